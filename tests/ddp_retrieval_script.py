"""Run by tests/test_ddp.py: dense retrieval with the corpus shared out over 2 CPU processes (gloo), as validation
does under DDP, with the family named (encoder | colbert); each rank saves its run."""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def work(rank: int, model_dir: str, data_dir: str, out_dir: str, port: str, family: str) -> None:
    from retrieval_lab.data.beir import BeirDataset
    from retrieval_lab.models.colbert import ColBERT
    from retrieval_lab.models.encoder import Encoder
    from retrieval_lab.retrieval import dense

    encoded, encode_texts = [], dense.encode_texts

    def counting(encoder, texts, side, *args, **kwargs):  # how many documents this process encodes
        encoded.extend([len(texts)] if side == "doc" else [])
        return encode_texts(encoder, texts, side, *args, **kwargs)

    dense.encode_texts = counting

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    split = BeirDataset(data_dir).split("test")
    corpus = dict(list(split.corpus.items())[:59])  # an odd number of documents: the shares differ in size
    torch.manual_seed(0)  # ColBERT's projection starts at random: the same one in every process
    model = Encoder(model_dir) if family == "encoder" else ColBERT(model_dir, doc_max_length=32)
    retriever = dense.DenseRetriever(model, batch_size=8, progress=False, shard=True)
    run = retriever.retrieve(corpus, split.queries, 10)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"run": run, "docs_encoded": encoded}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(work, args=tuple(sys.argv[1:6]), nprocs=2)
