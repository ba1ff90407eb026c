"""Lightning callbacks and plugins: retrieval validation on the dev split during training; stopping on a
non-finite loss or gradient; atomic checkpoint files read without running code."""
from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from retrieval_lab.data.beir import BeirSplit
from retrieval_lab.errors import UserError
from retrieval_lab.files import atomic_write, load_checkpoint
from retrieval_lab.retrieval.evaluation import retrieve_split
from retrieval_lab.retrieval.metrics import evaluate_run


def sample_corpus(split: BeirSplit, sample: int | None, seed: int) -> dict:
    """The corpus to search: everything, or ``sample`` random documents plus every judged document of the split's
    queries (a cheaper, easier stand-in for the full corpus, for validation and for reduced CPU sweeps)."""
    if not sample or sample >= len(split.corpus):
        return split.corpus
    judged = {d for docs in split.qrels.values() for d in docs}
    others = sorted(set(split.corpus) - judged)
    keep = judged | set(random.Random(seed).sample(others, max(0, sample - len(judged))))
    return {d: split.corpus[d] for d in split.corpus if d in keep}


class RetrievalValidation(L.Callback):
    """Every ``every_n_epochs`` epochs (and, with ``every_n_steps``, also every that many optimiser steps), retrieve
    for the dev queries and log ``val/<metric>``."""

    def __init__(self, dev: BeirSplit, corpus_sample: int | None = None, every_n_epochs: int = 1,
                 batch_size: int = 128, k: int = 100, metrics=("ndcg@10", "recall@100", "mrr@10"), seed: int = 0,
                 every_n_steps: int | None = None, index: str | None = None, ignore_identical_ids: bool = True,
                 index_settings: dict | None = None):
        self.dev = BeirSplit(sample_corpus(dev, corpus_sample, seed), dev.queries, dev.qrels)
        self.index, self.index_settings = index, index_settings
        self.every_n_epochs, self.batch_size, self.k, self.metrics = every_n_epochs, batch_size, k, tuple(metrics)
        self.every_n_steps, self.ignore_identical_ids = every_n_steps, ignore_identical_ids

    def validate(self, pl_module: L.LightningModule) -> dict:
        retriever = pl_module.retriever(self.batch_size, self.index, progress=False, shard=True,  # DDP: corpus shared out
                                        index_settings=self.index_settings)
        run = retrieve_split(retriever, self.dev, self.k, self.ignore_identical_ids)
        return {f"val/{name}": value for name, value in evaluate_run(self.dev.qrels, run, self.metrics).items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            scores = self.validate(pl_module)
            if trainer.is_global_zero:  # straight to the loggers: self.log would repeat the value at later steps
                for logger in trainer.loggers:  # step index of the batch just done, as Lightning's own rows
                    logger.log_metrics(scores, step=trainer.global_step - 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stepped = self.every_n_steps and trainer.global_step % self.every_n_steps == 0  # validated at this step
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 and not stepped:
            pl_module.log_dict(self.validate(pl_module), rank_zero_only=True)


class NumericFault(UserError):
    """Training met a non-finite loss or gradient."""


class NumericGuard(L.Callback):
    """Stop at the first non-finite loss or gradient instead of training on NaN, after saving the state the step
    started from (no update has been applied yet) as ``<checkpoint_dir>/last-good.ckpt``. Under fp16 mixed
    precision, non-finite gradients are the GradScaler's business (it skips the step and lowers the scale)."""

    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir, self.qids = Path(checkpoint_dir), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.qids = list(batch.get("qids", [])) if isinstance(batch, dict) else []

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        bad = not torch.isfinite(loss).all()
        # under DDP every process stops, not only the one that saw it (the others would wait in the gradient
        # all-reduce); the gradients are all-reduced, so a non-finite one is seen everywhere without this
        if (trainer.strategy.reduce_boolean_decision(bad, all=False) if trainer.world_size > 1 else bad):
            # under gradient caching the backward's stand-in (embeddings x cached gradients) also carries the
            # gradient of the loss with respect to the embeddings
            what = "the loss" if pl_module.automatic_optimization else "the loss (or its gradient: gradient caching)"
            self.fail(trainer, f"{what} is {loss.detach().float().item()}" if bad else
                      f"{what} is not finite in another process")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if str(trainer.precision) == "16-mixed":
            return
        named = [(name, p.grad) for name, p in pl_module.named_parameters() if p.grad is not None]
        if not named or torch.stack([torch.isfinite(g).all() for _, g in named]).all():  # one sync, not one per tensor
            return
        name = next(name for name, g in named if not torch.isfinite(g).all())
        self.fail(trainer, f"the gradient of {name} is not finite")

    def fail(self, trainer, what: str) -> None:
        path = self.checkpoint_dir / "last-good.ckpt"
        trainer.save_checkpoint(path)
        ids = ", ".join(self.qids[:8]) + (f" and {len(self.qids) - 8} more" if len(self.qids) > 8 else "")
        raise NumericFault(f"step {trainer.global_step}: {what} on the batch of queries {ids or '(unknown)'}; "
                           f"training stopped, and the last good state (before this step) is in {path}.")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their final name and renamed (:func:`retrieval_lab.files.atomic_write`: a crash or
    a full disk leaves the previous one intact and no temporary file), and read without running code
    (:func:`retrieval_lab.files.load_checkpoint`)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path, "resume")


class ExactResume(L.Callback):
    """What a mid-epoch resume needs beyond Lightning's checkpoint (model, optimiser, scheduler, step, MoCo
    buffers): the Python, NumPy and torch random states, restored just before the first batch after resuming
    (so dropout draws what the uninterrupted run drew). The data module puts its sampler past the batches already
    trained on (``RetrievalDataModule.resume_position``). Assumes one optimiser step per batch."""

    def __init__(self, settings: dict | None = None):
        self._pending = None
        self._step_start = None  # the random states as the current step began (None between steps)
        self.settings = settings  # the run's settings, written into every checkpoint (see train.check_resumable)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.settings is not None:
            checkpoint["retrieval_lab_settings"] = self.settings
        if self._step_start is not None:
            # written inside a step (NumericGuard's last-good.ckpt): the checkpoint says that step never began, as
            # its weights do. Else Lightning would resume counting the failed batch as done: its logged steps
            # would run one ahead of an uninterrupted run's
            progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
            for counts in (progress["total"], progress["current"]):
                counts["ready"] = counts["started"] = counts["processed"] = counts["completed"]
        self.mark_a_cut_epoch_unfinished(trainer, checkpoint)

    @staticmethod
    def mark_a_cut_epoch_unfinished(trainer, checkpoint: dict) -> None:
        """A run that reaches trainer.max_steps inside an epoch ends that epoch, and the checkpoints written then
        (last.ckpt, epoch<N>.ckpt) count it as processed: continuing the run with a larger max_steps, Lightning
        would start the next epoch (its order, with the rest of this one skipped). Such a checkpoint is written as a
        mid-epoch one (as a step checkpoint is), so the continued run trains the batches an uninterrupted run
        would."""
        datamodule = getattr(trainer, "datamodule", None)
        batches = datamodule.batches_per_epoch() if hasattr(datamodule, "batches_per_epoch") else None
        epochs = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
        if not batches or epochs is None or trainer.global_step % batches == 0:
            return  # the epoch's batches are all trained: it did end
        for counts in (epochs["total"], epochs["current"]):  # started, not yet processed (nor completed)
            counts["ready"] = counts["started"] = max(counts["started"], 1)
            counts["processed"] = counts["completed"] = counts["started"] - 1
        checkpoint["epoch"] = epochs["current"]["completed"]

    def state_dict(self) -> dict:
        # inside a step, the states it began with: resuming replays it with the same dropout
        return self._step_start if self._step_start is not None else self.random_states()

    @staticmethod
    def random_states() -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # plain types: checkpoints load weights_only
        state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            state, self._pending = self._pending, None
            random.setstate(state["python"])
            kind, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
        self._step_start = self.random_states()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step_start = None  # runs before the checkpoint callbacks' (Lightning puts those last)


def build_callbacks(cfg, run_dir: Path, dataset, dev_qrels, logging: bool = True, strategy_callbacks=()) -> list:
    """The callbacks of a training run: checkpoints, the numeric guard, exact resume, the LR monitor (with a
    logger), the negative strategy's (ANCE's refresh), and validation on the dev queries."""
    from retrieval_lab.run_folder import run_settings

    every = cfg.checkpoint.every_n_steps
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(  # the newest `keep` step checkpoints, plus last.ckpt
                     dirpath=run_dir / "checkpoints", filename="step{step}", auto_insert_metric_name=False,
                     monitor="step", mode="max", save_top_k=cfg.checkpoint.keep, save_last=True,
                     every_n_train_steps=every or None, enable_version_counter=False),
                 NumericGuard(run_dir / "checkpoints"), ExactResume(run_settings(cfg))]
    if every:  # Lightning's step trigger turns epoch ends off: a second callback writes epoch<N>.ckpt (the newest
        # only) and last.ckpt at every epoch end, so a crash loses at most an epoch even when steps are rarer. No
        # version counter: both write the one last.ckpt (else the second one finding it writes last-v1.ckpt)
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="epoch{epoch}",
                                                             auto_insert_metric_name=False, save_top_k=1,
                                                             save_last=True, every_n_epochs=1,
                                                             enable_version_counter=False))
    if logging:  # the LR monitor needs a logger
        callbacks.append(L.pytorch.callbacks.LearningRateMonitor())
    callbacks.extend(strategy_callbacks)
    if cfg.validation.enabled:
        callbacks.append(RetrievalValidation(dataset.subset(dev_qrels), cfg.validation.corpus_sample,
                                             cfg.validation.every_n_epochs, cfg.eval.batch_size,
                                             seed=cfg.data.split_seed, every_n_steps=cfg.validation.get("every_n_steps"),
                                             index=cfg.eval.index, index_settings=cfg.eval.get("index_settings"),
                                             ignore_identical_ids=cfg.eval.ignore_identical_ids))
    return callbacks
