"""What every negative strategy is: one object (``conf/negatives/<option>.yaml`` names its class in ``_target_``)
that contributes what its negatives take to a run, and declares what it provides and needs.

- ``provides``: what it gives a loss (``hard_negatives``: groups of a positive and mined negatives; ``teacher``:
  teacher scores for each group, which a scored negatives file carries; ``queue``: MoCo's momentum keys).
- ``needs``: the model families it works with, by ``doc_representation`` (``vector``: one vector per document;
  ``vectors``: several; a strategy that names none works with any) and what its module must provide (``queue``);
  ``config.check_train_config`` matches them with the family and the module.
- ``check(cfg, loss, module_class, family_class)``: its own settings, each refusal one sentence naming the key.
- what it contributes to a run: ``dataset_extras`` and ``batch_sampler`` (read by
  ``data.datamodule.build_datamodule``), ``callbacks``, ``module`` (a partial of the LightningModule class),
  ``uses_workers`` (whether ``num_workers=auto`` may use data-loader workers).

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


def refuse(key: str, value, why: str) -> None:
    """A ConfigError naming ``key`` with ``value`` as the config spells it (null, true, false)."""
    shown = "null" if value is None else "true" if value is True else "false" if value is False else value
    raise ConfigError(f"{key}={shown} {why}")
