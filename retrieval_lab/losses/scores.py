"""The score matrix shared by the contrastive losses (DESIGN.md batch layout).

Row i holds query i's scores against the B*G documents of the batch (its target is column i*G), then, when
a queue of momentum keys is given (MoCo), against every queue entry. False negatives are masked to -inf:
in-batch columns by ``mask`` (B x B*G, True = drop; a dense bool tensor or its pairs, :class:`FalseNegatives`),
queue columns by ``queue_mask`` (B x K).

``rows`` (the indices of some of the B queries; None: all) restricts the anchors to those queries: each loss is
then the mean of their terms, against every column of the batch. Under DDP each process takes its own queries'
rows of the gathered batch, so no process scores the whole global batch (see ``BiEncoderModule.gather_batch``).

Every score of every loss is a float32 product (``similarity``), also under bf16 autocast: a bf16 product keeps 8
bits, so cosines near 1 move in steps of 2^-8, which the temperature (1/tau = 20) turns into logit steps of 0.08.
"""
from __future__ import annotations

import torch

from retrieval_lab.errors import ConfigError


class FalseNegatives:
    """The true entries (query i, column j) of a B x B*G false-negative mask, as two index lists.

    A dense mask takes B^2 G bytes, and under DDP every process builds one for the global batch: 4.3 GB at 65,536
    queries (8 GPUs of 8,192), moved to the GPU in every step. False negatives are rare, so their pairs take next to
    nothing; each loss builds the dense block of the rows and columns it scores (:meth:`block`).
    """

    def __init__(self, query: torch.Tensor, column: torch.Tensor, shape: tuple[int, int]):
        self.query, self.column, self.shape = query.long(), column.long(), (int(shape[0]), int(shape[1]))

    @classmethod
    def of(cls, mask: "torch.Tensor | FalseNegatives | None") -> "FalseNegatives | None":
        """``mask`` as pairs: a dense bool tensor is converted, pairs and None are returned as they are."""
        if mask is None or isinstance(mask, FalseNegatives):
            return mask
        query, column = mask.nonzero(as_tuple=True)
        return cls(query, column, tuple(mask.shape))

    def to(self, device, **_) -> "FalseNegatives":  # Lightning moves a batch's objects that have ``to``
        return FalseNegatives(self.query.to(device), self.column.to(device), self.shape)

    def __len__(self) -> int:
        return self.query.numel()

    def block(self, rows: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """The dense mask of queries ``rows`` (distinct) against ``columns`` (distinct; None: all B*G):
        ``block(rows, columns)[a, b] == mask[rows[a], columns[b]]``, on the pairs' device."""
        device = self.query.device
        rows = rows.to(device)
        at = torch.full((self.shape[0],), -1, dtype=torch.long, device=device)
        at[rows] = torch.arange(rows.numel(), device=device)
        r, c, width = at[self.query], self.column, self.shape[1]
        if columns is not None:
            columns = columns.to(device)
            at = torch.full((self.shape[1],), -1, dtype=torch.long, device=device)
            at[columns] = torch.arange(columns.numel(), device=device)
            c, width = at[c], columns.numel()
        keep = (r >= 0) & (c >= 0)
        out = torch.zeros(rows.numel(), width, dtype=torch.bool, device=device)
        out[r[keep], c[keep]] = True
        return out

    def dense(self) -> torch.Tensor:
        return self.block(torch.arange(self.shape[0], device=self.query.device))


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
    rows, mask = anchor_rows(q, rows), FalseNegatives.of(mask)
    targets = rows * group_size
    scores = similarity(q[rows], d)
    if mask is not None and len(mask):
        scores = scores.masked_fill(mask.block(rows), float("-inf"))
    if queue is not None and queue.numel():
        queue_scores = similarity(q[rows], queue)
        if queue_mask is not None:
            queue_scores = queue_scores.masked_fill(queue_mask[rows], float("-inf"))
        scores = torch.cat([scores, queue_scores], dim=1)
    return scores / temperature, targets
