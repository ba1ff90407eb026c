"""ColBERT: every token of a query and of a document keeps a vector, and a query's score against a document is the
sum over its token vectors of the best inner product with any of the document's (MaxSim).

Khattab & Zaharia (2020), "ColBERT: Efficient and Effective Passage Search via Contextualized Late Interaction
over BERT", SIGIR. With Q_i the query's token vectors and D_j the document's (each a linear projection of the last
hidden state to ``projection_dim`` = 128 dimensions, L2-normalised):

    S(q, d) = sum_i max_j Q_i . D_j

- A marker token follows [CLS]: ``query_marker`` in queries, ``doc_marker`` in documents ([unused0] and [unused1]
  of BERT's vocabulary, as the paper's [Q] and [D]).
- Query augmentation (``augment``): a query is padded with [MASK] to ``query_max_length`` tokens plus its marker, and
  every one of those positions keeps a vector (the masks learn to expand the query). The encoder does not attend to
  the [MASK] tokens unless ``attend_to_expansion``.
- Documents keep the vectors of their real tokens but punctuation (``skip_punctuation``): [CLS], marker and [SEP]
  stay, as in the paper's code.

The same formula scores documents against documents and queries against queries (the blocks of SamToNe). A
training step holds every query token's inner product with every document token of the batch (B x B*G x 33 x 181
floats: 60 MB for 32 queries in groups of 2, growing with the square of the batch; under DDP each process holds
its own queries' rows of the global batch). Search
(``build_index``, :mod:`retrieval_lab.retrieval.late`): ``exact`` MaxSim over the corpus, batched; ``ann``, ColBERT
v1's candidate generation (a faiss index over every document token vector) with exact MaxSim over the candidates;
``plaid``, ColBERTv2's residual compression with PLAID's centroid pruning.

``python -m retrieval_lab.train model=colbert loss.temperature=1``
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch

from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.scores import anchor_rows
from retrieval_lab.models.encoder import SAVED_SETTINGS, Encoder, read_saved_settings, require_bool
from retrieval_lab.models.pylate_folder import write_pylate_files
from retrieval_lab.models.representation import MultiVector

SETTINGS = ("query_marker", "doc_marker", "augment", "attend_to_expansion", "skip_punctuation")
COLBERT_DEFAULTS = {"query_marker": "[unused0]", "doc_marker": "[unused1]", "augment": True,
                    "attend_to_expansion": False, "skip_punctuation": True}


def sum_of_best(each: torch.Tensor, q_mask: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """From inner products ``each`` (..., Lq, Ld): each real query vector's best over the real document vectors
    (``d_mask``, broadcast to ``each``), summed over the real query vectors (``q_mask``, broadcast to (..., Lq))."""
    best = each.masked_fill(~d_mask.to(each.device), float("-inf")).amax(-1)
    return torch.where(q_mask.to(each.device), best, 0.0).sum(-1)


def maxsim(q: MultiVector, d: MultiVector) -> torch.Tensor:
    """A x B float32: sum_i max_j q_ai . d_bj over the real vectors of every text of ``q`` against every text of
    ``d`` (a text of ``d`` with no real vector scores -inf)."""
    with torch.autocast(q.device.type, enabled=False):
        each = torch.einsum("aid,bjd->abij", q.vectors.float(), d.vectors.float())
        return sum_of_best(each, q.mask[:, None, :], d.mask[None, :, None, :])


def maxsim_groups(q: MultiVector, d: MultiVector, group_size: int) -> torch.Tensor:
    """B x G float32: each query of ``q`` (B) against its own G documents of ``d`` (B*G, in groups) only."""
    with torch.autocast(q.device.type, enabled=False):
        docs = d.vectors.float().view(len(q), group_size, *d.vectors.shape[1:])
        each = torch.einsum("bid,bgjd->bgij", q.vectors.float(), docs)
        return sum_of_best(each, q.mask[:, None, :], d.mask.view(len(q), group_size, 1, -1))


class ColBERT(Encoder):
    doc_representation = "vectors"
    own_settings = "colbert"
    temperature = 1.0  # the losses' temperature its scores (sums of up to query_max_length + 1 cosines) want
    indexes = ("exact", "ann", "plaid")
    index_settings = {"exact": ("batch_size", "dtype"),
                      "ann": ("candidates", "ann", "dtype"),
                      "plaid": ("nbits", "centroids", "ncells", "centroid_threshold", "ndocs", "kmeans_iterations",
                                "sample", "seed")}

    def __init__(self, name_or_path: str = "packaged:minilm", projection_dim: int | None = None,
                 query_max_length: int | None = None, doc_max_length: int | None = None,
                 query_marker: str | None = None, doc_marker: str | None = None, augment: bool | None = None,
                 attend_to_expansion: bool | None = None, skip_punctuation: bool | None = None, **settings):
        """``query_marker`` / ``doc_marker``: tokens of the tokenizer's vocabulary; ``augment``,
        ``attend_to_expansion``, ``skip_punctuation``: booleans (see the module docstring); None: a saved folder's
        value, else ``COLBERT_DEFAULTS``'s. ``projection_dim``, ``query_max_length`` and ``doc_max_length``: None is a
        saved folder's value, else the paper's 128, 32 and 180. The other settings are the bi-encoder's
        (:class:`~retrieval_lab.models.encoder.Encoder`; ``pooling`` is unused)."""
        given = {"query_marker": query_marker, "doc_marker": doc_marker, "augment": augment,
                 "attend_to_expansion": attend_to_expansion, "skip_punctuation": skip_punctuation}
        for key in ("augment", "attend_to_expansion", "skip_punctuation"):
            require_bool(f"model.{key}", given[key], nullable=True)
        saved = read_saved_settings(name_or_path) or {}
        if saved and "colbert" not in saved:
            raise ConfigError(f"{name_or_path} was saved as another model family than ColBERT (its "
                              f"{SAVED_SETTINGS} has no 'colbert' settings); load it with the model it was trained as.")
        if not saved:
            projection_dim = 128 if projection_dim is None else projection_dim
            query_max_length = 32 if query_max_length is None else query_max_length
            doc_max_length = 180 if doc_max_length is None else doc_max_length
        chosen = {key: saved.get("colbert", {}).get(key) if given[key] is None else given[key] for key in SETTINGS}
        chosen = {key: COLBERT_DEFAULTS[key] if value is None else value for key, value in chosen.items()}
        super().__init__(name_or_path, projection_dim=projection_dim, query_max_length=query_max_length,
                         doc_max_length=doc_max_length, **settings)
        positions = getattr(self.query_model.config, "max_position_embeddings", None)
        for key, length in (("model.query_max_length", self.query_max_length),
                            ("model.doc_max_length", self.doc_max_length)):
            if isinstance(positions, int) and length + 1 > positions:
                raise ConfigError(f"{key}={length} and ColBERT's marker token are longer than the {positions} "
                                  f"positions of model '{self.name_or_path}'; set {key} to {positions - 1} or less.")
        for key, value in chosen.items():
            setattr(self, key, value)
        self.query_marker_id = self._token_id("model.query_marker", self.query_marker)
        self.doc_marker_id = self._token_id("model.doc_marker", self.doc_marker)
        if self.augment and self.tokenizer.mask_token_id is None:
            raise ConfigError(f"the tokenizer of model '{self.name_or_path}' has no mask token to augment queries "
                              f"with: set model.augment=false.")
        skip = [self.tokenizer.convert_tokens_to_ids(p) for p in string.punctuation] if self.skip_punctuation else []
        unk = self.tokenizer.unk_token_id
        self.register_buffer("skip_ids", torch.tensor(sorted({i for i in skip if i is not None and i != unk}),
                                                      dtype=torch.long), persistent=False)

    def _token_id(self, key: str, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token) if isinstance(token, str) else None
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ConfigError(f"{key} '{token}' is not a token of the tokenizer of model '{self.name_or_path}'; name "
                              f"one of its vocabulary (BERT's: [unused0], [unused1]).")
        return token_id

    # ---- encoding: the towers' inputs with markers (and query augmentation), every token's vector ----
    @staticmethod
    def _with_marker(inputs, marker: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        column = torch.full_like(ids[:, :1], marker)
        return (torch.cat([ids[:, :1], column, ids[:, 1:]], 1),
                torch.cat([attention[:, :1], torch.ones_like(column), attention[:, 1:]], 1))

    def query_inputs(self, inputs) -> tuple[dict, torch.Tensor]:
        """The query tower's inputs ([CLS] [Q] tokens [SEP], and with ``augment`` [MASK] up to query_max_length + 1
        positions) and the mask of the positions that keep a vector."""
        ids, attention = self._with_marker(inputs, self.query_marker_id)
        if not self.augment:
            return {"input_ids": ids, "attention_mask": attention}, attention.bool()
        length = self.query_max_length + 1
        if ids.shape[1] < length:
            pad = torch.zeros(len(ids), length - ids.shape[1], dtype=ids.dtype, device=ids.device)
            ids, attention = torch.cat([ids, pad], 1), torch.cat([attention, pad.to(attention.dtype)], 1)
        ids = ids.masked_fill(attention == 0, self.tokenizer.mask_token_id)
        if self.attend_to_expansion:
            attention = torch.ones_like(attention)
        return {"input_ids": ids, "attention_mask": attention}, torch.ones_like(ids, dtype=torch.bool)

    def doc_inputs(self, inputs) -> tuple[dict, torch.Tensor]:
        """The document tower's inputs ([CLS] [D] tokens [SEP]) and the mask of the tokens that keep a vector (not
        padding, not punctuation)."""
        ids, attention = self._with_marker(inputs, self.doc_marker_id)
        keep = attention.bool() & ~torch.isin(ids, self.skip_ids.to(ids.device))
        return {"input_ids": ids, "attention_mask": attention}, keep

    def _vectors(self, model, inputs, keep: torch.Tensor) -> MultiVector:
        hidden, _ = self.token_vectors(model, {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])})
        return MultiVector(self.finish(hidden), keep)

    def encode_queries(self, inputs) -> MultiVector:
        return self._vectors(self.query_model, *self.query_inputs(inputs))

    def encode_docs(self, inputs) -> MultiVector:
        return self._vectors(self.doc_tower, *self.doc_inputs(inputs))

    def empty(self, count: int, side: str) -> MultiVector:
        length = (self.query_max_length if side == "query" else self.doc_max_length) + 1  # + the marker
        return MultiVector(np.zeros((count, length, self.dim), dtype=np.float32), np.zeros((count, length), dtype=bool))

    # ---- scoring ----
    def score(self, a: MultiVector, b: MultiVector) -> torch.Tensor:
        """MaxSim of every text of ``a`` against every text of ``b``."""
        return maxsim(a, b)

    def score_groups(self, q: MultiVector, d: MultiVector, group_size: int,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            return maxsim_groups(q, d, group_size)
        rows = anchor_rows(q, rows)
        owned = (rows[:, None].to(d.device) * group_size + torch.arange(group_size, device=d.device)).reshape(-1)
        return maxsim_groups(q[rows.to(q.device)], d[owned], group_size)

    @classmethod
    def check_index(cls, index: str | None, settings=None, key: str = "retriever.index") -> str:
        """The family's check (kinds, setting names), then each setting's value (``late.check_settings``)."""
        from retrieval_lab.retrieval import late

        index = super().check_index(index, settings, key)
        late.check_settings(index, dict(settings or {}), f"{key}_settings")
        return index

    def build_index(self, docs: MultiVector, index: str | None = None, device=None, **settings):
        """An index over encoded documents (see :mod:`retrieval_lab.retrieval.late`) whose ``search`` takes encoded
        queries."""
        from retrieval_lab.retrieval import late

        return late.build(docs, self.check_index(index, settings), device, **settings)

    # ---- saving ----
    def save(self, folder: str | Path) -> Path:
        """The bi-encoder's folder, with ColBERT's settings recorded in ``retrieval_lab.json`` (``model=colbert``
        loads it back as it was trained) and, for shared towers, the files PyLate reads
        (:mod:`retrieval_lab.models.pylate_folder`: ``pylate.models.ColBERT(folder)`` is the same model)."""
        folder = super().save(folder)
        settings = json.loads((folder / SAVED_SETTINGS).read_text())
        settings["colbert"] = {key: getattr(self, key) for key in SETTINGS}
        (folder / SAVED_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
        if self.doc_model is None:  # PyLate holds one encoder for both sides
            write_pylate_files(folder, self)
        return folder
