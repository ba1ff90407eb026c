"""Token-vector search (retrieval_lab.retrieval.late) on synthetic clustered token vectors: exact MaxSim against a
plain loop, ColBERT v1's candidate generation (ann) and ColBERTv2/PLAID's compressed index (plaid)."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval_lab.errors import ConfigError
from retrieval_lab.models.representation import MultiVector
from retrieval_lab.retrieval import late

DIM = 32


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(docs: int, length: int, queries: int, seed: int = 0, clusters: int = 64):
    """Documents of up to ``length`` token vectors (cluster centre plus noise, cosine with its centre about 0.75;
    lengths between length/2 and length, the rest masked and filled with noise that must not count), and queries of
    12 vectors made from one document's tokens plus noise, the last 2 masked."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((clusters, DIM)))
    noise = np.sqrt(0.8 / DIM)
    which = rng.integers(0, clusters, (docs, length))
    vectors = normalise(centres[which] + noise * rng.standard_normal((docs, length, DIM)))
    mask = np.arange(length)[None] < rng.integers(length // 2, length + 1, docs)[:, None]
    vectors[~mask] = normalise(rng.standard_normal((int((~mask).sum()), DIM)))
    source = rng.integers(0, docs, queries)
    picks = rng.integers(0, mask[source].sum(1)[:, None], (queries, 12))
    q = normalise(vectors[source[:, None], picks] + noise * rng.standard_normal((queries, 12, DIM)))
    q_mask = np.ones((queries, 12), dtype=bool)
    q_mask[:, 10:] = False
    return MultiVector(vectors, mask), MultiVector(q, q_mask)


@pytest.fixture(scope="module")
def corpus():
    return clustered(400, 24, 30)


def loop_maxsim(q: MultiVector, d: MultiVector) -> np.ndarray:
    """MaxSim written out: for each query and document, the sum over real query vectors of the best dot product with
    a real document vector."""
    out = np.zeros((len(q), len(d)))
    for a in range(len(q)):
        for b in range(len(d)):
            total = 0.0
            for i in np.flatnonzero(q.mask[a]):
                total += max(float(q.vectors[a, i] @ d.vectors[b, j]) for j in np.flatnonzero(d.mask[b]))
            out[a, b] = total
    return out


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` that ``found``'s row holds too."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def test_exact_maxsim_matches_a_plain_loop_and_ignores_masked_vectors(corpus):
    docs, queries = corpus
    docs, queries = docs[:40], queries[:5]
    expected = loop_maxsim(queries, docs)
    scores, ids = late.build(docs, "exact", batch_size=7).search(queries, 5)
    order = np.argsort(-expected, axis=1)[:, :5]
    assert np.array_equal(ids, order)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, 1), rtol=1e-5, atol=1e-5)


def test_ann_flat_with_enough_candidates_ranks_as_exact(corpus):
    docs, queries = corpus
    exact_scores, exact_ids = late.build(docs, "exact").search(queries, 10)
    index = late.build(docs, "ann", candidates=int(docs.mask.sum()), ann="flat")
    scores, ids = index.search(queries, 10)
    assert len(index) == len(docs)
    assert np.array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)


def test_ann_with_few_candidates_finds_most_of_the_exact_top_10(corpus):
    """Measured on this corpus (400 documents, 7,244 token vectors in 64 clusters): candidates=32 keeps 0.99 of
    exact's top 10 with flat, 0.98 with hnsw; candidates=4 keeps 0.42 (flat)."""
    docs, queries = corpus
    _, exact_ids = late.build(docs, "exact").search(queries, 10)
    for kind in ("flat", "hnsw"):
        _, ids = late.build(docs, "ann", candidates=32, ann=kind).search(queries, 10)
        assert overlap(ids, exact_ids) >= 0.95
    _, ids = late.build(docs, "ann", candidates=4).search(queries, 10)
    assert 0.2 <= overlap(ids, exact_ids) <= 0.6


def test_ann_pads_queries_with_fewer_candidates_than_k():
    docs, queries = clustered(30, 8, 3, seed=1)
    scores, ids = late.build(docs, "ann", candidates=1).search(queries, 30)
    found = (ids >= 0).sum(1)
    assert (found <= 10).all() and (found >= 1).all()  # 10 real query vectors, one token each
    assert np.isneginf(scores[ids < 0]).all() and np.isfinite(scores[ids >= 0]).all()
    exact = loop_maxsim(queries, docs)
    for row in range(3):
        kept = ids[row][ids[row] >= 0]
        np.testing.assert_allclose(scores[row][:len(kept)], exact[row, kept], rtol=1e-5)
        assert (np.diff(scores[row][:len(kept)]) <= 0).all()


@pytest.mark.parametrize("index, settings, message", [
    ("exact", {"batch_size": 0}, r"retriever\.index_settings\.batch_size must be a positive whole number"),
    ("ann", {"candidates": 2.5}, r"retriever\.index_settings\.candidates must be a positive whole number"),
    ("ann", {"ann": "ivf"}, r"retriever\.index_settings\.ann must be 'flat' or 'hnsw', got 'ivf'"),
    ("ann", {"dtype": "int8"}, r"retriever\.index_settings\.dtype must be one of"),
])
def test_bad_settings_are_refused_in_a_sentence_naming_the_key(corpus, index, settings, message):
    with pytest.raises(ConfigError, match=message):
        late.build(corpus[0][:10], index, **settings)
