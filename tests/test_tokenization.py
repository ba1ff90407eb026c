"""Tokenisation: flat token ids, prefix tokenisation, ASCII texts normalised in Python, the tokenizer backend
copies, the token cache's folder, tokenisation in worker processes."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch


def test_token_cache_folder_keeps_tokenised_texts_for_later_runs(tiny_model, tmp_path):
    """With a folder, tokenised texts are written there and a new cache (a later run) reads them back instead of
    tokenising; another length or other texts get another file; a damaged file is tokenised again."""
    from retrieval_lab.models.encoder import load_tokenizer
    from retrieval_lab.tokenization import TokenCache

    tokenizer = load_tokenizer(str(tiny_model))
    texts = ["a protein study of cancer cells in the liver", "gene", "virus and vaccine", "x " * 40]
    expected = dict(enumerate(tokenizer(texts, truncation=True, max_length=16)["input_ids"]))
    as_dict = lambda chunks: {int(i): x for idx, ids in chunks for i, x in zip(idx, ids)}  # noqa: E731
    first = TokenCache(folder=tmp_path / "tokens")
    assert as_dict(first.stream(tokenizer, texts, 16, chunk=2)) == expected
    files = list((tmp_path / "tokens").glob("tokens-*.npz"))
    assert len(files) == 1 and first.misses == 1 and first.loads == 0
    later = TokenCache(folder=tmp_path / "tokens")
    chunks = list(later.stream(tokenizer, texts, 16))
    assert len(chunks) == 1 and as_dict(chunks) == expected and later.loads == 1 and later.misses == 0
    list(later.stream(tokenizer, texts, 16))  # now from memory
    assert later.loads == 1 and later.misses == 0
    for other_texts, length in ((texts, 8), (texts[:-1], 16), (["ab", "c"], 16), (["a", "bc"], 16)):
        list(later.stream(tokenizer, other_texts, length))
    assert len(list((tmp_path / "tokens").glob("tokens-*.npz"))) == 5 and later.misses == 4
    files[0].write_bytes(b"cut short")
    damaged = TokenCache(folder=tmp_path / "tokens")
    with pytest.warns(UserWarning, match="could not be read"):
        assert as_dict(damaged.stream(tokenizer, texts, 16)) == expected
    assert damaged.misses == 1
    assert as_dict(TokenCache(folder=tmp_path / "tokens").stream(tokenizer, texts, 16)) == expected  # rewritten


def test_token_ids_pad_like_lists_padded_by_hand():
    """Token ids kept in one flat array: any rows, padded, equal the lists padded one by one; chunks concatenate."""
    from retrieval_lab.tokenization import TokenIds

    rng = np.random.default_rng(0)
    lists = [rng.integers(1000, 30000, size=n).tolist() for n in (5, 1, 12, 3, 12, 7)]
    ids = TokenIds.concat([TokenIds.from_lists(lists[:2]), TokenIds.from_lists([]), TokenIds.from_lists(lists[2:])])
    assert list(ids) == lists and ids.lengths.tolist() == [5, 1, 12, 3, 12, 7] and ids.flat.dtype == np.int32
    for rows in ([2, 0, 1], [3], [5, 4, 3, 2, 1, 0]):
        width = max(len(lists[r]) for r in rows)
        expected = [lists[r] + [7] * (width - len(lists[r])) for r in rows]
        mask = [[1] * len(lists[r]) + [0] * (width - len(lists[r])) for r in rows]
        padded = ids.pad(np.array(rows), pad_id=7)
        assert padded["input_ids"].tolist() == expected and padded["attention_mask"].tolist() == mask
        assert padded["input_ids"].dtype == padded["attention_mask"].dtype == torch.int64


def _trained_tokenizer(pre_tokenizer):
    """A small BPE tokenizer trained here, with the given pre-tokenizer, wrapped like a Hugging Face fast one."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    words = ["protein", "cancer", "virus", "immunohistochemistry", "cell", "a", "of", "the", "and"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizer
    backend.train_from_iterator([" ".join(words[(i * 7 + j) % 9] for j in range(30)) for i in range(50)],
                                trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


def test_tokenising_a_prefix_of_long_texts_gives_the_whole_texts_tokens(tiny_model):
    """Long texts are tokenised from a prefix cut at a space; the ids equal those of the whole text, truncated,
    for BERT word pieces, byte-level and metaspace BPE, also where the prefix falls short (long words)."""
    from tokenizers import pre_tokenizers

    from retrieval_lab.models.encoder import load_tokenizer
    from retrieval_lab import tokenization

    rng = np.random.default_rng(0)
    words = ["protein", "cancer", "virus", "immunohistochemistry" * 3, "cell", "a", "of", "the", "and", ",", "."]
    texts = [" ".join(rng.choice(words, size=n)) for n in (1, 5, 40, 80, 300, 600)]
    texts += ["  ".join(["immunohistochemistry" * 4] * 40), "x" * 500, "word " * 100 + "   ", "  lead  " * 90]
    max_length = 24
    for tokenizer in (load_tokenizer(str(tiny_model)), _trained_tokenizer(pre_tokenizers.ByteLevel()),
                      _trained_tokenizer(pre_tokenizers.Metaspace())):
        backend = tokenization.rust_tokenizer(tokenizer, max_length)
        assert type(backend.full.pre_tokenizer).__name__ in tokenization.SPLITS_AT_SPACES
        full = [enc.ids for enc in backend.full.encode_batch(texts)]
        assert any(len(tokenization.cut_at_space(t, tokenization.CHARS_PER_TOKEN * max_length)) < len(t) for t in texts)
        assert tokenization.tokenize_ids(backend, texts, max_length) == full
        assert tokenization.tokenize_ids(backend, texts, max_length) == tokenizer(texts, truncation=True,
                                                                            max_length=max_length)["input_ids"]
    assert tokenization.cut_at_space("ab cd  ef gh", 8) == "ab cd" and tokenization.cut_at_space("abcdefgh", 3) == "abcdefgh"
    # a tokenizer that keeps the last tokens: whole texts, truncated on its side
    left = load_tokenizer(str(tiny_model))
    left.truncation_side = "left"
    expected = left(texts, truncation=True, max_length=max_length)["input_ids"]
    assert expected != load_tokenizer(str(tiny_model))(texts, truncation=True, max_length=max_length)["input_ids"]
    assert tokenization.tokenize_ids(tokenization.rust_tokenizer(left, max_length), texts, max_length) == expected


def test_pre_tokenizers_that_keep_spaces_inside_tokens_tokenise_whole_texts(tiny_model):
    """Metaspace(split=False) (Llama-style tokenizer.json files) and ByteLevel(use_regex=False) do not split at
    spaces, so a token may span the cut of a prefix: those tokenizers take the whole texts (a Unigram model found
    1 text in 600 of SciFact whose prefix gave other ids); the splitting ones keep the prefix path."""
    from tokenizers import pre_tokenizers

    from retrieval_lab.models.encoder import load_tokenizer
    from retrieval_lab import tokenization

    cases = [(load_tokenizer(str(tiny_model)), True), (_trained_tokenizer(pre_tokenizers.Metaspace()), True),
             (_trained_tokenizer(pre_tokenizers.Metaspace(split=False)), False),
             (_trained_tokenizer(pre_tokenizers.ByteLevel()), True),
             (_trained_tokenizer(pre_tokenizers.ByteLevel(use_regex=False)), False)]
    texts = ["protein cancer " * 40, "cell of the virus " * 30, "a"]
    for tokenizer, splits in cases:
        backend = tokenization.rust_tokenizer(tokenizer, 16)
        assert backend.splits_at_spaces == splits
        assert tokenization.tokenize_ids(backend, texts, 16) == tokenizer(texts, truncation=True,
                                                                          max_length=16)["input_ids"]


def test_ascii_texts_normalised_in_python_get_the_ids_of_berts_normaliser(tiny_model):
    """ASCII texts skip the Rust normaliser (translated character by character instead): every ASCII character,
    special tokens' text in any case, under each setting of BERT's lowercase and clean_text, give the ids of the
    full backend; other texts go through the full backend."""
    import json

    from tokenizers import Tokenizer

    from retrieval_lab.models.encoder import load_tokenizer
    from retrieval_lab.tokenization import RustTokenizer

    config = json.loads(load_tokenizer(str(tiny_model)).backend_tokenizer.to_str())
    every_char = "".join(map(chr, range(128)))
    texts = [every_char, every_char[::-1] * 3, "Protein\tCANCER\r\nvirus\x0bcell\x00s\x7fX",
             "ΟΔΟΣ Café naïve CAFÉ", "β-cells ± 5 µM 中文 e\u0301", "a [SEP] b", "[MASK]ed [CLS]", "a [sep] b",
             "[SE\x01P] x", "", "   "]
    for lowercase in (True, False):
        for clean_text in (True, False):
            config["normalizer"].update(lowercase=lowercase, clean_text=clean_text)
            backend = RustTokenizer(Tokenizer.from_str(json.dumps(config)), 64, "right")
            assert backend.bare is not None
            assert backend.ids(texts) == [enc.ids for enc in backend.full.encode_batch(texts)]
            # which texts skipped the Rust normaliser: the ASCII ones without a special token's text
            fast = [backend.normal_form(t) is not None for t in texts]
            assert fast == [True] * 3 + [False] * 4 + [True, lowercase or not clean_text, True, True]
    # another normaliser (or none): no fast path, the full backend's ids
    config["normalizer"] = None
    backend = RustTokenizer(Tokenizer.from_str(json.dumps(config)), 64, "right")
    assert backend.bare is None and backend.ids(texts) == [enc.ids for enc in backend.full.encode_batch(texts)]


def test_rust_backend_copies_are_made_once_and_go_with_their_tokenizer(tiny_model):
    import gc

    from retrieval_lab.models.encoder import load_tokenizer
    from retrieval_lab import tokenization

    tokenizer = load_tokenizer(str(tiny_model))
    backend = tokenization.rust_tokenizer(tokenizer, 16)
    assert tokenization.rust_tokenizer(tokenizer, 16) is backend and tokenization.rust_tokenizer(tokenizer, 32) is not backend
    assert backend.full is not tokenizer.backend_tokenizer and len(backend.full.encode("word " * 40).ids) == 16
    gc.collect()  # tokenizers other tests left behind go first, so that only this one's copies are counted
    count = len(tokenization.BACKENDS)
    del tokenizer
    gc.collect()
    assert len(tokenization.BACKENDS) == count - 1


TEXTS = ["A protein study of CANCER cells, in the liver.", "gene", "Café au lait [SEP] naïve [MASK] résumé",
         "ends with [CLS]", "word " * 300, "x" * 900 + " tail", "", "virus and vaccine " * 20]


def test_worker_processes_give_the_ids_of_this_process(tiny_model):
    """Texts tokenised by worker processes (non-ASCII, special tokens' text, long texts, an empty text) get the
    ids tokenised in this process; a worker learns each tokenizer once; embeddings are the same either way."""
    from retrieval_lab.models.encoder import Encoder, load_tokenizer
    from retrieval_lab.retrieval.encoding import encode_texts
    from retrieval_lab.tokenization import PROCESSES, TokenCache

    tokenizer = load_tokenizer(str(tiny_model))
    texts = TEXTS * 3
    for max_length in (16, 64):
        expected = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        chunks = list(TokenCache().stream(tokenizer, texts, max_length, chunk=8, processes=2))
        assert len(chunks) > 2 and len(PROCESSES.workers) >= 2
        assert {int(i): x for idx, ids in chunks for i, x in zip(idx, ids)} == dict(enumerate(expected))
    assert all(len(worker.known) >= 1 for worker in PROCESSES.workers)
    encoder = Encoder(str(tiny_model), doc_max_length=32)
    here = encode_texts(encoder, texts, "doc", progress=False, cache=None, tokenize_processes=0)
    workers = encode_texts(encoder, texts, "doc", progress=False, cache=None, tokenize_processes=2)
    assert np.array_equal(here, workers)


def test_a_worker_that_stops_leaves_its_texts_to_this_process(tiny_model, monkeypatch):
    """A worker killed while idle is replaced by the next encoding; one that dies during a request leaves those
    texts, and the rest, to this process, with a warning naming it; a worker that cannot tokenise answers with the
    error and goes on."""
    from retrieval_lab.models.encoder import load_tokenizer
    from retrieval_lab.tokenization import (PROCESSES, TokenCache, TokenizerProcess, WorkerError,
                                                      rust_tokenizer)

    tokenizer = load_tokenizer(str(tiny_model))
    expected = dict(enumerate(tokenizer(TEXTS, truncation=True, max_length=16)["input_ids"]))

    def ids(processes: int) -> dict:
        return {int(i): x for idx, ids in TokenCache().stream(tokenizer, TEXTS, 16, chunk=2, processes=processes)
                for i, x in zip(idx, ids)}

    PROCESSES.close()
    assert ids(1) == expected
    (idle,) = PROCESSES.workers
    idle.process.kill()
    idle.process.wait()
    assert ids(1) == expected  # no warning: the stopped worker is replaced before the encoding starts
    (worker,) = PROCESSES.workers
    assert worker is not idle and worker.alive()
    request = TokenizerProcess.ids

    def dies(self, backend, texts):
        self.process.kill()
        self.process.wait()
        return request(self, backend, texts)

    monkeypatch.setattr(TokenizerProcess, "ids", dies)
    with pytest.warns(UserWarning, match=f"worker process {worker.process.pid} stopped"):
        assert ids(1) == expected
    monkeypatch.undo()
    backend = rust_tokenizer(tokenizer, 16)
    broken = TokenizerProcess(1)
    try:
        with pytest.raises(WorkerError, match="Exception"):  # settings that are not a tokenizer
            broken.ids(type("Fake", (), {"key": "k", "settings": "{}", "max_length": 16, "direction": "right"}), ["a"])
        assert broken.alive()  # and still at work
        assert broken.ids(backend, TEXTS[:2]).lengths.tolist() == [len(expected[0]), len(expected[1])]
    finally:
        broken.close()
    assert not broken.alive()


@pytest.mark.parametrize("processes", [0, 2])
def test_a_caller_that_stops_early_does_not_wait_for_the_rest_of_the_corpus(tiny_model, monkeypatch, processes):
    """A caller that stops taking chunks after the first (a thread frozen at exit) has each tokenizer (a thread, or
    worker processes) tokenise at most two chunks ahead; one that stops early (an error, Ctrl-C) leaves the chunks
    not yet begun untokenised and caches nothing."""
    import time

    from retrieval_lab.models.encoder import load_tokenizer
    from retrieval_lab import tokenization

    tokenizer = load_tokenizer(str(tiny_model))
    done, request, tokenize_ids = [], tokenization.PROCESSES.ids, tokenization.tokenize_ids

    def slow(tokenise):  # each chunk takes 50 ms, as a chunk of long texts would
        return lambda *args: done.append(1) or time.sleep(0.05) or tokenise(*args)

    if processes:
        monkeypatch.setattr(tokenization.PROCESSES, "ids", slow(request))
    else:
        monkeypatch.setattr(tokenization, "tokenize_ids", slow(tokenize_ids))
    cache = tokenization.TokenCache()
    stream = cache.stream(tokenizer, [f"text number {i}" for i in range(2000)], 16, chunk=8, processes=processes)
    next(stream)
    time.sleep(0.5)  # time for 10 chunks per tokenizer, were they not held back
    ahead = len(done)
    assert 1 <= ahead <= 1 + 2 * max(1, processes)  # of 251 chunks
    stream.close()
    time.sleep(0.2)
    assert len(done) == ahead and not cache.entries
    assert len(list(cache.stream(tokenizer, ["a", "b"], 16, processes=processes))) == 1  # and it works on


def tokenise_in_a_forked_child(tokenizer, results) -> None:
    from retrieval_lab.tokenization import PROCESSES, TokenCache

    inherited = list(PROCESSES.workers)
    ids = {int(i): x for idx, chunk in TokenCache().stream(tokenizer, TEXTS, 16, chunk=2, processes=1)
           for i, x in zip(idx, chunk)}
    results.put((len(inherited), [w.process.pid for w in PROCESSES.workers], ids))


@pytest.mark.skipif(not hasattr(os, "register_at_fork"), reason="no fork on this platform")
def test_a_forked_child_starts_its_own_workers_and_leaves_the_parents_alone(tiny_model):
    """A child forked while the parent has workers (a DataLoader worker, a forked DDP rank) does not talk to them,
    which would mix its requests with the parent's: it starts its own, gets the right ids, and the parent's
    workers go on answering the parent."""
    import multiprocessing

    from retrieval_lab.models.encoder import load_tokenizer
    from retrieval_lab.tokenization import PROCESSES, TokenCache

    tokenizer = load_tokenizer(str(tiny_model))
    expected = dict(enumerate(tokenizer(TEXTS, truncation=True, max_length=16)["input_ids"]))

    def ids() -> dict:
        return {int(i): x for idx, chunk in TokenCache().stream(tokenizer, TEXTS, 16, chunk=2, processes=1)
                for i, x in zip(idx, chunk)}

    assert ids() == expected
    parents = [w.process.pid for w in PROCESSES.workers]
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=tokenise_in_a_forked_child, args=(tokenizer, results))
    child.start()
    inherited, pids, child_ids = results.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and inherited == 0
    assert child_ids == expected and pids and not set(pids) & set(parents)
    assert ids() == expected and [w.process.pid for w in PROCESSES.workers] == parents


def test_worker_plan_leaves_a_core_to_the_gpu_process(monkeypatch):
    """auto: no workers on a CPU; on a GPU one per 3 cores (at most 4), the other cores shared among them, one core
    left over; the cores are split among the processes of a distributed run on this machine."""
    from retrieval_lab.errors import ConfigError
    from retrieval_lab import tokenization

    monkeypatch.setattr(tokenization.os, "sched_getaffinity", lambda pid: set(range(16)))
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert tokenization.worker_plan("auto", cuda=False)[0] == 0
    assert tokenization.worker_plan("auto", cuda=True) == (4, 3)  # 4 x 3 threads of 16 cores
    assert tokenization.worker_plan(2, cuda=True) == (2, 7)
    assert tokenization.worker_plan(0, cuda=True)[0] == 0
    monkeypatch.setenv("WORLD_SIZE", "2")  # Lightning's DDP on 2 GPUs: 8 cores each
    assert tokenization.worker_plan("auto", cuda=True) == (2, 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun on 4 GPUs: 4 cores each
    assert tokenization.worker_plan("auto", cuda=True) == (1, 3)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(tokenization.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert tokenization.worker_plan("auto", cuda=True) == (1, 1)
    for bad in (-1, "two", 1.5, True):
        with pytest.raises(ConfigError, match="retriever.tokenize_processes"):
            tokenization.worker_plan(bad, cuda=True)
    from retrieval_lab.retrieval.dense import DenseRetriever

    with pytest.raises(ConfigError, match="retriever.tokenize_processes"):  # when the retriever is made
        DenseRetriever(object(), device="cpu", tokenize_processes="many")
