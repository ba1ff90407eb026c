"""MoCo: a momentum key encoder and a FIFO queue of past keys as extra negatives.

He et al. (2020), "Momentum Contrast for Unsupervised Visual Representation Learning"; for retrieval,
Izacard et al. (2021), "Unsupervised Dense Information Retrieval with Contrastive Learning" (Contriever).

Queries go through the trained encoder; documents (keys) through a copy of it that follows the encoder as an
exponential moving average, theta_k <- m * theta_k + (1 - m) * theta_q (after each optimiser step, as in MoCo's
pseudo-code), and gets no gradient. After each step the positive keys of the batch (gathered from every process
under DDP) replace the oldest queue entries. The loss sees the queue as extra document columns. The queue and the
key encoder are module state, so Lightning checkpoints save and restore them.

Next to each key the queue keeps its document's identity (``queue_ids``: ``GroupCollator.doc_key`` of its doc id,
-1 when unknown), and ``queue_mask`` (B x K) masks, for query i, every queue entry that holds one of query i's
judged positives (``batch["positive_keys"]``), as ``mask`` masks such in-batch columns. Without it, once a
supervised positive (or, with cropping/ICT pairs, the query's own source document) has been enqueued, an older
key of it comes back as a near-identical negative of the same query and cancels the positive's gradient. A
checkpoint written before ``queue_ids`` existed loads with every entry unknown: masked for no query, as before.
"""
from __future__ import annotations

import copy

import torch

from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.grad_cache import embed_in_chunks


class MoCoModule(BiEncoderModule):
    gather_negatives = False
    provides = frozenset({"queue"})
    families = frozenset({"vector"})  # the queue holds one key vector per document

    def __init__(self, encoder, loss, queue_size: int = 65536, momentum: float = 0.999, **kwargs):
        super().__init__(encoder, loss, **kwargs)
        self.momentum = momentum
        self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.register_buffer("queue", torch.zeros(queue_size, encoder.dim))
        self.register_buffer("queue_ids", torch.full((queue_size,), -1, dtype=torch.long))  # -1: matches nothing
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))  # filled slots
        self._new_keys: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (keys, doc ids) to enqueue

    def setup(self, stage: str) -> None:
        """Under DDP the queue is the same on every process (each enqueues every process's keys, in rank order), so
        DDP need not broadcast process 0's buffers before every forward (at 65,536 x 768 floats, 192 MiB a step).
        Lightning calls this before it wraps the module."""
        from lightning.pytorch.strategies import DDPStrategy

        if isinstance(self.trainer.strategy, DDPStrategy):
            self.trainer.strategy._ddp_kwargs.setdefault("broadcast_buffers", False)

    @torch.no_grad()
    def momentum_update(self) -> None:
        for key_param, param in zip(self.key_encoder.parameters(), self.encoder.parameters()):
            key_param.mul_(self.momentum).add_(param.detach(), alpha=1 - self.momentum)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before queue_ids: its keys are of unknown documents, masked for no query
        if prefix + "queue" in state_dict and prefix + "queue_ids" not in state_dict:
            state_dict[prefix + "queue_ids"] = torch.full_like(self.queue_ids, -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write ``keys`` and their documents' ``ids`` (None: unknown) at the pointer, wrapping around; the oldest
        entries are overwritten first."""
        size = self.queue.size(0)
        ids = torch.full((keys.size(0),), -1) if ids is None else ids
        keys, ids = keys[-size:].to(self.queue.dtype), ids[-size:]
        slots = (self.queue_ptr + torch.arange(keys.size(0), device=keys.device)) % size
        self.queue[slots] = keys
        self.queue_ids[slots] = ids.to(self.queue_ids)
        self.queue_ptr.copy_((self.queue_ptr + keys.size(0)) % size)
        self.queue_len.copy_(torch.clamp(self.queue_len + keys.size(0), max=size))

    def current_queue(self) -> torch.Tensor:
        # slots fill from 0 upwards, so the filled ones come first; no copy needed: the enqueue follows the backward
        return self.queue[: int(self.queue_len)]

    def queue_mask(self, batch: dict) -> torch.Tensor | None:
        """B x K, True where queue entry k holds a judged positive of query i (None without ``positive_keys``)."""
        positives = batch.get("positive_keys")
        if positives is None:
            return None
        ids = self.queue_ids[: int(self.queue_len)]
        mask = torch.zeros(positives.size(0), ids.size(0), dtype=torch.bool, device=ids.device)
        for column in positives.T.to(ids.device):  # one judged positive per query at a time (-1: padding)
            mask |= (column[:, None] == ids) & (column[:, None] >= 0)
        return mask

    def towers(self, batch: dict) -> list[tuple]:
        return [(self.encoder.encode_queries, batch["query"])]  # keys come from the key encoder, without gradient

    def loss_from_embeddings(self, embeddings: list[torch.Tensor], batch: dict) -> torch.Tensor:
        (q,) = embeddings
        with torch.no_grad():
            self.key_encoder.train(self.encoder.training)
            # under gradient caching, the keys in chunks too: the whole batch at once may not fit in memory
            keys = embed_in_chunks(self.key_encoder.encode_docs, batch["docs"], self.grad_cache_chunk)
        # the positives' keys and their documents' ids, enqueued at the end of the step
        doc_keys = batch.get("doc_keys")
        self._new_keys = keys[:: self.group_size], None if doc_keys is None else doc_keys[:: self.group_size]
        return self.loss(self.encoder.score_blocks(q, keys, self.group_size, self.loss.blocks, mask=batch.get("mask"),
                                                   queue=self.current_queue(), queue_mask=self.queue_mask(batch)))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.log("train/queue_len", self.queue_len.float(), batch_size=len(batch["qids"]))
        loss = super().training_step(batch, batch_idx)
        if not self.automatic_optimization:  # gradient caching took the optimiser step in training_step
            self.after_step()
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_step()

    def after_step(self) -> None:
        """After the optimiser step, as in MoCo's algorithm: the key encoder follows the updated encoder, and the
        batch's keys join the queue. A step stopped before its update (a non-finite loss or gradient) changes
        neither, so NumericGuard's last-good checkpoint holds the state the step started from; a checkpoint
        written at the end of a step holds both."""
        self.momentum_update()
        keys, ids = self._new_keys
        if self._world() > 1:  # every process's, in rank order
            keys = self.all_gather(keys).flatten(0, 1)
            ids = None if ids is None else self.all_gather(ids).flatten(0, 1)
        self.enqueue(keys, ids)
