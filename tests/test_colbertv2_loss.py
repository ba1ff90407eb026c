"""ColBERTv2's loss against its formula computed by hand: KL(softmax(T_i / tau_t) || softmax(S_i / tau)) over each
query's group plus lambda times the in-batch cross-entropy, false negatives left out."""
from __future__ import annotations

import math

import pytest
import torch

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.colbertv2 import ColBERTv2Loss
from retrieval_lab.models.family import loss_on_vectors


def by_hand(q, d, teacher, group, tau, tau_t, weight, dropped=()):
    total = 0.0
    for i in range(len(q)):
        s = [float(q[i] @ d[i * group + g]) / tau for g in range(group)]
        t = [float(teacher[i, g]) / tau_t for g in range(group)]
        log_s = [x - math.log(sum(math.exp(y) for y in s)) for x in s]
        log_p = [x - math.log(sum(math.exp(y) for y in t)) for x in t]
        kl = sum(math.exp(lp) * (lp - ls) for lp, ls in zip(log_p, log_s))
        every = [float(q[i] @ d[j]) / tau for j in range(len(d)) if (i, j) not in dropped]
        ce = -(float(q[i] @ d[i * group]) / tau - math.log(sum(math.exp(x) for x in every)))
        total += kl + weight * ce
    return total / len(q)


@pytest.mark.parametrize("tau,tau_t,weight", [(1.0, 1.0, 1.0), (0.5, 2.0, 0.3), (1.0, 1.0, 0.0)])
def test_value_and_gradient_follow_the_formula(tau, tau_t, weight):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, generator=g, dtype=torch.float64).float().requires_grad_()
    d = torch.randn(9, 4, generator=g).requires_grad_()
    teacher = torch.randn(3, 3, generator=g) * 3
    loss = ColBERTv2Loss(tau, tau_t, weight)
    value = loss_on_vectors(loss, q, d, group_size=3, teacher=teacher)
    assert value.item() == pytest.approx(by_hand(q.detach(), d.detach(), teacher, 3, tau, tau_t, weight), rel=1e-5)
    value.backward()
    qn, dn = q.detach().double().requires_grad_(), d.detach().double().requires_grad_()
    loss_on_vectors(loss, qn, dn, group_size=3, teacher=teacher.double()).backward()  # float64: finite differences' reference
    eps, i, k = 1e-6, 1, 2
    bumped = qn.detach().clone()
    bumped[i, k] += eps
    numeric = (by_hand(bumped, dn.detach(), teacher, 3, tau, tau_t, weight)
               - by_hand(qn.detach(), dn.detach(), teacher, 3, tau, tau_t, weight)) / eps
    assert q.grad[i, k].item() == pytest.approx(numeric, rel=1e-3, abs=1e-5)
    assert loss.blocks == ({"groups", "query_doc"} if weight else {"groups"})


def test_false_negatives_are_left_out_of_the_in_batch_term():
    g = torch.Generator().manual_seed(1)
    q, d, teacher = torch.randn(2, 4, generator=g), torch.randn(4, 4, generator=g), torch.randn(2, 2, generator=g)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 2] = True  # query 0's positive is also query 1's positive document
    value = loss_on_vectors(ColBERTv2Loss(), q, d, group_size=2, teacher=teacher, mask=mask)
    assert value.item() == pytest.approx(by_hand(q, d, teacher, 2, 1.0, 1.0, 1.0, dropped={(0, 2)}), rel=1e-5)


def test_settings_and_a_missing_teacher_are_refused():
    with pytest.raises(ConfigError, match="loss.inbatch_weight must be a number of 0 or more"):
        ColBERTv2Loss(inbatch_weight=-1)
    with pytest.raises(ConfigError, match="loss.teacher_temperature must be a positive number"):
        ColBERTv2Loss(teacher_temperature=0)
    with pytest.raises(ConfigError, match="loss.inbatch_weight must be a number"):
        ColBERTv2Loss(inbatch_weight=True)
    with pytest.raises(ConfigError, match="colbertv2"):
        loss_on_vectors(ColBERTv2Loss(), torch.randn(2, 4), torch.randn(4, 4), group_size=2)
