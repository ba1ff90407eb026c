"""Margin-MSE and listwise KL against their formulas, computed with explicit loops; gradients reach the
student's embeddings and never the teacher's scores."""
from __future__ import annotations

import math

import pytest
import torch

from retrieval_lab.models.family import loss_on_vectors
from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.losses.listwise_kl import ListwiseKLLoss
from retrieval_lab.losses.margin_mse import MarginMSELoss
from test_infonce import by_hand as infonce_by_hand


def batch(B=3, G=4, H=6, seed=0):
    """Float64 embeddings and teacher scores that all ask for gradients."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, dtype=torch.float64, generator=g, requires_grad=True)
    d = torch.randn(B * G, H, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = (3 * torch.randn(B, G, dtype=torch.float64, generator=g)).requires_grad_(True)
    return q, d, teacher


def margin_mse_by_hand(q, d, teacher, G, scale=1.0):
    q, d, teacher = q.detach(), d.detach(), teacher.detach()
    total, count = 0.0, 0
    for i in range(q.shape[0]):
        s = [scale * float(q[i] @ d[i * G + g]) for g in range(G)]
        t = [float(teacher[i, g]) for g in range(G)]
        for g in range(1, G):
            total += ((s[0] - s[g]) - (t[0] - t[g])) ** 2
            count += 1
    return total / count


def kl_by_hand(q, d, teacher, G, tau, tau_t):
    q, d, teacher = q.detach(), d.detach(), teacher.detach()
    total = 0.0
    for i in range(q.shape[0]):
        s = [float(q[i] @ d[i * G + g]) / tau for g in range(G)]
        t = [float(teacher[i, g]) / tau_t for g in range(G)]
        zs, zt = math.log(sum(math.exp(x) for x in s)), math.log(sum(math.exp(x) for x in t))
        total += sum(math.exp(t[g] - zt) * ((t[g] - zt) - (s[g] - zs)) for g in range(G))
    return total / q.shape[0]


@pytest.mark.parametrize("G,scale", [(2, 1.0), (4, 1.0), (4, 7.5)])
def test_margin_mse_matches_formula(G, scale):
    q, d, teacher = batch(G=G)
    loss = loss_on_vectors(MarginMSELoss(scale=scale), q, d, group_size=G, teacher=teacher)
    assert loss.item() == pytest.approx(margin_mse_by_hand(q, d, teacher, G, scale), rel=1e-6)


def test_margin_mse_with_in_batch_term():
    q, d, teacher = batch(G=3)
    loss = loss_on_vectors(MarginMSELoss(alpha=0.3, temperature=0.1), q, d, group_size=3, teacher=teacher)
    expected = margin_mse_by_hand(q, d, teacher, 3) + 0.3 * infonce_by_hand(q, d, 3, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tau,tau_t", [(0.05, 1.0), (0.5, 2.0)])
def test_listwise_kl_matches_formula(tau, tau_t):
    q, d, teacher = batch(G=5, seed=1)
    q = torch.nn.functional.normalize(q.detach(), dim=-1).requires_grad_(True)
    loss = loss_on_vectors(ListwiseKLLoss(temperature=tau, teacher_temperature=tau_t), q, d, group_size=5, teacher=teacher)
    assert loss.item() == pytest.approx(kl_by_hand(q, d, teacher, 5, tau, tau_t), rel=1e-6)


def test_listwise_kl_is_zero_when_the_student_agrees():
    q, d, _ = batch(G=4, seed=2)
    student = torch.einsum("bh,bgh->bg", q, d.view(3, 4, -1)).detach()
    loss = loss_on_vectors(ListwiseKLLoss(temperature=0.5, teacher_temperature=1.0), q, d, 4, teacher=student / 0.5 + 3.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # the loss works in float32


@pytest.mark.parametrize("loss", [MarginMSELoss(), MarginMSELoss(alpha=0.5), ListwiseKLLoss()])
def test_gradients_reach_the_student_only(loss):
    q, d, teacher = batch(G=3, seed=3)
    loss_on_vectors(loss, q, d, group_size=3, teacher=teacher).backward()
    assert teacher.grad is None
    assert q.grad.abs().sum() > 0 and (d.grad.abs().sum(dim=1) > 0).all()


def test_without_in_batch_term_a_query_only_moves_its_own_group():
    """Margin-MSE and listwise KL compare each query with its own group: query 0's documents get no gradient
    from the other queries' terms (checked through the loss of query 0 alone)."""
    for loss in (MarginMSELoss(), ListwiseKLLoss()):
        q, d, teacher = batch(G=3, seed=4)
        loss_on_vectors(loss, q[:1], d[:3], group_size=3, teacher=teacher[:1]).backward()
        assert (d.grad[3:] == 0).all() and (q.grad[1:] == 0).all()


def test_teacher_losses_refuse_missing_teacher_and_bad_settings():
    q, d, _ = batch(G=2)
    for loss in (MarginMSELoss(), ListwiseKLLoss()):
        with pytest.raises(ConfigError, match="teacher scores"):
            loss_on_vectors(loss, q, d, group_size=2)
    with pytest.raises(ConfigError, match="loss.scale"):
        MarginMSELoss(scale=0)
    with pytest.raises(ConfigError, match="loss.teacher_temperature"):
        ListwiseKLLoss(teacher_temperature=-1)
    assert "teacher" not in InfoNCELoss().needs
