"""Hybrid sparse + dense fusion against hand-computed scores; alpha chosen on dev; the evaluate entry point."""
from __future__ import annotations

import json
import os

import pytest

from conftest import run_module
from retrieval_lab.data.beir import BeirSplit, Document
from retrieval_lab.errors import ConfigError
from retrieval_lab.retrieval.fusion import HybridRetriever, linear_fusion, reciprocal_rank_fusion

DENSE = {"q": {"a": 0.9, "b": 0.7, "c": 0.5}}
SPARSE = {"q": {"b": 20.0, "d": 15.0, "a": 10.0}}


def test_linear_fusion_fills_a_missing_document_with_the_lists_lowest_score():
    fused = linear_fusion(DENSE, SPARSE, alpha=0.1)
    # a: 0.9 + 0.1*10;  b: 0.7 + 0.1*20;  c: 0.5 + 0.1*min(sparse)=10;  d: min(dense)=0.5 + 0.1*15
    assert fused["q"] == pytest.approx({"a": 1.9, "b": 2.7, "c": 1.5, "d": 2.0})
    assert linear_fusion(DENSE, SPARSE, alpha=0.0)["q"] == pytest.approx({"a": 0.9, "b": 0.7, "c": 0.5, "d": 0.5})


def test_reciprocal_rank_fusion_by_hand():
    fused = reciprocal_rank_fusion([DENSE, SPARSE], rrf_k=60)
    assert fused["q"] == pytest.approx({"a": 1 / 61 + 1 / 63, "b": 1 / 62 + 1 / 61, "c": 1 / 63, "d": 1 / 62})


class Fixed:
    def __init__(self, run):
        self.run = run

    def retrieve(self, corpus, queries, k):
        return {q: self.run[q] for q in queries}


def test_alpha_is_chosen_on_dev_and_applied_to_the_evaluated_queries():
    # dev query "v": relevant "s" is top of the sparse list only, so a large alpha wins on dev
    dense = {"v": {"x": 0.9, "s": 0.1}, "t": {"a": 0.9, "b": 0.8}}
    sparse = {"v": {"s": 30.0, "x": 1.0}, "t": {"b": 30.0, "a": 1.0}}
    dev = BeirSplit({}, {"v": "dev query"}, {"v": {"s": 1}})
    hybrid = HybridRetriever(Fixed(dense), Fixed(sparse), alpha=None, alphas=[0.0, 0.001, 1.0], dev=dev)
    run = hybrid.retrieve({}, {"t": "test query"}, k=10)
    assert hybrid.alpha == 1.0 and hybrid.tuning[0.0] < hybrid.tuning[1.0]
    assert set(run) == {"t"} and run["t"] == pytest.approx({"b": 30.8, "a": 1.9})


def test_hybrid_refusals():
    with pytest.raises(ConfigError, match="retriever.method"):
        HybridRetriever(Fixed({}), Fixed({}), method="max")
    with pytest.raises(ConfigError, match="needs a dev split"):
        HybridRetriever(Fixed({}), Fixed({}), alpha=None).retrieve({}, {"q": "x"})
    dev = BeirSplit({}, {"q": "x"}, {"q": {"a": 1}})
    with pytest.raises(ConfigError, match="shares 1 queries"):
        HybridRetriever(Fixed({}), Fixed({}), alpha=None, dev=dev).retrieve({}, {"q": "x"})


def test_hybrid_through_evaluate(tiny_model, beir_folder, tmp_path):
    result = run_module("retrieval_lab.evaluate", "retriever=hybrid", "data=beir", f"data.path={beir_folder}",
                        f"model.name_or_path={tiny_model}", "retriever.depth=20", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["alpha"] in [0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5]
    assert max(metrics["dev_ndcg@10"].values()) == pytest.approx(metrics["dev_ndcg@10"][str(metrics["alpha"])])
    assert 0 <= metrics["metrics"]["ndcg@10"] <= 1


def test_bm25_keeps_jax_off_the_gpu_unless_told(monkeypatch):
    """bm25s runs JAX at import when JAX is installed; on a GPU machine JAX would take 75% of the GPU from PyTorch."""
    from retrieval_lab.retrieval.bm25 import BM25Retriever

    corpus = {"d1": Document("", "protein folding"), "d2": Document("", "vitamin deficiency")}
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert list(BM25Retriever().retrieve(corpus, {"q": "protein"}, k=1)["q"]) == ["d1"]
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    BM25Retriever().retrieve(corpus, {"q": "protein"}, k=1)
    assert os.environ["JAX_PLATFORMS"] == "cuda"


def test_tied_scores_rank_and_cut_in_trec_eval_order():
    """trec_eval breaks score ties by doc id descending; RRF's ranks and the top-k cut do the same."""
    from retrieval_lab.retrieval.fusion import top_k

    tied = {"q": {"a": 1.0, "b": 1.0, "c": 0.5}}  # ranks: b 1, a 2, c 3
    assert reciprocal_rank_fusion([tied], rrf_k=60)["q"] == pytest.approx({"b": 1 / 61, "a": 1 / 62, "c": 1 / 63})
    assert top_k({"q": {"a": 1.0, "c": 0.5, "b": 1.0}}, 1) == {"q": {"b": 1.0}}
    assert list(top_k({"q": {"x": 0.2, "a": 0.7, "y": 0.2, "b": 0.2}}, 3)["q"]) == ["a", "y", "x"]


def test_fused_scores_that_differ_beyond_float32_tie_as_trec_eval_reads_them(tmp_path):
    """a's fused score is 1e-8 above b's as a double, but trec_eval reads run-file scores as 32-bit floats, where
    they are equal and the tie goes to the larger doc id (b). The hybrid run ranks them so in memory too, and its run
    file, read back as float32, gives that same order."""
    import numpy as np

    from retrieval_lab.retrieval.metrics import ranked
    from retrieval_lab.retrieval.runfile import read_trec_run, write_trec_run

    assert 0.5 + 0.1 * (10.0 + 1e-7) > 0.5 + 0.1 * 10.0 and np.float32(0.5 + 0.1 * (10.0 + 1e-7)) == np.float32(1.5)
    hybrid = HybridRetriever(Fixed({"q": {"a": 0.5, "b": 0.5}}), Fixed({"q": {"a": 10.0 + 1e-7, "b": 10.0}}),
                             alpha=0.1)
    run = hybrid.retrieve({}, {"q": "text"}, k=2)
    assert [d for d, _ in ranked(run["q"])] == ["b", "a"]
    write_trec_run(run, tmp_path / "run.trec")
    as_trec_eval = {d: np.float32(s) for d, s in read_trec_run(tmp_path / "run.trec")["q"].items()}
    assert [d for d, _ in ranked(as_trec_eval)] == ["b", "a"]
