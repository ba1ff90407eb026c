"""SamToNe against its formula, computed with explicit loops for each side, with and without a queue."""
from __future__ import annotations

import math

import pytest
import torch

from retrieval_lab.models.family import loss_on_vectors
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
    loss = loss_on_vectors(SamToNeLoss(temperature=0.1, side=side), q, d, group_size=group, queue=queue)
    assert loss.item() == pytest.approx(by_hand(q, d, group, 0.1, side, queue), rel=1e-6)


def test_samtone_is_infonce_plus_more_negatives():
    q, d, queue = tensors(G=1)
    infonce = loss_on_vectors(InfoNCELoss(0.1), q, d, queue=queue)
    assert loss_on_vectors(SamToNeLoss(0.1, "query"), q, d, queue=queue) > infonce  # a larger denominator, a larger loss
    assert loss_on_vectors(InfoNCELoss(0.1), q, d, queue=queue).item() == pytest.approx(by_hand(q, d, 1, 0.1, "none", queue), rel=1e-6)


def by_hand_dropping(q, d, tau, side, mask, dropped):
    """SamToNe with G=1 (column j is d+_j): row i leaves out the in-batch columns ``mask`` marks and the ordered
    same-tower pairs (i, j) in ``dropped``."""
    B, total = q.shape[0], 0.0
    for i in range(B):
        terms = [float(q[i] @ d[j]) / tau for j in range(B) if not mask[i, j]]
        same = q if side == "query" else d
        anchor = q[i] if side == "query" else d[i]
        terms += [float(anchor @ same[j]) / tau for j in range(B) if j != i and (i, j) not in dropped]
        total += -(float(q[i] @ d[i]) / tau - math.log(sum(math.exp(t) for t in terms)))
    return total / B


@pytest.mark.parametrize("side", ["query", "document"])
def test_same_tower_pairs_sharing_a_positive_are_dropped(side):
    """Query 0's positives are documents 0 and 1; document 1 is query 1's positive. The queries share a positive,
    so q0.q1 leaves both rows. On the document side d+_1 is a positive of query 0, so d+_0.d+_1 leaves row 0; d+_0
    is no positive of query 1, so row 1 keeps it."""
    q, d, _ = tensors(B=3, G=1)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 1] = True
    dropped = {(0, 1), (1, 0)} if side == "query" else {(0, 1)}
    loss = loss_on_vectors(SamToNeLoss(0.1, side), q, d, mask=mask)
    assert loss.item() == pytest.approx(by_hand_dropping(q, d, 0.1, side, mask, dropped), rel=1e-6)


def test_queries_that_share_a_positive_drop_each_other_whichever_positive_they_drew():
    """Query 0 judges {A}, query 1 judges {A, B} and drew B: the pair shares A, so each row drops the other query
    (before, only row 1 did, as B is no positive of query 0)."""
    q, d, _ = tensors(B=3, G=1)  # columns: A (query 0's target), B (query 1's target), C (query 2's)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1, 0] = True  # A is also a positive of query 1
    loss = loss_on_vectors(SamToNeLoss(0.1, "query"), q, d, mask=mask)
    assert loss.item() == pytest.approx(by_hand_dropping(q, d, 0.1, "query", mask, {(0, 1), (1, 0)}), rel=1e-6)


def test_query_side_gradient_reaches_other_queries():
    q, d, _ = tensors(G=1)
    q.requires_grad_(True)
    loss_on_vectors(SamToNeLoss(0.1, "query"), q, d.detach()).backward()
    g_samtone = q.grad.clone()
    q.grad = None
    loss_on_vectors(InfoNCELoss(0.1), q, d.detach()).backward()
    assert not torch.allclose(g_samtone, q.grad)


@pytest.mark.parametrize("kwargs,key", [({"side": "docs"}, "loss.side"), ({"temperature": 0.0}, "loss.temperature")])
def test_bad_settings_are_refused(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        SamToNeLoss(**kwargs)


@pytest.mark.parametrize("group", [1, 3])
def test_queries_that_share_a_positive_follow_the_dense_definition(group):
    """Query r and query j share a positive when some column of the batch is judged by both: masked for them, or
    their own target. ``share_a_positive`` works on the few columns that two queries judge; the dense product over
    all B*G columns must agree, for every anchor row set."""
    from retrieval_lab.losses.samtone import share_a_positive
    from retrieval_lab.losses.scores import FalseNegatives

    generator = torch.Generator().manual_seed(group)
    batch = 24
    mask = torch.rand(batch, batch * group, generator=generator) < 0.05
    targets = torch.arange(batch) * group
    mask[torch.arange(batch), targets] = False
    judged = mask.clone()
    judged[torch.arange(batch), targets] = True
    other = ~torch.eye(batch, dtype=torch.bool)
    expected = (judged.float() @ judged.float().T > 0) & other
    assert expected.any()  # some distinct queries do share one
    for rows in (torch.arange(batch), torch.arange(8, 16), torch.tensor([5, 0, 23])):
        assert torch.equal(share_a_positive(FalseNegatives.of(mask), rows, targets) & other[rows], expected[rows])
