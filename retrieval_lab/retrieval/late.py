"""Search over token vectors (ColBERT, :mod:`retrieval_lab.models.colbert`): an index over every document's
vectors whose ``search(queries, k)`` takes encoded queries (:class:`MultiVector`, numpy) and returns (scores,
document rows), each Q x k, best first.

- ``exact``: MaxSim of every query against every document, in batches of documents (the reference for the others).
"""
from __future__ import annotations

import numpy as np
import torch

from retrieval_lab.errors import ConfigError
from retrieval_lab.models.colbert import maxsim
from retrieval_lab.models.representation import MultiVector

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(dtype: str, key: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"{key} must be one of {', '.join(DTYPES)}, got '{dtype}'.")
    return DTYPES[dtype]


def as_torch(rep: MultiVector, device=None, dtype=torch.float32) -> MultiVector:
    return MultiVector(torch.as_tensor(rep.vectors, device=device).to(dtype), torch.as_tensor(rep.mask, device=device))


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top.values, top.indices


class ExactIndex:
    """MaxSim of the queries against every document, ``batch_size`` documents at a time, with torch on ``device``
    (the documents kept there in ``dtype``; scores in float32)."""

    def __init__(self, docs: MultiVector, device=None, batch_size: int = 1024, dtype: str = "float32"):
        self.docs = as_torch(docs, device, torch_dtype(dtype, "retriever.index_settings.dtype"))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.docs)

    def scores(self, queries: MultiVector) -> torch.Tensor:
        """Q x N MaxSim of ``queries`` (torch, on the index's device) against every document."""
        return torch.cat([maxsim(queries, self.docs[start:start + self.batch_size])
                          for start in range(0, len(self.docs), self.batch_size)], 1)

    @torch.inference_mode()
    def search(self, queries: MultiVector, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = as_torch(queries, self.docs.device)
        scores, ids = [], []
        for start in range(0, len(queries), 64):
            values, rows = top_k(self.scores(queries[start:start + 64]), k)
            scores.append(values.cpu())
            ids.append(rows.cpu())
        return torch.cat(scores).numpy(), torch.cat(ids).numpy()


def build(docs: MultiVector, index: str, device=None, **settings):
    """The ``index`` kind over encoded documents ``docs`` (numpy :class:`MultiVector`), with its ``settings``."""
    if index == "exact":
        return ExactIndex(docs, device, **settings)
    raise ConfigError(f"retriever.index '{index}' is not built yet.")
