"""Search over token vectors (ColBERT, :mod:`retrieval_lab.models.colbert`): an index over every document's
vectors whose ``search(queries, k)`` takes encoded queries (:class:`MultiVector`, numpy) and returns (scores,
document rows), each Q x k, best first (rows of -1 scoring -inf pad a query that found fewer than k documents).
Each index's ``nbytes`` is what it stores, in bytes.

- ``exact``: MaxSim of every query against every document, in batches of documents (the reference for the others).
- ``ann``: ColBERT v1's end-to-end retrieval (Khattab & Zaharia, 2020, section 3.6): a faiss index over every real
  document token vector (``ann``: ``flat``, exact inner product, or ``hnsw``, a graph of 32 links per vector);
  each query token vector takes its ``candidates`` nearest token vectors, and the documents owning them, ranked
  by exact MaxSim, are the results.
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
QUERY_BATCH = 64          # queries searched together
TOKEN_CHUNK = 1 << 16     # token vectors added, assigned or compressed together
QUIET_BELOW = 1 << 20     # no progress bar for corpora of fewer token vectors


def torch_dtype(dtype: str, key: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"{key} must be one of {', '.join(DTYPES)}, got '{dtype}'.")
    return DTYPES[dtype]


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
        require_whole(f"{KEY}.batch_size", batch_size)
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

        require_whole(f"{KEY}.candidates", candidates)
        if ann not in ("flat", "hnsw"):
            raise ConfigError(f"{KEY}.ann must be 'flat' or 'hnsw', got '{ann}'.")
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


def build(docs: MultiVector, index: str, device=None, **settings):
    """The ``index`` kind over encoded documents ``docs`` (numpy :class:`MultiVector`), with its ``settings``."""
    if index == "exact":
        return ExactIndex(docs, device, **settings)
    if index == "ann":
        return ANNIndex(docs, device, **settings)
    raise ConfigError(f"retriever.index '{index}' is not built yet.")
