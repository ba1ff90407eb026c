"""Run by tests/test_ddp.py: three bi-encoder steps on 2 CPU processes (gloo) with gathered negatives; each rank
saves, for each step, the weights it starts from, its examples, its loss and its (DDP-averaged) gradients. Arguments: ... chunk (0: no gradient caching),
towers (shared | separate), family (encoder | colbert)."""
import sys

import lightning as L
import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.negatives import read_negatives
from retrieval_lab.data.pairs import SupervisedPairs
from retrieval_lab.losses.samtone import SamToNeLoss
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.colbert import ColBERT
from retrieval_lab.models.encoder import Encoder

model_dir, data_dir, negatives_file, out_dir, chunk, towers, family = sys.argv[1:8]


class Recording(BiEncoderModule):
    steps = []  # per step: the weights it starts from, its examples, its loss and its (DDP-averaged) gradients

    def training_step(self, batch, batch_idx):
        weights = {n: p.detach().clone() for n, p in self.named_parameters()}
        self.steps.append({"weights": weights, "qids": batch["qids"], "doc_ids": batch["doc_ids"]})
        loss = super().training_step(batch, batch_idx)
        self.steps[-1]["loss"] = float(loss)
        return loss

    def on_before_optimizer_step(self, optimizer):  # the gradients the optimiser steps with
        self.steps[-1]["grads"] = {n: p.grad.detach().clone() for n, p in self.named_parameters()
                                   if p.grad is not None}


L.seed_everything(0)
encoder = {"encoder": Encoder, "colbert": ColBERT}[family](model_dir, query_max_length=16, doc_max_length=32,
                                                           shared_towers=towers == "shared")
for m in encoder.modules():
    if isinstance(m, torch.nn.Dropout):
        m.p = 0.0  # the single-process reference draws no dropout either
dataset = BeirDataset(data_dir)
qrels = dataset.qrels("train")
pairs = SupervisedPairs(dataset, qrels, group_size=2, negatives=read_negatives(negatives_file, dataset, qrels))
module = Recording(encoder, SamToNeLoss(0.1, side="both", bidirectional=True), group_size=2,
                   grad_cache_chunk=int(chunk) or None)
data = RetrievalDataModule(pairs, GroupCollator(encoder.tokenizer, 16, 32), batch_size=3)
trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False,
                    logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, datamodule=data)
torch.save(module.steps, f"{out_dir}/rank{trainer.global_rank}.pt")
