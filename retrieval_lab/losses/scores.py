"""The score blocks a loss reads, and the helpers the contrastive losses share (DESIGN.md batch layout).

A loss never computes a score: the model family scores representations (``ModelFamily.score_blocks``) and hands
the loss the blocks it declared (``Loss.blocks``) as one :class:`Scores`. Row r of a block belongs to anchor query
``rows[r]`` (all B queries, or under DDP this process's queries of the gathered batch, so that no process scores
the whole global batch; see ``BiEncoderModule.gather_batch``). ``query_doc`` holds that query's scores against the
B*G documents of the batch (its target is column ``rows[r] * G``); ``queue`` against every key of a MoCo queue.
False negatives are masked to -inf by the losses: in-batch columns by ``mask`` (B x B*G, True = drop; its pairs,
:class:`FalseNegatives`), queue columns by ``queue_mask`` (B x K).

Every score is float32, also under bf16 autocast: a bf16 product keeps 8 bits, so cosines near 1 move in steps of
2^-8, which the temperature (1/tau = 20) turns into logit steps of 0.08.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def anchor_rows(q: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The indices of the anchor queries (all B when ``rows`` is None)."""
    return torch.arange(len(q), device=q.device) if rows is None else rows.to(q.device)


BLOCKS = {  # the score blocks a family computes and a loss may declare, each with what it holds
    "query_doc": "each query against every document of the batch",
    "groups": "each query against its own group of documents",
    "queue": "each query against the keys of a queue",
    "query_query": "queries against the other queries of the batch",
    "doc_doc": "positive documents against the other positive documents",
    "doc_query": "positive documents against the queries of the batch",
}


@dataclass
class Scores:
    """The blocks of one batch that a loss declared (None for the others; ``queue`` None without a queue), float32
    and before any temperature, with what the loss needs to read them: the anchor ``rows`` and their ``targets``
    (column of each positive in ``query_doc``), ``group_size``, the false-negative ``mask`` and ``queue_mask``,
    and ``teacher`` scores (B x G) when the batch carries them."""

    rows: torch.Tensor
    group_size: int
    batch_size: int
    query_doc: torch.Tensor | None = None      # R x B*G
    groups: torch.Tensor | None = None         # R x G, positive first
    queue: torch.Tensor | None = None          # R x K
    query_query: torch.Tensor | None = None    # R x B
    doc_doc: torch.Tensor | None = None        # R x B, positive documents
    doc_query: torch.Tensor | None = None      # R x B, each anchor's positive against every query
    mask: FalseNegatives | None = None
    queue_mask: torch.Tensor | None = None     # B x K
    teacher: torch.Tensor | None = None        # B x G

    @property
    def targets(self) -> torch.Tensor:
        return self.rows * self.group_size


def contrastive_logits(scores: Scores, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of the contrastive losses: ``query_doc`` with false negatives at -inf, then the queue's
    columns (masked by ``queue_mask``), all divided by ``temperature``."""
    rows, mask = scores.rows, FalseNegatives.of(scores.mask)
    logits = scores.query_doc
    if mask is not None and len(mask):
        logits = logits.masked_fill(mask.block(rows), float("-inf"))
    if scores.queue is not None and scores.queue.numel():
        queue = scores.queue
        if scores.queue_mask is not None:
            queue = queue.masked_fill(scores.queue_mask[rows], float("-inf"))
        logits = torch.cat([logits, queue], dim=1)
    return logits / temperature, scores.targets
