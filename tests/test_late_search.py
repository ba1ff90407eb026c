"""Token-vector search (retrieval_lab.retrieval.late) on synthetic clustered token vectors: exact MaxSim against a
plain loop, ColBERT v1's candidate generation (ann) and ColBERTv2/PLAID's compressed index (plaid)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval_lab.errors import ConfigError
from retrieval_lab.models.representation import MultiVector
from retrieval_lab.retrieval import late

DIM = 32


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(docs: int, length: int, queries: int, seed: int = 0, clusters: int = 64, spread: float = 0.8):
    """Documents of up to ``length`` token vectors (cluster centre plus noise of squared norm about ``spread``: a
    cosine with its centre of about 0.75 for 0.8, 0.9 for 0.2;
    lengths between length/2 and length, the rest masked and filled with noise that must not count), and queries of
    12 vectors made from one document's tokens plus noise, the last 2 masked."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((clusters, DIM)))
    noise = np.sqrt(spread / DIM)
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


def numpy_maxsim(q: MultiVector, d: MultiVector) -> np.ndarray:
    """MaxSim with numpy: every query vector against every document vector, masked vectors left out."""
    each = np.einsum("aid,bjd->abij", q.vectors, d.vectors)
    each = np.where(d.mask[None, :, None, :], each, -np.inf).max(-1)
    return np.where(q.mask[:, None, :], each, 0).sum(-1)


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


@pytest.fixture(scope="module")
def tight():
    """Token vectors closer to their cluster centres (cosine about 0.9), as ColBERT's are."""
    return clustered(400, 24, 30, seed=2, spread=0.2)


@pytest.fixture(scope="module")
def plaid(tight):
    return {nbits: late.build(tight[0], "plaid", nbits=nbits) for nbits in (1, 2)}


def by_hand(index: late.PLAIDIndex, tokens: np.ndarray) -> np.ndarray:
    """ColBERTv2's decompression written out from the index's centroid ids, cutoffs and weights: centroid plus the
    weight of each residual value's bucket, L2-normalised."""
    centroid = index.centroids[index.codes.astype(np.int64)]
    return normalise(centroid + index.weights[np.searchsorted(index.cutoffs, tokens - centroid)])


@pytest.mark.parametrize("nbits", [1, 2])
def test_plaid_stores_each_token_as_its_nearest_centroid_and_packed_residual_buckets(tight, plaid, nbits):
    docs, _ = tight
    index, tokens = plaid[nbits], docs.vectors[docs.mask]
    count = len(tokens)
    assert len(index.centroids) == min(count, 2 ** int(np.log2(16 * np.sqrt(count)))) == 1024
    assert np.array_equal(index.codes, np.argmax(tokens @ index.centroids.T, axis=1))
    assert index.codes.dtype == np.int16 and index.residuals.shape == (count, DIM * nbits // 8)
    assert index.bytes_per_token == 2 + DIM * nbits // 8
    residuals = tokens - index.centroids[index.codes.astype(np.int64)]
    below = [(residuals <= cut).mean() for cut in index.cutoffs]  # cutoffs: quantiles of all residual values
    np.testing.assert_allclose(below, np.arange(1, 2 ** nbits) / 2 ** nbits, atol=0.02)
    rebuilt = index.decompress(np.arange(len(docs)))
    assert np.array_equal(rebuilt.mask.numpy(), docs.mask)
    np.testing.assert_allclose(rebuilt.vectors.numpy()[docs.mask], by_hand(index, tokens), atol=1e-5)


def test_plaid_decompressed_vectors_are_close_to_the_originals_and_closer_with_2_bits(tight, plaid):
    """Measured: cosine with the original 0.976 on average (lowest 0.91) with 1 bit, 0.991 (lowest 0.95) with 2."""
    docs, _ = tight
    tokens = docs.vectors[docs.mask]
    cosine = {}
    for nbits, index in plaid.items():
        rebuilt = index.decompress(np.arange(len(docs)))
        cosine[nbits] = (rebuilt.vectors.numpy()[docs.mask] * tokens).sum(1)
    assert cosine[2].mean() >= 0.985 and cosine[2].min() >= 0.93
    assert cosine[1].mean() >= 0.97 and cosine[1].min() >= 0.89
    assert cosine[1].mean() < cosine[2].mean() - 0.01


def test_plaid_finds_most_of_the_exact_top_10(tight, plaid):
    """Measured (ncells 4, centroid_threshold 0.45, ndocs 1024): the exact top 1 always, 0.93 of the exact top 10
    with 2 bits, 0.88 with 1 bit."""
    docs, queries = tight
    _, exact_ids = late.build(docs, "exact").search(queries, 10)
    found = {nbits: index.search(queries, 10)[1] for nbits, index in plaid.items()}
    for nbits, ids in found.items():
        assert np.array_equal(ids[:, 0], exact_ids[:, 0])
    assert overlap(found[2], exact_ids) >= 0.9
    assert overlap(found[1], exact_ids) >= 0.85


def test_plaid_ranks_its_candidates_by_maxsim_over_the_decompressed_vectors(tight, plaid):
    """Every centroid a cell and every document kept: the ranking is exact MaxSim over the decompressed vectors."""
    docs, queries = tight
    index = plaid[2]
    index.ncells, index.ndocs = len(index.centroids), len(docs)
    try:
        scores, ids = index.search(queries, 10)
    finally:
        index.ncells, index.ndocs = 4, None
    rebuilt = np.zeros_like(docs.vectors)
    rebuilt[docs.mask] = by_hand(index, docs.vectors[docs.mask])
    expected = numpy_maxsim(queries, MultiVector(rebuilt, docs.mask))
    assert np.array_equal(ids, np.argsort(-expected, axis=1)[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(expected, ids, 1), rtol=1e-4)


def test_plaid_centroid_interaction_leaves_out_centroids_below_the_threshold(tight, plaid):
    docs, queries = tight
    index, query = plaid[2], queries.vectors[0][queries.mask[0]]
    centroid_scores = query @ index.centroids.T
    rows = np.arange(50)
    for threshold in (0.45, 0.8):
        index.threshold = threshold
        got = index.centroid_interaction(torch.as_tensor(centroid_scores), rows).numpy()
        kept = centroid_scores.max(0) >= threshold
        expected = []
        for row in rows:
            codes = index.codes[index.offsets[row]:index.offsets[row + 1]].astype(np.int64)
            codes = codes[kept[codes]]
            expected.append(centroid_scores[:, codes].max(1).sum() if len(codes) else 0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    index.threshold = 0.45
    assert 0 < kept.sum() < len(kept)


def test_plaid_with_no_centroid_above_the_threshold_leaves_none_out(tight, plaid):
    """A threshold no query token reaches would score every candidate 0: centroid interaction then prunes nothing."""
    docs, queries = tight
    index, query = plaid[2], torch.as_tensor(queries.vectors[0][queries.mask[0]])
    centroid_scores = query @ torch.as_tensor(index.centroids).T
    rows = np.arange(50)
    index.threshold = -2.0
    try:
        unpruned = index.centroid_interaction(centroid_scores, rows)
        index.threshold = 2.0  # above any cosine
        assert torch.equal(index.centroid_interaction(centroid_scores, rows), unpruned)
    finally:
        index.threshold = 0.45


@pytest.mark.parametrize("index, settings, message", [
    ("exact", {"batch_size": 0}, r"retriever\.index_settings\.batch_size must be a positive whole number"),
    ("ann", {"candidates": 2.5}, r"retriever\.index_settings\.candidates must be a positive whole number"),
    ("ann", {"ann": "ivf"}, r"retriever\.index_settings\.ann must be 'flat' or 'hnsw', got 'ivf'"),
    ("ann", {"dtype": "int8"}, r"retriever\.index_settings\.dtype must be one of"),
    ("plaid", {"nbits": 3}, r"retriever\.index_settings\.nbits must be 1 or 2, got '3'"),
    ("plaid", {"ncells": 0}, r"retriever\.index_settings\.ncells must be a positive whole number"),
    ("plaid", {"centroids": 10_000}, r"retriever\.index_settings\.centroids must be at most the number of document "
                                     r"token vectors \(\d+\), got '10000'"),
    ("plaid", {"centroids": 64, "sample": 10}, r"retriever\.index_settings\.sample must be between the number of "
                                               r"centroids \(64\)"),
    ("plaid", {"centroid_threshold": "high"}, r"retriever\.index_settings\.centroid_threshold must be a number"),
    ("plaid", {"seed": -1}, r"retriever\.index_settings\.seed must be a whole number of 0 or more"),
])
def test_bad_settings_are_refused_in_a_sentence_naming_the_key(corpus, index, settings, message):
    with pytest.raises(ConfigError, match=message):
        late.build(corpus[0][:10], index, **settings)
