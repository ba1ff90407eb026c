"""ANCE (Xiong et al., 2021): negatives re-mined from an index of the model being trained, refreshed every
``refresh.every_n_steps`` steps (``mining/ance.AnceRefresh``); training starts from the negatives file."""
from __future__ import annotations

from retrieval_lab.negatives.base import refuse
from retrieval_lab.negatives.mined import MinedFile

BINS_WHY = ("draws negatives by their teacher-score margins, which ANCE's re-mined negatives (negatives.refresh) do "
            "not have: TAS-B's pairs would silently turn into random ones.")


class Ance(MinedFile):
    option = "ance"
    needs = frozenset({"vector", "vectors"})  # re-mined with the family's index of its encoded documents
    why = {"vector": "ANCE re-mining needs a bi-encoder's embeddings."}
    uses_workers = False  # a worker would see a refresh only from the next epoch on

    def __init__(self, group_size: int = 2, file: str | None = None, refresh: dict | None = None, module=None,
                 balanced_bins: int | None = None):
        super().__init__(group_size, file, module)
        self.refresh, self.balanced_bins = dict(refresh or {}), balanced_bins

    @property
    def provides(self) -> frozenset[str]:
        return super().provides - {"teacher"}  # re-mined negatives carry no teacher score

    def refusal(self, who: str, missing: set[str]) -> str:
        if missing == {"teacher"}:
            return (f"negatives=ance cannot be used with {who}: its re-mined negatives carry no teacher score (use "
                    "negatives=bm25, tas or tasb with a scored file).")
        return super().refusal(who, missing)

    def check(self, cfg, loss, module_class, family_class) -> None:
        every = self.refresh.get("every_n_steps")
        if every is None or every < 1:
            refuse("negatives.refresh.every_n_steps", every, "must be 1 or more.")
        if self.balanced_bins:
            refuse("negatives.balanced_bins", self.balanced_bins, BINS_WHY)

    def callbacks(self, cfg, train_set) -> list:
        from retrieval_lab.mining.ance import AnceRefresh

        return [AnceRefresh(train_set, batch_size=cfg.eval.batch_size, index=cfg.eval.index,
                            index_settings=cfg.eval.get("index_settings"), **self.refresh)]
