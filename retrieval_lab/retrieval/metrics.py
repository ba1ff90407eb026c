"""IR metrics through ranx, with trec_eval's definitions (graded gain = relevance, relevant = score >= 1)."""
from __future__ import annotations

from retrieval_lab.data.beir import Qrels

Run = dict[str, dict[str, float]]

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@100", "precision@10")


def ranked(docs: dict[str, float]) -> list[tuple[str, float]]:
    """(doc id, score) pairs in trec_eval's order: score descending, ties by doc id descending.

    trec_eval re-sorts every query this way (``comp_sim_docno`` in form_res_rels.c), ignoring the rank column;
    metrics, run-file ranks and top-k cuts all use this order so they agree with it.
    """
    return sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)


def top_k(run: Run, k: int) -> Run:
    """Each query's first ``k`` documents in trec_eval's order (ties by doc id descending)."""
    return {q: dict(ranked(docs)[:k]) for q, docs in run.items()}


def _ranx_inputs(qrels: Qrels, run: Run):
    from ranx import Qrels as RanxQrels
    from ranx import Run as RanxRun

    judged = {q: {d: int(s) for d, s in docs.items() if s > 0} for q, docs in qrels.items()}
    judged = {q: docs for q, docs in judged.items() if docs}
    # ranx needs every judged query in the run; an empty ranking is a dummy document with no judgement.
    # ranx breaks score ties arbitrarily (an unstable sort), so it gets strictly decreasing scores, one per rank
    # in trec_eval's order; every metric here depends on the order only.
    filled = {}
    for q in judged:
        order = ranked(run.get(q) or {"__no_result__": 0.0})
        filled[q] = {doc: float(len(order) - i) for i, (doc, _) in enumerate(order)}
    return RanxQrels(judged), RanxRun(filled)


def per_query(qrels: Qrels, run: Run, metrics=DEFAULT_METRICS) -> dict[str, dict[str, float]]:
    """metric -> {query id: score} over the judged queries (the inputs of paired significance tests)."""
    from ranx import evaluate

    ranx_qrels, ranx_run = _ranx_inputs(qrels, run)
    scores = evaluate(ranx_qrels, ranx_run, list(metrics), return_mean=False, make_comparable=True)
    if not isinstance(scores, dict):
        scores = {metrics[0]: scores}
    qids = list(ranx_qrels.keys())
    return {m: {q: float(v) for q, v in zip(qids, scores[m])} for m in metrics}


def check_metrics(metrics, key: str = "eval.metrics") -> None:
    """Refuse, before any retrieval runs, a metric name the metrics library does not know (ConfigError)."""
    from retrieval_lab.errors import ConfigError

    for metric in metrics:
        try:
            evaluate_run({"q": {"d": 1}}, {"q": {"d": 1.0}}, [metric])
        except Exception as err:  # noqa: BLE001 - ranx raises ValueError or KeyError, depending on the name
            raise ConfigError(f"{key}: '{metric}' is not a metric ranx knows (e.g. ndcg@10, recall@100, mrr@10, "
                              f"map@100, precision@10): {str(err).splitlines()[0][:120]}") from None


def evaluate_run(qrels: Qrels, run: Run, metrics=DEFAULT_METRICS) -> dict[str, float]:
    """Mean of each metric over the queries of ``qrels``; a query with no retrieved document scores 0.

    Judgements with score <= 0 are not relevant (as in trec_eval) and are dropped before scoring.
    """
    from ranx import evaluate

    scores = evaluate(*_ranx_inputs(qrels, run), list(metrics), make_comparable=True)
    if isinstance(scores, float):
        scores = {metrics[0]: scores}
    return {name: float(value) for name, value in scores.items()}
