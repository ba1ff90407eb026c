"""ME-BERT: a document is its first m token vectors, a query one vector, the score their best inner product.

Luan, Eisenstein, Toutanova & Collins (2021), "Sparse, Dense, and Attentional Representations for Text
Retrieval", TACL. A query is its [CLS] vector q; a document d is the contextual vectors d_1..d_m of its first m
tokens ([CLS] first; fewer for a document shorter than m tokens), and

    s(q, d) = max_{j <= m} q . d_j

With m = 1 it is the bi-encoder with [CLS] pooling. Projection and normalisation, when set, apply to every vector.
The index holds the m vectors of every document (faiss flat or HNSW, or torch); a search takes the top vectors,
enough of them to cover k documents, and keeps each document's best (exact under an exact index: a document
outside the vectors taken scores at most the last one taken).

``python -m retrieval_lab.train model=mebert model.vectors=4 negatives=bm25``
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.scores import BLOCKS
from retrieval_lab.models.encoder import SAVED_SETTINGS, Encoder, read_saved_settings, require_whole
from retrieval_lab.models.representation import MultiVector


class MEBERT(Encoder):
    doc_representation = "vectors"
    blocks = frozenset(BLOCKS) - {"doc_doc"}  # documents against documents: m x m vectors, no score defined

    def __init__(self, vectors: int | None = None, pooling: str | None = "cls", **settings):
        """``vectors`` (m, a positive whole number; None: the saved folder's, else 8, the paper's); ``pooling``
        must be cls (a query is its [CLS] vector, as a document's first vector); the other settings are the
        bi-encoder's (:class:`~retrieval_lab.models.encoder.Encoder`)."""
        saved = (read_saved_settings(settings.get("name_or_path", "packaged:minilm")) or {}).get("vectors")
        vectors = vectors if vectors is not None else saved or 8
        require_whole("model.vectors", vectors)
        super().__init__(pooling=pooling, **settings)
        if self.pooling != "cls":
            raise ConfigError(f"model=mebert scores a query by its [CLS] vector against a document's first token "
                              f"vectors: model.pooling must be cls, got '{self.pooling}'.")
        self.vectors = vectors

    def encode_docs(self, inputs) -> MultiVector:
        hidden, mask = self.token_vectors(self.doc_tower, inputs)
        return MultiVector(self.finish(hidden[:, :self.vectors]), mask[:, :self.vectors].bool())

    def empty(self, count: int, side: str):
        if side == "query":
            return super().empty(count, side)
        return MultiVector(np.zeros((count, self.vectors, self.dim), dtype=np.float32),
                           np.zeros((count, self.vectors), dtype=bool))

    def score(self, a, b) -> torch.Tensor:
        """Vectors against vectors as the bi-encoder; a vector against a document's vectors, their maximum (either
        order)."""
        if isinstance(a, MultiVector) and isinstance(b, MultiVector):
            raise ConfigError("model=mebert scores vectors against a document's vectors, not documents against "
                              "documents.")
        if isinstance(b, MultiVector):
            count, m, dim = b.vectors.shape
            each = super().score(a, b.vectors.reshape(count * m, dim)).view(len(a), count, m)
            return each.masked_fill(~b.mask[None].to(each.device), float("-inf")).amax(-1)
        if isinstance(a, MultiVector):
            count, m, dim = a.vectors.shape
            each = super().score(a.vectors.reshape(count * m, dim), b).view(count, m, len(b))
            return each.masked_fill(~a.mask[:, :, None].to(each.device), float("-inf")).amax(1)
        return super().score(a, b)

    def score_groups(self, q, d, group_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(d, MultiVector):
            return super().score_groups(q, d, group_size, rows)
        m, dim = d.vectors.shape[1:]
        each = super().score_groups(q, d.vectors.reshape(-1, dim), group_size * m, rows)  # R x (G m)
        mask = d.mask.view(len(q), group_size, m)
        mask = mask if rows is None else mask[rows.to(mask.device)]
        return each.view(-1, group_size, m).masked_fill(~mask.to(each.device), float("-inf")).amax(-1)

    def build_index(self, docs: MultiVector, index: str | None = None, device=None, **settings):
        real = docs.mask.reshape(-1)
        owner = np.repeat(np.arange(len(docs)), docs.vectors.shape[1])[real]
        vectors = docs.vectors.reshape(-1, docs.vectors.shape[2])[real]
        return BestVectorIndex(super().build_index(vectors, index, device, **settings), owner, len(docs))

    def save(self, folder: str | Path) -> Path:
        """The bi-encoder's folder, with m recorded in ``retrieval_lab.json`` (``model=mebert`` loads it back with
        the same m; as a plain encoder it is the [CLS] bi-encoder)."""
        folder = super().save(folder)
        settings = json.loads((folder / SAVED_SETTINGS).read_text())
        (folder / SAVED_SETTINGS).write_text(json.dumps({**settings, "vectors": self.vectors}, indent=2) + "\n")
        return folder


class BestVectorIndex:
    """Search an index of document vectors (``owner[i]``: the document of vector i) by document: each
    document's best vector, the top k documents."""

    def __init__(self, vectors, owner: np.ndarray, documents: int):
        self.vectors, self.owner, self.documents = vectors, owner, documents

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.documents)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        todo, depth = np.arange(len(queries)), k * max(1, round(len(self.owner) / max(1, self.documents)))
        while len(todo):
            depth = min(depth, len(self.owner))
            top_scores, top = self.vectors.search(queries[todo], depth)
            short = []
            for row, vector_scores, vectors in zip(todo, top_scores, top):
                found = vectors >= 0
                docs, first = np.unique(self.owner[vectors[found]], return_index=True)
                if len(docs) < k and depth < len(self.owner):
                    short.append(row)  # its top vectors cover fewer than k documents: look deeper
                    continue
                best = np.sort(first)[:k]  # each document at its first (best) vector, best first
                ids[row, :len(best)] = self.owner[vectors[found][best]]
                scores[row, :len(best)] = vector_scores[found][best]
            todo, depth = np.array(short, dtype=np.int64), depth * 2
        return scores, ids
