"""MoCo: a momentum key encoder and a FIFO queue of past keys as extra negatives.

He et al. (2020), "Momentum Contrast for Unsupervised Visual Representation Learning"; for retrieval,
Izacard et al. (2021), "Unsupervised Dense Information Retrieval with Contrastive Learning" (Contriever).

Queries go through the trained encoder; documents (keys) through a copy of it that follows the encoder as an
exponential moving average, theta_k <- m * theta_k + (1 - m) * theta_q, and gets no gradient. After each step
the positive keys of the batch (gathered from every process under DDP) replace the oldest queue entries. The
loss sees the queue as extra document columns. The queue and the key encoder are module state, so Lightning
checkpoints save and restore them.
"""
from __future__ import annotations

import copy

import torch

from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.grad_cache import embed_in_chunks


class MoCoModule(BiEncoderModule):
    gather_negatives = False

    def __init__(self, encoder, loss, queue_size: int = 65536, momentum: float = 0.999, **kwargs):
        super().__init__(encoder, loss, **kwargs)
        self.momentum = momentum
        self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.register_buffer("queue", torch.zeros(queue_size, encoder.dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))  # filled slots
        self._new_keys: torch.Tensor | None = None

    @torch.no_grad()
    def momentum_update(self) -> None:
        for key_param, param in zip(self.key_encoder.parameters(), self.encoder.parameters()):
            key_param.mul_(self.momentum).add_(param.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` at the pointer, wrapping around; the oldest entries are overwritten first."""
        size = self.queue.size(0)
        keys = keys[-size:].to(self.queue.dtype)
        slots = (self.queue_ptr + torch.arange(keys.size(0), device=keys.device)) % size
        self.queue[slots] = keys
        self.queue_ptr.copy_((self.queue_ptr + keys.size(0)) % size)
        self.queue_len.copy_(torch.clamp(self.queue_len + keys.size(0), max=size))

    def current_queue(self) -> torch.Tensor:
        # slots fill from 0 upwards, so the filled ones come first; a copy, as the step enqueues before backward
        return self.queue[: int(self.queue_len)].clone()

    def towers(self, batch: dict) -> list[tuple]:
        return [(self.encoder.encode_queries, batch["query"])]  # keys come from the key encoder, without gradient

    def loss_from_embeddings(self, embeddings: list[torch.Tensor], batch: dict) -> torch.Tensor:
        (q,) = embeddings
        with torch.no_grad():
            self.key_encoder.train(self.encoder.training)
            # under gradient caching, the keys in chunks too: the whole batch at once may not fit in memory
            keys = embed_in_chunks(self.key_encoder.encode_docs, batch["docs"], self.grad_cache_chunk)
        self._new_keys = keys[:: self.group_size]  # the positives' keys, enqueued at the end of the step
        return self.loss(q, keys, group_size=self.group_size, mask=batch.get("mask"), queue=self.current_queue())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.momentum_update()
        loss = super().training_step(batch, batch_idx)
        # enqueue inside the step, so a checkpoint written at the end of it holds the updated queue
        keys = self._new_keys
        gathered = self.all_gather(keys) if self._trainer is not None and self.trainer.world_size > 1 else keys
        self.enqueue(gathered.reshape(-1, keys.size(-1)))
        self.log("train/queue_len", self.queue_len.float(), batch_size=len(batch["qids"]))
        return loss
