"""Train a dense retriever: `python -m retrieval_lab.train loss=... negatives=... [key=value ...]`.

Evaluates on the test split before and after training (by default), saves the model, and writes
``metrics.json``, the run files, CSV and W&B logs into the run directory.
"""
from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from retrieval_lab import config
from retrieval_lab.callbacks import AtomicCheckpointIO, build_callbacks, sample_corpus
from retrieval_lab.data.beir import BeirDataset, BeirSplit
from retrieval_lab.data.datamodule import build_datamodule
from retrieval_lab.errors import UserError, exit_on_user_error
from retrieval_lab.files import atomic_save_folder
from retrieval_lab.loggers import build_loggers, finish_loggers, hydra_job
from retrieval_lab.retrieval.evaluation import evaluate_retriever, print_table
from retrieval_lab.retrieval.runfile import read_json, write_json
from retrieval_lab.run_folder import (check_resumable, is_first_process, resolved_config, resume_from,
                                      set_aside_earlier_run)
from retrieval_lab.tokenization import TOKEN_CACHE


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
    module_cfg = config.module_config(cfg)  # conf/module/* replaces the negative strategy's
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    chunk = trainer_cfg.pop("grad_cache_chunk", None)
    # gradient caching steps the optimiser in the module, which then also clips (the Trainer may not)
    grad_cache = {"grad_cache_chunk": chunk,
                  "gradient_clip_val": trainer_cfg.pop("gradient_clip_val", None)} if chunk else {}
    module = instantiate(module_cfg)(encoder=encoder, loss=instantiate(cfg.loss),
                                     group_size=cfg.negatives.group_size, **cfg.optim, **grad_cache)
    strategy = instantiate(cfg.negatives)  # what the negatives take: dataset extras, batch sampler, callbacks
    datamodule, dev_qrels = build_datamodule(cfg, dataset, module, strategy)

    commit = config.git_commit()  # the code as it was when the run started
    info = {"run_dir": str(run_dir), **commit, "train_examples": len(datamodule.train_set)}
    hparams = {**resolved_config(cfg), "git": info, **hydra_job()}  # choices: W&B columns
    first = is_first_process()
    if first:
        if checkpoint is None:
            set_aside_earlier_run(run_dir)
        write_json(run_dir / "run_info.json", hparams)

    def test_eval(name: str) -> dict:
        retriever = module.retriever(cfg.eval.batch_size, cfg.eval.index, device="auto",
                                     index_settings=cfg.eval.get("index_settings"))
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
                          callbacks=build_callbacks(cfg, run_dir, dataset, dev_qrels, logging=bool(loggers),
                                                    strategy_callbacks=strategy.callbacks(cfg, datamodule.train_set)))
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
    finish_loggers(trainer.loggers, results, trainer.global_step)
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
