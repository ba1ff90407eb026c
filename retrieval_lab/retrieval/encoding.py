"""Encoding many texts with an encoder, fast: each text tokenised once (by the Rust tokenizer, in a background
thread, from a prefix when that gives the same ids, ASCII texts normalised in Python) and cached, length-sorted
batches under a token budget, bf16 on a GPU, no synchronisation per batch."""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import warnings
import weakref
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_lab.errors import ConfigError


def pick_device(device: str | None) -> str | None:
    """``auto``: the GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


BACKENDS = weakref.WeakKeyDictionary()  # tokenizer -> {max_length: its RustTokenizer}


class RustTokenizer:
    """A private copy of a fast tokenizer's Rust backend (``full``) that truncates to ``max_length`` and adds the
    special tokens. Where that backend normalises with BERT's normaliser, a second copy without it (``bare``) takes
    the ASCII texts, normalised here by one ``str.translate`` with each ASCII character's normal form (asked of
    the normaliser itself; on ASCII it works character by character). The Rust normaliser, which tracks every
    character's alignment, takes about a third of the Rust tokenisation time; the translation, in Python, takes
    about 2% of the time on 2 cores. Other texts, and texts that hold a special token's text, go through
    ``full``; the ids are the same either way."""

    def __init__(self, backend, max_length: int, direction: str):
        from tokenizers import Tokenizer

        self.full = Tokenizer.from_str(backend.to_str())
        self.full.no_padding()
        self.full.enable_truncation(max_length, direction=direction)
        config = json.loads(self.full.to_str())
        self.bare = None
        if (config["normalizer"] or {}).get("type") == "BertNormalizer" and not any(
                token["normalized"] for token in config["added_tokens"]):
            self.bare = Tokenizer.from_str(self.full.to_str())
            self.bare.normalizer = None
            self.ascii_forms = {c: self.full.normalizer.normalize_str(chr(c)) for c in range(128)}
            self.specials = [token["content"] for token in config["added_tokens"]]
            self.first_chars = {special[0] for special in self.specials if special}

    def normal_form(self, text: str) -> str | None:
        """What the normaliser makes of ``text``, or None where ``bare`` must not take it."""
        if not text.isascii():
            return None
        normal = text.translate(self.ascii_forms)
        if any(c in text or c in normal for c in self.first_chars) and any(
                s in text or s in normal for s in self.specials):
            return None
        return normal

    def ids(self, texts: list[str]) -> list[list[int]]:
        """The token ids of ``texts`` (no character offsets)."""
        if self.bare is None:
            return [enc.ids for enc in encode_fast(self.full, texts)]
        normal = [self.normal_form(text) for text in texts]
        fast = [i for i, x in enumerate(normal) if x is not None]
        rest = [i for i, x in enumerate(normal) if x is None]
        out = [None] * len(texts)
        for backend, rows, batch in ((self.bare, fast, [normal[i] for i in fast]),
                                     (self.full, rest, [texts[i] for i in rest])):
            for row, enc in zip(rows, encode_fast(backend, batch) if rows else []):
                out[row] = enc.ids
        return out


def encode_fast(backend, texts: list[str]):
    return getattr(backend, "encode_batch_fast", backend.encode_batch)(texts)  # fast: no character offsets


def rust_tokenizer(tokenizer, max_length: int) -> RustTokenizer | None:
    """The :class:`RustTokenizer` of a fast tokenizer, or None for a tokenizer without a Rust backend (then the
    tokenizer's own call is used). Made once per tokenizer and length (a copy takes ~20 ms), and kept while the
    tokenizer lives."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    copies = BACKENDS.setdefault(tokenizer, {})
    if max_length not in copies:
        copies[max_length] = RustTokenizer(backend, max_length, getattr(tokenizer, "truncation_side", "right"))
    return copies[max_length]


# pre-tokenizers that split words at spaces: a text cut just before a space begins with the whole text's tokens
SPLITS_AT_SPACES = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "ByteLevel", "Metaspace"}
CHARS_PER_TOKEN = 6  # text cut at max_length * this many characters first; few texts need their whole text after


def cut_at_space(text: str, limit: int) -> str:
    """``text`` cut before its last space within ``limit`` characters (unchanged when short or without a space)."""
    if len(text) <= limit:
        return text
    end = text.rfind(" ", 0, limit + 1)
    return text[:end].rstrip() if end > 0 else text


def tokenize_ids(backend: RustTokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of ``texts`` truncated to ``max_length``, from a :func:`rust_tokenizer` backend. Where truncation
    keeps the first tokens and the tokenizer splits at spaces, only a prefix of each long text is tokenised: the
    text cut at a space after ``CHARS_PER_TOKEN * max_length`` characters. A cut text that still fills
    ``max_length`` tokens has the whole text's first tokens; the others are tokenised again in full."""
    truncation = backend.full.truncation
    keeps_first = truncation is not None and truncation["direction"] == "right"
    if not keeps_first or type(backend.full.pre_tokenizer).__name__ not in SPLITS_AT_SPACES:
        return backend.ids(texts)
    cut = [cut_at_space(text, CHARS_PER_TOKEN * max_length) for text in texts]
    ids = backend.ids(cut)
    short = [i for i, (text, x) in enumerate(zip(texts, ids)) if len(x) < max_length and len(cut[i]) < len(text)]
    for i, x in zip(short, backend.ids([texts[i] for i in short]) if short else []):
        ids[i] = x
    return ids


class TokenIds:
    """The token ids of many texts in one flat int32 array (text ``i``: ``flat[offsets[i]:offsets[i + 1]]``): a
    tenth of the memory that Python lists of ints take, which matters for a cached corpus of millions of texts."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_lists(cls, ids: list[list[int]]) -> TokenIds:
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), out=offsets[1:])
        return cls(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1])), offsets)

    @classmethod
    def concat(cls, parts: list[TokenIds]) -> TokenIds:
        starts = np.cumsum([0] + [len(part.flat) for part in parts[:-1]])
        offsets = np.concatenate([[0]] + [part.offsets[1:] + start for part, start in zip(parts, starts)])
        return cls(np.concatenate([np.zeros(0, dtype=np.int32)] + [part.flat for part in parts]), offsets)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __iter__(self):
        return (self.flat[a:b].tolist() for a, b in zip(self.offsets[:-1], self.offsets[1:]))

    def pad(self, rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        """Input ids of texts ``rows``, right-padded to the longest, and their attention mask (no Python loop)."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts  # not self.lengths: that differences the whole corpus
        mask = np.arange(lengths.max()) < lengths[:, None]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # 0, 1, .. per text
        input_ids = np.full(mask.shape, pad_id, dtype=np.int64)
        input_ids[mask] = self.flat[np.repeat(starts, lengths) + within]  # row-major: each text's ids in order
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}


def tokenize_padded(tokenizer, texts: list[str], max_length: int | None):
    """What ``tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")``
    returns (input ids and attention mask), about twice as fast: the Rust backend copy, prefix tokenisation and
    numpy padding. Falls back on the tokenizer's own call where those would differ (padding on the left, no Rust
    backend, no maximum length)."""
    from transformers import BatchEncoding

    backend = None
    if max_length is not None and getattr(tokenizer, "padding_side", "right") == "right":
        backend = rust_tokenizer(tokenizer, max_length)
    if backend is None:
        return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids = TokenIds.from_lists(tokenize_ids(backend, texts, max_length))
    return BatchEncoding(ids.pad(np.arange(len(texts)), tokenizer.pad_token_id or 0))


class TokenCache:
    """Tokenised texts kept between encodings, so tokenisation leaves the critical path: a corpus is tokenised
    once (by the Rust tokenizer on every core, chunk by chunk in a background thread while the GPU encodes the
    chunks already done), and every later encoding of the same texts (each validation, each ANCE refresh, the
    final evaluation) only pads and runs the model. Keyed by the tokenizer, the maximum length and the texts
    themselves; holds the ``size`` newest entries. With a ``folder``, tokenised texts are also written there
    (one ``.npz`` file each, named by a hash of the tokenizer's settings, the maximum length and the texts) and
    read back by later runs, so that a corpus is tokenised once across runs too."""

    def __init__(self, size: int = 4, folder: str | Path | None = None):
        self.size, self.entries, self.misses, self.loads = size, OrderedDict(), 0, 0
        self.folder = folder

    def nbytes(self) -> int:
        """The memory the cached token ids take."""
        return sum(ids.flat.nbytes + ids.offsets.nbytes for _, _, ids in self.entries.values())

    def file(self, backend: RustTokenizer | None, texts: list[str]) -> Path | None:
        """Where ``texts`` tokenised by ``backend`` are kept in ``folder`` (None: no folder, or no Rust backend,
        whose settings name it)."""
        if not self.folder or backend is None:
            return None
        digest = hashlib.blake2b(backend.full.to_str().encode(), digest_size=16)  # vocabulary, truncation, ...
        digest.update(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)).tobytes())  # where each ends
        for start in range(0, len(texts), 4096):
            digest.update("".join(texts[start:start + 4096]).encode("utf-8", "surrogatepass"))
        return Path(self.folder) / f"tokens-{digest.hexdigest()}.npz"

    def store(self, key, tokenizer, order: np.ndarray, ids: TokenIds) -> None:
        self.entries[key] = (tokenizer, order, ids)  # the tokenizer held, so that its id is not reused meanwhile
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def stream(self, tokenizer, texts: list[str], max_length: int, chunk: int = 1024):
        """Yield (indices, :class:`TokenIds` of those texts): everything at once when cached, else chunks of up
        to ``chunk`` texts (the first ones smaller), longest (in characters) first, each tokenised while the
        caller works on the previous one."""
        key = (id(tokenizer), max_length, len(texts), hash(tuple(texts)))
        if key in self.entries and self.entries[key][0] is tokenizer:
            self.entries.move_to_end(key)
            yield self.entries[key][1:]
            return
        backend = rust_tokenizer(tokenizer, max_length)
        file = self.file(backend, texts)
        if file is not None and file.exists():
            try:
                with np.load(file) as saved:
                    order, ids = saved["order"], TokenIds(saved["flat"], saved["offsets"])
                if len(order) != len(texts) or len(ids.offsets) != len(texts) + 1:
                    raise ValueError(f"it holds {len(order)} texts, not {len(texts)}")
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # e.g. a damaged file
                warnings.warn(f"{file} could not be read ({err}); tokenising again and rewriting it.")
            else:
                self.loads += 1
                self.store(key, tokenizer, order, ids)
                yield order, ids
                return
        self.misses += 1

        def tokenize(idx: np.ndarray) -> TokenIds:
            batch = [texts[i] for i in idx]
            if backend is None:
                return TokenIds.from_lists(tokenizer(batch, truncation=True, max_length=max_length)["input_ids"])
            return TokenIds.from_lists(tokenize_ids(backend, batch, max_length))

        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks, start, size = [], 0, max(1, chunk // 8)  # a small first chunk, so that the GPU starts early
        while start < len(order):
            chunks.append(order[start:start + size])
            start, size = start + size, min(chunk, 2 * size)
        parts = []
        with ThreadPoolExecutor(1) as pool:  # the Rust tokenizer releases the GIL and uses every core itself
            futures = [pool.submit(tokenize, idx) for idx in chunks]
            for idx, future in zip(chunks, futures):
                parts.append(future.result())
                yield idx, parts[-1]
        ids = TokenIds.concat(parts)  # texts in the order tokenised
        self.store(key, tokenizer, order, ids)
        if file is not None:  # written under a temporary name, then renamed: a reader never sees half a file
            partial = file.with_name(f"{file.stem}.{os.getpid()}.partial.npz")
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                np.savez(partial, order=order, flat=ids.flat, offsets=ids.offsets)
                os.replace(partial, file)
            except OSError as err:  # the encoding goes on without it
                warnings.warn(f"tokenised texts could not be written to {file} ({err}).")


TOKEN_CACHE = TokenCache()


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
                 dtype: torch.dtype | str | None = "auto", compile: bool | str = False) -> np.ndarray:
    """Embed ``texts`` (float32, in input order). Texts are tokenised once (``cache``), sorted by token length
    and batched so that padding is small (``token_budget``: tokens per batch instead of a fixed count).
    ``dtype``: ``auto`` runs the encoder as it is, under bf16 autocast on a GPU; a dtype (or its name) runs a copy
    of the encoder with its weights in that type, without autocast. ``compile``: run the towers through
    ``torch.compile`` (True: inductor; or a backend's name); the first call compiles, which pays off only on
    large corpora, and a dtype copy is compiled anew at each call. On a GPU batches are copied asynchronously,
    and embeddings wait there and come back ``flush_rows`` at a time, so the CPU prepares the next batches while
    the GPU runs (no synchronisation per batch)."""
    device = torch.device(device) if device else next(encoder.parameters()).device
    cuda = device.type == "cuda"
    autocast = dtype == "auto" and cuda
    if dtype == "auto":
        dtype = None
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"retriever.dtype must be 'auto' or one of {', '.join(DTYPES)}, got '{dtype}'.")
        dtype = DTYPES[dtype]
    model = with_dtype(encoder, dtype)
    if compile:
        model = compiled(model, "inductor" if compile is True else compile)
    max_length = encoder.query_max_length if side == "query" else encoder.doc_max_length
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    pad_id = encoder.tokenizer.pad_token_id or 0
    pending_rows, pending = [], []  # embeddings still on the device, and the rows of ``out`` they go to

    def flush() -> None:
        if pending:
            out[np.concatenate(pending_rows)] = torch.cat(pending).float().cpu().numpy()
            pending_rows.clear()
            pending.clear()

    was_training = encoder.training
    model.eval()
    try:
        bar = tqdm(total=len(texts), desc=desc or f"encode {side}s", unit="text", disable=not progress, leave=False)
        for chunk, ids in (cache or TokenCache()).stream(encoder.tokenizer, texts, max_length):
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
        bar.close()
    finally:
        encoder.train(was_training)
    return out
