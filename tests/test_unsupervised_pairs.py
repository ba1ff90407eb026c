"""Pairs without labels: crop lengths and spans, ICT query removal rate, augmentation."""
from __future__ import annotations

import random

import pytest

from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.pairs import Augmentation, CroppingPairs, ICTPairs, load_plain_corpus, random_span
from retrieval_lab.errors import ConfigError, DataError


def is_sublist(part, whole):
    return any(whole[i:i + len(part)] == part for i in range(len(whole) - len(part) + 1))


@pytest.fixture(scope="module")
def long_docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long")
    rng = random.Random(0)
    lines = []
    for i in range(30):
        sentences = [" ".join(f"w{i}_{j}_{k}" for k in range(rng.randint(5, 12))) + "." for j in range(rng.randint(3, 8))]
        lines.append(f'{{"_id": "d{i}", "title": "title {i}", "text": "{" ".join(sentences)}"}}')
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "queries.jsonl").write_text('{"_id": "q", "text": "x"}\n')
    (folder / "qrels").mkdir()
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq\td0\t1\n")
    return BeirDataset(folder)


def test_crop_lengths_in_range_and_spans_inside_the_document(long_docs):
    pairs = CroppingPairs(long_docs, min_ratio=0.2, max_ratio=0.4, augmentation=None)
    for epoch in range(5):
        pairs.set_epoch(epoch)
        for i in range(len(pairs)):
            ex = pairs[i]
            words = long_docs.corpus[ex["qid"]].full_text.split()
            for view in (ex["query"].split(), ex["docs"][0].split()):
                assert round(0.2 * len(words)) <= len(view) <= round(0.4 * len(words))
                assert is_sublist(view, words)


def test_random_span_covers_the_ratio_range():
    words = [str(i) for i in range(100)]
    rng = random.Random(0)
    lengths = [len(random_span(words, 0.1, 0.5, rng)) for _ in range(2000)]
    assert min(lengths) == 10 and max(lengths) == 50
    starts = {int(random_span(words, 0.1, 0.1, rng)[0]) for _ in range(2000)}
    assert starts == set(range(91))  # every start that keeps the span inside the document


@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
def test_ict_removes_the_query_from_the_key_at_the_configured_rate(long_docs, keep):
    pairs = ICTPairs(long_docs, keep_query=keep, seed=7)
    kept, total = 0, 0
    for epoch in range(20):
        pairs.set_epoch(epoch)
        for i in range(len(pairs)):
            ex = pairs[i]
            doc = long_docs.corpus[ex["qid"]]
            assert ex["query"] in doc.text and ex["docs"][0].startswith(doc.title)
            kept += ex["query"] in ex["docs"][0]
            total += 1
    assert kept / total == pytest.approx(keep, abs=0.05)


def test_augmentation_rates():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(20000)]
    deleted = Augmentation(deletion=0.2)(words, rng, ["x"])
    assert len(deleted) / len(words) == pytest.approx(0.8, abs=0.02) and set(deleted) <= set(words)
    masked = Augmentation(masking=0.3)(words, rng, ["x"])
    assert masked.count("[MASK]") / len(words) == pytest.approx(0.3, abs=0.02)
    replaced = Augmentation(replacement=0.25)(words, rng, ["zz"])
    assert replaced.count("zz") / len(words) == pytest.approx(0.25, abs=0.02)


def test_plain_text_corpus(tmp_path, long_docs):
    path = tmp_path / "corpus.txt"
    path.write_text("one two three four five six seven eight nine\n\nshort line\n")
    docs = load_plain_corpus(path)
    assert list(docs) == ["line1", "line3"]
    pairs = CroppingPairs(long_docs, corpus=str(path), augmentation=None)
    assert pairs.doc_ids == ["line1"]  # the short line has fewer than min_words words
    with pytest.raises(DataError, match="not found"):
        load_plain_corpus(tmp_path / "missing.txt")


@pytest.mark.parametrize("kwargs,key", [({"min_ratio": 0.6, "max_ratio": 0.5}, "pairs.min_ratio"),
                                        ({"augmentation": {"deletion": 1.5}}, "pairs.augmentation.deletion")])
def test_bad_pair_settings_are_refused(long_docs, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        CroppingPairs(long_docs, **kwargs)
