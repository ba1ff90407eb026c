"""InfoNCE with in-batch negatives.

van den Oord et al. (2018), "Representation Learning with Contrastive Predictive Coding"; the in-batch form
for retrieval as in Karpukhin et al. (2020), "Dense Passage Retrieval for Open-Domain Question Answering".

With scores s_ij = q_i . d_j / tau over the B*G documents of the batch (group i holds d_{iG}, the positive of
query i, then its G-1 negatives), the query-to-document loss is

    L_qd = -1/B sum_i log( exp(s_{i,iG}) / sum_j exp(s_ij) )

and, when ``bidirectional``, the document-to-query term over the positives d+_i = d_{iG},

    L_dq = -1/B sum_i log( exp(d+_i . q_i / tau) / sum_k exp(d+_i . q_k / tau) ),

the loss being (L_qd + L_dq) / 2. ``mask`` (B x B*G, True = drop) removes false negatives, e.g. a column
that holds another copy of query i's own positive.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCELoss(nn.Module):
    def __init__(self, temperature: float = 0.05, bidirectional: bool = False):
        super().__init__()
        if temperature <= 0:
            from retrieval_lab.errors import ConfigError

            raise ConfigError(f"loss.temperature must be positive, got {temperature}.")
        self.temperature, self.bidirectional = temperature, bidirectional

    def forward(self, q: torch.Tensor, d: torch.Tensor, group_size: int = 1, mask: torch.Tensor | None = None):
        batch = q.size(0)
        targets = torch.arange(batch, device=q.device) * group_size
        scores = (q @ d.T).float() / self.temperature
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        loss = F.cross_entropy(scores, targets)
        if not self.bidirectional:
            return loss
        positives = d[targets]
        reverse = (positives @ q.T).float() / self.temperature
        if mask is not None:  # d+_i vs q_k is a false pair exactly when column iG is masked for query k
            reverse = reverse.masked_fill(mask[:, targets].T, float("-inf"))
        return (loss + F.cross_entropy(reverse, torch.arange(batch, device=q.device))) / 2
