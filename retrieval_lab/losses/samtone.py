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

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.base import Loss
from retrieval_lab.losses.infonce import document_to_query
from retrieval_lab.losses.scores import FalseNegatives, Scores, check_temperature, contrastive_logits

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


class SamToNeLoss(Loss):
    def __init__(self, temperature: float = 0.05, side: str = "query", bidirectional: bool = False):
        super().__init__()
        if side not in SIDES:
            raise ConfigError(f"loss.side must be one of {', '.join(SIDES)}, got '{side}'.")
        self.temperature, self.side, self.bidirectional = check_temperature(temperature), side, bidirectional
        self.blocks = frozenset({"query_doc", "queue", *(["query_query"] if side in ("query", "both") else []),
                                 *(["doc_doc"] if side in ("document", "both") else []),
                                 *(["doc_query"] if bidirectional else [])})

    def setting_for(self, block: str) -> str:
        return {"query_query": f"loss.side={self.side}", "doc_doc": f"loss.side={self.side}",
                "doc_query": "loss.bidirectional=true"}.get(block, "")

    def forward(self, scores: Scores) -> torch.Tensor:
        logits, targets = contrastive_logits(scores, self.temperature)
        rows, mask = scores.rows, FalseNegatives.of(scores.mask)
        every = torch.arange(scores.batch_size, device=rows.device)
        # same-tower pairs dropped: (i, i), and where the two queries share a positive among the batch's
        # columns (query side; symmetric), or where d+_j is a positive of query i (document side)
        eye = rows[:, None] == every[None, :]  # anchor row r against batch entry j: the same query
        all_targets = every * scores.group_size
        extra = []
        if scores.query_query is not None:
            drop = eye if mask is None else eye | share_a_positive(mask, rows, all_targets)
            extra.append(scores.query_query.masked_fill(drop, float("-inf")))
        if scores.doc_doc is not None:
            drop = eye if mask is None else eye | mask.block(rows, all_targets)  # [r, j]: d+_j a positive of query r
            extra.append(scores.doc_doc.masked_fill(drop, float("-inf")))
        logits = torch.cat([logits, *(e / self.temperature for e in extra)], dim=1)
        loss = F.cross_entropy(logits, targets)
        if self.bidirectional:
            loss = (loss + document_to_query(scores, self.temperature)) / 2
        return loss
