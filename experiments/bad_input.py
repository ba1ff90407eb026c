"""Every bad-input case we check, run through the real readers and entry-point functions: the message each one
gives, and whether an output written before the failing call is still intact.

    python experiments/bad_input.py > bad_input.md

Each case starts from a small valid BEIR folder (and a valid negatives file, run file and sweep folder) and
breaks one thing. An output written earlier (a negatives file, metrics.json, a report) sits where the failing
call would write; the last column says whether its bytes are unchanged afterwards.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from retrieval_lab import config  # noqa: E402
from retrieval_lab.data.beir import BeirDataset  # noqa: E402
from retrieval_lab.data.negatives import read_negatives  # noqa: E402
from retrieval_lab.errors import find_user_error  # noqa: E402
from retrieval_lab.models.encoder import resolve_model_path  # noqa: E402
from retrieval_lab.mine import mine  # noqa: E402
from retrieval_lab.report import report  # noqa: E402
from retrieval_lab.score import score  # noqa: E402
from retrieval_lab.retrieval.runfile import read_json, read_trec_run  # noqa: E402

DOCS = [{"_id": f"d{i}", "title": f"title {i}", "text": f"text of document {i}"} for i in range(6)]
QUERIES = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(4)]


def beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    for split, rows in {"train": [("q0", "d0"), ("q1", "d1")], "test": [("q2", "d2"), ("q3", "d3")]}.items():
        (folder / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in rows))
    return folder


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def compose_named(name, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def edit(path: Path, text: str | bytes):
    def apply():
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return apply


def cases(folder: Path, work: Path):
    corpus, queries, test = folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / "test.tsv"
    neg = work / "neg.jsonl"
    load = lambda: BeirDataset(folder).split("test")  # noqa: E731
    negatives = lambda: read_negatives(neg, BeirDataset(folder), BeirDataset(folder).qrels("train"))  # noqa: E731
    good_neg = json.dumps({"qid": "q0", "pos": ["d0"], "neg": ["d4"], "scores": {"d0": 2.0, "d4": 1.0}})
    yield "corpus.jsonl missing", lambda: corpus.unlink(), load
    yield "corpus line is not JSON", edit(corpus, corpus.read_text() + "{oops\n"), load
    yield "corpus line without _id", edit(corpus, corpus.read_text() + '{"title": "x", "text": "y"}\n'), load
    yield "corpus repeats an id", edit(corpus, corpus.read_text() + json.dumps(DOCS[0]) + "\n"), load
    yield "corpus line is a JSON list", edit(corpus, corpus.read_text() + "[1, 2]\n"), load
    yield "corpus bytes not UTF-8", edit(corpus, corpus.read_bytes() + b'{"_id": "x", "text": "\xff"}\n'), load
    yield "document with neither title nor text", edit(corpus, corpus.read_text() + '{"_id": "e", "title": "", "text": ""}\n'), load
    yield "query with empty text", edit(queries, queries.read_text() + '{"_id": "qx", "text": ""}\n'), load
    yield "query text not a string", edit(queries, queries.read_text() + '{"_id": "qy", "text": 5}\n'), load
    yield "qrels split missing", lambda: test.unlink(), load
    yield "qrels without header", edit(test, "q2\td2\t1\n"), load
    yield "qrels row with 2 fields", edit(test, test.read_text() + "q3\td4\n"), load
    yield "qrels score not a number", edit(test, test.read_text() + "q3\td4\tx\n"), load
    # (a few judgements of unknown ids are a warning: BEIR's own ArguAna and NFCorpus hold some; none known is not)
    yield "qrels names no known query", edit(test, "query-id\tcorpus-id\tscore\nQ3\td4\t1\n"), load
    yield "qrels names no known document", edit(test, "query-id\tcorpus-id\tscore\nq3\tD4\t1\n"), load
    yield "qrels judges a pair twice", edit(test, test.read_text() + "q2\td2\t1\n"), load
    yield "data folder missing", lambda: None, lambda: BeirDataset(folder / "nowhere")
    yield "negatives file missing", lambda: None, negatives
    yield "negatives line not JSON", edit(neg, good_neg + "\n{bad\n"), negatives
    yield "negatives: unknown query id", edit(neg, json.dumps({"qid": "q9", "neg": ["d4"]}) + "\n"), negatives
    yield "negatives: unknown document id", edit(neg, json.dumps({"qid": "q0", "neg": ["d99"]}) + "\n"), negatives
    yield "negatives: judged positive listed as negative", edit(neg, json.dumps({"qid": "q0", "neg": ["d0"]}) + "\n"), negatives
    yield "teacher scores not finite", edit(neg, good_neg.replace("1.0", "NaN") + "\n"), negatives
    yield "negatives: query repeated", edit(neg, good_neg + "\n" + good_neg + "\n"), negatives
    yield "negatives: 'neg' not a list", edit(neg, json.dumps({"qid": "q0", "neg": "d4"}) + "\n"), negatives
    run = work / "run.trec"
    yield "run file line with 5 fields", edit(run, "q0 Q0 d1 1 0.5\n"), lambda: read_trec_run(run)
    yield "run file score not a number", edit(run, "q0 Q0 d1 1 high tag\n"), lambda: read_trec_run(run)
    yield "metrics.json not JSON", edit(work / "metrics.json", "{"), lambda: read_json(work / "metrics.json")
    sweep = work / "sweep"
    yield "report: folder without runs", lambda: sweep.mkdir(exist_ok=True), lambda: report(sweep, ["ndcg@10"])
    from hydra.utils import instantiate

    yield "config: loss.temperature=0", lambda: None, lambda: instantiate(compose_train(["loss.temperature=0"]).loss)
    for overrides, name in [(["batch_size=1"], "batch_size=1 with in-batch negatives"),
                            (["negatives=moco", "loss=samtone", "loss.side=document"], "MoCo with document-side SamToNe"),
                            (["negatives=moco", "model.shared_towers=false"], "MoCo with separate towers"),
                            (["negatives=bm25", "pairs=cropping"], "mined negatives with cropping pairs"),
                            (["loss=margin_mse"], "Margin-MSE without a scored negatives file"),
                            (["loss=margin_mse", "negatives=ance"], "Margin-MSE with ANCE re-mining"),
                            (["module=cross_encoder", "negatives=tas"], "cross-encoder with TAS clusters"),
                            (["model=cross_encoder", "negatives=bm25"], "cross-encoder model in a bi-encoder module"),
                            (["trainer.grad_cache_chunk=0"], "gradient cache chunk 0"),
                            (["optim.warmup_ratio=1.5"], "warm-up ratio 1.5"),
                            (["data.dev_fraction=0"], "dev fraction 0")]:
        yield f"config: {name}", lambda: None, lambda o=overrides: config.check_train_config(compose_train(o))
    # outputs that exist before a failing call to the entry point that would overwrite them
    out = work / "negatives-out.jsonl"
    yield ("mine: broken train qrels, an earlier negatives file at the output path",
           edit(folder / "qrels" / "train.tsv", "query-id\tcorpus-id\tscore\nq0\td0\n"),
           lambda: mine(compose_named("mine", [f"data.path={folder}", f"output={out}"])), out)
    teacher = work / "teacher"  # a model folder (config.json): score checks the teacher before the negatives file
    yield ("score: negatives file with an unknown id, an earlier scores file at the output path",
           lambda: (edit(neg, json.dumps({"qid": "q0", "neg": ["d99"]}) + "\n")(), teacher.mkdir(),
                    (teacher / "config.json").write_text("{}")),
           lambda: score(compose_named("score", [f"data.path={folder}", f"input={neg}", f"output={out}",
                                                 f"model.name_or_path={teacher}"])), out)
    earlier = sweep / "report" / "report.md"
    yield ("report: a run's metrics.json broken, an earlier report in place",
           lambda: ((sweep / "0").mkdir(parents=True), (sweep / "0" / "metrics.json").write_text("{")),
           lambda: report(sweep, ["ndcg@10"]), earlier)
    yield "config: model path missing", lambda: None, lambda: resolve_model_path("./missing/model")
    yield "config: model folder without config.json", lambda: (work / "empty_model").mkdir(), \
        lambda: resolve_model_path(str(work / "empty_model"))


def main() -> None:
    print("| # | bad input | message | earlier output intact |")
    print("| --- | --- | --- | --- |")
    number = 0
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(1000):
            case_dir = Path(tmp) / str(index)
            folder, work = beir(case_dir / "beir"), case_dir / "work"
            work.mkdir()
            try:
                name, breaks, call, *output = list(cases(folder, work))[index]
            except IndexError:
                break
            kept = output[0] if output else work / "metrics.json.before"
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text('{"after": {"ndcg@10": 0.7}}\n')  # an output from an earlier, successful call
            breaks()
            try:
                call()
                message = "NO ERROR"
            except Exception as err:  # noqa: BLE001  (a library may wrap our error, as Hydra's instantiate does)
                user_error = find_user_error(err)
                if user_error is None:
                    raise
                message = str(user_error).replace(tmp, "<tmp>").replace("|", "\\|")
            number += 1
            intact = kept.read_text() == '{"after": {"ndcg@10": 0.7}}\n'
            print(f"| {number} | {name} | {message} | {'yes' if intact else 'NO'} |")


if __name__ == "__main__":
    main()
