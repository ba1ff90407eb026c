"""RankNet: a pairwise logistic loss on each query's positive against each of its negatives.

Burges et al. (2005), "Learning to Rank using Gradient Descent" (ICML); for dense retrieval as trained by STAR
(Zhan et al., 2021, "Optimizing Dense Retrieval Model Training with Hard Negatives").

For anchor query i with positive d+_i and its negatives N_i (the other documents of the batch: in-batch
negatives and, with a negatives file, its mined ones; under MoCo also the queue's keys; false negatives left
out), with scores s and scale sigma:

    L = 1/B sum_i 1/|N_i| sum_{j in N_i} log(1 + exp(sigma (s(q_i, d_j) - s(q_i, d+_i))))

``scale`` (sigma) sets how sharply a pair is judged: 20 puts cosine scores on the logit scale of InfoNCE at
tau = 0.05.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.base import Loss
from retrieval_lab.losses.scores import Scores, contrastive_logits


class RankNetLoss(Loss):
    blocks = frozenset({"query_doc", "queue"})

    def __init__(self, scale: float = 20.0):
        super().__init__()
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            raise ConfigError(f"loss.scale must be a positive number, got '{scale}'.")
        self.scale = scale

    def forward(self, scores: Scores) -> torch.Tensor:
        logits, targets = contrastive_logits(scores, 1.0)  # false negatives and masked queue keys at -inf
        rows = torch.arange(len(targets), device=logits.device)
        negative = logits != float("-inf")  # a NaN score stays in, so the loss is NaN and training stops
        negative[rows, targets] = False
        margin = self.scale * (logits - logits[rows, targets][:, None])
        pairs = F.softplus(margin).masked_fill(~negative, 0.0)
        return (pairs.sum(1) / negative.sum(1).clamp(min=1)).mean()
