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
from torch import nn

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.losses.scores import anchor_rows


def group_scores(q: torch.Tensor, d: torch.Tensor, group_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """R x G: each anchor query (``rows``; None: all B) against its own group only (positive first), in float32
    (see ``scores.similarity``)."""
    rows = anchor_rows(q, rows)
    with torch.autocast(q.device.type, enabled=False):
        return torch.einsum("bh,bgh->bg", q[rows].float(), d.float().view(q.size(0), group_size, -1)[rows])


class MarginMSELoss(nn.Module):
    needs_teacher = True  # the data module attaches the teacher's group scores to each batch

    def __init__(self, scale: float = 1.0, alpha: float = 0.0, temperature: float = 0.05):
        super().__init__()
        if scale <= 0 or alpha < 0:
            raise ConfigError(f"loss.scale must be positive and loss.alpha non-negative, got {scale} and {alpha}.")
        self.scale, self.alpha = scale, alpha
        self.in_batch = InfoNCELoss(temperature) if alpha > 0 else None

    def forward(self, q: torch.Tensor, d: torch.Tensor, group_size: int = 2, mask: torch.Tensor | None = None,
                queue: torch.Tensor | None = None, teacher: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        if teacher is None or group_size < 2:
            raise ConfigError("loss=margin_mse needs teacher scores and negatives.group_size >= 2 "
                              "(a negatives file with scores for every listed document).")
        student = self.scale * group_scores(q, d, group_size, rows)
        teacher = teacher.detach().float()[anchor_rows(q, rows)]
        loss = F.mse_loss(student[:, :1] - student[:, 1:], teacher[:, :1] - teacher[:, 1:])
        if self.in_batch is not None:
            loss = loss + self.alpha * self.in_batch(q, d, group_size, mask, queue, rows=rows)
        return loss
