"""TREC run files and JSON outputs, written atomically (temporary name, then rename)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from retrieval_lab.data.beir import read_lines
from retrieval_lab.errors import DataError
from retrieval_lab.files import atomic_write_text
from retrieval_lab.retrieval.metrics import ranked


def write_json(path: str | Path, data) -> None:
    """``data`` as JSON that every reader takes: a NaN or infinite number (which Python would write as ``NaN``, outside
    the JSON standard) is refused, naming its key."""
    def finite(value, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                finite(item, f"{key}.{name}" if key else str(name))
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                finite(item, f"{key}[{index}]")
        elif isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{path} not written: {key} is {value}, which is no number a JSON reader takes (a metric "
                            f"over no query, or a broken model).")

    finite(data, "")
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_trec_run(run: dict[str, dict[str, float]], path: str | Path, tag: str = "retrieval_lab") -> None:
    """``qid Q0 docid rank score tag``, ranks from 1 in trec_eval's order (score descending, ties by doc id
    descending). Scores are written with every digit (Python's shortest round-trip form). trec_eval keeps scores
    as 32-bit floats, so dense and BM25 scores (float32 values) reach it exactly, with the ties and order of the
    evaluation in memory; 6 decimals used to tie scores a few float32 steps apart."""
    for name in [tag, *run, *(doc for docs in run.values() for doc in docs)]:
        if name.split() != [name]:  # empty, or holding white space: its line would not have 6 fields
            raise DataError(f"{path} not written: {name!r} is empty or holds white space, which a TREC run line "
                            f"cannot hold.")
    for qid, docs in run.items():
        for doc, score in docs.items():
            if not math.isfinite(score):
                raise DataError(f"{path} not written: the score of {doc!r} for {qid!r} is {score}, which orders "
                                f"nothing.")
    lines = []
    for qid in sorted(run):
        order = ranked(run[qid])
        lines.extend(f"{qid} Q0 {doc} {rank} {float(score)!r} {tag}" for rank, (doc, score) in enumerate(order, 1))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def read_trec_run(path: str | Path) -> dict[str, dict[str, float]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"run file {path} not found.")
    run: dict[str, dict[str, float]] = {}
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 6:
            raise DataError(f"{path} line {lineno} has {len(fields)} fields, a TREC run line has 6.")
        try:
            run.setdefault(fields[0], {})[fields[2]] = float(fields[4])
        except ValueError:
            raise DataError(f"{path} line {lineno}: score {fields[4]!r} is not a number.") from None
    return run


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}).") from None
