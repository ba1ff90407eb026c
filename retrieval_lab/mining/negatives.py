"""Turn a ranking into hard negatives: drop judged positives, then guard against false negatives.

Two guards (Qu et al., 2021, RocketQA, and common practice since): ``skip_top`` drops the first n non-positive
candidates, which are the likeliest to be unjudged relevant documents; ``score_ratio`` drops candidates that
score at least ``score_ratio`` times the best-scoring positive (for scores that are positive, e.g. BM25 or
cosine; a query whose positives were not retrieved gets no ratio filter).
"""
from __future__ import annotations

from retrieval_lab.data.beir import Qrels
from retrieval_lab.data.negatives import QueryNegatives


def mine_negatives(run: dict[str, dict[str, float]], qrels: Qrels, n_neg: int = 30, skip_top: int = 0,
                   score_ratio: float | None = None) -> dict[str, QueryNegatives]:
    mined = {}
    for qid in sorted(qrels):
        positives = sorted(d for d, s in qrels[qid].items() if s > 0)
        if not positives:
            continue
        ranked = sorted(run.get(qid, {}).items(), key=lambda item: (-item[1], item[0]))
        pos_scores = [s for d, s in ranked if d in positives]
        candidates = [(d, s) for d, s in ranked if d not in positives][skip_top:]
        if score_ratio is not None and pos_scores:
            candidates = [(d, s) for d, s in candidates if s < score_ratio * max(pos_scores)]
        negatives = candidates[:n_neg]
        scores = {d: s for d, s in ranked if d in positives}
        scores.update(negatives)
        mined[qid] = QueryNegatives(positives, [d for d, _ in negatives], scores)
    return mined
