"""Load and validate data sets in BEIR layout.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``)
and ``qrels/{split}.tsv`` (``query-id``, ``corpus-id``, ``score`` with a header line). Every reader here
stops at the first problem with a :class:`DataError` whose message names the file and line; the one exception is
a qrels line naming an unknown id, which BEIR's own data sets hold (see ``load_qrels``).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from retrieval_lab.errors import DataError, warn

Qrels = dict[str, dict[str, int]]


@dataclass(frozen=True)
class Document:
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """Title and text joined by a space: what the retrievers index."""
        return f"{self.title} {self.text}".strip()


@dataclass
class BeirSplit:
    """The corpus, the queries judged in one split and that split's judgements."""

    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: Qrels


def _require_file(path: Path, hint: str = "") -> None:
    if not path.is_file():
        raise DataError(f"{path} not found{hint}.")


def read_lines(path: Path, start: int = 1):
    """Yield (line number, text) of a UTF-8 file, naming the line of any byte that is not UTF-8."""
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=start):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} line {lineno} is not valid UTF-8 ({err.reason} at byte {err.start}).") from None


def read_jsonl(path: Path, required: tuple[str, ...]):
    """Yield (line number, record) for each non-blank line, checking JSON syntax and required fields."""
    _require_file(path)
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {lineno} is not valid JSON ({err.msg}).") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {lineno} is a JSON {type(record).__name__}, not an object.")
        for field in required:
            if field not in record:
                raise DataError(f"{path} line {lineno} has no '{field}' field.")
        yield lineno, record


def _id_of(record: dict, path: Path, lineno: int) -> str:
    value = record["_id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise DataError(f"{path} line {lineno} has an empty or non-scalar '_id' ({value!r}).")
    if str(value).split() != [str(value)]:  # a TREC run line is split at white space
        raise DataError(f"{path} line {lineno}: id {str(value)!r} holds white space, which TREC run files (and "
                        f"trec_eval) cannot hold; rename it.")
    return str(value)


def _text_of(record: dict, field: str, path: Path, lineno: int, default: str | None = None) -> str:
    value = record.get(field, default)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise DataError(f"{path} line {lineno}: '{field}' must be a string, not {type(value).__name__}.")
    return value


def _records_by_id(path: Path, kind: str, kinds: str):
    """Yield (line number, id, record) from a JSONL file with ``_id`` and ``text``, refusing repeated ids."""
    first_line: dict[str, int] = {}
    for lineno, record in read_jsonl(path, ("_id", "text")):
        record_id = _id_of(record, path, lineno)
        if record_id in first_line:
            raise DataError(f"{path} line {lineno} repeats {kind} id '{record_id}' (first seen on line {first_line[record_id]}).")
        first_line[record_id] = lineno
        yield lineno, record_id, record
    if not first_line:
        raise DataError(f"{path} holds no {kinds}.")


def load_corpus(path: str | Path) -> dict[str, Document]:
    path = Path(path)
    corpus: dict[str, Document] = {}
    for lineno, doc_id, record in _records_by_id(path, "document", "documents"):
        doc = Document(_text_of(record, "title", path, lineno, ""), _text_of(record, "text", path, lineno))
        if not doc.full_text:
            raise DataError(f"{path} line {lineno}: document '{doc_id}' has neither title nor text.")
        corpus[doc_id] = doc
    return corpus


def load_queries(path: str | Path) -> dict[str, str]:
    path = Path(path)
    queries: dict[str, str] = {}
    for lineno, qid, record in _records_by_id(path, "query", "queries"):
        text = _text_of(record, "text", path, lineno)
        if not text.strip():
            raise DataError(f"{path} line {lineno}: query '{qid}' has empty text.")
        queries[qid] = text
    return queries


def load_qrels(path: str | Path, corpus: dict | None = None, queries: dict | None = None,
               reachable_only: bool = False) -> Qrels:
    """Read a qrels TSV. With ``corpus``/``queries`` given, judgements naming ids they lack are taken as BEIR's own
    data sets hold a few (ArguAna's test qrels name a document missing from its corpus, NFCorpus's name queries
    missing from queries.jsonl), with a warning naming the file, the first such line and the count: a judgement
    of an unknown query is left out (it cannot be asked); one of an unknown document is kept, relevant but
    unreachable, as BEIR's evaluation counts it, unless ``reachable_only`` (training and mining need its text).
    A file none of whose judgements names a known query and document is refused."""
    path = Path(path)
    unknown = {"query": [], "corpus": []}  # (line, id) of the judgements naming an unknown id
    _require_file(path)
    qrels: Qrels = {}
    seen: dict[str, set[str]] = {}  # every judged pair, to refuse a second judgement of one
    lines = read_lines(path)
    _, header = next(lines, (1, ""))
    if not header.strip():
        raise DataError(f"{path} is empty (expected the header line 'query-id, corpus-id, score').")
    columns = header.rstrip("\n").rstrip("\r").split("\t")
    if len(columns) != 3 or columns[2].strip() != "score":
        raise DataError(f"{path} line 1 must be the header 'query-id<TAB>corpus-id<TAB>score', got {header.strip()!r}.")
    for lineno, line in lines:
        if not line.strip():
            continue
        fields = line.rstrip("\n").rstrip("\r").split("\t")
        if len(fields) != 3:
            raise DataError(f"{path} line {lineno} has {len(fields)} tab-separated fields, expected 3.")
        qid, doc_id, score_text = (f.strip() for f in fields)
        try:
            value = float(score_text)
            score = int(value)
        except (ValueError, OverflowError):
            raise DataError(f"{path} line {lineno}: score {score_text!r} is not a finite number.") from None
        if score != value:
            raise DataError(f"{path} line {lineno}: score {score_text!r} is not a whole number (relevance grades are "
                            f"integers, as trec_eval reads them).")
        if doc_id in seen.get(qid, ()):
            raise DataError(f"{path} line {lineno} judges the pair ('{qid}', '{doc_id}') a second time.")
        seen.setdefault(qid, set()).add(doc_id)
        if queries is not None and qid not in queries:
            unknown["query"].append((lineno, qid))
            continue
        if corpus is not None and doc_id not in corpus:
            unknown["corpus"].append((lineno, doc_id))
            if reachable_only:
                continue
        qrels.setdefault(qid, {})[doc_id] = score
    if not seen:
        raise DataError(f"{path} holds no judgements.")
    for kind, file, what in (("query", "queries.jsonl", "left out"),
                             ("corpus", "corpus.jsonl", "left out" if reachable_only else
                              "kept as relevant but unreachable, as BEIR's evaluation counts such judgements")):
        if unknown[kind]:
            (line, first), count = unknown[kind][0], len(unknown[kind])
            if count == sum(len(docs) for docs in seen.values()):
                if count == 1:
                    raise DataError(f"{path} line {line}, its only judgement, names {kind} id '{first}', which is "
                                    f"not in {file}.")
                raise DataError(f"{path}: none of its {count} judgements names a {kind} id of {file} (line {line} "
                                f"names '{first}'): the ids of the two files do not match.")
            names = (f"1 judgement names a {kind} id that is not in {file} (line {line}: '{first}')" if count == 1 else
                     f"{count} judgements name {kind} ids that are not in {file} (first at line {line}: '{first}')")
            warn(f"{path}: {names}; {what}.")
    if not qrels:
        raise DataError(f"{path} holds no judgements of documents in the corpus.")
    if not any(score > 0 for docs in qrels.values() for score in docs.values()):
        raise DataError(f"{path} judges no document relevant (every score is 0 or less): there is nothing to "
                        f"retrieve or train on.")
    return qrels


def available_splits(folder: str | Path) -> list[str]:
    return sorted(p.stem for p in (Path(folder) / "qrels").glob("*.tsv"))


def qrels_path(folder: str | Path, split: str) -> Path:
    path = Path(folder) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        found = ", ".join(available_splits(folder)) or "none"
        raise DataError(f"{path} not found: data set {folder} has no '{split}' split (available: {found}).")
    return path


def check_folder(folder: str | Path) -> None:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} not found (run `make data` or set data.path to a BEIR folder).")


class BeirDataset:
    """A BEIR folder: the corpus and queries are read once, qrels per split on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_folder(self.path)
        self.corpus = load_corpus(self.path / "corpus.jsonl")
        self.queries = load_queries(self.path / "queries.jsonl")

    def qrels(self, split: str, reachable_only: bool = False) -> Qrels:
        """``reachable_only``: without judgements of documents missing from the corpus (see ``load_qrels``)."""
        return load_qrels(qrels_path(self.path, split), self.corpus, self.queries, reachable_only)

    def split(self, split: str) -> BeirSplit:
        return self.subset(self.qrels(split))

    def subset(self, qrels: Qrels) -> BeirSplit:
        """The corpus with the queries judged in ``qrels``."""
        return BeirSplit(self.corpus, {qid: self.queries[qid] for qid in qrels}, qrels)


def carve_dev(qrels: Qrels, fraction: float, seed: int) -> tuple[Qrels, Qrels]:
    """Split a qrels dict by query into (train, dev), ``fraction`` of the queries going to dev.

    The split depends only on the query ids and the seed, so every run with the same seed agrees.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"data.dev_fraction must lie strictly between 0 and 1, got {fraction}.")
    qids = sorted(qrels)
    random.Random(seed).shuffle(qids)
    n_dev = max(1, round(len(qids) * fraction))
    dev_ids = set(qids[:n_dev])
    train = {q: r for q, r in qrels.items() if q not in dev_ids}
    dev = {q: r for q, r in qrels.items() if q in dev_ids}
    if not train:
        raise DataError(f"data.dev_fraction={fraction} leaves no training queries out of {len(qids)}.")
    return train, dev
