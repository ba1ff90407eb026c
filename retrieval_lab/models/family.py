"""A model family: what a text becomes, how representations are scored against each other, and how a corpus is
indexed and searched with them. Every part of training and retrieval goes through this interface, so a new family
(several vectors per document, sparse vectors, a cross-encoder) is one class.

- ``encode_queries(inputs)`` / ``encode_docs(inputs)``: tokenised texts -> representations (a tensor with one row
  per text, or :class:`~retrieval_lab.models.representation.MultiVector`).
- ``score(a, b)``: every row of ``a`` against every row of ``b`` (float32, A x B); ``score_groups(q, d, G)``: each
  query against its own G documents only. ``score_blocks`` builds from them the blocks a loss declared.
- ``build_index(docs, index, device)``: an index over encoded documents whose ``search(queries, k)`` returns
  (scores, document rows), each Q x k; ``retriever(...)``: what validation and test evaluation retrieve with.
- ``empty(count, side)``: room for ``count`` encoded texts, which ``encoding.encode_texts`` fills.
- ``indexes``: the index kinds ``build_index`` takes (the first is the default, which ``index=None`` means), and
  ``check_index(index, settings)``, which refuses another kind or a setting the kind lacks in a sentence.
- Declarations: ``doc_representation`` (one of ``REPRESENTATIONS``: "vector", one vector per document, which a
  MoCo queue needs; "vectors"; "sparse"; "pairs", scored jointly with the query) and ``blocks``, the score
  blocks the family can compute; ``temperature``, where its scores are not cosines (ColBERT's sums of them), the
  loss temperature they want (the config check warns of one far below it).

The defaults here are those of the single-vector bi-encoder: inner products of one vector per text, an exact or
HNSW inner-product index (faiss, or torch on a GPU).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.scores import BLOCKS, FalseNegatives, Scores, anchor_rows

REPRESENTATIONS = frozenset({"vector", "vectors", "sparse", "pairs"})  # what a family's documents become


class ModelFamily(nn.Module):
    doc_representation = "vector"
    blocks = frozenset(BLOCKS)
    temperature: float | None = None  # a loss temperature its scores want, where the losses' defaults (0.05) do not fit
    indexes = ("flat", "hnsw", "torch")  # exact inner product (faiss) | approximate (faiss HNSW) | exact (torch)
    index_settings: dict[str, tuple] = {}  # index kind -> the settings build_index takes for it

    @classmethod
    def check_index(cls, index: str | None, settings=None, key: str = "retriever.index") -> str:
        """The index kind ``index`` names (None: the family's default), refused in a sentence naming ``key`` when
        the family has no such kind or ``settings`` holds a key the kind does not take."""
        index = cls.indexes[0] if index is None else index
        if index not in cls.indexes:
            names = ", ".join(f"'{name}'" for name in cls.indexes[:-1]) + f" or '{cls.indexes[-1]}'"
            raise ConfigError(f"{key} must be {names} for {cls.__name__} models, got '{index}'.")
        unknown = sorted(set(settings or {}) - set(cls.index_settings.get(index, ())))
        if unknown:
            takes = ", ".join(cls.index_settings.get(index, ())) or "no settings"
            raise ConfigError(f"{key}_settings.{unknown[0]} is not a setting of the '{index}' index of "
                              f"{cls.__name__} models (it takes {takes}).")
        return index

    def encode_queries(self, inputs):
        raise NotImplementedError

    def encode_docs(self, inputs):
        raise NotImplementedError

    def empty(self, count: int, side: str):
        """Room for ``count`` encoded texts of ``side`` (query or doc): one float32 vector of ``self.dim`` each."""
        return np.zeros((count, self.dim), dtype=np.float32)

    def score(self, a, b) -> torch.Tensor:
        """``a @ b.T`` in float32, autocast or not (gradients flow back to ``a`` and ``b`` in their own dtypes)."""
        with torch.autocast(a.device.type, enabled=False):
            return a.float() @ b.float().T

    def score_groups(self, q, d, group_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """R x G: each anchor query (``rows``; None: all B) against its own group only (positive first), float32."""
        rows = anchor_rows(q, rows)
        with torch.autocast(q.device.type, enabled=False):
            return torch.einsum("bh,bgh->bg", q[rows].float(), d.float().view(q.size(0), group_size, -1)[rows])

    def score_blocks(self, q, d, group_size: int, blocks, mask: FalseNegatives | None = None,
                     rows: torch.Tensor | None = None, queue=None, queue_mask: torch.Tensor | None = None,
                     teacher: torch.Tensor | None = None) -> Scores:
        """The score blocks named in ``blocks`` (see ``scores.BLOCKS``) of queries ``q`` (B) against the batch's
        documents ``d`` (B*G, groups of G, positive first) and, for ``queue``, a queue of document keys."""
        rows = anchor_rows(q, rows)
        out = Scores(rows=rows, group_size=group_size, batch_size=len(q), mask=mask, queue_mask=queue_mask,
                     teacher=teacher)
        if {"doc_doc", "doc_query"} & set(blocks):
            positives = d[torch.arange(len(q), device=rows.device) * group_size]
        if "query_doc" in blocks:
            out.query_doc = self.score(q[rows], d)
        if "groups" in blocks:
            out.groups = self.score_groups(q, d, group_size, rows)
        if "queue" in blocks and queue is not None and len(queue):
            out.queue = self.score(q[rows], queue)
        if "query_query" in blocks:
            out.query_query = self.score(q[rows], q)
        if "doc_doc" in blocks:
            out.doc_doc = self.score(positives[rows], positives)
        if "doc_query" in blocks:
            out.doc_query = self.score(positives[rows], q)
        return out

    @torch.inference_mode()
    def score_texts(self, queries: list[str], docs: list[str], batch_size: int = 64, device=None,
                    progress: bool = True) -> list[float]:
        """The score of each (query, document) text pair, in input order: each distinct text encoded once
        (``encoding.encode_texts``), then each pair scored by ``score_groups`` (a re-ranker's scores)."""
        from retrieval_lab.models import representation
        from retrieval_lab.retrieval.encoding import encode_texts

        device = torch.device(device) if device else next(self.parameters()).device
        encoded = []
        for texts, side in ((queries, "query"), (docs, "doc")):
            distinct = list(dict.fromkeys(texts))
            rows = dict(zip(distinct, range(len(distinct))))
            encoded.append((encode_texts(self, distinct, side, batch_size, device, progress,
                                         desc=f"encode {side}s to re-rank"), [rows[t] for t in texts]))
        (q, q_rows), (d, d_rows) = encoded
        out = []
        for start in range(0, len(queries), 1024):
            part = slice(start, start + 1024)
            scores = self.score_groups(representation.rows_on(q, q_rows[part], device),
                                       representation.rows_on(d, d_rows[part], device), 1)
            out.extend(scores[:, 0].tolist())
        return out

    def build_index(self, docs, index: str | None = None, device=None, **settings):
        """An index over the encoded documents ``docs`` (N x D, float32): exact inner product (``flat``, faiss),
        approximate (``hnsw``) or exact with torch on ``device`` (``torch``)."""
        from retrieval_lab.retrieval.dense import build_index

        return build_index(docs, self.check_index(index, settings), device)

    def retriever(self, batch_size: int = 128, index: str | None = None, device: str | None = None,
                  progress: bool = True, shard: bool = False, index_settings: dict | None = None):
        """What validation and test evaluation retrieve with: the corpus encoded and indexed by this family
        (``shard``: under DDP, each process encodes a share of the corpus)."""
        from retrieval_lab.retrieval.dense import DenseRetriever

        return DenseRetriever(self, batch_size, index, device, progress, shard=shard, index_settings=index_settings)


def loss_on_vectors(loss, q, d, group_size: int = 1, mask=None, queue=None, queue_mask=None, teacher=None,
                    rows=None) -> torch.Tensor:
    """``loss`` applied to the single-vector family's score blocks of ``q`` (B x D) and ``d`` (B*G x D): a loss on
    its own, as tests and benchmarks take it."""
    return loss(ModelFamily().score_blocks(q, d, group_size, loss.blocks, mask=mask, rows=rows, queue=queue,
                                           queue_mask=queue_mask, teacher=teacher))
