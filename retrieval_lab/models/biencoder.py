"""The bi-encoder LightningModule: encode queries and document groups, score, apply the configured loss."""
from __future__ import annotations

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from retrieval_lab.retrieval.dense import DenseRetriever


def linear_warmup_decay(warmup_steps: int, total_steps: int):
    """Learning-rate factor: 0 -> 1 linearly over ``warmup_steps``, then 1 -> 0 linearly until ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


class BiEncoderModule(L.LightningModule):
    def __init__(self, encoder, loss, group_size: int = 1, lr: float = 2e-5, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.1):
        super().__init__()
        self.encoder, self.loss = encoder, loss
        self.group_size, self.lr, self.weight_decay, self.warmup_ratio = group_size, lr, weight_decay, warmup_ratio
        self.save_hyperparameters(ignore=["encoder", "loss", "cross_encoder"])

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.encode_queries(batch["query"]), self.encoder.encode_docs(batch["docs"])

    # what the DataModule puts in each batch: the towers' query/doc inputs; (tokenizer, max length) of a
    # cross-encoder for [CLS] q [SEP] d [SEP] inputs (None: none)
    uses_towers = True
    pair_tokenizer = None

    def retriever(self, batch_size: int = 128, index: str = "flat", device: str | None = None, progress: bool = True):
        """What validation and the test evaluation retrieve with: a faiss index of this encoder's embeddings."""
        return DenseRetriever(self.encoder, batch_size, index, device, progress)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        q, d = self(batch)
        teacher = {"teacher": batch["teacher"]} if "teacher" in batch else {}
        loss = self.loss(q, d, group_size=self.group_size, mask=batch.get("mask"), **teacher)
        self.log("train/loss", loss, prog_bar=True, batch_size=q.size(0))
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 else decay).append(param)  # biases and LayerNorm weights
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = LambdaLR(optimizer, linear_warmup_decay(int(total * self.warmup_ratio), total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
