"""Two-stage retrieval: a first stage (BM25 or dense) retrieves ``depth`` candidates, a model re-scores them (its
``score_texts``: a cross-encoder's joint scores, or any model family's, e.g. ColBERT's MaxSim or a Poly-encoder's),
and the ranking follows the model's scores."""
from __future__ import annotations

from retrieval_lab.data.beir import Document
from retrieval_lab.errors import ConfigError
from retrieval_lab.retrieval.dense import refuse_non_finite
from retrieval_lab.retrieval.encoding import pick_device
from retrieval_lab.retrieval.metrics import ranked


class Reranker:
    def __init__(self, first_stage, model, depth: int = 100, batch_size: int = 64, device: str | None = None,
                 progress: bool = True):
        if depth < 1:
            raise ConfigError(f"reranker.depth must be at least 1, got {depth}.")
        self.first_stage, self.model, self.depth = first_stage, model, depth
        self.batch_size, self.progress = batch_size, progress
        device = pick_device(device)
        if device is not None:
            self.model.to(device)
        self.device = device

    def retrieve(self, corpus: dict[str, Document], queries: dict[str, str], k: int = 100) -> dict[str, dict[str, float]]:
        """The top ``min(k, depth)`` of each query's first-stage candidates, by the model's score."""
        candidates = self.first_stage.retrieve(corpus, queries, max(k, self.depth))
        pairs = [(qid, doc_id) for qid, docs in candidates.items()
                 for doc_id, _ in ranked(docs)[:self.depth]]
        scores = self.model.score_texts([queries[q] for q, _ in pairs], [corpus[d].full_text for _, d in pairs],
                                          self.batch_size, self.device, self.progress)
        refuse_non_finite(scores, [f"{q} {d}" for q, d in pairs], "re-ranking scores")
        run: dict[str, dict[str, float]] = {qid: {} for qid in queries}
        for (qid, doc_id), score in zip(pairs, scores):
            run[qid][doc_id] = score
        return {qid: dict(ranked(docs)[:k]) for qid, docs in run.items()}  # ties as trec_eval breaks them
