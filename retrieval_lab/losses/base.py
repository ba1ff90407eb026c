"""What every loss is: a formula applied to score blocks, with its needs declared.

A loss declares ``blocks`` (the score blocks of ``scores.BLOCKS`` it reads; the model family computes them) and
``needs`` (what the run must give it: ``teacher`` scores for each query's group, ``hard_negatives``: groups of a
positive and mined negatives). ``forward(scores)`` takes one :class:`~retrieval_lab.losses.scores.Scores` and
returns a scalar. Its settings are checked in ``__init__``, each refusal one sentence naming the key.
"""
from __future__ import annotations

from torch import nn


class Loss(nn.Module):
    blocks: frozenset[str] = frozenset({"query_doc", "queue"})
    needs: frozenset[str] = frozenset()

    def setting_for(self, block: str) -> str:
        """The setting of this loss that makes it read ``block`` (e.g. ``loss.side=document``), for sentences that
        refuse the block; empty when the loss always reads it."""
        return ""
