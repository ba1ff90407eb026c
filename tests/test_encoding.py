"""Encoding: input order despite length sorting, the token cache and token budgets, bf16 copies, torch.compile."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval_lab.errors import ConfigError
from retrieval_lab.models.encoder import Encoder
from retrieval_lab.retrieval.encoding import encode_texts


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return Encoder(str(tiny_model))


def test_encoding_keeps_input_order_despite_length_sorting(encoder):
    texts = ["short", "a much longer text about proteins and cancer", "mid length text"]
    batched = encode_texts(encoder, texts, "doc", batch_size=2, progress=False)
    with torch.no_grad():
        encoder.eval()  # encode_texts switches dropout off by itself
        one_by_one = np.stack([encoder.encode_docs(encoder.tokenize([t], "doc"))[0].numpy() for t in texts])
    encoder.train()
    assert np.allclose(batched, one_by_one, atol=1e-5)
    # embeddings copied back after every batch instead of at the end: the same result
    assert np.array_equal(encode_texts(encoder, texts, "doc", batch_size=2, progress=False, flush_rows=1), batched)


def test_token_cache_and_token_budget_batches(tiny_model):
    """Texts are tokenised once and reused; token-budget batches give the embeddings of one-by-one encoding."""
    from retrieval_lab.retrieval.encoding import token_batches
    from retrieval_lab.tokenization import TokenCache

    encoder = Encoder(tiny_model, doc_max_length=32)
    texts = ["a protein study of cancer cells in the liver"] * 3 + ["gene", "virus and vaccine", "x " * 40]
    cache = TokenCache()
    cached = encode_texts(encoder, texts, "doc", batch_size=2, progress=False, token_budget=40, cache=cache)
    again = encode_texts(encoder, texts, "doc", batch_size=2, progress=False, cache=cache)
    assert cache.misses == 1
    lengths = [len(x) for x in encoder.tokenizer(texts, truncation=True, max_length=32)["input_ids"]]
    assert cache.nbytes() == 4 * sum(lengths) + 8 * (len(texts) + 1)  # int32 ids and int64 offsets
    one_by_one = np.stack([encode_texts(encoder, [t], "doc", progress=False, cache=None)[0] for t in texts])
    assert (np.sum(cached * one_by_one, axis=1) > 0.9999).all() and np.allclose(cached, again, atol=1e-5)
    # the Rust backend, chunk by chunk, gives the tokenizer's own ids, longest texts first, every text once
    expected = encoder.tokenizer(texts, truncation=True, max_length=32)["input_ids"]
    chunks = list(TokenCache().stream(encoder.tokenizer, texts, 32, chunk=4))
    assert [len(idx) for idx, _ in chunks] == [1, 2, 3] and chunks[0][0][0] == 5  # chunks grow to at most 4
    assert [len(idx) for idx, _ in TokenCache().stream(encoder.tokenizer, texts * 5, 32, chunk=8)] == [1, 2, 4, 8, 8, 7]
    assert {int(i): x for idx, ids in chunks for i, x in zip(idx, ids)} == dict(enumerate(expected))
    lengths = [30, 2, 12, 7, 30, 1]
    batches = token_batches(lengths, batch_size=8, token_budget=40)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) * max(lengths[i] for i in b) <= 40 for b in batches if len(b) > 1)
    assert [len(b) for b in token_batches(lengths, batch_size=4, token_budget=None)] == [4, 2]


def test_encoding_with_bf16_weights_leaves_the_encoder_alone(tiny_model):
    """``dtype``: a bf16 copy of the weights encodes; the encoder keeps its float32 weights."""
    encoder = Encoder(tiny_model)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    texts = ["a protein study of cancer cells", "gene", "virus and vaccine " * 10]
    exact = encode_texts(encoder, texts, "doc", progress=False, cache=None)
    half = encode_texts(encoder, texts, "doc", progress=False, cache=None, dtype="bfloat16")
    assert half.dtype == np.float32 and not np.array_equal(half, exact)  # bf16 arithmetic did run
    assert (np.sum(half * exact, axis=1) > 0.99).all()
    assert encoder.training and all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert next(encoder.parameters()).dtype == torch.float32
    with pytest.raises(ConfigError, match="retriever.dtype"):
        encode_texts(encoder, texts, "doc", progress=False, dtype="fp8")


def test_compiled_encoding_equals_the_plain_one_and_leaves_the_encoder_alone(tiny_model):
    """``compile``: the towers run through torch.compile (the ``eager`` backend here: dynamo's graph capture without
    code generation, so the test stays fast); one compilation serves batches of every shape."""
    from retrieval_lab.retrieval import encoding

    encoder = Encoder(tiny_model, doc_max_length=32)
    texts = ["protein cancer study " * (i % 7 + 1) for i in range(20)]
    plain = encode_texts(encoder, texts, "doc", batch_size=4, progress=False, cache=None)
    compiled = encode_texts(encoder, texts, "doc", batch_size=4, progress=False, cache=None, compile="eager")
    assert np.allclose(compiled, plain, atol=1e-6) and encoder in encoding.COMPILED  # compiled by encode_texts
    view = encoding.compiled(encoder, "eager")
    assert view is encoding.compiled(encoder, "eager") and view.query_model is not encoder.query_model
    assert type(encoder.query_model).__name__ == "BertModel" and encoder.training
    assert view.query_model._orig_mod is encoder.query_model  # the same weights


def test_an_encoding_that_fails_stops_tokenising_in_the_background(encoder, monkeypatch):
    """When the model fails on the first batch (out of memory, Ctrl-C), the chunks not yet begun are never
    tokenised: the background thread does not go on through the corpus after the error."""
    import time

    from retrieval_lab import tokenization

    done, tokenize_ids = [], tokenization.tokenize_ids

    def slow(*args):  # each chunk takes 50 ms, as a chunk of long texts would
        done.append(1)
        time.sleep(0.05)
        return tokenize_ids(*args)

    def fails(inputs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(tokenization, "tokenize_ids", slow)
    monkeypatch.setattr(encoder, "encode_docs", fails)
    with pytest.raises(RuntimeError, match="out of memory") as failure:
        encode_texts(encoder, [f"text number {i}" for i in range(2000)], "doc", progress=False, cache=None,
                     tokenize_processes=0)
    time.sleep(0.5)  # time for the rest, were the thread still at work
    assert 1 <= len(done) <= 2 and failure.value  # of 5 chunks: 128, 256, 512, 1,024 and 80 texts
