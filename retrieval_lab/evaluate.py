"""Evaluate a retriever on a BEIR split: `python -m retrieval_lab.evaluate [model.name_or_path=...] [retriever=bm25]
[reranker=cross_encoder reranker.model.name_or_path=...]`.

Writes ``run.trec`` and ``metrics.json`` into the run directory and prints the metrics.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from retrieval_lab import config  # also registers the resolvers
from retrieval_lab.data.beir import BeirDataset, BeirSplit, carve_dev
from retrieval_lab.errors import exit_on_user_error
from retrieval_lab.retrieval.evaluation import evaluate_retriever, print_table
from retrieval_lab.retrieval.fusion import HybridRetriever
from retrieval_lab.retrieval.metrics import check_metrics
from retrieval_lab.retrieval.runfile import write_json


def dev_split(dataset: BeirDataset, cfg: DictConfig) -> BeirSplit:
    """The data set's dev split, else the train queries a training run holds out (``data.split_seed``)."""
    if cfg.data.get("dev_split"):
        return dataset.split(cfg.data.dev_split)
    return dataset.subset(carve_dev(dataset.qrels(cfg.data.train_split), cfg.data.dev_fraction,
                                    cfg.data.split_seed)[1])


def evaluate(cfg: DictConfig) -> dict:
    config.check_all_set(cfg)  # e.g. model=hf, reranker=cross_encoder without a name
    config.check_targets(cfg)
    config.check_kinds(cfg, whole=("k", "retriever.batch_size"), optional_whole=("retriever.token_budget",))
    check_metrics(cfg.metrics, "metrics")
    config.check_search(cfg, "k", "metrics")
    if cfg.retriever.get("tune_metric"):
        check_metrics([cfg.retriever.tune_metric], "retriever.tune_metric")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    dataset = BeirDataset(cfg.data.path)
    if cfg.get("token_cache_dir"):  # imported here: BM25 alone needs no torch
        from retrieval_lab.tokenization import TOKEN_CACHE

        TOKEN_CACHE.folder = cfg.token_cache_dir
    split = dataset.split(cfg.split)
    retriever = instantiate(cfg.retriever)
    name = Path(cfg.retriever._target_).suffix.lstrip(".")
    extra = {}
    if isinstance(retriever, HybridRetriever) and retriever.method == "linear" and retriever.alpha is None:
        retriever.dev = dev_split(dataset, cfg)
    if cfg.get("reranker"):
        from retrieval_lab.models.cross_encoder import CrossEncoder, require_trained_head

        retriever = instantiate(cfg.reranker)(first_stage=retriever)
        if isinstance(retriever.model, CrossEncoder):
            require_trained_head(retriever.model, "reranker.model.name_or_path")
        name = f"{name}+{Path(cfg.reranker._target_).suffix.lstrip('.')}"
    scores = evaluate_retriever(retriever, split, run_dir / "run.trec", cfg.k, list(cfg.metrics), tag=name,
                                ignore_identical_ids=cfg.ignore_identical_ids)
    if isinstance(retriever, HybridRetriever):
        extra = {"alpha": retriever.alpha, "dev_" + retriever.tune_metric: retriever.tuning or None}
    write_json(run_dir / "metrics.json", {"data": cfg.data.name, "split": cfg.split, "retriever": name,
                                          "model": OmegaConf.select(cfg, "retriever.encoder.name_or_path")  # dense
                                          or OmegaConf.select(cfg, "retriever.dense.encoder.name_or_path"),  # hybrid
                                          "reranker": OmegaConf.select(cfg, "reranker.model.name_or_path"),
                                          "metrics": scores, "index": getattr(retriever, "index_info", None),
                                          **extra, **config.git_commit()})
    print_table({name: scores}, list(cfg.metrics), title=f"{cfg.data.name} {cfg.split} ({len(split.queries)} queries)")
    print(f"run file and metrics.json in {run_dir}")
    return scores


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    config.quiet_library_notices()
    with exit_on_user_error():
        evaluate(cfg)


if __name__ == "__main__":
    main()
