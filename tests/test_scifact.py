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
