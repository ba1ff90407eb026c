"""SamToNe: contrastive loss with same-tower negatives.

Moiseev et al. (2023), "SamToNe: Improving Contrastive Loss for Dual Encoder Retrieval Models with Same Tower
Negatives", Findings of ACL 2023.

InfoNCE's denominator for query i (in-batch documents d_j, and MoCo queue keys k_m when present) is extended
with embeddings from the *same* tower as the anchor side:

    L = -1/B sum_i log( exp(q_i.d+_i/tau) / ( sum_j exp(q_i.d_j/tau) + sum_m exp(q_i.k_m/tau)
                                               + [query]    sum_{j != i} exp(q_i.q_j/tau)
                                               + [document] sum_{j != i} exp(d+_i.d+_j/tau) ) )

``side='query'`` (the paper's default) adds the other queries of the batch, ``side='document'`` the other
positive documents, ``side='both'`` both; self-similarity is always excluded. ``bidirectional`` adds InfoNCE's
document-to-query term, averaged as in :mod:`retrieval_lab.losses.infonce`. Same-tower false negatives are
dropped like in-batch ones (``mask``, B x B*G, or its pairs): q_i.q_j when the two queries share a judged positive
among the batch's documents (in both rows), d+_i.d+_j when d+_j is a positive of query i; queue keys of a query's
positives by ``queue_mask`` (B x K).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.infonce import document_to_query
from retrieval_lab.losses.scores import FalseNegatives, anchor_rows, check_temperature, contrastive_scores, similarity

SIDES = ("query", "document", "both")


def share_a_positive(mask: FalseNegatives, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """R x B, True where anchor query ``rows[r]`` and another query j judge a common column of the batch: a column
    masked for a query, or its own target (entries of a query against itself are left to the caller). Only columns
    judged by two queries or more can be shared, and they are few (at most the number of masked pairs), so the
    product runs over those columns only, not over all B*G."""
    query = torch.cat([mask.query, torch.arange(targets.numel(), device=mask.query.device)])
    column = torch.cat([mask.column, targets.to(mask.query.device)])
    shared = torch.bincount(column, minlength=mask.shape[1])[column] > 1
    columns, index = torch.unique(column[shared], return_inverse=True)
    judged = torch.zeros(targets.numel(), columns.numel(), device=mask.query.device)
    judged[query[shared], index] = 1.0
    return (judged[rows.to(judged.device)] @ judged.T > 0).to(rows.device)


class SamToNeLoss(nn.Module):
    def __init__(self, temperature: float = 0.05, side: str = "query", bidirectional: bool = False):
        super().__init__()
        if side not in SIDES:
            raise ConfigError(f"loss.side must be one of {', '.join(SIDES)}, got '{side}'.")
        self.temperature, self.side, self.bidirectional = check_temperature(temperature), side, bidirectional

    def forward(self, q: torch.Tensor, d: torch.Tensor, group_size: int = 1, mask: torch.Tensor | None = None,
                queue: torch.Tensor | None = None, queue_mask: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        scores, targets = contrastive_scores(q, d, group_size, self.temperature, mask, queue, queue_mask, rows)
        rows, batch, mask = anchor_rows(q, rows), q.size(0), FalseNegatives.of(mask)
        every = torch.arange(batch, device=q.device)
        # same-tower pairs dropped: (i, i), and where the two queries share a positive among the batch's
        # columns (query side; symmetric), or where d+_j is a positive of query i (document side)
        eye = rows[:, None] == every[None, :]  # anchor row r against batch entry j: the same query
        all_targets = every * group_size
        extra = []
        if self.side in ("query", "both"):
            drop = eye if mask is None else eye | share_a_positive(mask, rows, all_targets)
            extra.append(similarity(q[rows], q).masked_fill(drop, float("-inf")))
        if self.side in ("document", "both"):
            positives = d[all_targets]
            drop = eye if mask is None else eye | mask.block(rows, all_targets)  # [r, j]: d+_j a positive of query r
            extra.append(similarity(positives[rows], positives).masked_fill(drop, float("-inf")))
        scores = torch.cat([scores, *(e / self.temperature for e in extra)], dim=1)
        loss = F.cross_entropy(scores, targets)
        if self.bidirectional:
            loss = (loss + document_to_query(q, d, group_size, self.temperature, mask, rows)) / 2
        return loss
