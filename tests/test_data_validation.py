"""Validation of BEIR-format data: the loader, the `check`/`fetch` CLI and `carve_dev`.

Every malformed-input case starts from a small valid BEIR folder and corrupts exactly one file. The loader
must stop with a ``DataError`` whose message is one sentence naming the offending file (and line, where a
line is at fault); the CLI must turn it into a single ``error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from retrieval_lab.data.beir import BeirDataset, carve_dev
from retrieval_lab.data.fetch import fetch
from retrieval_lab.errors import DataError

# --------------------------------------------------------------------------------------------------------------
# A small valid BEIR folder
# --------------------------------------------------------------------------------------------------------------

DOCS = [
    {"_id": "d1", "title": "Aspirin", "text": "Aspirin reduces the risk of heart attack."},
    {"_id": "d2", "title": "Statins", "text": "Statins lower LDL cholesterol."},
    {"_id": "d3", "title": "", "text": "Vitamin D deficiency is common in winter."},
    {"_id": "d4", "title": "Sleep", "text": "Short sleep is linked to weight gain."},
    {"_id": "d5", "title": "Coffee", "text": "Coffee intake and liver health."},
]
QUERIES = [
    {"_id": "q1", "text": "does aspirin prevent heart attacks"},
    {"_id": "q2", "text": "vitamin d in winter"},
    {"_id": "q3", "text": "sleep and body weight"},
]
QRELS = {
    "train": [("q1", "d1", 1), ("q2", "d2", 1)],
    # data lines of test.tsv are file lines 2, 3, 4 (line 1 is the header)
    "test": [("q2", "d3", 1), ("q3", "d4", 2), ("q3", "d5", 1)],
}
HEADER = "query-id\tcorpus-id\tscore"


def write_beir_folder(folder: Path) -> Path:
    """Write a valid BEIR folder (5 documents, 3 queries, qrels/train.tsv and qrels/test.tsv) and return it."""
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES), encoding="utf-8")
    for split, rows in QRELS.items():
        lines = [HEADER] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def beir_dir(tmp_path: Path) -> Path:
    return write_beir_folder(tmp_path / "tinybeir")


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retrieval_lab.data", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=60,
    )


def assert_one_error_line(proc: subprocess.CompletedProcess, *must_contain: str) -> str:
    """Exit status 2, stderr exactly one line `error: ...` naming what it must, no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not exactly one line: {proc.stderr!r}"
    assert proc.stderr.endswith("\n")
    assert lines[0].startswith("error: "), lines[0]
    for text in must_contain:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def assert_one_sentence(message: str) -> None:
    assert message, "empty error message"
    assert "\n" not in message and "\r" not in message, f"message spans several lines: {message!r}"
    assert message == message.strip(), repr(message)
    assert message.endswith("."), f"message is not a finished sentence: {message!r}"
    assert "Traceback" not in message


# --------------------------------------------------------------------------------------------------------------
# 1. The valid folder
# --------------------------------------------------------------------------------------------------------------


def test_valid_folder_loads(beir_dir: Path):
    data = BeirDataset(beir_dir)
    assert sorted(data.corpus) == ["d1", "d2", "d3", "d4", "d5"]
    assert data.corpus["d1"].title == "Aspirin"
    assert data.corpus["d3"].full_text == DOCS[2]["text"]  # empty title: no leading space
    assert data.queries == {q["_id"]: q["text"] for q in QUERIES}

    test = data.split("test")
    assert test.queries == {"q2": "vitamin d in winter", "q3": "sleep and body weight"}
    assert test.qrels == {"q2": {"d3": 1}, "q3": {"d4": 2, "d5": 1}}
    assert all(type(s) is int for rels in test.qrels.values() for s in rels.values())
    assert test.corpus is data.corpus

    train = data.split("train")
    assert train.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert set(train.queries) == {"q1", "q2"}


def test_valid_folder_tolerates_blank_lines_crlf_and_int_ids(beir_dir: Path):
    with open(beir_dir / "corpus.jsonl", "a", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"_id": 6, "text": "numeric id, no title"}) + "\n\n")
    tsv = beir_dir / "qrels" / "test.tsv"
    tsv.write_bytes(tsv.read_bytes().replace(b"\n", b"\r\n"))
    data = BeirDataset(beir_dir)
    assert data.corpus["6"].full_text == "numeric id, no title"
    assert data.split("test").qrels == {"q2": {"d3": 1}, "q3": {"d4": 2, "d5": 1}}


def test_check_cli_accepts_valid_folder(beir_dir: Path, tmp_path: Path):
    proc = run_cli("check", beir_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "5 documents" in proc.stdout and "3 queries" in proc.stdout
    assert "test: 2 queries" in proc.stdout and "train: 2 queries" in proc.stdout


# --------------------------------------------------------------------------------------------------------------
# 2. Malformed inputs
# --------------------------------------------------------------------------------------------------------------


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def replace_line(path: Path, lineno: int, new: str) -> None:
    lines = _lines(path)
    lines[lineno - 1] = new
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def append_line(path: Path, new: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(new + "\n")


def delete_line(path: Path, lineno: int) -> None:
    lines = _lines(path)
    del lines[lineno - 1]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def corpus(d: Path) -> Path:
    return d / "corpus.jsonl"


def queries(d: Path) -> Path:
    return d / "queries.jsonl"


def qrels_test(d: Path) -> Path:
    return d / "qrels" / "test.tsv"


def _plain_file(path: Path) -> Path:
    path.write_text("not a folder\n", encoding="utf-8")
    return path


@dataclass
class Case:
    id: str
    corrupt: Callable[[Path], Path | None]  # corrupts the folder; a returned Path is loaded instead
    file: str  # the file (or folder) name the message must contain
    line: int | None  # the line number the message must give, if a line is at fault
    split: str = "test"
    cli: bool = True  # also run through `python -m retrieval_lab.data check`
    marks: list = field(default_factory=list)


CASES = [
    # ---- corpus.jsonl
    Case("corpus-line-not-json", lambda d: replace_line(corpus(d), 3, '{"_id": "d3", "text": "unterminated'),
         "corpus.jsonl", 3),
    Case("corpus-line-json-list", lambda d: replace_line(corpus(d), 2, '["d2", "Statins lower LDL cholesterol."]'),
         "corpus.jsonl", 2),
    Case("corpus-line-json-string", lambda d: replace_line(corpus(d), 4, '"just a string"'), "corpus.jsonl", 4),
    Case("corpus-missing-_id", lambda d: replace_line(corpus(d), 4, json.dumps({"title": "Sleep", "text": "x"})),
         "corpus.jsonl", 4),
    Case("corpus-missing-text", lambda d: replace_line(corpus(d), 5, json.dumps({"_id": "d5", "title": "Coffee"})),
         "corpus.jsonl", 5),
    Case("corpus-duplicate-id", lambda d: append_line(corpus(d), json.dumps({"_id": "d2", "text": "again"})),
         "corpus.jsonl", 6),
    Case("corpus-empty-title-and-text",
         lambda d: replace_line(corpus(d), 1, json.dumps({"_id": "d1", "title": "", "text": "  "})),
         "corpus.jsonl", 1),
    Case("corpus-text-not-string", lambda d: replace_line(corpus(d), 2, json.dumps({"_id": "d2", "text": 42})),
         "corpus.jsonl", 2),
    Case("corpus-title-not-string",
         lambda d: replace_line(corpus(d), 2, json.dumps({"_id": "d2", "title": ["a"], "text": "x"})),
         "corpus.jsonl", 2),
    Case("corpus-empty-id", lambda d: replace_line(corpus(d), 3, json.dumps({"_id": "", "text": "x"})),
         "corpus.jsonl", 3),
    Case("corpus-id-not-scalar", lambda d: replace_line(corpus(d), 3, json.dumps({"_id": {"a": 1}, "text": "x"})),
         "corpus.jsonl", 3),
    Case("corpus-empty-file", lambda d: corpus(d).write_text("", encoding="utf-8"), "corpus.jsonl", None),
    Case("corpus-only-blank-lines", lambda d: corpus(d).write_text("\n  \n\n", encoding="utf-8"), "corpus.jsonl", None),
    Case("corpus-missing", lambda d: corpus(d).unlink(), "corpus.jsonl", None),
    Case("corpus-not-utf8",
         lambda d: corpus(d).write_bytes(corpus(d).read_bytes() + b'{"_id": "d6", "text": "caf\xe9 \xff"}\n'),
         "corpus.jsonl", None),
    # ---- queries.jsonl
    Case("queries-line-not-json", lambda d: replace_line(queries(d), 2, "_id: q2, text: vitamin d"),
         "queries.jsonl", 2),
    Case("queries-missing-text", lambda d: replace_line(queries(d), 1, json.dumps({"_id": "q1"})),
         "queries.jsonl", 1),
    Case("queries-duplicate-id", lambda d: append_line(queries(d), json.dumps({"_id": "q1", "text": "again"})),
         "queries.jsonl", 4),
    Case("queries-empty-text", lambda d: replace_line(queries(d), 3, json.dumps({"_id": "q3", "text": "   "})),
         "queries.jsonl", 3),
    Case("queries-text-not-string", lambda d: replace_line(queries(d), 2, json.dumps({"_id": "q2", "text": ["a"]})),
         "queries.jsonl", 2),
    Case("queries-empty-file", lambda d: queries(d).write_text("", encoding="utf-8"), "queries.jsonl", None),
    Case("queries-missing", lambda d: queries(d).unlink(), "queries.jsonl", None),
    # ---- qrels/test.tsv
    Case("qrels-missing-header", lambda d: delete_line(qrels_test(d), 1), "test.tsv", 1),
    Case("qrels-comma-separated-header",
         lambda d: replace_line(qrels_test(d), 1, "query-id,corpus-id,score"), "test.tsv", 1),
    Case("qrels-two-fields", lambda d: replace_line(qrels_test(d), 3, "q3\td4"), "test.tsv", 3),
    Case("qrels-four-fields", lambda d: replace_line(qrels_test(d), 2, "q2\td3\t1\textra"), "test.tsv", 2),
    Case("qrels-space-separated", lambda d: replace_line(qrels_test(d), 4, "q3 d5 1"), "test.tsv", 4),
    Case("qrels-non-numeric-score", lambda d: replace_line(qrels_test(d), 3, "q3\td4\thigh"), "test.tsv", 3),
    Case("qrels-empty-score", lambda d: replace_line(qrels_test(d), 4, "q3\td5\t"), "test.tsv", 4),
    Case("qrels-fractional-score", lambda d: replace_line(qrels_test(d), 3, "q3\td4\t1.5"), "test.tsv", 3),
    Case("qrels-infinite-score", lambda d: replace_line(qrels_test(d), 3, "q3\td4\tinf"), "test.tsv", 3),
    Case("qrels-no-known-query-id", lambda d: qrels_test(d).write_text(f"{HEADER}\nQ2\td3\t1\nQ3\td4\t1\n"),
         "test.tsv", 2),
    Case("qrels-no-known-corpus-id", lambda d: qrels_test(d).write_text(f"{HEADER}\nq2\tD3\t1\nq3\tD4\t1\n"),
         "test.tsv", 2),
    Case("qrels-nothing-relevant", lambda d: qrels_test(d).write_text(f"{HEADER}\nq2\td3\t0\nq3\td4\t-1\n"),
         "test.tsv", None),
    Case("qrels-duplicate-judgement", lambda d: append_line(qrels_test(d), "q2\td3\t0"), "test.tsv", 5),
    Case("qrels-empty-file", lambda d: qrels_test(d).write_text("", encoding="utf-8"), "test.tsv", None),
    Case("qrels-header-only", lambda d: qrels_test(d).write_text(HEADER + "\n", encoding="utf-8"), "test.tsv", None),
    # ---- folder layout
    Case("missing-data-folder", lambda d: d.parent / "no_such_dataset", "no_such_dataset", None),
    Case("data-folder-is-a-file", lambda d: _plain_file(d.parent / "a_plain_file"), "a_plain_file", None),
    Case("missing-split-dev", lambda d: None, "dev.tsv", None, split="dev", cli=False),
]

_ids = [c.id for c in CASES]
assert len(set(_ids)) == len(_ids), "duplicate case ids"


def _params(cases):
    return [pytest.param(c, id=c.id, marks=c.marks) for c in cases]


def _corrupted(case: Case, beir_dir: Path) -> Path:
    other = case.corrupt(beir_dir)
    return other if isinstance(other, Path) else beir_dir


def _check_message(message: str, case: Case) -> None:
    assert_one_sentence(message)
    assert case.file in message, f"message does not name {case.file!r}: {message!r}"
    if case.line is not None:
        assert re.search(rf"\bline {case.line}\b", message), f"message does not give 'line {case.line}': {message!r}"


@pytest.mark.parametrize("case", _params(CASES))
def test_malformed_input_raises_data_error(case: Case, beir_dir: Path):
    folder = _corrupted(case, beir_dir)
    with pytest.raises(DataError) as excinfo:
        BeirDataset(folder).split(case.split)
    _check_message(str(excinfo.value), case)


CLI_CASES = [c for c in CASES if c.cli]
assert len(CLI_CASES) >= 10


@pytest.mark.parametrize("case", _params(CLI_CASES))
def test_check_cli_rejects_malformed_input(case: Case, beir_dir: Path, tmp_path: Path):
    folder = _corrupted(case, beir_dir)
    proc = run_cli("check", folder, cwd=tmp_path)
    assert proc.stdout == ""
    line = assert_one_error_line(proc, case.file)
    _check_message(line[len("error: "):], case)


def test_check_cli_validates_every_split(beir_dir: Path, tmp_path: Path):
    """`check` reads all qrels files, not just test: a fault in train.tsv is reported too."""
    append_line(beir_dir / "qrels" / "train.tsv", "q1\tnope")
    assert BeirDataset(beir_dir).split("test").qrels  # the test split alone is fine
    assert_one_error_line(run_cli("check", beir_dir, cwd=tmp_path), "train.tsv", "line 4")


def test_check_cli_rejects_folder_without_qrels(beir_dir: Path, tmp_path: Path):
    for tsv in (beir_dir / "qrels").iterdir():
        tsv.unlink()
    assert_one_error_line(run_cli("check", beir_dir, cwd=tmp_path), "qrels")


# --------------------------------------------------------------------------------------------------------------
# 3. fetch with a bad source
# --------------------------------------------------------------------------------------------------------------

NAME = "tinyset"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_no_stray_copies(dest: Path, allowed: Path | None = None) -> None:
    """Nothing under DEST but (optionally) the one good copy: no temp folder, no half or complete stray copy."""
    if not dest.exists():
        return
    entries = sorted(p.name for p in dest.iterdir())
    expected = [allowed.name] if allowed is not None else []
    assert entries == expected, f"unexpected entries in {dest}: {entries}"
    stray = [p for p in dest.rglob("corpus.jsonl") if allowed is None or allowed not in p.parents]
    assert not stray, f"stray copies left behind: {stray}"


BAD_SOURCES = {
    "source-missing": lambda d: d.parent / "not_there",
    "corpus-not-json": lambda d: replace_line(corpus(d), 3, "{oops"),
    "qrels-no-known-corpus-id": lambda d: qrels_test(d).write_text(f"{HEADER}\nq2\tD3\t1\n"),
    "train-qrels-bad": lambda d: replace_line(d / "qrels" / "train.tsv", 2, "q1\td1"),
}


@pytest.mark.parametrize("bad", sorted(BAD_SOURCES))
def test_fetch_bad_source_leaves_nothing(bad: str, beir_dir: Path, tmp_path: Path):
    other = BAD_SOURCES[bad](beir_dir)
    source = other if isinstance(other, Path) else beir_dir
    dest = tmp_path / "dest"

    with pytest.raises(DataError) as excinfo:
        fetch(NAME, dest, source)
    assert_one_sentence(str(excinfo.value))
    assert not (dest / NAME).exists()
    assert_no_stray_copies(dest)

    proc = run_cli("fetch", NAME, "--source", source, "--dest", dest, cwd=tmp_path)
    assert_one_error_line(proc)
    assert not (dest / NAME).exists()
    assert_no_stray_copies(dest)


def test_fetch_good_source_then_force_with_bad_source_keeps_copy(beir_dir: Path, tmp_path: Path):
    dest = tmp_path / "dest"
    original = snapshot(beir_dir)

    proc = run_cli("fetch", NAME, "--source", beir_dir, "--dest", dest, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    target = dest / NAME
    assert snapshot(target) == original
    assert_no_stray_copies(dest, allowed=target)

    # A bad source, with and without --force: the good copy survives untouched.
    bad = write_beir_folder(tmp_path / "bad_source")
    append_line(qrels_test(bad), "q3\td4")
    for force in (["--force"], []):
        proc = run_cli("fetch", NAME, "--source", bad, "--dest", dest, *force, cwd=tmp_path)
        if force:
            assert_one_error_line(proc, "test.tsv")
        assert snapshot(target) == original
        assert_no_stray_copies(dest, allowed=target)

    with pytest.raises(DataError):
        fetch(NAME, dest, bad, force=True)
    assert snapshot(target) == original
    assert_no_stray_copies(dest, allowed=target)
    assert BeirDataset(target).split("test").qrels == {"q2": {"d3": 1}, "q3": {"d4": 2, "d5": 1}}

    # A missing source with --force: still intact.
    proc = run_cli("fetch", NAME, "--source", tmp_path / "gone", "--dest", dest, "--force", cwd=tmp_path)
    assert_one_error_line(proc, "gone")
    assert snapshot(target) == original
    assert_no_stray_copies(dest, allowed=target)


def test_fetch_force_with_good_source_replaces_copy(beir_dir: Path, tmp_path: Path):
    dest = tmp_path / "dest"
    fetch(NAME, dest, beir_dir)
    newer = write_beir_folder(tmp_path / "newer")
    append_line(corpus(newer), json.dumps({"_id": "d6", "text": "a sixth document"}))
    fetch(NAME, dest, newer, force=True)
    assert snapshot(dest / NAME) == snapshot(newer)
    assert_no_stray_copies(dest, allowed=dest / NAME)


# --------------------------------------------------------------------------------------------------------------
# 4. carve_dev
# --------------------------------------------------------------------------------------------------------------


def _qrels(n: int) -> dict[str, dict[str, int]]:
    return {f"q{i:03d}": {f"d{i}": 1, f"d{i + 1}": i % 3} for i in range(n)}


@pytest.mark.parametrize("n, fraction", [(20, 0.1), (20, 0.25), (20, 0.5), (37, 0.3), (3, 0.34)])
def test_carve_dev_is_deterministic_disjoint_and_sized(n: int, fraction: float):
    qrels = _qrels(n)
    before = json.dumps(qrels, sort_keys=True)
    train, dev = carve_dev(qrels, fraction, seed=13)

    assert carve_dev(qrels, fraction, seed=13) == (train, dev)
    assert carve_dev(dict(reversed(list(qrels.items()))), fraction, seed=13) == (train, dev)  # order-independent
    assert not set(train) & set(dev)
    assert set(train) | set(dev) == set(qrels)
    assert len(dev) == round(n * fraction)
    assert all(train[q] == qrels[q] for q in train) and all(dev[q] == qrels[q] for q in dev)
    assert json.dumps(qrels, sort_keys=True) == before  # input untouched


def test_carve_dev_depends_on_seed():
    qrels = _qrels(30)
    dev_sets = {frozenset(carve_dev(qrels, 0.2, seed=s)[1]) for s in range(5)}
    assert len(dev_sets) > 1


def test_carve_dev_on_loaded_qrels(beir_dir: Path):
    qrels = BeirDataset(beir_dir).qrels("test")
    train, dev = carve_dev(qrels, 0.5, seed=0)
    assert len(dev) == 1 and len(train) == 1 and set(train) | set(dev) == {"q2", "q3"}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_carve_dev_rejects_invalid_fraction(fraction: float):
    with pytest.raises(DataError) as excinfo:
        carve_dev(_qrels(10), fraction, seed=0)
    assert_one_sentence(str(excinfo.value))
    assert "dev_fraction" in str(excinfo.value)


def test_carve_dev_rejects_fraction_leaving_no_training_queries():
    with pytest.raises(DataError, match="no training queries"):
        carve_dev(_qrels(2), 0.9, seed=0)


def test_judgements_of_unknown_ids_as_beirs_own_data_sets_hold_them(beir_dir: Path, tmp_path: Path, capsys):
    """ArguAna's test qrels name a document missing from its corpus, NFCorpus's name queries missing from its
    queries: such a data set loads, with one warning line per kind naming the file, the first line and the count.
    The unknown query's judgement is left out; the unknown document's is kept for evaluation, relevant but
    unreachable (its query's recall can reach 1/2 only, as trec_eval and BEIR count it), and left out of training
    and mining (reachable_only)."""
    from retrieval_lab.retrieval.metrics import evaluate_run

    append_line(qrels_test(beir_dir), "q99\td1\t1")  # line 5
    append_line(qrels_test(beir_dir), "q2\td99\t1")  # line 6
    data = BeirDataset(beir_dir)
    qrels = data.qrels("test")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: ") and "test.tsv" in line for line in err)
    assert "names a query id that is not in queries.jsonl (line 5: 'q99'); left out." in err[0]
    assert "names a corpus id that is not in corpus.jsonl (line 6: 'd99'); kept" in err[1]
    assert "q99" not in qrels and qrels["q2"] == {"d3": 1, "d99": 1}
    assert evaluate_run({"q2": qrels["q2"]}, {"q2": {"d3": 1.0, "d1": 0.5}}, ["recall@100"])["recall@100"] == 0.5
    assert data.qrels("test", reachable_only=True)["q2"] == {"d3": 1}
    proc = run_cli("check", beir_dir, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr.count("warning: ") == 2, proc.stderr
