"""Metrics equal trec_eval's definitions, computed here independently on a small fixture."""
from __future__ import annotations

import math

import pytest

from retrieval_lab.retrieval.metrics import evaluate_run, per_query
from retrieval_lab.retrieval.runfile import read_trec_run, write_trec_run

QRELS = {
    "q1": {"d1": 1, "d4": 2, "d9": 1},        # graded relevance
    "q2": {"d2": 1, "d7": 0},                 # a judged non-relevant document (score 0)
    "q3": {"d3": 1},                          # nothing relevant retrieved
    "q4": {"d5": 1},                          # absent from the run: scores 0
}
RUN = {
    "q1": {"d4": 9.0, "d2": 8.0, "d1": 7.0, "d8": 6.0, "d6": 5.0, "d3": 4.5, "d5": 4.0, "d7": 3.0, "d10": 2.0,
           "d11": 1.5, "d9": 1.0},       # d9 (relevant) at rank 11: outside the top 10
    "q2": {"d7": 3.0, "d3": 2.0, "d2": 1.0},
    "q3": {"d1": 2.0, "d2": 1.0},
}


def ranking(qid):
    return [d for d, _ in sorted(RUN.get(qid, {}).items(), key=lambda x: -x[1])]


def relevant(qid):
    return {d: r for d, r in QRELS[qid].items() if r > 0}


def ndcg(qid, k):  # trec_eval ndcg_cut: gain = relevance grade, discount log2(rank + 1)
    rels = relevant(qid)
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking(qid)[:k]))
    ideal = sorted(rels.values(), reverse=True)[:k]
    return dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))


def recall(qid, k):
    return len(set(ranking(qid)[:k]) & set(relevant(qid))) / len(relevant(qid))


def rr(qid, k):
    for i, d in enumerate(ranking(qid)[:k]):
        if d in relevant(qid):
            return 1 / (i + 1)
    return 0.0


def precision(qid, k):
    return len(set(ranking(qid)[:k]) & set(relevant(qid))) / k


def ap(qid, k):
    hits, total = 0, 0.0
    for i, d in enumerate(ranking(qid)[:k]):
        if d in relevant(qid):
            hits += 1
            total += hits / (i + 1)
    return total / len(relevant(qid))


def mean(fn, k):
    return sum(fn(q, k) for q in QRELS) / len(QRELS)


def test_hand_computed_values_for_q1():
    # q1: d4 (grade 2) at rank 1, d1 (grade 1) at rank 3, d9 (grade 1) at rank 11.
    dcg10 = 2 / math.log2(2) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg("q1", 10) == pytest.approx(dcg10 / idcg)
    assert recall("q1", 10) == pytest.approx(2 / 3) and recall("q1", 100) == 1.0
    assert ap("q1", 100) == pytest.approx((1 / 1 + 2 / 3 + 3 / 11) / 3)


@pytest.mark.parametrize("name,fn,k", [("ndcg@10", ndcg, 10), ("ndcg@3", ndcg, 3), ("recall@100", recall, 100),
                                       ("recall@10", recall, 10), ("mrr@10", rr, 10), ("precision@10", precision, 10),
                                       ("map@100", ap, 100)])
def test_metric_matches_trec_eval_definition(name, fn, k):
    assert evaluate_run(QRELS, RUN, [name])[name] == pytest.approx(mean(fn, k), abs=1e-9)


def test_run_file_round_trip_is_trec_format(tmp_path):
    path = tmp_path / "run.trec"
    write_trec_run(RUN, path, tag="x")
    first = path.read_text().splitlines()[0].split()
    assert first == ["q1", "Q0", "d4", "1", "9.0", "x"]
    assert read_trec_run(path) == RUN


# Tied scores. trec_eval orders each query by score descending, then doc id descending (strcmp(p2, p1) in
# comp_sim_docno, form_res_rels.c), whatever the file order; the rankings below are written out by hand.
TIED_QRELS = {"t1": {"a": 1}, "t2": {"b": 2, "c": 1}, "t3": {"d05": 1}}
TIED_RUN = {
    "t1": {"a": 1.0, "b": 1.0, "c": 1.0},             # trec_eval: c, b, a
    "t2": {"a": 2.0, "b": 1.0, "c": 1.0, "d": 1.0},   # trec_eval: a, d, c, b
    "t3": {f"d{i:02d}": 0.5 for i in range(40)},      # trec_eval: d39, d38, ..., d05 at rank 35, ..., d00
}
L2 = math.log2
TIED_EXPECTED = {  # per query t1, t2, t3
    "mrr@10": [1 / 3, 1 / 3, 0.0],
    "ndcg@3": [1 / L2(4), (1 / L2(4)) / (2 + 1 / L2(3)), 0.0],
    "ndcg@10": [1 / L2(4), (1 / L2(4) + 2 / L2(5)) / (2 + 1 / L2(3)), 0.0],
    "map@100": [1 / 3, (1 / 3 + 2 / 4) / 2, 1 / 35],
    "precision@2": [0.0, 0.0, 0.0],
    "recall@3": [1.0, 0.5, 0.0],
}


@pytest.mark.parametrize("order", ["as written", "reversed", "shuffled"])
def test_tied_scores_follow_trec_eval_whatever_the_insertion_order(order):
    import random

    def reorder(docs):
        items = list(docs.items())
        if order == "reversed":
            items.reverse()
        elif order == "shuffled":
            random.Random(7).shuffle(items)
        return dict(items)

    run = {q: reorder(docs) for q, docs in TIED_RUN.items()}
    means = evaluate_run(TIED_QRELS, run, list(TIED_EXPECTED))
    assert means == pytest.approx({m: sum(v) / 3 for m, v in TIED_EXPECTED.items()}, abs=1e-9)
    queries = per_query(TIED_QRELS, run, list(TIED_EXPECTED))
    for metric, values in TIED_EXPECTED.items():
        assert queries[metric] == pytest.approx(dict(zip(["t1", "t2", "t3"], values)), abs=1e-9), metric


def test_run_file_ranks_tied_scores_in_trec_eval_order(tmp_path):
    path = tmp_path / "run.trec"
    write_trec_run(TIED_RUN, path)
    ranks = {}
    for line in path.read_text().splitlines():
        qid, _, doc, rank, _, _ = line.split()
        ranks.setdefault(qid, []).append((int(rank), doc))
    assert [d for _, d in sorted(ranks["t1"])] == ["c", "b", "a"]
    assert [d for _, d in sorted(ranks["t2"])] == ["a", "d", "c", "b"]
    assert [d for _, d in sorted(ranks["t3"])] == [f"d{i:02d}" for i in range(39, -1, -1)]
    assert evaluate_run(TIED_QRELS, read_trec_run(path), list(TIED_EXPECTED)) == pytest.approx(
        {m: sum(v) / 3 for m, v in TIED_EXPECTED.items()}, abs=1e-9)


def test_an_unknown_metric_is_refused_before_retrieval_and_a_run_file_survives_scoring(tmp_path):
    """A metric name ranx does not know stops training and evaluation at start-up, naming the key; and should
    scoring fail anyway, the run file of the retrieval is already written."""
    from retrieval_lab.data.beir import BeirSplit, Document
    from retrieval_lab.errors import ConfigError
    from retrieval_lab.retrieval.evaluation import evaluate_retriever
    from retrieval_lab.retrieval.metrics import check_metrics

    check_metrics(["ndcg@10", "recall@100", "mrr@10", "map@100", "precision@10"])
    with pytest.raises(ConfigError, match="eval.metrics: 'recal@100' is not a metric"):
        check_metrics(["ndcg@10", "recal@100"])

    class Fixed:
        def retrieve(self, corpus, queries, k):
            return {"q": {"d1": 2.0, "d2": 1.0}}

    split = BeirSplit({"d1": Document("", "a"), "d2": Document("", "b")}, {"q": "a"}, {"q": {"d1": 1}})
    with pytest.raises(Exception):
        evaluate_retriever(Fixed(), split, tmp_path / "run.trec", metrics=["recal@100"])
    assert (tmp_path / "run.trec").read_text().splitlines()[0] == "q Q0 d1 1 2.0 retrieval_lab"


@pytest.mark.parametrize("ignore", [True, False])
def test_a_querys_own_document_is_left_out_as_beir_evaluates(ignore, tmp_path):
    """ArguAna and Quora hold each query in the corpus under its own id; BEIR's evaluation drops that document from
    the query's results (ignore_identical_ids) and still returns k documents. Here q1's own document ranks first
    above its relevant d2 (rank 2, reciprocal rank 1/2); left out, d2 ranks first."""
    from retrieval_lab.data.beir import BeirSplit
    from retrieval_lab.retrieval.evaluation import evaluate_retriever

    class Fixed:
        def retrieve(self, corpus, queries, k):
            ranking = {"q1": 0.9, "d2": 0.8, "d3": 0.7, "d4": 0.6}
            return {"q1": dict(list(ranking.items())[:k])}

    split = BeirSplit({d: None for d in ("q1", "d2", "d3", "d4")}, {"q1": "text"}, {"q1": {"d2": 1}})
    scores = evaluate_retriever(Fixed(), split, tmp_path / "run.trec", k=2, metrics=["mrr@10"],
                                ignore_identical_ids=ignore)
    assert scores["mrr@10"] == (1.0 if ignore else 0.5)
    assert list(read_trec_run(tmp_path / "run.trec")["q1"]) == (["d2", "d3"] if ignore else ["q1", "d2"])
