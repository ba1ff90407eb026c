"""The loggers of a training run (CSV in the run folder, W&B), and what Hydra knows of the job they log."""
from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from retrieval_lab.run_folder import csv_logger


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


def finish_loggers(loggers: list, results: dict, step: int) -> None:
    """Log the test metrics (``test/<stage>/<metric>``) at ``step`` and close every logger."""
    for logger in loggers:
        logger.log_metrics({f"test/{stage}/{m}": v for stage, s in results.items() for m, v in s.items()}, step=step)
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":  # end the W&B run: the next job of a sweep process starts its own
            logger.experiment.finish()
