"""Run by tests/test_ddp.py: one bi-encoder step on 2 CPU processes (gloo) with gathered negatives; each rank
saves its examples, its loss and its (DDP-averaged) gradients."""
import sys

import lightning as L
import torch

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.negatives import read_negatives
from retrieval_lab.data.pairs import SupervisedPairs
from retrieval_lab.losses.samtone import SamToNeLoss
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.encoder import Encoder

model_dir, data_dir, negatives_file, out_dir, chunk = sys.argv[1:6]


class Recording(BiEncoderModule):
    def training_step(self, batch, batch_idx):
        self.examples_seen = batch["qids"], batch["doc_ids"]
        self.step_loss = super().training_step(batch, batch_idx)
        return self.step_loss

    def on_after_backward(self):  # after the (last) backward, before the optimiser step
        self.grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}


L.seed_everything(0)
encoder = Encoder(model_dir, query_max_length=16, doc_max_length=32)
for m in encoder.modules():
    if isinstance(m, torch.nn.Dropout):
        m.p = 0.0  # the single-process reference draws no dropout either
dataset = BeirDataset(data_dir)
qrels = dataset.qrels("train")
pairs = SupervisedPairs(dataset, qrels, group_size=2, negatives=read_negatives(negatives_file, dataset, qrels))
module = Recording(encoder, SamToNeLoss(0.1, side="both", bidirectional=True), group_size=2,
                   grad_cache_chunk=int(chunk) or None)
data = RetrievalDataModule(pairs, GroupCollator(encoder.tokenizer, 16, 32), batch_size=3)
trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(module, datamodule=data)
torch.save({"qids": module.examples_seen[0], "doc_ids": module.examples_seen[1], "loss": float(module.step_loss),
            "grads": module.grads}, f"{out_dir}/rank{trainer.global_rank}.pt")
