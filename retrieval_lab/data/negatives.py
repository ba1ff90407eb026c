"""Mined-negatives / teacher-score files: JSONL, one query a line.

    {"qid": "12", "pos": ["4983"], "neg": ["771", "90"], "scores": {"4983": 31.2, "771": 25.0, "90": 24.1}}

``scores`` is optional (teacher or retriever scores of any listed document). Reading validates every line
against the data set: unknown query or document ids, a negative that is a judged positive, or malformed JSON
stop with one sentence naming the file and line.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from retrieval_lab.data.beir import BeirDataset, Qrels, read_jsonl
from retrieval_lab.errors import DataError


@dataclass
class QueryNegatives:
    pos: list[str]
    neg: list[str]
    scores: dict[str, float] = field(default_factory=dict)


def _str_list(value, path, lineno, key) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise DataError(f"{path} line {lineno}: '{key}' must be a list of document ids.")
    return [str(v) for v in value]


def read_negatives(path: str | Path, dataset: BeirDataset, qrels: Qrels | None = None) -> dict[str, QueryNegatives]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"negatives file {path} not found (make it with `python -m retrieval_lab.mine`).")
    out: dict[str, QueryNegatives] = {}
    for lineno, record in read_jsonl(path, ("qid", "neg")):
        qid = str(record["qid"])
        if qid not in dataset.queries:
            raise DataError(f"{path} line {lineno} names query id '{qid}', which is not in queries.jsonl.")
        if qid in out:
            raise DataError(f"{path} line {lineno} repeats query id '{qid}'.")
        pos = _str_list(record.get("pos", []), path, lineno, "pos")
        neg = _str_list(record["neg"], path, lineno, "neg")
        for doc_id in pos + neg:
            if doc_id not in dataset.corpus:
                raise DataError(f"{path} line {lineno} names corpus id '{doc_id}', which is not in corpus.jsonl.")
        judged = {d for d, s in (qrels or {}).get(qid, {}).items() if s > 0}
        if judged & set(neg):
            raise DataError(f"{path} line {lineno} lists judged positive '{sorted(judged & set(neg))[0]}' "
                            f"of query '{qid}' as a negative.")
        scores = record.get("scores", {})
        if not isinstance(scores, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores.values()):
            raise DataError(f"{path} line {lineno}: 'scores' must map document ids to finite numbers.")
        out[qid] = QueryNegatives(pos, neg, {str(k): float(v) for k, v in scores.items()})
    if not out:
        raise DataError(f"negatives file {path} holds no query.")
    return out


def write_negatives(path: str | Path, records: dict[str, QueryNegatives]) -> None:
    from retrieval_lab.files import atomic_write_text

    lines = [json.dumps({"qid": q, "pos": r.pos, "neg": r.neg, "scores": r.scores}) for q, r in records.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")
