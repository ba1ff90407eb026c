"""Train a dense retriever: `python -m retrieval_lab.train loss=... negatives=... [key=value ...]`.

Evaluates on the test split before and after training (by default), saves the model, and writes
``metrics.json``, the run files, CSV and W&B logs into the run directory.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from retrieval_lab import config
from retrieval_lab.callbacks import AtomicCheckpointIO, ExactResume, NumericGuard, RetrievalValidation, sample_corpus
from retrieval_lab.data.beir import BeirDataset, BeirSplit, Qrels, carve_dev
from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule
from retrieval_lab.data.negatives import read_negatives
from retrieval_lab.data.sampling import tas_batch_sampler
from retrieval_lab.errors import ConfigError, UserError, exit_on_user_error
from retrieval_lab.files import atomic_save_folder
from retrieval_lab.mining.ance import AnceRefresh
from retrieval_lab.retrieval.evaluation import evaluate_retriever, print_table
from retrieval_lab.retrieval.runfile import read_json, write_json
from retrieval_lab.tokenization import TOKEN_CACHE, machine_cores
from retrieval_lab.run_folder import (check_resumable, csv_logger, is_first_process, resolved_config, resume_from,
                                      run_settings, set_aside_earlier_run)


def hydra_job() -> dict:
    """What Hydra knows of this job: the group choices (loss=..., negatives=...), and for a multirun job the sweep
    folder's name (its W&B group) and the overrides that name the job. Empty outside a Hydra app."""
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    job = {"choices": {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}}
    if hc.mode == RunMode.MULTIRUN:
        job.update(sweep=Path(hc.sweep.dir).name, overrides=hc.job.override_dirname)
    return job


def build_loggers(cfg: DictConfig, run_dir: Path, hparams: dict, resume_step: int | None = None) -> list:
    from lightning.pytorch.loggers import WandbLogger

    loggers = []
    if cfg.logger.csv:
        loggers.append(csv_logger(run_dir, resume_step))
    if cfg.logger.wandb.enabled and cfg.logger.wandb.mode != "disabled":
        wb, sweep = cfg.logger.wandb, hydra_job()
        import wandb

        loggers.append(WandbLogger(project=wb.project, entity=wb.entity, group=wb.group or sweep.get("sweep"),
                                   tags=list(wb.tags), save_dir=str(run_dir), offline=wb.mode == "offline",
                                   name=sweep.get("overrides") or run_dir.name,
                                   settings=wandb.Settings(quiet=True)))  # no run summary: the table follows
    for logger in loggers:
        logger.log_hyperparams(hparams)
    return loggers


def data_workers(cfg: DictConfig) -> int:
    """``num_workers``, where ``auto`` is 0 on a CPU and with ANCE (a worker would see a refresh only from the next
    epoch on), else up to 8 per GPU and never more than half the CPU cores this process may run on. On an H200 at
    batch 512 the data pipeline made 0.82x the pairs/s of the training step with 0 workers, so the two took turns at
    about 3,450 pairs/s; with 4 workers it made 1.27x, with 8, 2.88x."""
    if cfg.num_workers != "auto":
        if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
            raise ConfigError(f"num_workers must be auto or a whole number of 0 or more, got '{cfg.num_workers}'.")
        return cfg.num_workers
    on_cpu = cfg.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()
    if on_cpu or cfg.negatives.get("refresh"):
        return 0
    devices = cfg.trainer.get("devices")
    gpus = devices if isinstance(devices, int) and devices > 0 else torch.cuda.device_count()
    return max(1, min(8, machine_cores() // (2 * max(1, gpus))))


def build_data(cfg: DictConfig, dataset: BeirDataset, module) -> tuple[RetrievalDataModule, Qrels | None]:
    """The training set the config asks for (pairs + negatives), batched as ``module`` needs it; and the dev
    qrels for validation."""
    encoder = module.encoder
    carve = cfg.validation.enabled and not cfg.data.dev_split  # the dev queries come out of the training qrels
    labels = getattr(hydra.utils.get_class(cfg.pairs._target_), "needs_qrels", True) or cfg.negatives.get("file")
    train_qrels = dataset.qrels(cfg.data.train_split, reachable_only=True) if labels or carve else None
    dev_qrels = None
    extras = {}
    if cfg.negatives.get("file"):
        extras["negatives"] = read_negatives(cfg.negatives.file, dataset, train_qrels)
    if cfg.negatives.get("balanced_bins"):
        extras["balanced_bins"] = cfg.negatives.balanced_bins
    if module.loss is not None and "teacher" in module.loss.needs and "teacher" not in module.provides:
        extras["teacher"] = True
    if cfg.data.dev_split:
        dev_qrels = dataset.qrels(cfg.data.dev_split)
    elif carve:
        train_qrels, dev_qrels = carve_dev(train_qrels, cfg.data.dev_fraction, cfg.data.split_seed)
    train_set = instantiate(cfg.pairs)(dataset=dataset, qrels=train_qrels, group_size=cfg.negatives.group_size,
                                       seed=cfg.seed, **extras)
    if getattr(train_set, "skipped", 0):
        print(f"{train_set.skipped} training queries have no teacher score for a positive or for any negative in "
              f"{cfg.negatives.file}; training on the other {len(train_set)}.")
    batch_sampler = None
    if cfg.negatives.get("clusters"):
        batch_sampler = tas_batch_sampler(train_set, encoder, cfg.negatives.clusters, cfg.negatives.clusters_per_batch,
                                          cfg.batch_size, cfg.seed)
    towers = module.uses_towers
    collator = GroupCollator(encoder.tokenizer if towers else None, getattr(encoder, "query_max_length", None),
                             getattr(encoder, "doc_max_length", None), module.pair_tokenizer)
    datamodule = RetrievalDataModule(train_set, collator, cfg.batch_size, data_workers(cfg), cfg.seed, batch_sampler)
    return datamodule, dev_qrels


def build_callbacks(cfg: DictConfig, run_dir: Path, dataset: BeirDataset, train_set, dev_qrels,
                    logging: bool = True) -> list:
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
    if cfg.negatives.get("refresh"):
        callbacks.append(AnceRefresh(train_set, batch_size=cfg.eval.batch_size, index=cfg.eval.index,
                                     **cfg.negatives.refresh))
    if cfg.validation.enabled:
        callbacks.append(RetrievalValidation(dataset.subset(dev_qrels), cfg.validation.corpus_sample,
                                             cfg.validation.every_n_epochs, cfg.eval.batch_size,
                                             seed=cfg.data.split_seed, every_n_steps=cfg.validation.get("every_n_steps"),
                                             index=cfg.eval.index,
                                             ignore_identical_ids=cfg.eval.ignore_identical_ids))
    return callbacks


def train(cfg: DictConfig, run_dir: Path) -> dict:
    config.check_train_config(cfg)
    checkpoint = resume_from(cfg, run_dir)
    resume_step = check_resumable(checkpoint, cfg) if checkpoint else None
    L.seed_everything(cfg.seed, workers=True)
    TOKEN_CACHE.folder = cfg.eval.get("token_cache_dir")  # every corpus encoding of this run
    dataset = BeirDataset(cfg.data.path)
    test = dataset.split(cfg.eval.split)
    if cfg.eval.get("corpus_sample"):  # one fixed sample (seed 0) for every run, so runs stay comparable
        test = BeirSplit(sample_corpus(test, cfg.eval.corpus_sample, seed=0), test.queries, test.qrels)
    encoder = instantiate(cfg.model)
    module_cfg = cfg.module if cfg.get("module") else cfg.negatives.module  # conf/module/* replaces the default
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    chunk = trainer_cfg.pop("grad_cache_chunk", None)
    # gradient caching steps the optimiser in the module, which then also clips (the Trainer may not)
    grad_cache = {"grad_cache_chunk": chunk,
                  "gradient_clip_val": trainer_cfg.pop("gradient_clip_val", None)} if chunk else {}
    module = instantiate(module_cfg)(encoder=encoder, loss=instantiate(cfg.loss),
                                     group_size=cfg.negatives.group_size, **cfg.optim, **grad_cache)
    datamodule, dev_qrels = build_data(cfg, dataset, module)

    commit = config.git_commit()  # the code as it was when the run started
    info = {"run_dir": str(run_dir), **commit, "train_examples": len(datamodule.train_set)}
    hparams = {**resolved_config(cfg), "git": info, **hydra_job()}  # choices: W&B columns
    first = is_first_process()
    if first:
        if checkpoint is None:
            set_aside_earlier_run(run_dir)
        write_json(run_dir / "run_info.json", hparams)

    def test_eval(name: str) -> dict:
        retriever = module.retriever(cfg.eval.batch_size, cfg.eval.index, device="auto")
        return evaluate_retriever(retriever, test, run_dir / name / "run.trec", cfg.eval.k, list(cfg.eval.metrics),
                                  tag=name, ignore_identical_ids=cfg.eval.ignore_identical_ids)

    results = {}
    # a finished run's metrics.json (a rerun of its command): its untrained model's scores hold (same settings)
    earlier = read_json(run_dir / "metrics.json") if checkpoint and (run_dir / "metrics.json").is_file() else {}
    if cfg.eval.before and first and "before" in earlier:
        results["before"] = earlier["before"]
    elif cfg.eval.before and first:
        results["before"] = test_eval("before")
        print_table(results, list(cfg.eval.metrics), title=f"before training ({cfg.data.name} {cfg.eval.split})")
    loggers = build_loggers(cfg, run_dir, hparams, resume_step)
    trainer = instantiate(trainer_cfg, plugins=[AtomicCheckpointIO()], logger=loggers,
                          default_root_dir=str(run_dir),
                          callbacks=build_callbacks(cfg, run_dir, dataset, datamodule.train_set, dev_qrels,
                                                    logging=bool(loggers)))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    fit = {"fit_seconds": round(time.perf_counter() - start, 1)}
    if not trainer.is_global_zero:  # DDP: the first process saves, evaluates and writes the outputs
        return {}
    if trainer.global_step == resume_step and earlier.get("steps") == resume_step:  # nothing trained, nothing to redo
        print(f"the run in {run_dir} had finished (step {resume_step}): its outputs are as they were (a larger "
              f"trainer.max_steps or max_epochs continues it, resume=null starts it afresh)")
        return {stage: earlier[stage] for stage in ("before", "after") if stage in earlier}
    if trainer.global_step == 0:  # else the pretrained weights would be saved and reported as the trained model
        raise UserError(f"training took no optimiser step ({len(datamodule.train_set)} training examples, "
                        f"trainer.max_steps={cfg.trainer.max_steps}, trainer.max_epochs={cfg.trainer.max_epochs}), so "
                        f"there is no trained model: nothing was saved and no 'after' metrics were written.")
    if torch.cuda.is_available():
        fit["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if cfg.save_model:
        atomic_save_folder(run_dir / "model", encoder.save)
        if getattr(module, "cross_encoder", None) is not None:  # RocketQA-v2 trains a ranker too
            atomic_save_folder(run_dir / "cross_encoder", module.cross_encoder.save)
    if cfg.eval.after:
        results["after"] = test_eval("after")
    for logger in trainer.loggers:
        logger.log_metrics({f"test/{stage}/{m}": v for stage, s in results.items() for m, v in s.items()},
                           step=trainer.global_step)
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":  # end the W&B run: the next job of a sweep process starts its own
            logger.experiment.finish()
    write_json(run_dir / "metrics.json", {"data": cfg.data.name, "split": cfg.eval.split,
                                          "corpus_sample": cfg.eval.get("corpus_sample"), **results,
                                          "steps": trainer.global_step, **fit, **commit})
    if results:
        print_table(results, list(cfg.eval.metrics), title=f"{cfg.data.name} {cfg.eval.split}")
    print(f"outputs in {run_dir}" + (f" (model: {run_dir / 'model'})" if cfg.save_model else ""))
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    config.quiet_library_notices()
    with exit_on_user_error():
        train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
