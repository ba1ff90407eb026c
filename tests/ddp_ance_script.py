"""Run by tests/test_ddp.py: ANCE under DDP on 2 CPU processes (gloo). Rank 1 finishes each refresh 1.5 s after
rank 0; each rank saves its refreshes (the snapshot's weights, the table, when it was mined and swapped in) and
how many documents it encoded for them."""
import sys
import time

import lightning as L
import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.negatives import read_negatives
from retrieval_lab.data.pairs import SupervisedPairs
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.mining.ance import AnceRefresh
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.encoder import Encoder
from retrieval_lab.retrieval import dense

model_dir, data_dir, negatives_file, out_dir = sys.argv[1:5]
docs_encoded, encode_texts = [], dense.encode_texts


def counting(encoder, texts, side, *args, **kwargs):
    docs_encoded.extend([len(texts)] if side == "doc" else [])
    return encode_texts(encoder, texts, side, *args, **kwargs)


dense.encode_texts = counting


class Recording(AnceRefresh):
    built = []

    def build_table(self, encoder):
        table = super().build_table(encoder)
        self.built.append({"weights": {k: v.clone() for k, v in encoder.state_dict().items()}, "table": table})
        if self.group is not None and torch.distributed.get_rank(self.group) == 1:
            time.sleep(1.5)  # this process finishes later: the swap must wait for it
        return table


L.seed_everything(0)
encoder = Encoder(model_dir, query_max_length=16, doc_max_length=32)
dataset = BeirDataset(data_dir)
qrels = dataset.qrels("train")
pairs = SupervisedPairs(dataset, qrels, group_size=2, negatives=read_negatives(negatives_file, dataset, qrels))


class Slow(L.Callback):  # steps of 0.1 s at least, so that refreshes finish during training
    def on_train_batch_end(self, *args):
        time.sleep(0.1)


refresh = Recording(pairs, every_n_steps=2, depth=20, n_neg=3, batch_size=16)
trainer = L.Trainer(max_steps=40, accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False,
                    logger=False,
                    callbacks=[refresh, Slow()],
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(BiEncoderModule(encoder, InfoNCELoss(0.05), group_size=2),
            datamodule=RetrievalDataModule(pairs, GroupCollator(encoder.tokenizer, 16, 32), batch_size=4))
torch.save({"history": refresh.history, "built": refresh.built, "docs_encoded": docs_encoded,
            "corpus": len(dataset.corpus)}, f"{out_dir}/rank{trainer.global_rank}.pt")
