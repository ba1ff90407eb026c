"""Mine hard negatives: `python -m retrieval_lab.mine [retriever=bm25|dense] [split=train] [n_neg=30] [skip_top=0]`.

Retrieves the top ``depth`` documents for every query of the split, removes the judged positives and writes
the negatives file of DESIGN.md (default: ``<data.path>/negatives/<retriever>-<split>.jsonl``). With
``denoise.cross_encoder=<folder>``, candidates the cross-encoder scores as high as a positive are dropped (default
output: ``<retriever>-denoised-<split>.jsonl``, next to the plain file).
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from retrieval_lab import config  # also registers the resolvers
from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.negatives import write_negatives
from retrieval_lab.errors import ConfigError, exit_on_user_error
from retrieval_lab.mining.negatives import denoise, mine_negatives
from retrieval_lab.retrieval.encoding import pick_device


# the default output of a denoised mining, <retriever>-denoised-<split>.jsonl, never replaces the plain negatives
OmegaConf.register_new_resolver("suffix_if", lambda value, suffix: suffix if value else "", replace=True)


def mine(cfg: DictConfig) -> Path:
    config.check_all_set(cfg)  # e.g. retriever=dense model=hf without a name
    config.check_targets(cfg)
    if cfg.n_neg < 1 or cfg.skip_top < 0 or cfg.depth < cfg.n_neg + cfg.skip_top:
        raise ConfigError(f"n_neg={cfg.n_neg}, skip_top={cfg.skip_top}, depth={cfg.depth}: need n_neg >= 1, "
                          f"skip_top >= 0 and depth >= n_neg + skip_top.")
    teacher = None
    if cfg.denoise.cross_encoder:  # before the mining, which takes a while
        from retrieval_lab.models.cross_encoder import CrossEncoder, require_trained_head

        teacher = CrossEncoder(cfg.denoise.cross_encoder, cfg.denoise.max_length)
        require_trained_head(teacher, "denoise.cross_encoder")
    dataset = BeirDataset(cfg.data.path)
    split = dataset.subset(dataset.qrels(cfg.split, reachable_only=True))  # positives are written out with the text
    run = instantiate(cfg.retriever).retrieve(split.corpus, split.queries, cfg.depth)
    mined = mine_negatives(run, split.qrels, cfg.n_neg, cfg.skip_top, cfg.score_ratio)
    if teacher is not None:
        mined, dropped = denoise(mined, split.queries, split.corpus, teacher, cfg.denoise.margin,
                                 cfg.denoise.batch_size, pick_device("auto"))
        print(f"denoising with {cfg.denoise.cross_encoder} dropped {dropped} candidates as likely positives")
    write_negatives(cfg.output, mined)
    counts = [len(r.neg) for r in mined.values()]
    print(f"{cfg.output}: {len(mined)} queries, {sum(counts) / max(1, len(counts)):.1f} negatives per query "
          f"(min {min(counts, default=0)})")
    return Path(cfg.output)


@hydra.main(version_base="1.3", config_path="../conf", config_name="mine")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        mine(cfg)


if __name__ == "__main__":
    main()
