"""What every negative strategy is: one object (``conf/negatives/<option>.yaml`` names its class in ``_target_``)
that contributes what its negatives take to a run, and declares what it provides and needs.

- ``provides``: what it gives a loss (``hard_negatives``: groups of a positive and mined negatives; ``teacher``:
  teacher scores for each group, which a scored negatives file carries; ``queue``: MoCo's momentum keys).
- ``needs``: the model families it works with, by ``doc_representation`` (``vector``: one vector per document;
  ``vectors``: several; a strategy that names none works with any) and what its module must provide (``queue``);
  ``config.check_train_config`` matches them with the family and the module.
- ``check(cfg, loss, module_class, family_class)``: its own settings, each refusal one sentence naming the key.
- ``build_data`` (the training set, its dataset extras and batch sampler, the data module), ``callbacks``,
  ``module`` (a partial of the LightningModule class), ``uses_workers`` (whether ``num_workers=auto`` may use
  data-loader workers).

The base class is the strategy of a negatives file read as it is (``negatives.file``, DPR's BM25 negatives), or
of in-batch negatives only when there is no file.
"""
from __future__ import annotations

from retrieval_lab.errors import ConfigError


class NegativeStrategy:
    option = "inbatch"  # its conf/negatives option, for sentences
    needs = frozenset()
    uses_workers = True
    why = {"vector": "it needs one vector per document."}  # need -> why, for the sentence that refuses it

    def __init__(self, group_size: int = 1, file: str | None = None, module=None):
        self.group_size, self.file, self.module = group_size, file, module

    @property
    def provides(self) -> frozenset[str]:
        """A scored file's groups carry teacher scores: both come with a file and groups of two or more."""
        return frozenset({"hard_negatives", "teacher"}) if self.file and self.group_size >= 2 else frozenset()

    def check(self, cfg, loss, module_class, family_class) -> None:
        """Refuse, with one sentence, settings of this strategy that cannot work (with this loss, module, family)."""

    def refusal(self, who: str, missing: set[str]) -> str:
        """The sentence that refuses ``who`` (``loss=...``, ``module=...``) the ``missing`` things it needs."""
        if "hard_negatives" in missing:
            return (f"{who} needs groups of hard negatives: a negatives file and negatives.group_size >= 2 "
                    "(e.g. negatives=bm25).")
        if "teacher" in missing:
            return (f"{who} needs teacher scores for each query's group: a negatives file with scores and "
                    "negatives.group_size >= 2 (e.g. negatives=bm25).")
        if "queue" in missing:
            return f"{who} needs a queue of momentum keys (negatives=moco)."
        return f"{who} needs {', '.join(sorted(missing))}, which negatives={self.option} does not provide."

    # ---- what the strategy contributes to a run ----
    def dataset_extras(self, dataset, qrels) -> dict:
        """Keyword arguments of the pairs class: the negatives read from the file."""
        from retrieval_lab.data.negatives import read_negatives

        return {"negatives": read_negatives(self.file, dataset, qrels)} if self.file else {}

    def batch_sampler(self, train_set, encoder, batch_size: int, seed: int):
        return None  # the data module's default: shuffled batches

    def callbacks(self, cfg, train_set) -> list:
        return []

    def build_data(self, cfg, dataset, module):
        """The training set the config asks for (pairs + these negatives), batched as ``module`` needs it; and the
        dev qrels for validation."""
        from hydra.utils import get_class, instantiate

        from retrieval_lab.data.beir import carve_dev
        from retrieval_lab.data.datamodule import GroupCollator, RetrievalDataModule, data_workers

        encoder = module.encoder
        carve = cfg.validation.enabled and not cfg.data.dev_split  # the dev queries come out of the training qrels
        labels = get_class(cfg.pairs._target_).needs_qrels or self.file
        train_qrels = dataset.qrels(cfg.data.train_split, reachable_only=True) if labels or carve else None
        dev_qrels = None
        extras = self.dataset_extras(dataset, train_qrels)
        if module.loss is not None and "teacher" in module.loss.needs and "teacher" not in module.provides:
            extras["teacher"] = True
        if cfg.data.dev_split:
            dev_qrels = dataset.qrels(cfg.data.dev_split)
        elif carve:
            train_qrels, dev_qrels = carve_dev(train_qrels, cfg.data.dev_fraction, cfg.data.split_seed)
        train_set = instantiate(cfg.pairs)(dataset=dataset, qrels=train_qrels, group_size=self.group_size,
                                           seed=cfg.seed, **extras)
        if getattr(train_set, "skipped", 0):
            print(f"{train_set.skipped} training queries have no teacher score for a positive or for any negative in "
                  f"{self.file}; training on the other {len(train_set)}.")
        batch_sampler = self.batch_sampler(train_set, encoder, cfg.batch_size, cfg.seed)
        collator = GroupCollator(encoder.tokenizer if module.uses_towers else None,
                                 getattr(encoder, "query_max_length", None), getattr(encoder, "doc_max_length", None),
                                 module.pair_tokenizer)
        datamodule = RetrievalDataModule(train_set, collator, cfg.batch_size, data_workers(cfg, self.uses_workers),
                                         cfg.seed, batch_sampler)
        return datamodule, dev_qrels


def refuse(key: str, value, why: str) -> None:
    """A ConfigError naming ``key`` with ``value`` as the config spells it (null, true, false)."""
    shown = "null" if value is None else "true" if value is True else "false" if value is False else value
    raise ConfigError(f"{key}={shown} {why}")
