"""Score a negatives file with a teacher:
`python -m retrieval_lab.score model.name_or_path=<cross-encoder> [input=...] [output=...]`.

Every (query, listed document) pair of the input file, positives and negatives, is scored by the cross-encoder;
the output is the same JSONL with ``scores`` replaced by the teacher's (DESIGN.md format), ready for
``loss=margin_mse``, ``loss=listwise_kl`` and ``negatives=tasb``.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from retrieval_lab import config  # also registers the resolvers
from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.negatives import read_negatives, write_negatives
from retrieval_lab.errors import ConfigError, exit_on_user_error
from retrieval_lab.mining.negatives import score_negatives
from retrieval_lab.models.cross_encoder import require_trained_head
from retrieval_lab.models.encoder import resolve_model_path
from retrieval_lab.retrieval.encoding import pick_device


def score(cfg: DictConfig) -> Path:
    config.check_targets(cfg)
    if Path(cfg.output).resolve() == Path(cfg.input).resolve():
        raise ConfigError(f"output={cfg.output} would overwrite the input file: choose another output path.")
    if OmegaConf.is_missing(cfg.model, "name_or_path"):  # the teacher is checked first: reading the data takes a while
        raise ConfigError("config key model.name_or_path must be set: the teacher, a trained cross-encoder folder "
                          "(module=cross_encoder's <run dir>/model).")
    if cfg.model.name_or_path == "packaged:minilm":
        raise ConfigError("model.name_or_path=packaged:minilm is a bi-encoder, not a cross-encoder: its classifier "
                          "head would score at random; give a trained cross-encoder folder.")
    resolve_model_path(cfg.model.name_or_path)
    dataset = BeirDataset(cfg.data.path)
    split = cfg.get("split")
    records = read_negatives(cfg.input, dataset, dataset.qrels(split) if split else None)
    teacher = instantiate(cfg.model)
    require_trained_head(teacher, "model.name_or_path")
    device = pick_device(cfg.device)
    teacher.to(device)
    scored = score_negatives(records, dataset.queries, dataset.corpus, teacher, cfg.batch_size, device)
    write_negatives(cfg.output, scored)
    print(f"{cfg.output}: {sum(len(r.scores) for r in scored.values())} pairs of {len(scored)} queries scored by "
          f"{cfg.model.name_or_path}")
    return Path(cfg.output)


@hydra.main(version_base="1.3", config_path="../conf", config_name="score")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        score(cfg)


if __name__ == "__main__":
    main()
