"""RankNet's value and gradient against its formula by hand; it trains with in-batch, BM25 and MoCo negatives."""
from __future__ import annotations

import json
import math

import pytest
import torch

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.ranknet import RankNetLoss
from retrieval_lab.models.family import loss_on_vectors
from test_combinations import FAST, compose_train
from retrieval_lab.train import train


def by_hand(q, d, group, scale, mask=None, queue=None, queue_mask=None):
    total = 0.0
    for i in range(len(q)):
        s = lambda doc: float(sum(a * b for a, b in zip(q[i].tolist(), doc.tolist())))
        positive = s(d[i * group])
        negatives = [s(d[j]) for j in range(len(d)) if j != i * group and not (mask is not None and mask[i, j])]
        if queue is not None:
            negatives += [s(k) for m, k in enumerate(queue) if not (queue_mask is not None and queue_mask[i, m])]
        total += sum(math.log1p(math.exp(scale * (n - positive))) for n in negatives) / len(negatives)
    return total / len(q)


@pytest.mark.parametrize("group", [1, 3])
def test_value_equals_the_formula(group):
    g = torch.Generator().manual_seed(group)
    q = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(4 * group, 8, generator=g), dim=-1)
    assert loss_on_vectors(RankNetLoss(3.0), q, d, group).item() == pytest.approx(by_hand(q, d, group, 3.0), rel=1e-6)
    mask = torch.zeros(4, 4 * group, dtype=torch.bool)
    mask[0, group], mask[2, 0] = True, True  # false negatives: left out of those queries' pairs
    queue = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    queue_mask = torch.tensor([[True, False, False]] + [[False] * 3] * 3)
    value = loss_on_vectors(RankNetLoss(5.0), q, d, group, mask=mask, queue=queue, queue_mask=queue_mask)
    assert value.item() == pytest.approx(by_hand(q, d, group, 5.0, mask, queue, queue_mask), rel=1e-6)


def test_gradient_equals_the_formulas():
    """dL/ds for one query: sigma/|N| * sigmoid(sigma (s_j - s+)) on each negative, minus their sum on the positive."""
    q = torch.nn.functional.normalize(torch.randn(1, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    d = torch.randn(1, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
    others = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    scale = 2.0
    loss_on_vectors(RankNetLoss(scale), q, d, 1, queue=others).backward()  # one query, its positive, 3 queue keys
    s = (q @ others.T)[0]
    weight = scale / 3 * torch.sigmoid(scale * (s - (q @ d.T)[0, 0])).sum()
    assert torch.allclose(d.grad, -weight * q, atol=1e-6)


def test_scale_is_checked():
    with pytest.raises(ConfigError, match="loss.scale must be a positive number"):
        RankNetLoss(0)


@pytest.mark.parametrize("negatives", ["inbatch", "bm25", "moco"])
def test_trains_with_in_batch_bm25_and_moco_negatives(negatives, tiny_model, beir_folder, bm25_negatives, tmp_path):
    overrides = ["loss=ranknet", f"negatives={negatives}", "data=beir", f"data.path={beir_folder}",
                 f"model.name_or_path={tiny_model}", *[o for o in FAST if negatives == "moco" or "queue_size" not in o]]
    if negatives == "bm25":
        overrides.append(f"negatives.file={bm25_negatives}")
    train(compose_train(overrides), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2
    log = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in log


def test_a_nan_score_makes_the_loss_nan_and_is_not_dropped_like_a_false_negative():
    q = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    d = q.clone()
    d[1, 0] = float("nan")
    assert torch.isnan(loss_on_vectors(RankNetLoss(), q, d))
