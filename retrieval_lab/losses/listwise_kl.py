"""Listwise KL distillation over each query's group.

The listwise distillation objective of RocketQA-v2 (Ren et al., 2021, "RocketQAv2: A Joint Training Method for
Dense Passage Retrieval and Passage Re-ranking"), here with fixed teacher scores from a negatives file.

For query i with group scores S_ig = q_i . d_{i,g} / tau (student) and T_ig / tau_t (teacher, no gradient),
p_i = softmax_g(T_i / tau_t) and s_i = softmax_g(S_i):

    L = 1/B sum_i KL(p_i || s_i) = 1/B sum_i sum_g p_ig (log p_ig - log s_ig)

This is the distillation direction (teacher first). RocketQA-v2 writes its KL the other way, KL(s_i || p_i), as both
models learn from it there; see :mod:`retrieval_lab.models.rocketqa`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.base import Loss
from retrieval_lab.losses.margin_mse import require_teacher
from retrieval_lab.losses.scores import Scores, check_temperature


def listwise_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student)); gradients reach the student only."""
    target = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), target, log_target=True, reduction="batchmean")


class ListwiseKLLoss(Loss):
    blocks = frozenset({"groups"})
    needs = frozenset({"teacher", "hard_negatives"})

    def __init__(self, temperature: float = 0.05, teacher_temperature: float = 1.0):
        super().__init__()
        self.temperature = check_temperature(temperature)
        if teacher_temperature <= 0:
            raise ConfigError(f"loss.teacher_temperature must be positive, got {teacher_temperature}.")
        self.teacher_temperature = teacher_temperature

    def forward(self, scores: Scores) -> torch.Tensor:
        require_teacher(scores, "listwise_kl")
        student = scores.groups / self.temperature
        return listwise_kl(student, scores.teacher[scores.rows] / self.teacher_temperature)
