"""The score matrix shared by the contrastive losses (DESIGN.md batch layout).

Row i holds query i's scores against the B*G documents of the batch (its target is column i*G), then, when
a queue of momentum keys is given (MoCo), against every queue entry. False negatives are masked to -inf:
in-batch columns by ``mask`` (B x B*G), queue columns by ``queue_mask`` (B x K), True = drop.

``rows`` (the indices of some of the B queries; None: all) restricts the anchors to those queries: each loss is
then the mean of their terms, against every column of the batch. Under DDP each process takes its own queries'
rows of the gathered batch, so no process scores the whole global batch (see ``BiEncoderModule.gather_batch``).

Every score of every loss is a float32 product (``similarity``), also under bf16 autocast: a bf16 product keeps 8
bits, so cosines near 1 move in steps of 2^-8, which the temperature (1/tau = 20) turns into logit steps of 0.08.
"""
from __future__ import annotations

import torch

from retrieval_lab.errors import ConfigError


def check_temperature(temperature: float) -> float:
    if temperature <= 0:
        raise ConfigError(f"loss.temperature must be positive, got {temperature}.")
    return temperature


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in float32, autocast or not (gradients flow back to ``a`` and ``b`` in their own dtypes)."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float().T


def anchor_rows(q: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The indices of the anchor queries (all B when ``rows`` is None)."""
    return torch.arange(q.size(0), device=q.device) if rows is None else rows.to(q.device)


def contrastive_scores(q: torch.Tensor, d: torch.Tensor, group_size: int, temperature: float,
                       mask: torch.Tensor | None = None, queue: torch.Tensor | None = None,
                       queue_mask: torch.Tensor | None = None, rows: torch.Tensor | None = None):
    """Return (scores / temperature, targets): one row per anchor query (``rows``), its target the column of its
    positive."""
    rows = anchor_rows(q, rows)
    targets = rows * group_size
    scores = similarity(q[rows], d)
    if mask is not None:
        scores = scores.masked_fill(mask[rows], float("-inf"))
    if queue is not None and queue.numel():
        queue_scores = similarity(q[rows], queue)
        if queue_mask is not None:
            queue_scores = queue_scores.masked_fill(queue_mask[rows], float("-inf"))
        scores = torch.cat([scores, queue_scores], dim=1)
    return scores / temperature, targets
