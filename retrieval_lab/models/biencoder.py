"""The training module of every family that encodes queries and documents apart: encode the batch's queries and
document groups, let the model family score the blocks the loss declares, apply the loss."""
from __future__ import annotations

from contextlib import nullcontext

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from retrieval_lab.data.datamodule import false_negatives
from retrieval_lab.distributed import average_gradients
from retrieval_lab.models import representation
from retrieval_lab.models.family import REPRESENTATIONS
from retrieval_lab.models.grad_cache import grad_cached_backward


def linear_warmup_decay(warmup_steps: int, total_steps: int):
    """Learning-rate factor: 0 -> 1 linearly over ``warmup_steps``, then 1 -> 0 linearly until ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


class BiEncoderModule(L.LightningModule):
    """``grad_cache_chunk`` (an int) trains with gradient caching (:mod:`grad_cache`): embeddings are computed
    that many rows at a time, so the batch size is not bounded by memory; the optimiser step is then taken here
    (manual optimisation), with ``gradient_clip_val`` applied by the module instead of the Trainer."""

    def __init__(self, encoder, loss, group_size: int = 1, lr: float = 2e-5, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.1, grad_cache_chunk: int | None = None,
                 gradient_clip_val: float | None = None):
        super().__init__()
        self.encoder, self.loss = encoder, loss
        self.group_size, self.lr, self.weight_decay, self.warmup_ratio = group_size, lr, weight_decay, warmup_ratio
        self.grad_cache_chunk, self.gradient_clip_val = grad_cache_chunk, gradient_clip_val
        self.automatic_optimization = not grad_cache_chunk
        self.save_hyperparameters(ignore=["encoder", "loss", "cross_encoder"])

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.encode_queries(batch["query"]), self.encoder.encode_docs(batch["docs"])

    # what the DataModule puts in each batch: the towers' query/doc inputs; (tokenizer, max length) of a
    # cross-encoder for [CLS] q [SEP] d [SEP] inputs (None: none)
    uses_towers = True
    pair_tokenizer = None
    # declarations read by config.check_train_config: what the module gives a loss beyond the data ("teacher":
    # RocketQA's ranker scores, "queue": MoCo's momentum keys); what it needs from the negative strategy
    # ("hard_negatives"); the losses it takes (loss_needs: what such a loss must need; takes_loss=False: the
    # objective is fixed); the doc_representation of the model families it trains; its module=... option name
    provides = frozenset()
    needs = frozenset()
    loss_needs = frozenset()
    takes_loss = True
    fixed_negatives = False  # True: trains on a negatives file's groups only (no re-mining, no clustering)
    families = REPRESENTATIONS - {"pairs"}  # bi-encoders: every family but the cross-encoder
    option = None

    def retriever(self, batch_size: int = 128, index: str | None = None, device: str | None = None,
                  progress: bool = True, shard: bool = False, index_settings: dict | None = None):
        """What validation and the test evaluation retrieve with: the model family's (``shard``: under DDP, each
        process encodes a share of the corpus)."""
        return self.encoder.retriever(batch_size, index, device, progress, shard=shard, index_settings=index_settings)

    # ---- a training step = towers (inputs that carry gradient, and how each is embedded) + a loss on them ----
    def towers(self, batch: dict) -> list[tuple]:
        return [(self.encoder.encode_queries, batch["query"]), (self.encoder.encode_docs, batch["docs"])]

    def loss_from_embeddings(self, embeddings: list, batch: dict) -> torch.Tensor:
        q, d = embeddings  # rows: see gather_batch
        return self.loss(self.encoder.score_blocks(q, d, self.group_size, self.loss.blocks, mask=batch.get("mask"),
                                                   rows=batch.get("rows"), teacher=batch.get("teacher")))

    # under DDP, every process scores against the batch of every process (MoCo's queue already holds every
    # process's keys; RocketQA and the cross-encoder compare a query with its own group only)
    gather_negatives = True

    def global_loss(self, embeddings: list, batch: dict) -> torch.Tensor:
        if self._world() > 1 and self.gather_negatives:
            embeddings, batch = self.gather_batch(embeddings, batch)
        return self.loss_from_embeddings(embeddings, batch)

    def gather_batch(self, embeddings: list, batch: dict) -> tuple[list, dict]:
        """Every process's embeddings, concatenated in rank order, with gradients flowing back to their owners,
        and the mask and teacher scores of the concatenated batch, with ``rows``: this process's queries in it.
        Each process takes the loss terms of its own queries against the whole batch (its rows of the score
        matrix, not all of them), and the mean of the processes' losses is the loss one process would take on the
        whole batch. Each process's gradient reaches every process's embeddings through the gather (summed at
        their owner), and DDP averages the parameter gradients over the processes: the gradient equals the
        single-process one."""
        import torch.distributed as dist

        gathered = [representation.gather(self, e) for e in embeddings]
        meta = [None] * self.trainer.world_size
        dist.all_gather_object(meta, (batch["qids"], batch["doc_ids"], batch["positives"]))
        qids, doc_ids, positives = ([x for m in meta for x in m[k]] for k in range(3))
        start = sum(len(m[0]) for m in meta[:self.trainer.global_rank])
        device = representation.values(gathered[0]).device
        rows = torch.arange(start, start + len(batch["qids"]), device=device)
        out = {**batch, "qids": qids, "doc_ids": doc_ids, "positives": positives, "rows": rows,
               "mask": false_negatives(doc_ids, positives, self.group_size).to(device)}
        if "teacher" in batch:
            out["teacher"] = self.all_gather(batch["teacher"]).flatten(0, 1)
        return gathered, out

    def backward_step(self, batch: dict) -> torch.Tensor:
        """Gradient-cached forward and backward of one batch (parameter gradients accumulate); the loss. Under DDP
        the backward of every chunk runs without DDP's gradient synchronisation (which expects every parameter in
        every backward: a query chunk leaves a separate document tower, or RocketQA's ranker, without gradient),
        and the accumulated gradients are then averaged over the processes once (:func:`average_gradients`)."""
        backward = self.manual_backward if self._trainer is not None else torch.Tensor.backward
        ddp = self._world() > 1
        with self.trainer.model.no_sync() if ddp and hasattr(self.trainer.model, "no_sync") else nullcontext():
            loss = grad_cached_backward(self.towers(batch), lambda emb: self.global_loss(emb, batch),
                                        self.grad_cache_chunk, backward)
        if ddp:
            average_gradients([p for p in self.parameters() if p.requires_grad])
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization:
            loss = self.global_loss([embed(inputs) for embed, inputs in self.towers(batch)], batch)
        else:
            optimizer, schedule = self.optimizers(), self.lr_schedulers()
            loss = self.backward_step(batch)
            optimizer.step()  # clips first (on_before_optimizer_step)
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
        # each process's loss is that of its own queries: the logged loss is their mean (under DDP)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["qids"]), sync_dist=self._world() > 1)
        return loss

    def _world(self) -> int:
        """The number of processes training together (1 outside a Trainer)."""
        return self.trainer.world_size if self._trainer is not None else 1

    def on_train_start(self) -> None:
        """A run shorter than ``trainer.log_every_n_steps`` would log no training loss at all: it logs at its last
        step then."""
        if self.trainer.log_every_n_steps > (total := self.total_steps()) > 0:
            self.trainer.log_every_n_steps = total

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradient caching clips here: Lightning calls this after unscaling the gradients of a 16-mixed loss scaler
        (clipping in ``training_step`` would clip gradients still multiplied by the loss scale)."""
        if not self.automatic_optimization and self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    def total_steps(self) -> int:
        """The run's optimiser steps, for the learning-rate schedule. Lightning's ``estimated_stepping_batches`` gives
        the same figure but builds the training loader to count its batches, before a resumed run's checkpoint is
        restored: its workers would start at the wrong place (see ``RetrievalDataModule.resume_position``)."""
        trainer, datamodule = self.trainer, getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "batches_per_epoch") or trainer.max_epochs == -1:
            return int(trainer.estimated_stepping_batches)
        total = datamodule.batches_per_epoch() * max(trainer.max_epochs, 1)
        return total if trainer.max_steps == -1 else min(total, trainer.max_steps)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 else decay).append(param)  # biases and LayerNorm weights
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = self.total_steps()
        schedule = LambdaLR(optimizer, linear_warmup_decay(int(total * self.warmup_ratio), total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
