"""Poly-encoder: m = 1 is a bi-encoder pooling queries by attention with one learned vector (by hand from the
transformer's hidden states); m = 3 scores as the formula by a hand loop; padding is masked; score_groups equals
score's diagonal blocks; the codes and m survive saving; gradients reach the codes; exact search equals scoring all
documents by hand, and rerank with depth = corpus size equals exact; the entry point trains it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.models.biencoder import BiEncoderModule
from retrieval_lab.models.polyencoder import PolyEncoder, PolyIndex
from retrieval_lab.models.representation import MultiVector
from retrieval_lab.retrieval.dense import DenseRetriever
from retrieval_lab.train import train
from test_combinations import FAST, compose_train
from test_grad_cache import assert_same, make_batch, plain_and_cached

QUERIES = ["gene cancer", "virus in the blood of patients", "a"]
DOCS = ["protein gene cell brain heart", "a", "insulin level in the liver", "tumor study"]


def poly(tiny_model, codes, **settings) -> PolyEncoder:
    torch.manual_seed(0)
    model = PolyEncoder(codes, name_or_path=str(tiny_model), query_max_length=16, doc_max_length=32, **settings)
    with torch.no_grad():  # codes large enough that the attention is far from uniform
        model.codes.normal_(0, 1.0)
    return model.eval()


def by_hand(model: PolyEncoder, queries: list[str], docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The code vectors y (Q x m x D) and document vectors d (N x D) from the transformer's hidden states, one
    text at a time (no padding): y_i = normalize(sum_t softmax_t(c_i . h_t) h_t), d = normalize(mean_t h_t)."""
    ys, ds = [], []
    for text in queries:
        hidden = model.query_model(**model.tokenizer([text], return_tensors="pt")).last_hidden_state[0]  # T x H
        attention = (model.codes @ hidden.T).softmax(-1)  # m x T
        ys.append(F.normalize(attention @ hidden, dim=-1))
    for text in docs:
        hidden = model.query_model(**model.tokenizer([text], return_tensors="pt")).last_hidden_state[0]
        ds.append(F.normalize(hidden.mean(0), dim=-1))
    return torch.stack(ys), torch.stack(ds)


def encoded(model: PolyEncoder, queries: list[str], docs: list[str]):
    tokenizer = model.tokenizer
    return (model.encode_queries(tokenizer(queries, padding=True, return_tensors="pt")),
            model.encode_docs(tokenizer(docs, padding=True, return_tensors="pt")))


@torch.no_grad()
def test_one_code_is_a_bi_encoder_pooling_queries_by_attention_with_one_learned_vector(tiny_model):
    """score = finish(sum_t softmax_t(c . h_t) h_t) . d: with one code, the softmax over codes is 1."""
    model = poly(tiny_model, 1)
    q, d = encoded(model, QUERIES, DOCS)
    y, expected_d = by_hand(model, QUERIES, DOCS)
    assert q.vectors.shape == (3, 1, 32) and q.mask.all()
    assert torch.allclose(d, expected_d, atol=1e-5)
    expected = y[:, 0] @ expected_d.T
    assert torch.allclose(model.score(q, d), expected, atol=1e-5)
    assert expected.std() > 0.01  # scores that differ


@torch.no_grad()
def test_several_codes_score_as_the_formula_by_a_hand_loop(tiny_model):
    """w = softmax_i(y_i . d), q_d = sum_i w_i y_i, score = q_d . d, for every query and document."""
    model = poly(tiny_model, 3)
    q, d = encoded(model, QUERIES, DOCS)
    y, _ = by_hand(model, QUERIES, DOCS)
    assert torch.allclose(q.vectors, y, atol=1e-5)
    scores = model.score(q, d)
    assert scores.dtype == torch.float32 and scores.shape == (3, 4)
    for a in range(3):
        for b in range(4):
            weights = torch.softmax(torch.stack([y[a, i] @ d[b] for i in range(3)]), 0)
            q_d = sum(weights[i] * y[a, i] for i in range(3))
            assert abs(float(scores[a, b]) - float(q_d @ d[b])) < 1e-5
    assert torch.allclose(model.score(d, q), scores.T)  # documents against queries: the transpose
    assert torch.allclose(model.score(d, d), d @ d.T)  # documents against documents: inner products
    with pytest.raises(ConfigError, match="not queries against queries"):
        model.score(q, q)


@torch.no_grad()
def test_padded_query_tokens_are_masked(tiny_model):
    """A short query's code vectors are the same alone and padded in a batch with a long one, and the padding's
    hidden states do not enter them."""
    model = poly(tiny_model, 4)
    alone = model.encode_queries(model.tokenizer(["a"], return_tensors="pt")).vectors[0]
    batch = model.tokenizer(["a", "virus in the blood of patients and the liver"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # "a" is padded
    assert torch.allclose(model.encode_queries(batch).vectors[0], alone, atol=1e-5)


@torch.no_grad()
def test_score_groups_are_the_diagonal_blocks_of_score(tiny_model):
    model = poly(tiny_model, 3)
    q, d = encoded(model, QUERIES[:2], DOCS)  # 2 queries, groups of 2 documents
    full = model.score(q, d)
    groups = model.score_groups(q, d, 2)
    assert torch.allclose(groups, torch.stack([full[0, :2], full[1, 2:]]), atol=1e-6)
    assert torch.allclose(model.score_groups(q, d, 2, rows=torch.tensor([1])), full[1:, 2:], atol=1e-6)


def test_gradient_reaches_the_codes_and_caching_equals_the_plain_step(tiny_model):
    model = poly(tiny_model, 3)
    module = BiEncoderModule(model, InfoNCELoss(0.05), group_size=2)
    batch = make_batch(model, 2)
    loss = module.loss_from_embeddings([embed(inputs) for embed, inputs in module.towers(batch)], batch)
    loss.backward()
    assert model.codes.grad is not None and model.codes.grad.abs().sum() > 0
    assert_same(*plain_and_cached(module, batch, 3))


def test_settings_are_checked(tiny_model):
    for bad in (0, -2, "3", True, 1.5):
        with pytest.raises(ConfigError, match="model.codes must be a positive whole number or null"):
            PolyEncoder(bad, name_or_path=str(tiny_model))
    model = PolyEncoder(name_or_path=str(tiny_model))
    assert model.m == 16 and model.codes.shape == (16, 32)
    assert 0.01 < float(model.codes.detach().std()) < 0.03  # near-uniform first attention
    with pytest.raises(ConfigError, match="eval.index must be 'exact' or 'rerank'"):
        PolyEncoder.check_index("flat", {}, "eval.index")
    with pytest.raises(ConfigError, match="not a setting of the 'exact' index"):
        PolyEncoder.check_index("exact", {"depth": 5}, "eval.index")
    with pytest.raises(ConfigError, match="depth must be a positive whole number"):
        model.build_index(np.zeros((3, 32), np.float32), "rerank", depth=0)


@torch.no_grad()
def test_saving_and_loading_keeps_the_codes_and_m(tiny_model, tmp_path):
    model = poly(tiny_model, 5)
    model.save(tmp_path / "saved")
    settings = json.loads((tmp_path / "saved" / "retrieval_lab.json").read_text())
    assert settings["codes"] == 5 and (tmp_path / "saved" / "poly_codes.safetensors").is_file()
    assert not list((tmp_path / "saved").rglob("*.bin")) and not list((tmp_path / "saved").rglob("*.pt"))
    loaded = PolyEncoder(name_or_path=str(tmp_path / "saved")).eval()
    assert loaded.m == 5 and torch.equal(loaded.codes, model.codes)
    q, d = encoded(model, QUERIES, DOCS)
    lq, ld = encoded(loaded, QUERIES, DOCS)
    assert torch.allclose(model.score(q, d), loaded.score(lq, ld), atol=1e-6)
    with pytest.warns(UserWarning, match="model.codes=2 is ignored"):
        assert PolyEncoder(2, name_or_path=str(tmp_path / "saved")).m == 5
    (tmp_path / "saved" / "poly_codes.safetensors").unlink()
    with pytest.raises(ConfigError, match="poly_codes.safetensors is missing"):
        PolyEncoder(name_or_path=str(tmp_path / "saved"))


def test_exact_search_ranks_as_scoring_every_document_and_rerank_at_full_depth_equals_it():
    gen = torch.Generator().manual_seed(0)
    docs = F.normalize(torch.randn(50, 8, generator=gen), dim=-1)
    queries = MultiVector(F.normalize(torch.randn(7, 4, 8, generator=gen), dim=-1), torch.ones(7, 4, dtype=torch.bool))
    numpy_queries = MultiVector(queries.vectors.numpy(), queries.mask.numpy())
    k = 10
    def by_formula(y, d):  # w = softmax_i(y_i . d), score = (sum_i w_i y_i) . d
        return float(torch.softmax(y @ d, 0) @ y @ d)

    all_scores = torch.tensor([[by_formula(queries.vectors[a], docs[b]) for b in range(50)] for a in range(7)])
    exact = PolyIndex(docs.numpy(), budget=64)  # budget: a few queries at a time
    scores, ids = exact.search(numpy_queries, k)
    for row in range(7):
        assert ids[row].tolist() == torch.argsort(all_scores[row], descending=True)[:k].tolist()
        assert np.allclose(scores[row], all_scores[row].sort(descending=True).values[:k].numpy(), atol=1e-6)
    rerank_scores, rerank_ids = PolyIndex(docs.numpy(), depth=50, budget=64).search(numpy_queries, k)
    assert np.array_equal(rerank_ids, ids) and np.allclose(rerank_scores, scores, atol=1e-6)
    # a shallow first stage: its candidates (inner product with the mean code vector), re-scored
    shallow_scores, shallow_ids = PolyIndex(docs.numpy(), depth=5).search(numpy_queries, k)
    means = queries.vectors.mean(1)
    for row in range(7):
        candidates = torch.argsort(means[row] @ docs.T, descending=True)[:5]
        order = candidates[torch.argsort(all_scores[row, candidates], descending=True)]
        assert shallow_ids[row, :5].tolist() == order.tolist() and (shallow_ids[row, 5:] == -1).all()
        assert np.isneginf(shallow_scores[row, 5:]).all()


def test_retrievers_with_exact_and_full_depth_rerank_return_the_same_run(tiny_model, beir_folder):
    from retrieval_lab.data.beir import BeirDataset

    model = poly(tiny_model, 3)
    test = BeirDataset(beir_folder).split("test")
    runs = [DenseRetriever(model, batch_size=16, progress=False, index=index, index_settings=settings)
            .retrieve(test.corpus, test.queries, k=10)
            for index, settings in (("exact", {}), ("rerank", {"depth": len(test.corpus)}))]
    assert runs[0].keys() == runs[1].keys()
    for qid in runs[0]:
        assert list(runs[0][qid]) == list(runs[1][qid])
        assert np.allclose(list(runs[0][qid].values()), list(runs[1][qid].values()), atol=1e-5)


def test_samtone_is_refused_and_moco_accepted():
    from retrieval_lab import config

    with pytest.raises(ConfigError, match=r"loss=SamToNeLoss with loss.side=query reads the query_query scores, "
                                          r"which model=PolyEncoder does not compute"):
        config.check_train_config(compose_train(["model=polyencoder", "loss=samtone"]))
    config.check_train_config(compose_train(["model=polyencoder", "loss=samtone", "loss.side=document"]))
    config.check_train_config(compose_train(["model=polyencoder", "negatives=moco"]))


def test_trains_saves_its_codes_and_evaluates_with_rerank(tiny_model, beir_folder, tmp_path):
    overrides = ["model=polyencoder", "model.codes=4", f"model.name_or_path={tiny_model}", "data=beir",
                 f"data.path={beir_folder}", "eval.index=rerank", "+eval.index_settings.depth=20",
                 *[o for o in FAST if o not in ("eval.after=false", "save_model=false") and "queue_size" not in o]]
    train(compose_train(overrides), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["after"]["ndcg@10"] <= 1
    saved = tmp_path / "run" / "model"
    assert json.loads((saved / "retrieval_lab.json").read_text())["codes"] == 4
    assert PolyEncoder(name_or_path=str(saved)).m == 4  # m comes back with the folder
