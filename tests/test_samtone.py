"""SamToNe against its formula, computed with explicit loops for each side, with and without a queue."""
from __future__ import annotations

import math

import pytest
import torch

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.losses.samtone import SamToNeLoss


def by_hand(q, d, group, tau, side, queue=None):
    B = q.shape[0]
    total = 0.0
    for i in range(B):
        pos = d[i * group]
        terms = [float(q[i] @ d[j]) / tau for j in range(d.shape[0])]
        if queue is not None:
            terms += [float(q[i] @ k) / tau for k in queue]
        if side in ("query", "both"):
            terms += [float(q[i] @ q[j]) / tau for j in range(B) if j != i]
        if side in ("document", "both"):
            terms += [float(pos @ d[j * group]) / tau for j in range(B) if j != i]
        total += -(float(q[i] @ pos) / tau - math.log(sum(math.exp(t) for t in terms)))
    return total / B


def tensors(B=4, G=2, D=6, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    return (norm(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1),
            norm(torch.randn(B * G, D, generator=g, dtype=torch.float64), dim=-1),
            norm(torch.randn(K, D, generator=g, dtype=torch.float64), dim=-1))


@pytest.mark.parametrize("side", ["query", "document", "both"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("with_queue", [False, True])
def test_samtone_matches_formula(side, group, with_queue):
    q, d, queue = tensors(G=group)
    queue = queue if with_queue else None
    loss = SamToNeLoss(temperature=0.1, side=side)(q, d, group_size=group, queue=queue)
    assert loss.item() == pytest.approx(by_hand(q, d, group, 0.1, side, queue), rel=1e-6)


def test_samtone_is_infonce_plus_more_negatives():
    q, d, queue = tensors(G=1)
    infonce = InfoNCELoss(0.1)(q, d, queue=queue)
    assert SamToNeLoss(0.1, "query")(q, d, queue=queue) > infonce  # a larger denominator, a larger loss
    assert InfoNCELoss(0.1)(q, d, queue=queue).item() == pytest.approx(by_hand(q, d, 1, 0.1, "none", queue), rel=1e-6)


def test_same_tower_pairs_sharing_a_positive_are_dropped():
    q, d, _ = tensors(B=3, G=1)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1] = True  # query 0 also has document 1 (the positive of query 1) as a positive
    loss = SamToNeLoss(0.1, "query")(q, d, mask=mask)
    tau = 0.1
    terms0 = [float(q[0] @ d[0]) / tau, float(q[0] @ d[2]) / tau, float(q[0] @ q[2]) / tau]
    expected0 = -(float(q[0] @ d[0]) / tau - math.log(sum(math.exp(t) for t in terms0)))
    rest = [-(float(q[i] @ d[i]) / tau - math.log(sum(math.exp(float(q[i] @ d[j]) / tau) for j in range(3))
                                                    + sum(math.exp(float(q[i] @ q[j]) / tau) for j in range(3) if j != i)))
            for i in (1, 2)]
    assert loss.item() == pytest.approx((expected0 + sum(rest)) / 3, rel=1e-6)


def test_query_side_gradient_reaches_other_queries():
    q, d, _ = tensors(G=1)
    q.requires_grad_(True)
    SamToNeLoss(0.1, "query")(q, d.detach()).backward()
    g_samtone = q.grad.clone()
    q.grad = None
    InfoNCELoss(0.1)(q, d.detach()).backward()
    assert not torch.allclose(g_samtone, q.grad)


@pytest.mark.parametrize("kwargs,key", [({"side": "docs"}, "loss.side"), ({"temperature": 0.0}, "loss.temperature")])
def test_bad_settings_are_refused(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        SamToNeLoss(**kwargs)
