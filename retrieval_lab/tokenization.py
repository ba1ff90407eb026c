"""Tokenising many texts, fast, without torch: the Rust tokenizer on every core, from a prefix of long texts when
that gives the same ids, ASCII texts normalised in Python; token ids kept flat in numpy arrays; a cache that
tokenises a corpus once (in the background, in a thread or in worker processes, while the model encodes) and can
keep it on disk for later runs."""
from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import os
import pickle
import queue
import subprocess
import sys
import threading
import warnings
import weakref
import zipfile
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


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
        self.max_length, self.direction = max_length, direction
        self.settings = self.full.to_str()  # vocabulary, normaliser, truncation, ...: what a worker process rebuilds
        self.key = hashlib.blake2b(self.settings.encode(), digest_size=16).hexdigest()
        config = json.loads(self.settings)
        pre = config["pre_tokenizer"] or {}  # Metaspace(split=False) and ByteLevel(use_regex=False) do not split
        self.splits_at_spaces = pre.get("type") in SPLITS_AT_SPACES and pre.get("split", True) and pre.get(
            "use_regex", True)
        self.bare = None
        if (config["normalizer"] or {}).get("type") == "BertNormalizer" and not any(
                token["normalized"] for token in config["added_tokens"]):
            self.bare = Tokenizer.from_str(self.settings)
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
    if not keeps_first or not backend.splits_at_spaces:
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

    def pad(self, rows: np.ndarray, pad_id: int) -> dict:
        """Input ids of texts ``rows``, right-padded to the longest, and their attention mask (no Python loop), as
        torch tensors."""
        import torch

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


# ---- worker processes: tokenisation that takes neither the GIL nor the cores of the process driving the GPU ----
WORKER = "from retrieval_lab.tokenization import serve; serve()"


def serve() -> None:
    """The loop of a tokenizer worker process: read pickled requests ``(key, tokenizer or None, texts)`` on stdin,
    answer each with ``("ok", flat, offsets)`` (a :class:`TokenIds`) or ``("error", message)`` on stdout. The
    first request with a tokenizer ``key`` carries the tokenizer (its settings, maximum length and truncation
    side); the worker keeps it. Ends when stdin closes (the parent exited or closed it)."""
    import signal

    from tokenizers import Tokenizer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, whose exit closes stdin
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the replies
    requests, backends = sys.stdin.buffer, {}
    while True:
        try:
            key, new, texts = pickle.load(requests)
        except EOFError:
            return
        try:
            if new is not None:
                settings, max_length, direction = new
                backends[key] = RustTokenizer(Tokenizer.from_str(settings), max_length, direction)
            ids = TokenIds.from_lists(tokenize_ids(backends[key], texts, backends[key].max_length))
            reply = ("ok", ids.flat, ids.offsets)
        except Exception as err:  # noqa: BLE001 - reported to the parent, which tokenises those texts itself
            reply = ("error", f"{type(err).__name__}: {err}")
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()


class WorkerError(RuntimeError):
    """A tokenizer worker process failed or answered with an error."""


class TokenizerProcess:
    """One worker process running :func:`serve`, its Rust tokenizer on ``threads`` threads."""

    def __init__(self, threads: int):
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true",
                   PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self.threads, self.known = threads, set()
        self.process = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, env=env)

    def ids(self, backend: RustTokenizer, texts: list[str]) -> TokenIds:
        new = None if backend.key in self.known else (backend.settings, backend.max_length, backend.direction)
        try:
            pickle.dump((backend.key, new, texts), self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.process.stdin.flush()
            reply = pickle.load(self.process.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as err:
            self.close()
            raise WorkerError(f"tokenizer worker process {self.process.pid} stopped "
                              f"(exit code {self.process.poll()}): {err or type(err).__name__}") from None
        self.known.add(backend.key)
        if reply[0] != "ok":
            raise WorkerError(f"tokenizer worker process {self.process.pid}: {reply[1]}")
        return TokenIds(reply[1], reply[2])

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=5)  # it ends when its stdin closes
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def machine_cores() -> int:
    """The cores this process is allowed to run on (its CPU affinity, as SLURM or taskset set it; else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def usable_cores() -> int:
    """The cores this process may use: shared with the other processes of a distributed run on this machine
    (``LOCAL_WORLD_SIZE`` as torchrun sets it, else SLURM's tasks per node, else ``WORLD_SIZE`` as Lightning sets
    it, which counts the processes of every machine and so errs on the side of fewer cores)."""
    cores = machine_cores()
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return max(1, cores // max(1, int(os.environ[name])))
    return cores


def worker_plan(processes: int | str, cuda: bool) -> tuple[int, int]:
    """(worker processes, Rust threads each) for ``processes``: a count (0: tokenise in a thread of this process),
    or ``auto``: none on a CPU, where the model needs the cores itself; with a GPU, one process per 3 cores (at
    most 4), the cores shared among them, one core left to the process that drives the GPU."""
    if processes == "auto":
        processes = 0 if not cuda else max(1, min(4, (usable_cores() - 1) // 3))
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 0:
        from retrieval_lab.errors import ConfigError

        raise ConfigError(f"retriever.tokenize_processes must be 'auto' or a count of 0 or more, got '{processes}'.")
    return processes, max(1, (usable_cores() - 1) // max(1, processes))


class TokenizerProcesses:
    """The worker processes of this process, started on first use (about 0.2 s each) and kept until exit; a
    request takes whichever is idle."""

    def __init__(self):
        self.lock, self.idle, self.workers = threading.Lock(), queue.Queue(), []

    def start(self, processes: int, threads: int) -> TokenizerProcesses | None:
        """At least ``processes`` live workers (those started before keep their thread count); None, with a
        warning, when no worker process can be started."""
        with self.lock:
            self.workers = [w for w in self.workers if w.alive()]
            while len(self.workers) < processes:
                try:
                    self.workers.append(TokenizerProcess(threads))
                except OSError as err:
                    warnings.warn(f"no tokenizer worker process could be started ({err}); tokenising in a thread.")
                    break
                self.idle.put(self.workers[-1])
            return self if self.workers else None

    def ids(self, backend: RustTokenizer, texts: list[str]) -> TokenIds:
        """``texts`` tokenised by the next idle live worker (WorkerError: it failed, or none is left)."""
        while True:
            if not any(w.alive() for w in self.workers):
                raise WorkerError("no tokenizer worker process is left")
            try:
                worker = self.idle.get(timeout=0.5)
            except queue.Empty:  # all at work: wait on
                continue
            if worker.alive():  # one that stopped while idle is dropped
                break
        try:
            return worker.ids(backend, texts)
        finally:
            if worker.alive():
                self.idle.put(worker)

    def close(self) -> None:
        with self.lock:
            for worker in self.workers:
                worker.close()
            self.workers, self.idle = [], queue.Queue()

    def forget(self) -> None:
        """In a child forked from this process (a DataLoader worker, a forked DDP rank): let go of the parent's
        workers, which only the parent may talk to, and start its own when it needs any. This process's copies of
        their pipes are pointed at /dev/null, so that nothing here reaches a worker (not even a half-written
        request in a buffer) and a worker still ends when the parent closes its end."""
        null = os.open(os.devnull, os.O_RDWR)
        for worker in self.workers:
            for stream in (worker.process.stdin, worker.process.stdout):
                try:
                    os.dup2(null, stream.fileno())
                except (OSError, ValueError):  # already closed
                    pass
        os.close(null)
        self.lock, self.idle, self.workers = threading.Lock(), queue.Queue(), []


PROCESSES = TokenizerProcesses()
atexit.register(PROCESSES.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=PROCESSES.forget)


def check_cached(order: np.ndarray, ids: TokenIds, texts: list[str], backend: RustTokenizer, max_length: int,
                 vocabulary: int, sample: int = 16) -> None:
    """A ValueError unless a cache file's arrays are what tokenising ``texts`` gives: ``order`` a permutation of the
    texts, offsets rising from 0 to the number of ids, every id in the vocabulary, and ``sample`` texts (drawn by a
    fixed seed) tokenised again to the same ids. A damaged file, or one another machine wrote for other texts, would
    otherwise feed wrong (or out-of-range) ids to the model and still give a metric."""
    offsets, flat = np.asarray(ids.offsets), np.asarray(ids.flat)
    if order.dtype.kind not in "iu" or not np.array_equal(np.sort(order), np.arange(len(order))):
        raise ValueError("its order is not a permutation of the texts")
    if offsets.dtype.kind not in "iu" or offsets[0] != 0 or offsets[-1] != len(flat) or (np.diff(offsets) < 0).any():
        raise ValueError("its offsets do not rise from 0 to the number of ids")
    if len(flat) and (flat.dtype.kind not in "iu" or flat.min() < 0 or flat.max() >= vocabulary):
        raise ValueError(f"it holds token ids outside the vocabulary of {vocabulary}")
    rows = np.random.default_rng(0).choice(len(order), size=min(sample, len(order)), replace=False)
    for row, expected in zip(rows, tokenize_ids(backend, [texts[order[row]] for row in rows], max_length)):
        if flat[offsets[row]:offsets[row + 1]].tolist() != list(expected):
            raise ValueError(f"its ids of text {order[row]} are not the tokenizer's")


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
        digest = hashlib.blake2b(backend.settings.encode(), digest_size=16)  # vocabulary, truncation, ...
        digest.update(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)).tobytes())  # where each ends
        for start in range(0, len(texts), 4096):
            digest.update("".join(texts[start:start + 4096]).encode("utf-8", "surrogatepass"))
        return Path(self.folder) / f"tokens-{digest.hexdigest()}.npz"

    def store(self, key, tokenizer, order: np.ndarray, ids: TokenIds) -> None:
        self.entries[key] = (tokenizer, order, ids)  # the tokenizer held, so that its id is not reused meanwhile
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def stream(self, tokenizer, texts: list[str], max_length: int, chunk: int = 1024, processes: int = 0):
        """Yield (indices, :class:`TokenIds` of those texts): everything at once when cached, else chunks of up
        to ``chunk`` texts (the first ones smaller), longest (in characters) first, each tokenised while the
        caller works on the previous one: in a background thread of this process (``processes=0``), or in that
        many worker processes (:func:`worker_plan`), which hold neither this process's GIL nor its core."""
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
                check_cached(order, ids, texts, backend, max_length, len(tokenizer))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # e.g. a damaged file
                warnings.warn(f"{file} could not be read ({err}); tokenising again and rewriting it.")
            else:
                self.loads += 1
                self.store(key, tokenizer, order, ids)
                yield order, ids
                return
        self.misses += 1

        workers = None
        if processes and backend is not None:
            workers = PROCESSES.start(*worker_plan(processes, cuda=True))

        def tokenize(idx: np.ndarray) -> TokenIds:
            batch = [texts[i] for i in idx]
            if backend is None:
                return TokenIds.from_lists(tokenizer(batch, truncation=True, max_length=max_length)["input_ids"])
            if workers is not None:
                try:
                    return workers.ids(backend, batch)
                except WorkerError as err:  # tokenised here instead
                    warnings.warn(f"{err}; tokenising in this process instead.")
            return TokenIds.from_lists(tokenize_ids(backend, batch, max_length))

        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks, start, size = [], 0, max(1, chunk // 8)  # a small first chunk, so that the GPU starts early
        while start < len(order):
            chunks.append(order[start:start + size])
            start, size = start + size, min(chunk, 2 * size)
        # Each tokenizer (thread or worker) has a chunk at work and one waiting, no more: a caller that stops early
        # (an error, Ctrl-C), or a thread frozen at exit (an ANCE refresh), waits for those, not for the corpus.
        lanes, pending, ahead, parts = max(1, processes), iter(chunks), deque(), []
        pool = ThreadPoolExecutor(lanes)  # waiting on the Rust tokenizer or a worker: no GIL held

        def submit(count: int) -> None:
            ahead.extend((idx, pool.submit(tokenize, idx)) for idx in itertools.islice(pending, count))

        try:
            submit(2 * lanes)
            while ahead:
                idx, future = ahead.popleft()
                submit(1)  # the tokenizers stay busy while the caller works on this chunk
                parts.append(future.result())
                yield idx, parts[-1]
        finally:
            pool.shutdown(cancel_futures=True)
        ids = TokenIds.concat(parts)  # texts in the order tokenised
        self.store(key, tokenizer, order, ids)
        if file is not None:  # written under a temporary name, then renamed: a reader never sees half a file
            partial = file.with_name(f"{file.stem}.{os.getpid()}.partial.npz")
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                np.savez(partial, order=order, flat=ids.flat, offsets=ids.offsets)
                os.replace(partial, file)
            except OSError as err:  # the encoding goes on without it
                partial.unlink(missing_ok=True)
                warnings.warn(f"tokenised texts could not be written to {file} ({err}).")


TOKEN_CACHE = TokenCache()
