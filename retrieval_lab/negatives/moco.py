"""MoCo (He et al., 2020; Contriever): a momentum key encoder and a FIFO queue of past keys as extra negatives
(``models/moco.MoCoModule``, this strategy's module)."""
from __future__ import annotations

from retrieval_lab.errors import ConfigError
from retrieval_lab.negatives.base import NegativeStrategy, refuse

TOWERS_WHY = "the momentum key encoder follows the query tower, so a separate document tower would never be trained."


class MoCo(NegativeStrategy):
    option = "moco"
    needs = frozenset({"vector", "queue"})  # a queue of one key vector per document, kept by its module
    why = {"vector": "its queue holds one key vector per document.",
           "queue": "that module trains on negatives files, without a momentum queue."}
    provides = frozenset({"queue"})

    def refusal(self, who: str, missing: set[str]) -> str:
        if "teacher" in missing:
            return (f"{who} needs teacher scores for each query's group of mined negatives, which negatives=moco does "
                    "not use (its negatives are the queue of momentum keys); use negatives=bm25, tas or tasb with a "
                    "scored file.")
        return super().refusal(who, missing)

    def check(self, cfg, loss, module_class, family_class) -> None:
        from retrieval_lab.models.encoder import read_saved_settings

        queue_size, momentum = self.module.keywords.get("queue_size"), self.module.keywords.get("momentum")
        if queue_size is not None and queue_size < 1:
            refuse("negatives.module.queue_size", queue_size, "must be at least 1.")
        if momentum is not None and not 0 <= momentum < 1:
            refuse("negatives.module.momentum", momentum, "must lie in [0, 1).")
        towers = cfg.model.get("shared_towers")
        if towers is not None and not towers:
            refuse("model.shared_towers", towers, f"cannot train with negatives=moco: {TOWERS_WHY}")
        saved = read_saved_settings(cfg.model.name_or_path) or {}  # a model saved by training keeps its towers
        if not saved.get("shared_towers", True):
            raise ConfigError(f"model.name_or_path={cfg.model.name_or_path} was saved with separate query and document "
                              f"towers, so it cannot train with negatives=moco: {TOWERS_WHY}")
        if "doc_doc" in loss.blocks:
            who = loss.setting_for("doc_doc") or f"loss={type(loss).__name__}"
            raise ConfigError(f"{who} cannot train with negatives=moco: document-side same-tower negatives would be "
                              "momentum keys, which carry no gradient.")
