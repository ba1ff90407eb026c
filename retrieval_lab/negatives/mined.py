"""DPR (Karpukhin et al., 2020): each query's group = its positive + negatives mined into a file (BM25's by
``python -m retrieval_lab.mine``), plus in-batch negatives. A scored file's scores are the teacher of
distillation losses."""
from __future__ import annotations

from retrieval_lab.negatives.base import NegativeStrategy


class MinedFile(NegativeStrategy):
    option = "bm25"

    def __init__(self, group_size: int = 2, file: str | None = None, module=None):
        super().__init__(group_size, file, module)
