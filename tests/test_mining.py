"""Hard-negative mining: positives never come back as negatives; the false-negative guards; the file format."""
from __future__ import annotations

import json

import pytest

from conftest import run_module
from retrieval_lab.data.beir import BeirDataset
from retrieval_lab.data.negatives import QueryNegatives, read_negatives, write_negatives
from retrieval_lab.data.pairs import SupervisedPairs
from retrieval_lab.errors import DataError
from retrieval_lab.mining.negatives import mine_negatives

RUN = {"q1": {"a": 10.0, "p": 9.0, "b": 8.0, "c": 5.0, "d": 1.0}, "q2": {"x": 3.0, "y": 2.0}}
QRELS = {"q1": {"p": 1, "b": 0}, "q2": {"z": 1}}


def test_mining_drops_positives_only():
    mined = mine_negatives(RUN, QRELS, n_neg=10)
    assert mined["q1"].neg == ["a", "b", "c", "d"]  # 'b' is judged non-relevant (score 0): a fine negative
    assert mined["q1"].pos == ["p"] and mined["q1"].scores["p"] == 9.0
    assert mined["q2"].neg == ["x", "y"]


def test_the_query_itself_is_never_its_negative():
    """ArguAna and Quora hold each query in the corpus under its own id: that document is no negative."""
    mined = mine_negatives({"q1": {"q1": 20.0, **RUN["q1"]}}, {"q1": QRELS["q1"]}, n_neg=2)
    assert mined["q1"].neg == ["a", "b"]


def test_skip_top_and_score_ratio_guard_against_false_negatives():
    assert mine_negatives(RUN, QRELS, n_neg=2, skip_top=1)["q1"].neg == ["b", "c"]
    assert mine_negatives(RUN, QRELS, n_neg=10, score_ratio=0.9)["q1"].neg == ["b", "c", "d"]  # >= 8.1 dropped
    assert mine_negatives(RUN, QRELS, n_neg=10, score_ratio=0.85)["q1"].neg == ["c", "d"]  # >= 7.65 dropped
    assert mine_negatives(RUN, QRELS, n_neg=10, score_ratio=0.9)["q2"].neg == ["x", "y"]  # positive not retrieved


def test_bm25_mining_entry_point_never_returns_a_judged_positive(beir_folder, tmp_path):
    out = tmp_path / "neg.jsonl"
    result = run_module("retrieval_lab.mine", "data=beir", f"data.path={beir_folder}", "n_neg=5",
                        f"output={out}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    data = BeirDataset(beir_folder)
    qrels = data.qrels("train")
    mined = read_negatives(out, data, qrels)  # the reader itself refuses a positive listed as negative
    assert set(mined) == set(qrels)
    for qid, record in mined.items():
        assert not set(record.neg) & {d for d, s in qrels[qid].items() if s > 0}
        assert 1 <= len(record.neg) <= 5


@pytest.mark.parametrize("line,message", [
    ('{"qid": "q0", "neg": ["d1"]', "line 1 is not valid JSON"),
    ('{"qid": "nope", "neg": ["d1"]}', "query id 'nope'"),
    ('{"qid": "q0", "neg": ["d999"]}', "corpus id 'd999'"),
    ('{"qid": "q0", "neg": ["d0"]}', "judged positive 'd0'"),
    ('{"qid": "q0", "neg": "d1"}', "'neg' must be a list"),
    ('{"qid": "q0"}', "line 1 has no 'neg' field"),
    ('{"qid": "q0", "neg": ["d1"], "scores": {"d1": "high"}}', "'scores' must map"),
])
def test_bad_negatives_files_are_refused(beir_folder, tmp_path, line, message):
    path = tmp_path / "neg.jsonl"
    path.write_text(line + "\n")
    data = BeirDataset(beir_folder)
    with pytest.raises(DataError, match=message) as err:
        read_negatives(path, data, data.qrels("train"))
    assert "neg.jsonl" in str(err.value) and "\n" not in str(err.value)


def test_groups_hold_the_positive_then_mined_negatives(beir_folder, tmp_path):
    data = BeirDataset(beir_folder)
    qrels = data.qrels("train")
    path = tmp_path / "neg.jsonl"
    write_negatives(path, {"q0": QueryNegatives(["d0"], ["d5", "d6", "d7"]), "q1": QueryNegatives(["d1"], ["d9"])})
    pairs = SupervisedPairs(data, qrels, group_size=3, negatives=read_negatives(path, data, qrels))
    seen = set()
    for epoch in range(10):
        pairs.set_epoch(epoch)
        ex = pairs[pairs.qids.index("q0")]
        assert ex["doc_ids"][0] == "d0" and len(ex["doc_ids"]) == 3
        assert set(ex["doc_ids"][1:]) <= {"d5", "d6", "d7"} and len(set(ex["doc_ids"][1:])) == 2
        seen |= set(ex["doc_ids"][1:])
        assert pairs[pairs.qids.index("q1")]["doc_ids"][1:] == ["d9", "d9"]  # too few: drawn with replacement
        other = pairs[pairs.qids.index("q2")]  # no mined negatives: random non-positive documents
        assert len(other["doc_ids"]) == 3 and "d2" not in other["doc_ids"][1:]
    assert seen == {"d5", "d6", "d7"}
    json.loads(path.read_text().splitlines()[0])


def test_denoised_mining_keeps_the_plain_negatives_file(beir_folder, tiny_model, tmp_path):
    """`denoise.cross_encoder=...` writes <retriever>-denoised-<split>.jsonl by default, not over the plain file
    that negatives=bm25 and score read."""
    import shutil

    folder = shutil.copytree(beir_folder, tmp_path / "beir")  # the default output lies inside the data folder
    common = ["data=beir", f"data.path={folder}", "n_neg=5"]
    plain = run_module("retrieval_lab.mine", *common, f"hydra.run.dir={tmp_path / 'run1'}")
    assert plain.returncode == 0, plain.stderr[-2000:]
    before = (folder / "negatives" / "bm25-train.jsonl").read_text()
    from retrieval_lab.models.cross_encoder import CrossEncoder

    teacher = CrossEncoder(str(tiny_model), max_length=64).save(tmp_path / "ce")  # a score head, untrained: a stand-in
    denoised = run_module("retrieval_lab.mine", *common, f"denoise.cross_encoder={teacher}",
                          "denoise.max_length=64", f"hydra.run.dir={tmp_path / 'run2'}")
    assert denoised.returncode == 0, denoised.stderr[-2000:]
    assert (folder / "negatives" / "bm25-train.jsonl").read_text() == before
    assert (folder / "negatives" / "bm25-denoised-train.jsonl").is_file()
