"""Poly-encoder: a query is m vectors, each its token vectors attended by one learned code; a document is the
bi-encoder's one vector; the score attends over the query's m vectors with the document.

Humeau, Humeau, Shuster, Lachaux & Weston (2020), "Poly-encoders: Architectures and Pre-training Strategies for
Fast and Accurate Multi-sentence Scoring", ICLR. With h_1..h_T the query's last hidden states (padding left out),
c_1..c_m learned codes (m x H) and d the document's pooled vector (the bi-encoder's: pooling, projection,
normalisation):

    y_i = finish( sum_t softmax_t(c_i . h_t) h_t )          i = 1..m  (finish: the bi-encoder's projection and
                                                                       L2 normalisation, as set)
    w   = softmax_i(y_i . d),    q_d = sum_i w_i y_i,    s(q, d) = q_d . d

With m = 1 it is a bi-encoder whose query is pooled by attention with one learned vector (a softmax over one code
is 1). The codes start at N(0, 0.02^2), so the first attention is near uniform, i.e. near mean pooling.

Documents are one vector each (``doc_representation = "vector"``: MoCo's queue and ANCE's re-mining take them),
so documents score against documents by inner product (``doc_doc``); queries against queries are undefined
(``query_query`` is not a block of this family, so SamToNe's default ``loss.side=query`` is refused).

Search (``build_index``): ``exact`` scores the cached document vectors against every query's codes with torch,
in chunks of queries, and keeps the top k; ``rerank`` takes ``depth`` candidates (default 100) from a faiss flat
inner-product index of the documents searched with the mean of the query's m vectors, and re-scores them by
s(q, d). With depth at least the corpus size, ``rerank`` is ``exact``.

``python -m retrieval_lab.train model=polyencoder negatives=bm25``
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.scores import BLOCKS, anchor_rows
from retrieval_lab.models.encoder import SAVED_SETTINGS, Encoder, read_saved_settings, require_whole
from retrieval_lab.models.representation import MultiVector

CODES_FILE = "poly_codes.safetensors"  # the codes (m x H) in a saved folder; m is "codes" in retrieval_lab.json
DEFAULT_CODES = 16  # the paper's smallest m (16, 64, 360): most of its gain over the bi-encoder at a small cost
DEFAULT_DEPTH = 100  # candidates the rerank index re-scores


def poly_scores(y: torch.Tensor, mask: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """A x B float32 scores s(q_a, d_b) of queries' code vectors ``y`` (A x m x D, ``mask`` A x m True where real)
    against document vectors ``d`` (B x D): w = softmax_i(y_i . d), s = sum_i w_i (y_i . d) = (sum_i w_i y_i) . d."""
    with torch.autocast(y.device.type, enabled=False):
        each = torch.einsum("amd,bd->abm", y.float(), d.float())
        return _attend(each, mask[:, None, :].to(each.device))


def poly_scores_paired(y: torch.Tensor, mask: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """A x C float32 scores of each query of ``y`` (A x m x D, ``mask`` A x m) against its own documents ``d``
    (A x C x D) only."""
    with torch.autocast(y.device.type, enabled=False):
        each = torch.einsum("amd,acd->acm", y.float(), d.float())
        return _attend(each, mask[:, None, :].to(each.device))


def _attend(each: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i softmax_i(e_i) e_i over the last axis of ``each`` (the inner products y_i . d), masked codes left out:
    the document's attention over the codes, then the attended query vector's inner product with it."""
    weights = each.masked_fill(~mask, float("-inf")).softmax(-1)
    return (weights * each.masked_fill(~mask, 0.0)).sum(-1)


class PolyEncoder(Encoder):
    doc_representation = "vector"
    blocks = frozenset(BLOCKS) - {"query_query"}  # a query's m vectors against another's: no score defined
    indexes = ("exact", "rerank")
    index_settings = {"exact": (), "rerank": ("depth",)}

    def __init__(self, codes: int | None = None, **settings):
        """``codes`` (m, a positive whole number; None: a saved Poly-encoder folder's, else 16, the paper's smallest
        m); the other settings are the bi-encoder's (:class:`~retrieval_lab.models.encoder.Encoder`), whose pooled
        vector is the document's. A saved Poly-encoder folder restores its codes (``poly_codes.safetensors``); a
        ``codes`` given that differs from the folder's m is ignored with a warning, as the bi-encoder's
        architecture settings are."""
        require_whole("model.codes", codes, nullable=True)
        name_or_path = settings.get("name_or_path", "packaged:minilm")
        saved = (read_saved_settings(name_or_path) or {}).get("codes")
        folder = Path(str(name_or_path)).expanduser()
        if saved is not None:
            require_whole(f"{folder / SAVED_SETTINGS}: codes", saved)
            if codes is not None and codes != saved:
                warnings.warn(f"model.codes={codes} is ignored: {folder / SAVED_SETTINGS} says codes={saved}, and a "
                              f"saved model is loaded as it was trained.", stacklevel=2)
            codes = saved
        super().__init__(**settings)
        self.m = codes if codes is not None else DEFAULT_CODES
        hidden = self.query_model.config.hidden_size
        self.codes = nn.Parameter(torch.randn(self.m, hidden) * 0.02)
        if saved is not None and settings.get("random_init") is None:
            self._load_codes(folder / CODES_FILE)

    def _load_codes(self, file: Path) -> None:
        from safetensors.torch import load_file

        if not file.is_file():
            raise ConfigError(f"{file} is missing, though {SAVED_SETTINGS} gives the model {self.m} poly-encoder "
                              f"codes.")
        try:
            codes = load_file(str(file)).get("codes")
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{file} could not be read as safetensors ({str(err).splitlines()[0]}).") from None
        if codes is None or tuple(codes.shape) != tuple(self.codes.shape):
            shape = "no 'codes' tensor" if codes is None else f"codes of shape {tuple(codes.shape)}"
            raise ConfigError(f"{file} holds {shape}, not the {self.m} x {self.codes.shape[1]} codes of the model.")
        with torch.no_grad():
            self.codes.copy_(codes.float())

    # ---- encoding ----
    def encode_queries(self, inputs) -> MultiVector:
        """B x m x D: each code's attention over the query's real tokens (last hidden states), the weighted sum of
        those, then projection and normalisation (``finish``); every vector real."""
        hidden, mask = self.token_vectors(self.query_model, inputs)
        logits = torch.einsum("mh,blh->bml", self.codes.to(hidden.dtype), hidden)
        logits = logits.masked_fill(~mask.bool()[:, None, :], torch.finfo(logits.dtype).min)
        attended = torch.einsum("bml,blh->bmh", logits.softmax(-1), hidden)
        vectors = self.finish(attended)
        return MultiVector(vectors, torch.ones(vectors.shape[:2], dtype=torch.bool, device=vectors.device))

    # encode_docs: the bi-encoder's pooled vector (Encoder.encode_docs)

    def empty(self, count: int, side: str):
        if side == "doc":
            return super().empty(count, side)
        return MultiVector(np.zeros((count, self.m, self.dim), dtype=np.float32), np.zeros((count, self.m), dtype=bool))

    # ---- scoring ----
    def score(self, a, b) -> torch.Tensor:
        """Queries (MultiVector) against documents (vectors) by s(q, d), A x B; documents against queries, its
        transpose; vectors against vectors, their inner product; queries against queries refused."""
        if isinstance(a, MultiVector) and isinstance(b, MultiVector):
            raise ConfigError("model=polyencoder scores a query's codes against a document's vector, not queries "
                              "against queries.")
        if isinstance(a, MultiVector):
            return poly_scores(a.vectors, a.mask, b)
        if isinstance(b, MultiVector):
            return poly_scores(b.vectors, b.mask, a).T
        return super().score(a, b)

    def score_groups(self, q, d, group_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """R x G: each anchor query (``rows``; None: all B) against its own group of documents only."""
        if not isinstance(q, MultiVector):
            return super().score_groups(q, d, group_size, rows)
        rows = anchor_rows(q.vectors, rows)
        docs = d.view(len(q), group_size, -1)[rows.to(d.device)]
        return poly_scores_paired(q.vectors[rows], q.mask[rows.to(q.mask.device)], docs)

    # ---- search ----
    @classmethod
    def check_index(cls, index: str | None, settings=None, key: str = "retriever.index") -> str:
        """The family's check (kinds, setting names), then ``depth``'s value (a positive whole number)."""
        index = super().check_index(index, settings, key)
        if "depth" in (settings or {}):
            require_whole(f"{key}_settings.depth", settings["depth"])
        return index

    def build_index(self, docs, index: str | None = None, device=None, **settings):
        """``exact`` (every document scored) or ``rerank`` (``depth`` candidates of a faiss inner-product index
        searched with each query's mean code vector, re-scored) over the document vectors ``docs`` (N x D); its
        ``search`` takes encoded queries (MultiVector)."""
        index = self.check_index(index, settings)
        if index == "exact":
            return PolyIndex(docs, device)
        return PolyIndex(docs, device, depth=settings.get("depth", DEFAULT_DEPTH))

    # ---- saving ----
    def save(self, folder: str | Path) -> Path:
        """The bi-encoder's folder (as a plain encoder it is the mean- or cls-pooled bi-encoder), with the codes in
        ``poly_codes.safetensors`` and m as ``codes`` in ``retrieval_lab.json`` (``model=polyencoder`` loads both
        back)."""
        from safetensors.torch import save_file

        folder = super().save(folder)
        save_file({"codes": self.codes.detach().float().cpu().contiguous()}, str(folder / CODES_FILE))
        settings = json.loads((folder / SAVED_SETTINGS).read_text())
        (folder / SAVED_SETTINGS).write_text(json.dumps({**settings, "codes": self.m}, indent=2) + "\n")
        return folder


class PolyIndex:
    """Poly-encoder search over document vectors (N x D, kept as a float32 tensor on ``device``): every document
    scored (``depth`` None), or the ``depth`` best by inner product with each query's mean code vector (a faiss
    flat index) re-scored. ``search(queries, k)``: queries a MultiVector (numpy or torch), returns (scores, rows),
    each Q x k; rows beyond the candidates are -1 (score -inf)."""

    def __init__(self, docs, device=None, depth: int | None = None, budget: int = 2 ** 25):
        self.docs = torch.as_tensor(docs, dtype=torch.float32, device=device)
        self.depth, self.budget = depth, budget  # budget: scores (query x document x code) held at once
        self.first = None
        if depth is not None:
            from retrieval_lab.retrieval.dense import build_index

            self.first = build_index(self.docs.cpu().numpy(), "flat")

    def search(self, queries: MultiVector, k: int) -> tuple[np.ndarray, np.ndarray]:
        device = self.docs.device
        vectors = torch.as_tensor(queries.vectors, dtype=torch.float32, device=device)
        mask = torch.as_tensor(queries.mask, dtype=torch.bool, device=device)
        count, m = vectors.shape[:2]
        k = min(k, len(self.docs))
        if self.first is None:
            return self._exact(vectors, mask, k)
        depth = min(self.depth, len(self.docs))
        means = (vectors * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        _, candidates = self.first.search(np.ascontiguousarray(means.cpu().numpy()), depth)
        candidates = torch.as_tensor(candidates, device=device)
        scores = torch.full((count, k), float("-inf"))
        ids = torch.full((count, k), -1, dtype=torch.long)
        chunk = max(1, self.budget // max(1, depth * m))
        for start in range(0, count, chunk):
            rows = slice(start, start + chunk)
            found = candidates[rows]
            each = poly_scores_paired(vectors[rows], mask[rows], self.docs[found.clamp(min=0)])
            each = each.masked_fill(found < 0, float("-inf"))
            top = each.topk(min(k, depth), dim=1)
            scores[rows, :top.values.shape[1]] = top.values.cpu()
            ids[rows, :top.values.shape[1]] = found.gather(1, top.indices).cpu()
        ids[~torch.isfinite(scores)] = -1
        return scores.numpy(), ids.numpy()

    def _exact(self, vectors: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = [], []
        chunk = max(1, self.budget // max(1, len(self.docs) * vectors.shape[1]))
        for start in range(0, len(vectors), chunk):
            top = poly_scores(vectors[start:start + chunk], mask[start:start + chunk], self.docs).topk(k, dim=1)
            scores.append(top.values.cpu())
            ids.append(top.indices.cpu())
        if not scores:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        return torch.cat(scores).numpy(), torch.cat(ids).numpy()
