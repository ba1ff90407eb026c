"""ColBERTv2's objective: listwise KL distillation from a teacher over each query's group, plus in-batch
cross-entropy.

Santhanam, Khattab, Saad-Falcon, Potts & Zaharia (2022), "ColBERTv2: Effective and Efficient Retrieval via
Lightweight Late Interaction", NAACL. For query i with student group scores S_ig / tau (positive first, then its
G-1 hard negatives) and teacher scores T_ig / tau_t (a cross-encoder's, no gradient), and its scores s_ij / tau
against all B*G documents of the batch (the positive d_{iG} the target):

    L = 1/B sum_i KL(softmax_g(T_i / tau_t) || softmax_g(S_i / tau))
        + lambda * -1/B sum_i log( exp(s_{i,iG} / tau) / sum_j exp(s_ij / tau) )

with lambda = ``inbatch_weight`` (0: the listwise KL alone). ColBERT's scores are sums of cosines, taken at
temperature 1 as in the paper; ``mask`` removes false in-batch negatives as in InfoNCE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.base import Loss
from retrieval_lab.losses.listwise_kl import listwise_kl
from retrieval_lab.losses.margin_mse import require_teacher
from retrieval_lab.losses.scores import Scores, check_temperature, contrastive_logits


class ColBERTv2Loss(Loss):
    needs = frozenset({"teacher", "hard_negatives"})

    def __init__(self, temperature: float = 1.0, teacher_temperature: float = 1.0, inbatch_weight: float = 1.0):
        super().__init__()
        self.temperature = check_temperature(temperature)
        if isinstance(teacher_temperature, bool) or not isinstance(teacher_temperature, (int, float)) \
                or teacher_temperature <= 0:
            raise ConfigError(f"loss.teacher_temperature must be a positive number, got {teacher_temperature}.")
        if isinstance(inbatch_weight, bool) or not isinstance(inbatch_weight, (int, float)) or inbatch_weight < 0:
            raise ConfigError(f"loss.inbatch_weight must be a number of 0 or more, got {inbatch_weight}.")
        self.teacher_temperature, self.inbatch_weight = teacher_temperature, inbatch_weight
        self.blocks = frozenset({"groups", *(["query_doc"] if inbatch_weight else [])})

    def setting_for(self, block: str) -> str:
        return "loss.inbatch_weight > 0" if block == "query_doc" else ""

    def forward(self, scores: Scores) -> torch.Tensor:
        require_teacher(scores, "colbertv2")
        loss = listwise_kl(scores.groups / self.temperature, scores.teacher[scores.rows] / self.teacher_temperature)
        if self.inbatch_weight:
            logits, targets = contrastive_logits(scores, self.temperature)
            loss = loss + self.inbatch_weight * F.cross_entropy(logits, targets)
        return loss
