"""InfoNCE against its formula, computed with explicit loops."""
from __future__ import annotations

import math

import pytest
import torch

from retrieval_lab.models.family import loss_on_vectors
from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.infonce import InfoNCELoss


def by_hand(q, d, group, tau, mask=None, bidirectional=False):
    B, N = q.shape[0], d.shape[0]
    total = 0.0
    for i in range(B):
        cols = [j for j in range(N) if mask is None or not mask[i, j]]
        denom = sum(math.exp(float(q[i] @ d[j]) / tau) for j in cols)
        total += -(float(q[i] @ d[i * group]) / tau - math.log(denom))
    loss = total / B
    if not bidirectional:
        return loss
    back = 0.0
    for i in range(B):
        rows = [k for k in range(B) if mask is None or not mask[k, i * group]]
        denom = sum(math.exp(float(d[i * group] @ q[k]) / tau) for k in rows)
        back += -(float(d[i * group] @ q[i]) / tau - math.log(denom))
    return (loss + back / B) / 2


@pytest.mark.parametrize("group,bidirectional", [(1, False), (1, True), (3, False), (3, True)])
def test_infonce_matches_formula(group, bidirectional):
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(4 * group, 8, dtype=torch.float64), dim=-1)
    loss = loss_on_vectors(InfoNCELoss(temperature=0.1, bidirectional=bidirectional), q, d, group_size=group)
    assert loss.item() == pytest.approx(by_hand(q, d, group, 0.1, bidirectional=bidirectional), rel=1e-6)


def test_mask_removes_false_negatives():
    torch.manual_seed(1)
    q, d = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 2] = True  # document 2 is also relevant to query 0
    for bidirectional in (False, True):
        loss = loss_on_vectors(InfoNCELoss(0.5, bidirectional), q, d, 1, mask)
        assert loss.item() == pytest.approx(by_hand(q, d, 1, 0.5, mask, bidirectional), rel=1e-6)
    assert loss_on_vectors(InfoNCELoss(0.5), q, d, 1, mask).item() != pytest.approx(loss_on_vectors(InfoNCELoss(0.5), q, d).item())


def test_gradient_reaches_queries_and_documents():
    q = torch.randn(4, 6, requires_grad=True)
    d = torch.randn(4, 6, requires_grad=True)
    loss_on_vectors(InfoNCELoss(0.05), q, d).backward()
    assert q.grad.abs().sum() > 0 and d.grad.abs().sum() > 0


def test_bad_temperature_is_refused():
    with pytest.raises(ConfigError, match="loss.temperature"):
        InfoNCELoss(temperature=0)


@pytest.mark.parametrize("name", ["infonce", "samtone", "margin_mse", "listwise_kl"])
def test_scores_stay_float32_under_bf16_autocast(name):
    """Under bf16 autocast (training's bf16-mixed) every loss equals the float32 formula on the same embeddings, its
    gradient too: the scores are float32 products. A bf16 product moves cosines near 1 in steps of 2^-8, which a
    temperature of 0.05 turns into logit steps of 0.08."""
    from retrieval_lab.losses.listwise_kl import ListwiseKLLoss
    from retrieval_lab.losses.margin_mse import MarginMSELoss
    from retrieval_lab.losses.samtone import SamToNeLoss

    torch.manual_seed(0)
    loss = {"infonce": InfoNCELoss(0.05, bidirectional=True), "samtone": SamToNeLoss(0.05, side="both"),
            "margin_mse": MarginMSELoss(scale=20.0, alpha=0.5), "listwise_kl": ListwiseKLLoss(0.05)}[name]
    base = torch.nn.functional.normalize(torch.randn(1, 32), dim=-1)  # close embeddings: cosines near 1
    q = torch.nn.functional.normalize(base + 0.05 * torch.randn(8, 32), dim=-1)
    d = torch.nn.functional.normalize(base + 0.05 * torch.randn(16, 32), dim=-1)
    extra = {"teacher": torch.randn(8, 2)} if name in ("margin_mse", "listwise_kl") else {}

    def value_and_grad(autocast: bool):
        qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = loss_on_vectors(loss, qq, dd, group_size=2, **extra)
        value.backward()
        return value.detach(), qq.grad, dd.grad

    exact, mixed = value_and_grad(False), value_and_grad(True)
    assert exact[0].dtype == mixed[0].dtype == torch.float32
    for a, b in zip(exact, mixed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["infonce", "infonce_bidirectional", "samtone_query", "samtone_both_bidirectional",
                                  "margin_mse", "listwise_kl"])
def test_the_loss_of_the_batch_is_the_mean_of_its_row_shares(name):
    """Under DDP each process takes the terms of its own queries (``rows``) against the whole gathered batch: the
    mean of the shares, and the sum of their gradients over 2, equal the loss of the whole batch and its gradient,
    with a mask of false negatives (queries 0 and 5 share a positive; query 3 judges query 6's positive)."""
    from retrieval_lab.losses.listwise_kl import ListwiseKLLoss
    from retrieval_lab.losses.margin_mse import MarginMSELoss
    from retrieval_lab.losses.samtone import SamToNeLoss

    torch.manual_seed(1)
    loss = {"infonce": InfoNCELoss(0.1), "infonce_bidirectional": InfoNCELoss(0.1, bidirectional=True),
            "samtone_query": SamToNeLoss(0.1), "samtone_both_bidirectional": SamToNeLoss(0.1, "both", True),
            "margin_mse": MarginMSELoss(scale=5.0, alpha=0.5), "listwise_kl": ListwiseKLLoss(0.1)}[name]
    q, d = torch.randn(8, 16), torch.randn(16, 16)
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask[0, 10] = mask[5, 0] = mask[3, 12] = True
    extra = {"mask": mask, **({"teacher": torch.randn(8, 2)} if name in ("margin_mse", "listwise_kl") else {})}

    def value_and_grad(rows):
        qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
        value = loss_on_vectors(loss, qq, dd, group_size=2, rows=rows, **extra)
        value.backward()
        return value.detach(), qq.grad, dd.grad

    whole = value_and_grad(None)
    shares = [value_and_grad(torch.arange(4)), value_and_grad(torch.arange(4, 8))]
    for part, (a, b) in enumerate(zip(*shares)):
        torch.testing.assert_close((a + b) / 2, whole[part], rtol=1e-5, atol=1e-6)
