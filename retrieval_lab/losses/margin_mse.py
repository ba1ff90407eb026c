"""Margin-MSE: distil a teacher's score margins into the student.

Hofstätter et al. (2020), "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
Distillation"; the optional in-batch term follows the idea of Hofstätter et al. (2021), "Efficiently Teaching an
Effective Dense Retriever with Balanced Topic Aware Sampling" (TAS-B), with a difference: TAS-B distils in-batch
pairs from a second teacher (ColBERT) by Margin-MSE, while here they are in-batch negatives of InfoNCE (no
second teacher needed).

For query i with group (d_{i,0} = positive, d_{i,1..G-1} = negatives), student scores S_ig = scale * q_i . d_{i,g}
and teacher scores T_ig (from the negatives file, no gradient):

    L_margin = 1/(B (G-1)) sum_i sum_{g>=1} ( (S_i0 - S_ig) - (T_i0 - T_ig) )^2

and, with ``alpha > 0``, L = L_margin + alpha * L_InfoNCE (in-batch negatives, :mod:`infonce`). Margins are
compared on the teacher's scale, so a cross-encoder teacher whose margins span several units wants
unnormalised student embeddings (``model.normalize=false``, as TAS-B) or a ``scale`` that brings cosines there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.base import Loss
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.losses.scores import Scores


def require_teacher(scores: Scores, name: str) -> None:
    if scores.teacher is None or scores.group_size < 2:
        raise ConfigError(f"loss={name} needs teacher scores and negatives.group_size >= 2 "
                          "(a negatives file with scores for every listed document).")


class MarginMSELoss(Loss):
    needs = frozenset({"teacher", "hard_negatives"})  # the data module attaches the teacher's group scores

    def __init__(self, scale: float = 1.0, alpha: float = 0.0, temperature: float = 0.05):
        super().__init__()
        if scale <= 0 or alpha < 0:
            raise ConfigError(f"loss.scale must be positive and loss.alpha non-negative, got {scale} and {alpha}.")
        self.scale, self.alpha = scale, alpha
        self.in_batch = InfoNCELoss(temperature) if alpha > 0 else None
        self.blocks = frozenset({"groups", *(self.in_batch.blocks if self.in_batch is not None else ())})

    def setting_for(self, block: str) -> str:
        return f"loss.alpha={self.alpha}" if block != "groups" else ""

    def forward(self, scores: Scores) -> torch.Tensor:
        require_teacher(scores, "margin_mse")
        student = self.scale * scores.groups
        teacher = scores.teacher.detach().float()[scores.rows]
        loss = F.mse_loss(student[:, :1] - student[:, 1:], teacher[:, :1] - teacher[:, 1:])
        if self.in_batch is not None:
            loss = loss + self.alpha * self.in_batch(scores)
        return loss
