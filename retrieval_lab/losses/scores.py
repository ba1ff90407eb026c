"""The score matrix shared by the contrastive losses (DESIGN.md batch layout).

Row i holds query i's scores against the B*G documents of the batch (its target is column i*G), then, when
a queue of momentum keys is given (MoCo), against every queue entry. False negatives are masked to -inf:
in-batch columns by ``mask`` (B x B*G), queue columns by ``queue_mask`` (B x K), True = drop.

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


def contrastive_scores(q: torch.Tensor, d: torch.Tensor, group_size: int, temperature: float,
                       mask: torch.Tensor | None = None, queue: torch.Tensor | None = None,
                       queue_mask: torch.Tensor | None = None):
    """Return (scores / temperature, targets)."""
    targets = torch.arange(q.size(0), device=q.device) * group_size
    scores = similarity(q, d)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    if queue is not None and queue.numel():
        queue_scores = similarity(q, queue)
        if queue_mask is not None:
            queue_scores = queue_scores.masked_fill(queue_mask, float("-inf"))
        scores = torch.cat([scores, queue_scores], dim=1)
    return scores / temperature, targets
