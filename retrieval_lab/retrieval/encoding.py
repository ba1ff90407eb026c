"""Encoding many texts with an encoder, fast: the texts tokenised once (``tokenization.TokenCache``, off the
critical path), length-sorted batches under a token budget, bf16 on a GPU, no synchronisation per batch."""
from __future__ import annotations

import copy
import weakref

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_lab.errors import ConfigError
from retrieval_lab.models import representation
from retrieval_lab.tokenization import TOKEN_CACHE, TokenCache, worker_plan


def pick_device(device: str | None) -> str | None:
    """``auto``: the GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def token_batches(lengths: np.ndarray, batch_size: int, token_budget: int | None) -> list[np.ndarray]:
    """Indices grouped longest first: ``batch_size`` texts a batch or, with ``token_budget``, as many as fit in
    that many tokens once padded (short texts travel in larger batches)."""
    order = np.argsort(lengths, kind="stable")[::-1]
    batches, start = [], 0
    while start < len(order):  # sorted: the first text of a batch is its longest
        size = max(1, token_budget // max(1, lengths[order[start]])) if token_budget else batch_size
        batches.append(order[start:start + size])
        start += size
    return batches


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def with_dtype(encoder, dtype: torch.dtype | None):
    """``encoder`` itself when its weights are already ``dtype`` (or ``dtype`` is None), else a copy with weights
    in ``dtype`` that shares its tokenizer (the training weights stay as they are)."""
    if dtype is None or next(encoder.parameters()).dtype == dtype:
        return encoder
    return copy.deepcopy(encoder, memo={id(encoder.tokenizer): encoder.tokenizer}).to(dtype)


COMPILED = weakref.WeakKeyDictionary()  # encoder -> (torch.compile backend, its compiled view)


def compiled(encoder, backend: str = "inductor"):
    """A view of ``encoder`` (sharing its weights) whose towers run through ``torch.compile`` with dynamic shapes,
    so batches of every size and length reuse one compilation (except a batch of one text: torch specialises size
    1 and compiles once more). Made once per encoder and kept while it lives."""
    cached = COMPILED.get(encoder)
    if cached is None or cached[0] != backend:
        view = copy.copy(encoder)
        view._modules = dict(encoder._modules)  # the view's own module table: the encoder keeps its plain towers
        view.query_model = torch.compile(encoder.query_model, dynamic=True, backend=backend)
        if getattr(encoder, "doc_model", None) is not None:
            view.doc_model = torch.compile(encoder.doc_model, dynamic=True, backend=backend)
        COMPILED[encoder] = cached = (backend, view)
    return cached[1]


@torch.inference_mode()
def encode_texts(encoder, texts: list[str], side: str, batch_size: int = 128, device: str | torch.device | None = None,
                 progress: bool = True, desc: str | None = None, token_budget: int | None = None,
                 cache: TokenCache | None = TOKEN_CACHE, flush_rows: int = 65536,
                 dtype: torch.dtype | str | None = "auto", compile: bool | str = False,
                 tokenize_processes: int | str = "auto"):
    """Embed ``texts``: the family's representation (``encoder.empty``: float32, in input order). Texts are tokenised
    once (``cache``), sorted by token length and batched so that padding is small (``token_budget``: tokens per batch instead of a fixed count).
    ``dtype``: ``auto`` runs the encoder as it is, under bf16 autocast on a GPU; a dtype (or its name) runs a copy
    of the encoder with its weights in that type, without autocast. ``compile``: run the towers through
    ``torch.compile`` (True: inductor; or a backend's name); the first call compiles, which pays off only on
    large corpora, and a dtype copy is compiled anew at each call. ``tokenize_processes``: texts not yet
    tokenised are tokenised by that many worker processes (0: a thread of this process; ``auto``: 0 on a CPU, a
    few on a GPU; see ``tokenization.worker_plan``). On a GPU batches are copied asynchronously, and embeddings
    wait there and come back ``flush_rows`` at a time, so the CPU prepares the next batches while the GPU runs
    (no synchronisation per batch)."""
    device = torch.device(device) if device else next(encoder.parameters()).device
    cuda = device.type == "cuda"
    autocast = dtype == "auto" and cuda
    if dtype == "auto":
        dtype = None
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"retriever.dtype must be 'auto' or one of {', '.join(DTYPES)}, got '{dtype}'.")
        dtype = DTYPES[dtype]
    processes, _ = worker_plan(tokenize_processes, cuda)
    model = with_dtype(encoder, dtype)
    if compile:
        model = compiled(model, "inductor" if compile is True else compile)
    max_length = encoder.query_max_length if side == "query" else encoder.doc_max_length
    out = encoder.empty(len(texts), side)
    pad_id = encoder.tokenizer.pad_token_id or 0
    pending_rows, pending = [], []  # embeddings still on the device, and the rows of ``out`` they go to

    def flush() -> None:
        if pending:
            out[np.concatenate(pending_rows)] = representation.to_numpy(representation.concat(pending))
            pending_rows.clear()
            pending.clear()

    was_training = encoder.training
    model.eval()
    stream = (cache or TokenCache()).stream(encoder.tokenizer, texts, max_length, processes=processes)
    bar = tqdm(total=len(texts), desc=desc or f"encode {side}s", unit="text", disable=not progress, leave=False)
    try:
        for chunk, ids in stream:
            for rows in token_batches(ids.lengths, batch_size, token_budget):
                inputs = ids.pad(rows, pad_id)
                if cuda:
                    inputs = {k: v.pin_memory().to(device, non_blocking=True) for k, v in inputs.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    pending.append(model.encode_queries(inputs) if side == "query" else model.encode_docs(inputs))
                pending_rows.append(chunk[rows])
                if sum(len(r) for r in pending_rows) >= flush_rows:
                    flush()
                bar.update(len(rows))
        flush()
    finally:
        bar.close()
        stream.close()  # after an error or Ctrl-C: no more texts tokenised in the background
        encoder.train(was_training)
    return out
