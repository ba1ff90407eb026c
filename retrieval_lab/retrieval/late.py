"""Search over token vectors (ColBERT, :mod:`retrieval_lab.models.colbert`): an index over every document's
vectors whose ``search(queries, k)`` takes encoded queries (:class:`MultiVector`, numpy) and returns (scores,
document rows), each Q x k, best first (rows of -1 scoring -inf pad a query that found fewer than k documents).
Each index's ``nbytes`` is what it stores, in bytes.

- ``exact``: MaxSim of every query against every document, in batches of documents (the reference for the others).
- ``ann``: ColBERT v1's end-to-end retrieval (Khattab & Zaharia, 2020, section 3.6): a faiss index over every real
  document token vector (``ann``: ``flat``, exact inner product, or ``hnsw``, a graph of 32 links per vector);
  each query token vector takes its ``candidates`` nearest token vectors, and the documents owning them, ranked
  by exact MaxSim, are the results.
- ``plaid``: ColBERTv2's residual compression (Santhanam et al., 2022, "ColBERTv2: Effective and Efficient Retrieval
  via Lightweight Late Interaction") searched as PLAID does (Santhanam et al., 2022, "PLAID: An Efficient Engine for
  Late Interaction Retrieval"). Index: spherical k-means centroids over a sample of token vectors; each token kept
  as its nearest centroid's id (int16, or int32 past 32,768 centroids) and its residual (vector - centroid)
  quantised to ``nbits`` bits per dimension, packed into bytes (bytes per token: 2 or 4 + ceil(dim * nbits / 8));
  an inverted list from each centroid to the documents holding a token of it. Search: (1) each query token's
  ``ncells`` best centroids give the candidate documents; (2) centroid interaction, MaxSim with each document token
  replaced by its centroid's score, the centroids no query token scores ``centroid_threshold`` with left out,
  keeps the best ``ndocs``; (3) those documents are decompressed (centroid + bucket weights, L2-normalised) and
  ranked by exact MaxSim.

  Written here with faiss (k-means, the search of centroids) and torch; the fast-plaid and pylate packages pin
  torch and transformers versions other than this project's.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_lab.errors import ConfigError
from retrieval_lab.models.colbert import maxsim
from retrieval_lab.models.encoder import require_whole
from retrieval_lab.models.representation import MultiVector

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KEY = "retriever.index_settings"
QUERY_BATCH = 16          # queries searched together (exact: 16 x 1024 documents x 33 x 181 floats, 0.4 GB)
TOKEN_CHUNK = 1 << 16     # token vectors added, assigned or compressed together
QUIET_BELOW = 1 << 20     # no progress bar for corpora of fewer token vectors


def torch_dtype(dtype: str, key: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"{key} must be one of {', '.join(DTYPES)}, got '{dtype}'.")
    return DTYPES[dtype]


def check_settings(index: str, settings: dict, key: str = KEY) -> None:
    """Refuse, in a sentence naming ``key``.<setting>, a value an ``index`` kind's setting cannot take (before any
    corpus is encoded: the training config check calls it with ``key`` = eval.index_settings)."""
    given = dict(settings)
    for name in ("batch_size", "candidates", "ncells", "kmeans_iterations"):
        if name in given:
            require_whole(f"{key}.{name}", given[name])
    for name in ("centroids", "ndocs", "sample"):
        if name in given:
            require_whole(f"{key}.{name}", given[name], nullable=True)
    if "dtype" in given:
        torch_dtype(given["dtype"], f"{key}.dtype")
    if "ann" in given and given["ann"] not in ("flat", "hnsw"):
        raise ConfigError(f"{key}.ann must be 'flat' or 'hnsw', got '{given['ann']}'.")
    if "nbits" in given and (given["nbits"] not in (1, 2) or isinstance(given["nbits"], bool)):
        raise ConfigError(f"{key}.nbits must be 1 or 2, got '{given['nbits']}'.")
    threshold = given.get("centroid_threshold", 0.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ConfigError(f"{key}.centroid_threshold must be a number, got '{threshold}'.")
    seed = given.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{key}.seed must be a whole number of 0 or more, got '{seed}'.")


def as_torch(rep: MultiVector, device=None, dtype=torch.float32) -> MultiVector:
    return MultiVector(torch.as_tensor(rep.vectors, device=device).to(dtype), torch.as_tensor(rep.mask, device=device))


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top.values, top.indices


def empty_results(queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Q x k scores of -inf and rows of -1, for indexes that fill each query's best rows in."""
    return np.full((queries, k), -np.inf, dtype=np.float32), np.full((queries, k), -1, dtype=np.int64)


def put_best(scores: np.ndarray, ids: np.ndarray, row: int, found: torch.Tensor, rows: np.ndarray) -> None:
    """Write the best ``k`` (the width of ``scores``) of documents ``rows`` scoring ``found`` into ``row``."""
    top = found.float().topk(min(scores.shape[1], len(rows)))
    scores[row, :len(top.values)] = top.values.cpu().numpy()
    ids[row, :len(top.values)] = rows[top.indices.cpu().numpy()]


def token_chunks(docs: MultiVector, desc: str):
    """The real token vectors of ``docs`` in document order (float32, contiguous), about ``TOKEN_CHUNK`` at a
    time, with a progress bar over documents for large corpora."""
    lengths = docs.mask.sum(1)
    per_chunk = max(1, int(TOKEN_CHUNK // max(1, lengths.mean())))
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=int(lengths.sum()) < QUIET_BELOW) as bar:
        for start in range(0, len(docs), per_chunk):
            part = docs[start:start + per_chunk]
            yield np.ascontiguousarray(part.vectors[part.mask], dtype=np.float32)
            bar.update(len(part))


class ExactIndex:
    """MaxSim of the queries against every document, ``batch_size`` documents at a time, with torch on ``device``
    (the documents kept there in ``dtype``; scores in float32)."""

    def __init__(self, docs: MultiVector, device=None, batch_size: int = 1024, dtype: str = "float32"):
        check_settings("exact", {"batch_size": batch_size, "dtype": dtype})
        self.docs = as_torch(docs, device, torch_dtype(dtype, f"{KEY}.dtype"))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def nbytes(self) -> int:
        """The padded document vectors and their masks."""
        return self.docs.vectors.nbytes + self.docs.mask.nbytes

    def scores(self, queries: MultiVector) -> torch.Tensor:
        """Q x N MaxSim of ``queries`` (torch, on the index's device) against every document."""
        return torch.cat([maxsim(queries, self.docs[start:start + self.batch_size])
                          for start in range(0, len(self.docs), self.batch_size)], 1)

    def scores_of(self, query: MultiVector, rows: np.ndarray) -> torch.Tensor:
        """MaxSim of one query (torch, 1 row) against documents ``rows`` only (a vector of len(rows))."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.docs.device)
        return torch.cat([maxsim(query, self.docs[rows[start:start + self.batch_size]])[0]
                          for start in range(0, len(rows), self.batch_size)])

    @torch.inference_mode()
    def search(self, queries: MultiVector, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = as_torch(queries, self.docs.device)
        scores, ids = [], []
        for start in range(0, len(queries), QUERY_BATCH):
            values, rows = top_k(self.scores(queries[start:start + QUERY_BATCH]), k)
            scores.append(values.cpu())
            ids.append(rows.cpu())
        return torch.cat(scores).numpy(), torch.cat(ids).numpy()


class ANNIndex:
    """ColBERT v1's end-to-end retrieval: a faiss index (``ann``: ``flat`` or ``hnsw``) over every real document
    token vector; each real query token vector takes its ``candidates`` nearest (HNSW searches with
    efSearch = ``candidates``), and the documents owning them are ranked by exact MaxSim with torch on ``device``
    (documents kept there in ``dtype``)."""

    def __init__(self, docs: MultiVector, device=None, candidates: int = 256, ann: str = "flat",
                 dtype: str = "float32"):
        import faiss

        check_settings("ann", {"candidates": candidates, "ann": ann, "dtype": dtype})
        self.exact = ExactIndex(docs, device, dtype=dtype)
        self.candidates, self.kind = candidates, ann
        dim = docs.vectors.shape[2]
        if ann == "flat":
            self.faiss = faiss.IndexFlatIP(dim)
        else:
            self.faiss = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            self.faiss.hnsw.efSearch = candidates
        self.owner = np.repeat(np.arange(len(docs), dtype=np.int32), docs.mask.sum(1))  # document of each token
        for vectors in token_chunks(docs, f"faiss {ann} index"):
            self.faiss.add(vectors)

    def __len__(self) -> int:
        return len(self.exact)

    @property
    def nbytes(self) -> int:
        """The faiss index (its vectors, and an HNSW graph's links), each token's document and the documents' vectors
        for MaxSim."""
        size = self.faiss.ntotal * self.faiss.d * 4
        if self.kind == "hnsw":
            hnsw = self.faiss.hnsw
            size += hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
        return size + self.owner.nbytes + self.exact.nbytes

    def candidate_rows(self, queries: MultiVector) -> list[np.ndarray]:
        """For each query (numpy), the sorted rows of the documents owning its tokens' nearest token vectors."""
        tokens = np.ascontiguousarray(queries.vectors[queries.mask], dtype=np.float32)
        _, hits = self.faiss.search(tokens, min(self.candidates, self.faiss.ntotal))
        per_query = np.split(hits, np.cumsum(queries.mask.sum(1))[:-1])
        return [np.unique(self.owner[found[found >= 0]]).astype(np.int64) for found in per_query]

    @torch.inference_mode()
    def search(self, queries: MultiVector, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = empty_results(len(queries), k)
        on_device = as_torch(queries, self.exact.docs.device)
        for start in range(0, len(queries), QUERY_BATCH):
            for offset, rows in enumerate(self.candidate_rows(queries[start:start + QUERY_BATCH])):
                row = start + offset
                if len(rows):
                    put_best(scores, ids, row, self.exact.scores_of(on_device[row:row + 1], rows), rows)
        return scores, ids


def default_centroids(tokens: int) -> int:
    """ColBERTv2's number of centroids for ``tokens`` document token vectors: 2^floor(log2(16 sqrt(tokens))), at
    most ``tokens``."""
    return min(tokens, 2 ** int(np.floor(np.log2(16 * np.sqrt(tokens)))))


def default_sample(tokens: int, docs: int) -> int:
    """ColBERTv2's k-means sample: the token vectors of 1 + 16 sqrt(tokens) documents (tokens / docs each), at most
    every token vector."""
    return min(tokens, int(tokens / docs * (1 + 16 * np.sqrt(tokens))))


def nearest(centroids, vectors: np.ndarray) -> np.ndarray:
    """The row of the best inner product in faiss index ``centroids`` for each of ``vectors`` (int64)."""
    return centroids.search(vectors, 1)[1][:, 0]


class PLAIDIndex:
    """ColBERTv2's compressed token vectors searched in PLAID's stages (see the module docstring), with torch on
    ``device``.

    Settings (PLAID's for k around 100 where it has one): ``nbits`` 1 or 2 (2); ``centroids`` (None: ColBERTv2's
    2^floor(log2(16 sqrt(tokens)))); ``ncells`` centroids per query token (4: PLAID uses 2 for k=100, 4 for
    k=1000); ``centroid_threshold`` (0.45, PLAID's for k=100); ``ndocs`` documents ranked exactly (None:
    max(1024, 4k), PLAID's 1024 for k=100 and about 4k above; never fewer than k); ``kmeans_iterations`` (4,
    ColBERTv2's); ``sample`` token vectors for k-means (None: ColBERTv2's, the tokens of 1 + 16 sqrt(tokens)
    documents); ``seed`` of the sample and of k-means (0). Queries are searched one at a time."""

    def __init__(self, docs: MultiVector, device=None, nbits: int = 2, centroids: int | None = None, ncells: int = 4,
                 centroid_threshold: float = 0.45, ndocs: int | None = None, kmeans_iterations: int = 4,
                 sample: int | None = None, seed: int = 0):
        import faiss

        check_settings("plaid", {"nbits": nbits, "centroids": centroids, "ncells": ncells,
                                 "centroid_threshold": centroid_threshold, "ndocs": ndocs,
                                 "kmeans_iterations": kmeans_iterations, "sample": sample, "seed": seed})
        lengths = docs.mask.sum(1).astype(np.int64)
        tokens, dim = int(lengths.sum()), docs.vectors.shape[2]
        if tokens == 0:
            raise ConfigError(f"a {KEY} 'plaid' index needs documents with token vectors, got none.")
        centroids = default_centroids(tokens) if centroids is None else centroids
        if centroids > tokens:
            raise ConfigError(f"{KEY}.centroids must be at most the number of document token vectors ({tokens}), "
                              f"got '{centroids}'.")
        sample = max(centroids, default_sample(tokens, len(docs))) if sample is None else sample
        if not centroids <= sample <= tokens:
            raise ConfigError(f"{KEY}.sample must be between the number of centroids ({centroids}) and of document "
                              f"token vectors ({tokens}), got '{sample}'.")
        self.nbits, self.ncells, self.threshold, self.ndocs = nbits, ncells, float(centroid_threshold), ndocs
        self.dim, self.device = dim, torch.device(device) if device is not None else torch.device("cpu")

        # centroids: spherical k-means over a sample; bucket cutoffs and weights from held-out tokens' residuals
        flat = np.ascontiguousarray(docs.vectors[docs.mask], dtype=np.float32)
        order = np.random.default_rng(seed).permutation(tokens)
        heldout = order[sample:sample + 50_000] if sample < tokens else order[:50_000]
        kmeans = faiss.Kmeans(dim, centroids, niter=kmeans_iterations, seed=seed, spherical=True,
                              max_points_per_centroid=tokens, min_points_per_centroid=1, verbose=tokens >= QUIET_BELOW)
        kmeans.train(flat[np.sort(order[:sample])])
        del order
        self.centroids = kmeans.centroids.astype(np.float32)
        search = faiss.IndexFlatIP(dim)
        search.add(self.centroids)
        residuals = flat[heldout] - self.centroids[nearest(search, flat[heldout])]
        levels = 2 ** nbits
        self.cutoffs = np.quantile(residuals, np.arange(1, levels) / levels).astype(np.float32)
        self.weights = np.quantile(residuals, (np.arange(levels) + 0.5) / levels).astype(np.float32)

        # every token: its centroid and its residual's buckets, nbits per dimension packed into bytes
        self.codes = np.empty(tokens, dtype=np.int16 if centroids <= 2 ** 15 else np.int32)
        self.residuals = np.empty((tokens, -(-dim * nbits // 8)), dtype=np.uint8)
        bits = np.arange(nbits)
        with tqdm(total=tokens, desc=f"plaid compression ({nbits} bits)", unit="token",
                  disable=tokens < QUIET_BELOW) as bar:
            for start in range(0, tokens, TOKEN_CHUNK):
                part = flat[start:start + TOKEN_CHUNK]
                codes = nearest(search, part)
                buckets = np.searchsorted(self.cutoffs, part - self.centroids[codes]).astype(np.uint8)
                self.codes[start:start + len(part)] = codes
                self.residuals[start:start + len(part)] = np.packbits(
                    ((buckets[..., None] >> bits) & 1).reshape(len(part), -1), axis=1)
                bar.update(len(part))
        del flat
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

        # inverted lists: for each centroid, the documents holding one of its tokens
        owner = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
        pairs = np.unique(self.codes.astype(np.int64) * len(docs) + owner)
        del owner
        self.ivf_docs = (pairs % len(docs)).astype(np.int32)
        self.ivf_offsets = np.searchsorted(pairs // len(docs), np.arange(centroids + 1))

        # for search, on the device: each byte value's bucket weights (8 / nbits dimensions per byte)
        byte_bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).reshape(256, 8 // nbits, nbits)
        table = self.weights[(byte_bits << bits).sum(-1)]
        self.t_table = torch.as_tensor(table, device=self.device)
        self.t_centroids = torch.as_tensor(self.centroids, device=self.device)
        self.t_codes = torch.as_tensor(self.codes, device=self.device)
        self.t_residuals = torch.as_tensor(self.residuals, device=self.device)
        self.t_offsets = torch.as_tensor(self.offsets, device=self.device)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def bytes_per_token(self) -> int:
        """A token's centroid id and packed residual."""
        return self.codes.itemsize + self.residuals.shape[1]

    @property
    def nbytes(self) -> int:
        """Token codes and residuals, centroids, bucket cutoffs and weights, document offsets, inverted lists."""
        return sum(a.nbytes for a in (self.codes, self.residuals, self.centroids, self.cutoffs, self.weights,
                                      self.offsets, self.ivf_docs, self.ivf_offsets))

    def token_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For documents ``rows`` (torch, on the device): R x L positions of their tokens among all tokens (0 where
        padding) and the R x L mask of real ones (L, the longest of them)."""
        starts, lengths = self.t_offsets[rows], self.t_offsets[rows + 1] - self.t_offsets[rows]
        steps = torch.arange(int(lengths.max()) if len(rows) else 0, device=self.device)
        mask = steps[None] < lengths[:, None]
        return torch.where(mask, starts[:, None] + steps[None], 0), mask

    def decompress(self, rows) -> MultiVector:
        """The documents ``rows`` rebuilt from their codes (torch, on the device; padded to the longest): centroid
        plus bucket weights, L2-normalised."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        positions, mask = self.token_rows(rows)
        residual = self.t_table[self.t_residuals[positions].long()].flatten(2)[..., :self.dim]
        vectors = torch.nn.functional.normalize(self.t_centroids[self.t_codes[positions].long()] + residual, dim=-1)
        return MultiVector(vectors, mask)

    def candidates(self, centroid_scores: torch.Tensor) -> np.ndarray:
        """Stage 1: the documents holding a token of any real query token's ``ncells`` best centroids (sorted)."""
        cells = centroid_scores.topk(min(self.ncells, centroid_scores.shape[1]), dim=1).indices.unique().cpu().numpy()
        starts, ends = self.ivf_offsets[cells], self.ivf_offsets[cells + 1]
        return np.unique(np.concatenate([self.ivf_docs[a:b] for a, b in zip(starts, ends)]))

    def centroid_interaction(self, centroid_scores: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Stage 2: for documents ``rows``, sum over real query tokens of the best centroid score of any of the
        document's tokens whose centroid some query token scores ``centroid_threshold`` with (0 where none; no
        centroid reaching the threshold, none is left out)."""
        kept = centroid_scores.amax(0) >= self.threshold
        if not kept.any():
            kept = torch.ones_like(kept)
        pruned = torch.cat([torch.where(kept, centroid_scores, float("-inf")),
                            torch.full((len(centroid_scores), 1), float("-inf"), device=self.device)], 1)
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        scores = []
        for start in range(0, len(rows), 1024):
            positions, mask = self.token_rows(rows[start:start + 1024])
            codes = torch.where(mask, self.t_codes[positions].long(), len(self.centroids))
            best = pruned[:, codes].amax(-1)
            scores.append(torch.where(torch.isinf(best), 0.0, best).sum(0))
        return torch.cat(scores)

    @torch.inference_mode()
    def search(self, queries: MultiVector, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = empty_results(len(queries), k)
        ndocs = max(self.ndocs or max(1024, 4 * k), k)
        on_device = as_torch(queries, self.device)
        for row in range(len(queries)):
            query = on_device[row:row + 1]
            real = query.vectors[0][query.mask[0]]
            if not len(real):
                continue
            centroid_scores = real @ self.t_centroids.T
            rows = self.candidates(centroid_scores)
            if not len(rows):
                continue  # its cells hold no document: no result
            if len(rows) > ndocs:
                approximate = self.centroid_interaction(centroid_scores, rows)
                rows = np.sort(rows[approximate.topk(ndocs).indices.cpu().numpy()])
            exact = torch.cat([maxsim(query, self.decompress(rows[start:start + 1024]))[0]
                               for start in range(0, len(rows), 1024)])
            put_best(scores, ids, row, exact, rows)
        return scores, ids


def build(docs: MultiVector, index: str, device=None, **settings):
    """The ``index`` kind over encoded documents ``docs`` (numpy :class:`MultiVector`), with its ``settings``."""
    if index == "exact":
        return ExactIndex(docs, device, **settings)
    if index == "ann":
        return ANNIndex(docs, device, **settings)
    if index == "plaid":
        return PLAIDIndex(docs, device, **settings)
    raise ConfigError(f"retriever.index must be 'exact', 'ann' or 'plaid', got '{index}'.")
