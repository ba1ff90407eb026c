"""In-batch negatives: every other query's positive in the batch is a negative (groups of one document)."""
from __future__ import annotations

from retrieval_lab.negatives.base import NegativeStrategy


class InBatch(NegativeStrategy):
    option = "inbatch"
