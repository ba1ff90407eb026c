"""Dense retrieval: embed the corpus and the queries (``encoding.encode_texts``), then search the model family's
index (``ModelFamily.build_index``: for one vector per text, faiss or torch on the GPU; token vectors, MaxSim)."""
from __future__ import annotations

import time

import numpy as np
import torch

from retrieval_lab.data.beir import Document
from retrieval_lab.distributed import distributed_rank_world, fail_together, gather_shards
from retrieval_lab.errors import UserError
from retrieval_lab.models import representation
from retrieval_lab.retrieval.encoding import encode_texts, pick_device
from retrieval_lab.tokenization import PROCESSES, worker_plan


class TorchIndex:
    """Exact inner-product search with torch on any device (on a GPU: a matrix product and top-k there), with the
    ``search`` signature of a faiss index."""

    def __init__(self, embeddings: np.ndarray, device: str | torch.device | None = None, chunk: int = 4096):
        self.embeddings = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
        self.chunk = chunk

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = torch.as_tensor(queries, dtype=torch.float32, device=self.embeddings.device)
        scores, ids = [], []
        for start in range(0, len(queries), self.chunk):
            top = (queries[start:start + self.chunk] @ self.embeddings.T).topk(min(k, len(self.embeddings)), dim=1)
            scores.append(top.values.cpu())
            ids.append(top.indices.cpu())
        return torch.cat(scores).numpy(), torch.cat(ids).numpy()


def refuse_non_finite(values, names: list[str], what: str) -> None:
    """A UserError when any row of ``values`` (embeddings, or scores) is NaN or infinite: a search or re-ranking with
    them would order those texts arbitrarily and still report a metric."""
    if not len(names):
        return
    rows = np.asarray(values, dtype=np.float32).reshape(len(names), -1)
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise UserError(f"the model gave non-finite {what} for {len(bad)} of {len(names)} (the first: "
                        f"{names[bad[0]]!r}), which would rank them arbitrarily; check its weights, or encode in a "
                        f"wider precision (float32).")


def build_index(embeddings: np.ndarray, index: str = "flat", device: str | torch.device | None = None):
    """``flat``: exact inner product (faiss); ``hnsw``: approximate (faiss HNSW graph, 32 links) for large corpora;
    ``torch``: exact inner product with torch on ``device`` (the GPU, when the encoder is there)."""
    if index == "torch":
        return TorchIndex(embeddings, device)
    import faiss

    dim = embeddings.shape[1]
    if index == "flat":
        faiss_index = faiss.IndexFlatIP(dim)
    else:
        faiss_index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        faiss_index.hnsw.efSearch = 256
    faiss_index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return faiss_index


class DenseRetriever:
    """Encode the corpus and the queries with ``encoder``; ``device='auto'`` takes the GPU when there is one.
    ``shard``: under torch.distributed (validation during DDP training), each process encodes its share of the
    corpus and the shares are all-gathered (over ``group``; None: the default group), so every process must call
    :meth:`retrieve` at the same time; where one fails to encode its share, all raise (:func:`fail_together`).
    After a search, ``index_info`` holds the index's kind, settings, size in bytes (``nbytes``, where the index
    reports it), build seconds and search milliseconds per query, and the size of the documents' real vectors in
    fp16, which ``evaluate`` writes to metrics.json."""

    def __init__(self, encoder, batch_size: int = 128, index: str | None = None, device: str | None = None,
                 progress: bool = True, token_budget: int | None = None, dtype: str = "auto", shard: bool = False,
                 compile: bool | str = False, group=None, tokenize_processes: int | str = "auto",
                 index_settings: dict | None = None):
        self.encoder, self.batch_size, self.progress = encoder, batch_size, progress
        self.token_budget, self.dtype, self.shard, self.compile = token_budget, dtype, shard, compile
        self.group, self.tokenize_processes = group, tokenize_processes
        device = pick_device(device)
        cuda = device is not None and torch.device(device).type == "cuda"
        processes, threads = worker_plan(tokenize_processes, cuda)
        self.index_settings = dict(index_settings or {})
        self.index = encoder.check_index(index, self.index_settings)  # now, not after the corpus is encoded
        if processes:  # started now, so that they import while CUDA starts and the corpus loads
            PROCESSES.start(processes, threads)
        if device is not None:
            self.encoder.to(device)
        self.device = device

    def encode(self, texts: list[str], side: str, desc: str):
        """The family's representation of ``texts`` (``ModelFamily.empty``), in input order."""
        return encode_texts(self.encoder, texts, side, self.batch_size, self.device, self.progress, desc=desc,
                            token_budget=self.token_budget, dtype=self.dtype, compile=self.compile,
                            tokenize_processes=self.tokenize_processes)

    def retrieve(self, corpus: dict[str, Document], queries: dict[str, str], k: int = 100) -> dict[str, dict[str, float]]:
        doc_ids, qids = list(corpus), list(queries)
        rank, world = distributed_rank_world(self.group) if self.shard else (0, 1)
        # sharded, every process returns or every process raises: the blocks between collectives fail together
        with fail_together(self.group, world > 1):  # a process that fails to encode its share fails them all
            doc_emb = self.encode([corpus[d].full_text for d in doc_ids[rank::world]], "doc", "encode corpus")
            refuse_non_finite(representation.values(doc_emb), doc_ids[rank::world], "document embeddings")
        if world > 1:
            rows = gather_shards(representation.flat_rows(doc_emb), len(doc_ids), next(self.encoder.parameters()).device,
                                 self.group)
            doc_emb = representation.from_flat_rows(rows, doc_emb)
            doc_ids = [d for r in range(world) for d in doc_ids[r::world]]
        with fail_together(self.group, world > 1):
            query_emb = self.encode([queries[q] for q in qids], "query", "encode queries")
            refuse_non_finite(representation.values(query_emb), qids, "query embeddings")
            started = time.perf_counter()
            index = self.encoder.build_index(doc_emb, self.index, self.device or next(self.encoder.parameters()).device,
                                             **self.index_settings)
            built = time.perf_counter()
            scores, ids = index.search(query_emb, min(k, len(doc_ids)))
        vectors = representation.values(doc_emb)
        real = int(doc_emb.mask.sum()) if isinstance(doc_emb, representation.MultiVector) else len(vectors)
        self.index_info = {"index": self.index, "settings": self.index_settings,
                           "bytes": getattr(index, "nbytes", None), "documents": len(doc_ids),
                           "fp16_vectors_bytes": real * vectors.shape[-1] * 2,  # the documents' real vectors in fp16
                           "build_seconds": round(built - started, 3),
                           "search_ms_per_query": round((time.perf_counter() - built) * 1000 / max(1, len(qids)), 3)}
        return {qid: {doc_ids[j]: float(s) for j, s in zip(ids[row], scores[row]) if j >= 0}
                for row, qid in enumerate(qids)}
