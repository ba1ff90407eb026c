"""InfoNCE with in-batch negatives.

van den Oord et al. (2018), "Representation Learning with Contrastive Predictive Coding"; the in-batch form
for retrieval as in Karpukhin et al. (2020), "Dense Passage Retrieval for Open-Domain Question Answering".

With scores s_ij = q_i . d_j / tau over the B*G documents of the batch (group i holds d_{iG}, the positive of
query i, then its G-1 negatives) and, under MoCo, the K queue keys k_m (s_im = q_i . k_m / tau), the
query-to-document loss is

    L_qd = -1/B sum_i log( exp(s_{i,iG}) / (sum_j exp(s_ij) + sum_m exp(s_im)) )

and, when ``bidirectional``, the document-to-query term over the positives d+_i = d_{iG},

    L_dq = -1/B sum_i log( exp(d+_i . q_i / tau) / sum_k exp(d+_i . q_k / tau) ),

the loss being (L_qd + L_dq) / 2. ``mask`` (B x B*G, True = drop; or its pairs) removes false negatives, e.g. a column
that holds another copy of query i's own positive; ``queue_mask`` (B x K) does the same for queue keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval_lab.losses.scores import FalseNegatives, anchor_rows, check_temperature, contrastive_scores, similarity


def document_to_query(q: torch.Tensor, d: torch.Tensor, group_size: int, temperature: float,
                      mask: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """L_dq: the positive document of each anchor query (``rows``) against every query of the batch."""
    rows, mask = anchor_rows(q, rows), FalseNegatives.of(mask)
    targets = rows * group_size
    reverse = similarity(d[targets], q) / temperature
    if mask is not None and len(mask):  # d+_i vs q_k is a false pair exactly when column iG is masked for query k
        reverse = reverse.masked_fill(mask.block(anchor_rows(q, None), targets).T, float("-inf"))
    return F.cross_entropy(reverse, rows)


class InfoNCELoss(nn.Module):
    def __init__(self, temperature: float = 0.05, bidirectional: bool = False):
        super().__init__()
        self.temperature, self.bidirectional = check_temperature(temperature), bidirectional

    def forward(self, q: torch.Tensor, d: torch.Tensor, group_size: int = 1, mask: torch.Tensor | None = None,
                queue: torch.Tensor | None = None, queue_mask: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        scores, targets = contrastive_scores(q, d, group_size, self.temperature, mask, queue, queue_mask, rows)
        loss = F.cross_entropy(scores, targets)
        if self.bidirectional:
            loss = (loss + document_to_query(q, d, group_size, self.temperature, mask, rows)) / 2
        return loss
