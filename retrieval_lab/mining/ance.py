"""ANCE: hard negatives re-mined from an ANN index of the model being trained, refreshed during training.

Xiong et al. (2021), "Approximate Nearest Neighbor Negative Contrastive Learning for Dense Text Retrieval".

Every ``every_n_steps`` optimiser steps the callback snapshots the encoder's weights and hands them to a
background thread, which encodes the corpus and the training queries with that snapshot, searches an index
(the model family's, ``eval.index`` and ``eval.index_settings``: for one vector per text faiss flat by
default, or torch), drops the judged positives and builds a complete new
negatives table. Training goes on meanwhile; the finished table replaces the old one in a single reference
assignment (``train_set.negatives = table``), so a training step sees either the old table or the new one, never
a half-written one. A refresh that fails (out of memory, say) stops training at the next step with its error.
Training starts from the negatives file (BM25). With ``num_workers > 0`` worker processes hold a copy of the data
set and see the new table from the next epoch on.

Under DDP the refresh is shared out: each process encodes its share of the corpus and of the queries, the
document embeddings and the mined tables are all-gathered over a gloo group of the refresh's own (training keeps
the default one), and every process swaps the new table in at the same step, once all of them have it. Where one
process's refresh fails, the others learn it at the next all-gather, and every process stops at the same step (its
error names the failed process and its error), instead of waiting in that all-gather until gloo's timeout.
"""
from __future__ import annotations

import copy
import threading
import time
import warnings

import lightning as L
import torch.distributed as dist

from retrieval_lab.errors import warn
from retrieval_lab.mining.negatives import mine_negatives
from retrieval_lab.distributed import distributed_rank_world, fail_together
from retrieval_lab.retrieval.dense import DenseRetriever


class AnceRefresh(L.Callback):
    def __init__(self, train_set, every_n_steps: int = 100, depth: int = 100, n_neg: int = 30, skip_top: int = 0,
                 batch_size: int = 128, background: bool = True, index: str | None = None,
                 index_settings: dict | None = None):
        self.train_set, self.every_n_steps, self.depth, self.n_neg = train_set, every_n_steps, depth, n_neg
        self.skip_top, self.batch_size, self.background, self.index = skip_top, batch_size, background, index
        self.index_settings = index_settings
        self._thread: threading.Thread | None = None
        self._ready: dict | None = None  # the finished table and its statistics, waiting to be swapped in
        self._in_flight = False  # a refresh started and not swapped in yet (the same on every process)
        self._lock = threading.Lock()
        self.group = None  # under DDP: the refresh's own process group
        self.history: list[dict] = []

    # -- the work of one refresh (runs in the background thread) --
    def build_table(self, encoder) -> dict[str, list[str]]:
        rank, world = distributed_rank_world(self.group) if self.group is not None else (0, 1)
        qids = self.train_set.qids[rank::world]
        queries = {q: self.train_set.dataset.queries[q] for q in qids}
        # no process left waiting in a collective for a failed one: each block between collectives fails together
        with fail_together(self.group, world > 1):
            retriever = DenseRetriever(encoder, self.batch_size, self.index, progress=False, shard=world > 1,
                                       group=self.group, index_settings=self.index_settings)
        run = retriever.retrieve(self.train_set.dataset.corpus, queries, self.depth)  # raises on every process
        with fail_together(self.group, world > 1):
            mined = mine_negatives(run, {q: {d: 1 for d in self.train_set.judged[q]} for q in qids}, self.n_neg,
                                   self.skip_top)
            table = {q: mined[q].neg if q in mined else [] for q in qids}
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, table, group=self.group)
            table = {q: negatives for part in parts for q, negatives in part.items()}
        return {q: table[q] for q in self.train_set.qids}

    def _refresh(self, encoder, step: int) -> None:
        start = time.perf_counter()
        try:
            ready = {"table": self.build_table(encoder), "step": step}
        except Exception as err:  # noqa: BLE001 - raised in the training loop by swap_if_ready
            ready = {"error": err, "step": step}
        with self._lock:
            self._ready = dict(ready, seconds=time.perf_counter() - start)

    # -- Lightning hooks (main thread) --
    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.world_size > 1 and dist.is_initialized() and self.group is None:
            self.group = dist.new_group(backend="gloo")  # every process creates it, in the same order

    def on_train_start(self, trainer, pl_module) -> None:
        total = pl_module.total_steps() if hasattr(pl_module, "total_steps") else None
        if trainer.is_global_zero and total is not None and trainer.global_step < total <= self.every_n_steps:
            warn(f"ANCE: the run has {total} steps and its first refresh begins after step {self.every_n_steps}, so "
                 f"it trains on the starting negatives only (set negatives.refresh.every_n_steps below {total} to "
                 f"refresh).")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.swap_if_ready(trainer, pl_module)
        step = trainer.global_step
        if step % self.every_n_steps or self._in_flight:
            return
        self._in_flight = True
        encoder = pl_module.encoder  # weights as of this step; the tokenizer shared, so the token cache hits
        snapshot = copy.deepcopy(encoder, memo={id(encoder.tokenizer): encoder.tokenizer}).eval().requires_grad_(False)
        if self.background:
            self._thread = threading.Thread(target=self._refresh, args=(snapshot, step), daemon=True)
            self._thread.start()
        else:
            self._refresh(snapshot, step)
            self.swap_if_ready(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._thread is not None:
            self._thread.join()
        error = (self._ready or {}).get("error")
        if error is not None:  # the last refresh, whose table training would not have used anyway
            warnings.warn(f"the ANCE refresh begun at step {self._ready['step']} failed after training ended: "
                          f"{type(error).__name__}: {error}")
        elif not self.history and trainer.is_global_zero:
            print(f"ANCE: no refresh was swapped in during the run's {trainer.global_step} steps; it trained on the "
                  f"starting negatives only.")

    # -- checkpoints: a resumed run trains on the table that was in use; a refresh still running is lost, and
    # the next one begins at the next multiple of every_n_steps --
    def state_dict(self) -> dict:
        return {"negatives": self.train_set.negatives, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_set.negatives = dict(state_dict["negatives"])
        self.history = list(state_dict["history"])

    def swap_if_ready(self, trainer, pl_module) -> None:
        """Swap the finished table in; under DDP only once every process has finished, all at the same step."""
        if not self._in_flight:
            return
        with self._lock:
            finished = self._ready is not None
        if trainer.world_size > 1:
            finished = trainer.strategy.reduce_boolean_decision(finished, all=True)
        if not finished:
            return
        with self._lock:
            ready, self._ready = self._ready, None
        self._in_flight = False
        if "error" in ready:  # stop training rather than go on with negatives that are never refreshed again
            err = ready["error"]
            raise RuntimeError(f"the ANCE refresh begun at step {ready['step']} failed after {ready['seconds']:.1f} s: "
                               f"{type(err).__name__}: {err}") from err
        old = self.train_set.negatives
        changed = sum(len(set(ready["table"][q]) - set(old.get(q, []))) for q in ready["table"])
        total = sum(len(v) for v in ready["table"].values())
        self.train_set.negatives = ready["table"]  # the swap: one reference assignment
        stats = {"ance/refresh_seconds": ready["seconds"], "ance/changed_fraction": changed / max(1, total),
                 "ance/mined_at_step": float(ready["step"]), "ance/swapped_at_step": float(trainer.global_step)}
        self.history.append(stats)
        pl_module.log_dict(stats, rank_zero_only=True)
        if trainer.is_global_zero:
            print(f"ANCE refresh from step {ready['step']}: {ready['seconds']:.1f} s, "
                  f"{changed / max(1, total):.1%} of negatives changed")
