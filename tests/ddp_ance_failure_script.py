"""Run by tests/test_ddp.py: ANCE under DDP on 2 CPU processes (gloo), where process 1 runs out of memory in the
first refresh: while encoding its share of the corpus (``encode``), or while setting up its retriever, before
the first collective (``setup``). Each process saves the error that stopped its training and the step it
stopped at."""
import sys
import time

import lightning as L
import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.negatives import read_negatives
from retrieval_lab.data.pairs import SupervisedPairs
from retrieval_lab.mining import ance
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.mining.ance import AnceRefresh
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.encoder import Encoder
from retrieval_lab.retrieval import dense

model_dir, data_dir, negatives_file, out_dir, where = sys.argv[1:6]
encode_texts = dense.encode_texts


def failing_on_process_1(encoder, texts, side, *args, **kwargs):
    if side == "doc" and torch.distributed.get_rank() == 1:
        raise MemoryError("CUDA out of memory while encoding the corpus")
    return encode_texts(encoder, texts, side, *args, **kwargs)


class FailingToSetUp(dense.DenseRetriever):
    def __init__(self, *args, **kwargs):
        if torch.distributed.get_rank() == 1:
            raise MemoryError("CUDA out of memory while setting up the retriever")
        super().__init__(*args, **kwargs)


if where == "encode":
    dense.encode_texts = failing_on_process_1
else:
    ance.DenseRetriever = FailingToSetUp


class Slow(L.Callback):  # steps of 0.1 s at least: training would go on for 20 s if the failure went unnoticed
    def on_train_batch_end(self, *args):
        time.sleep(0.1)


L.seed_everything(0)
encoder = Encoder(model_dir, query_max_length=16, doc_max_length=32)
dataset = BeirDataset(data_dir)
qrels = dataset.qrels("train")
pairs = SupervisedPairs(dataset, qrels, group_size=2, negatives=read_negatives(negatives_file, dataset, qrels))
trainer = L.Trainer(max_steps=200, accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False,
                    logger=False,
                    callbacks=[AnceRefresh(pairs, every_n_steps=2, depth=20, n_neg=3, batch_size=16), Slow()],
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
start = time.perf_counter()
try:
    trainer.fit(BiEncoderModule(encoder, InfoNCELoss(0.05), group_size=2),
                datamodule=RetrievalDataModule(pairs, GroupCollator(encoder.tokenizer, 16, 32), batch_size=4))
    error = None
except RuntimeError as err:
    error = f"{err} | caused by {type(err.__cause__).__name__}: {err.__cause__}"
torch.save({"error": error, "step": trainer.global_step, "seconds": time.perf_counter() - start},
           f"{out_dir}/rank{trainer.global_rank}.pt")
