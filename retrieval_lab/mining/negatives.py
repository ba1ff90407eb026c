"""Turn a ranking into hard negatives: drop judged positives, then guard against false negatives.

Two guards (Qu et al., 2021, RocketQA, and common practice since): ``skip_top`` drops the first n non-positive
candidates, which are the likeliest to be unjudged relevant documents; ``score_ratio`` drops candidates that
score at least ``score_ratio`` times the best-scoring positive (for scores that are positive, e.g. BM25 or
cosine; a query whose positives were not retrieved gets no ratio filter). A document with the query's own id
(ArguAna and Quora hold each query in the corpus too) is never its negative.
"""
from __future__ import annotations

from retrieval_lab.data.beir import Qrels
from retrieval_lab.data.negatives import QueryNegatives
from retrieval_lab.retrieval.metrics import ranked


def mine_negatives(run: dict[str, dict[str, float]], qrels: Qrels, n_neg: int = 30, skip_top: int = 0,
                   score_ratio: float | None = None) -> dict[str, QueryNegatives]:
    mined = {}
    for qid in sorted(qrels):
        positives = sorted(d for d, s in qrels[qid].items() if s > 0)
        if not positives:
            continue
        order = ranked(run.get(qid, {}))  # ties as trec_eval breaks them
        pos_scores = [s for d, s in order if d in positives]
        candidates = [(d, s) for d, s in order if d not in positives and d != qid][skip_top:]  # not the query itself
        if score_ratio is not None and pos_scores:
            candidates = [(d, s) for d, s in candidates if s < score_ratio * max(pos_scores)]
        negatives = candidates[:n_neg]
        scores = {d: s for d, s in order if d in positives}
        scores.update(negatives)
        mined[qid] = QueryNegatives(positives, [d for d, _ in negatives], scores)
    return mined


def score_negatives(records: dict[str, QueryNegatives], queries: dict[str, str], corpus: dict, teacher,
                    batch_size: int = 64, device=None) -> dict[str, QueryNegatives]:
    """The same records with ``scores`` replaced by the teacher's (a cross-encoder) for every listed document."""
    pairs = [(qid, doc_id) for qid, r in records.items() for doc_id in dict.fromkeys(r.pos + r.neg)]
    scores = teacher.score_texts([queries[q] for q, _ in pairs], [corpus[d].full_text for _, d in pairs], batch_size, device)
    out = {qid: QueryNegatives(r.pos, r.neg, {}) for qid, r in records.items()}
    for (qid, doc_id), score in zip(pairs, scores):
        out[qid].scores[doc_id] = score
    return out


def denoise(mined: dict[str, QueryNegatives], queries: dict[str, str], corpus: dict, cross_encoder,
            margin: float = 0.0, batch_size: int = 64, device=None) -> tuple[dict[str, QueryNegatives], int]:
    """RocketQA's denoised hard negatives (Qu et al., 2021): a cross-encoder scores each query's positives and
    candidates, and a candidate scoring at least (best positive's score - ``margin``) is taken for an unjudged
    positive and dropped. Returns the filtered negatives and how many were dropped."""
    scored = score_negatives(mined, queries, corpus, cross_encoder, batch_size, device)
    out, dropped = {}, 0
    for qid, r in mined.items():
        ce = scored[qid].scores
        bar = max(ce[p] for p in r.pos) - margin if r.pos else float("inf")
        keep = [d for d in r.neg if ce[d] < bar]
        dropped += len(r.neg) - len(keep)
        out[qid] = QueryNegatives(r.pos, keep, {d: s for d, s in r.scores.items() if d in r.pos or d in keep})
    return out, dropped
