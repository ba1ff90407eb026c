"""BM25 baseline through bm25s (English Snowball stemmer and stop words, title + text)."""
from __future__ import annotations

import logging
import os

from retrieval_lab.data.beir import Document


class BM25Retriever:
    def __init__(self, k1: float = 1.2, b: float = 0.75, stemmer: str | None = "english", stopwords: str | None = "en"):
        self.k1, self.b, self.stemmer_name, self.stopwords = k1, b, stemmer, stopwords

    def _stemmer(self):
        if not self.stemmer_name:
            return None
        import Stemmer

        return Stemmer.Stemmer(self.stemmer_name)

    def retrieve(self, corpus: dict[str, Document], queries: dict[str, str], k: int = 100) -> dict[str, dict[str, float]]:
        # bm25s runs a JAX top-k when it is imported, if JAX is installed; on a GPU machine JAX then reserves 75% of
        # the GPU's memory for itself, out of PyTorch's reach (seen on an H100: 60 GiB, and the other runs on the
        # GPU failed for memory). Its top-k stays on the CPU unless JAX_PLATFORMS says otherwise.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.INFO)  # it sets DEBUG for itself: one line per index built
        doc_ids = list(corpus)
        stemmer = self._stemmer()
        corpus_tokens = bm25s.tokenize([corpus[d].full_text for d in doc_ids], stopwords=self.stopwords,
                                       stemmer=stemmer, show_progress=False)
        index = bm25s.BM25(k1=self.k1, b=self.b)
        index.index(corpus_tokens, show_progress=False)
        qids = list(queries)
        query_tokens = bm25s.tokenize([queries[q] for q in qids], stopwords=self.stopwords, stemmer=stemmer,
                                      show_progress=False)
        results, scores = index.retrieve(query_tokens, k=min(k, len(doc_ids)), show_progress=False)
        return {
            qid: {doc_ids[int(i)]: float(s) for i, s in zip(results[row], scores[row]) if s > 0}
            for row, qid in enumerate(qids)
        }
