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

from retrieval_lab.losses.base import Loss
from retrieval_lab.losses.scores import FalseNegatives, Scores, check_temperature, contrastive_logits


def document_to_query(scores: Scores, temperature: float) -> torch.Tensor:
    """L_dq: the positive document of each anchor query against every query of the batch (``doc_query``)."""
    mask, rows = FalseNegatives.of(scores.mask), scores.rows
    reverse = scores.doc_query / temperature
    if mask is not None and len(mask):  # d+_i vs q_k is a false pair exactly when column iG is masked for query k
        every = torch.arange(scores.batch_size, device=reverse.device)
        reverse = reverse.masked_fill(mask.block(every, scores.targets).T, float("-inf"))
    return F.cross_entropy(reverse, rows)


class InfoNCELoss(Loss):
    def __init__(self, temperature: float = 0.05, bidirectional: bool = False):
        super().__init__()
        self.temperature, self.bidirectional = check_temperature(temperature), bidirectional
        self.blocks = frozenset({"query_doc", "queue", *(["doc_query"] if bidirectional else [])})

    def setting_for(self, block: str) -> str:
        return "loss.bidirectional=true" if block == "doc_query" else ""

    def forward(self, scores: Scores) -> torch.Tensor:
        logits, targets = contrastive_logits(scores, self.temperature)
        loss = F.cross_entropy(logits, targets)
        if self.bidirectional:
            loss = (loss + document_to_query(scores, self.temperature)) / 2
        return loss
