"""Sparse + dense hybrid retrieval.

Linear fusion as in Ma et al. (2021), "A Replication Study of Dense Passage Retriever": over the union of a
query's top-``depth`` lists, s(d) = s_dense(d) + alpha * s_bm25(d), where a document missing from one list takes
that list's lowest top-``depth`` score. Reciprocal-rank fusion (Cormack et al., 2009): s(d) = sum over lists of
1 / (rrf_k + rank(d)), ranks from 1 in trec_eval's order (tied scores by doc id descending), a missing document
contributing nothing. With ``alpha=None`` the weight is chosen on a dev split (best ``tune_metric`` over ``alphas``).
"""
from __future__ import annotations

import numpy as np

from retrieval_lab.data.beir import BeirSplit, Document
from retrieval_lab.errors import ConfigError
from retrieval_lab.retrieval.metrics import Run, evaluate_run, ranked, top_k

METHODS = ("linear", "rrf")


def linear_fusion(dense: Run, sparse: Run, alpha: float) -> Run:
    fused = {}
    for qid in dense.keys() | sparse.keys():
        a, b = dense.get(qid, {}), sparse.get(qid, {})
        floor_a, floor_b = min(a.values(), default=0.0), min(b.values(), default=0.0)
        fused[qid] = {d: a.get(d, floor_a) + alpha * b.get(d, floor_b) for d in a.keys() | b.keys()}
    return fused


def reciprocal_rank_fusion(runs: list[Run], rrf_k: int = 60) -> Run:
    fused: Run = {}
    for run in runs:
        for qid, docs in run.items():
            out = fused.setdefault(qid, {})
            for rank, (doc_id, _) in enumerate(ranked(docs), start=1):
                out[doc_id] = out.get(doc_id, 0.0) + 1.0 / (rrf_k + rank)
    return fused


class HybridRetriever:
    """Fuse a dense and a sparse retriever. ``dev`` (a BeirSplit over the same corpus) is where ``alpha=None``
    is tuned; it is retrieved together with the evaluated queries, so the corpus is encoded once."""

    def __init__(self, dense, sparse, method: str = "linear", alpha: float | None = None, alphas=(0.0, 0.01, 0.1),
                 depth: int = 1000, rrf_k: int = 60, tune_metric: str = "ndcg@10", dev: BeirSplit | None = None):
        if method not in METHODS:
            raise ConfigError(f"retriever.method must be one of {', '.join(METHODS)}, got '{method}'.")
        if method == "linear" and alpha is None and not alphas:
            raise ConfigError("retriever.alpha=null chooses alpha on the dev split from retriever.alphas, which is empty.")
        self.dense, self.sparse, self.method, self.alpha, self.alphas = dense, sparse, method, alpha, list(alphas)
        self.depth, self.rrf_k, self.tune_metric, self.dev = depth, rrf_k, tune_metric, dev
        self.tuning: dict[float, float] = {}  # alpha -> dev metric, when tuned

    def fuse(self, dense: Run, sparse: Run, alpha: float | None = None) -> Run:
        """The fused run, its scores rounded to float32: trec_eval reads run-file scores as 32-bit floats, so two
        fused scores that only differ beyond float32 tie there, and must tie (ordered by doc id) here too."""
        if self.method == "rrf":
            fused = reciprocal_rank_fusion([dense, sparse], self.rrf_k)
        else:
            fused = linear_fusion(dense, sparse, self.alpha if alpha is None else alpha)
        return {q: {d: float(np.float32(s)) for d, s in docs.items()} for q, docs in fused.items()}

    def choose_alpha(self, dense: Run, sparse: Run, qrels) -> float:
        self.tuning = {a: evaluate_run(qrels, self.fuse(dense, sparse, a), [self.tune_metric])[self.tune_metric]
                       for a in self.alphas}
        return max(self.alphas, key=lambda a: (self.tuning[a], -a))

    def retrieve(self, corpus: dict[str, Document], queries: dict[str, str], k: int = 100) -> Run:
        tune = self.method == "linear" and self.alpha is None
        if tune and self.dev is None:
            raise ConfigError("retriever.alpha=null needs a dev split to choose alpha on (or set retriever.alpha).")
        asked = dict(queries)
        if tune:
            overlap = set(self.dev.queries) & set(queries)
            if overlap:
                raise ConfigError(f"the dev split used to choose alpha shares {len(overlap)} queries with the "
                                  "evaluated split; set retriever.alpha or another dev split.")
            asked.update(self.dev.queries)
        depth = max(k, self.depth)
        dense, sparse = self.dense.retrieve(corpus, asked, depth), self.sparse.retrieve(corpus, asked, depth)
        if tune:
            dev_q = set(self.dev.queries)
            self.alpha = self.choose_alpha({q: r for q, r in dense.items() if q in dev_q},
                                           {q: r for q, r in sparse.items() if q in dev_q}, self.dev.qrels)
            print(f"hybrid: alpha {self.alpha} chosen on {len(dev_q)} dev queries "
                  f"({self.tune_metric} " + ", ".join(f"{a}: {v:.4f}" for a, v in self.tuning.items()) + ")")
        keep = set(queries)
        return top_k(self.fuse({q: r for q, r in dense.items() if q in keep},
                               {q: r for q, r in sparse.items() if q in keep}), k)
