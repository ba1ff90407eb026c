"""Reference figures on the shared SciFact files (DESIGN.md), for what runs in seconds on a CPU."""
from __future__ import annotations

import pytest

from conftest import SCIFACT
from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.retrieval.bm25 import BM25Retriever
from retrieval_lab.retrieval.metrics import evaluate_run

pytestmark = pytest.mark.skipif(not SCIFACT.is_dir(), reason=f"{SCIFACT} not present")


def test_scifact_loads_with_the_documented_sizes():
    data = BeirDataset(SCIFACT)
    assert (len(data.corpus), len(data.queries)) == (5183, 1109)
    assert len(data.qrels("train")) == 809 and len(data.qrels("test")) == 300


def test_bm25_matches_the_reference_figure():
    test = BeirDataset(SCIFACT).split("test")
    scores = evaluate_run(test.qrels, BM25Retriever().retrieve(test.corpus, test.queries, 100), ["ndcg@10", "recall@100"])
    assert scores["ndcg@10"] == pytest.approx(0.686, abs=0.01)
    assert scores["recall@100"] == pytest.approx(0.913, abs=0.01)


def test_prefix_tokenisation_equals_the_tokenizer_on_the_corpus():
    """Most SciFact documents pass 256 tokens, so most are tokenised from a prefix: the ids must not change."""
    from retrieval_lab.models.encoder import load_tokenizer
    from retrieval_lab.tokenization import CHARS_PER_TOKEN, cut_at_space, rust_tokenizer, tokenize_ids

    tokenizer = load_tokenizer("packaged:minilm")
    texts = [doc.full_text for doc in BeirDataset(SCIFACT).corpus.values()]
    assert sum(len(cut_at_space(t, CHARS_PER_TOKEN * 256)) < len(t) for t in texts) > 1000
    expected = tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    assert tokenize_ids(rust_tokenizer(tokenizer, 256), texts, 256) == expected
