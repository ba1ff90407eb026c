"""Every bad-input case we check, run through the real readers and entry-point functions: the message each one
gives, and whether an output written before the failing call is still intact.

    python experiments/bad_input.py > bad_input.md

Each case starts from a small valid BEIR folder (and a valid negatives file, run file and sweep folder) and
breaks one thing. An output written earlier (a negatives file, metrics.json, a report) sits where the failing
call would write; the last column says whether its bytes are unchanged afterwards. A crafted file (a checkpoint, a
token cache, model weights, a model's custom code) would create a marker file if it ran code: the column would then
say CODE RAN. A call that only warns shows its warning; one that neither fails nor warns shows NO ERROR. Process ids,
host names, times and the toy zip's md5 are replaced by placeholders, so that the table regenerates the same.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import re
import subprocess
import sys
import tempfile
import warnings
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
from retrieval_lab.retrieval.runfile import read_json, read_trec_run, write_json, write_trec_run  # noqa: E402
from conftest import make_tiny_model  # noqa: E402
from test_fetch import make_zip  # noqa: E402

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


class Payload:
    """Unpickled, it would create the file ``marker`` (a crafted checkpoint, cache or weights file carries it)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return builtins.open, (self.marker, "w")


def copy_model(model: Path, folder: Path, drop=(), change=None) -> Path:
    """A copy of the tiny model folder without the files in ``drop``; ``change(folder)`` then edits it."""
    import shutil

    shutil.copytree(model, folder, ignore=lambda _, names: [n for n in names if n in drop])
    if change is not None:
        change(folder)
    return folder


def renamed_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    save_file({f"encoder_v2.{k}": v for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def pickled_weights(folder: Path) -> None:
    import torch

    (folder / "model.safetensors").unlink()
    torch.save({"payload": Payload(folder / "marker")}, folder / "pytorch_model.bin")


def custom_code(folder: Path) -> None:
    """A model type transformers does not know, whose classes its own custom.py would define (and which would create
    the marker on import)."""
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_bert", auto_map={"AutoConfig": "custom.Config", "AutoModel": "custom.Model"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"import pathlib\npathlib.Path({str(folder / 'marker')!r}).touch()\n")


def full_disk(handle) -> None:
    handle.write(b"half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def expect_exit(call):
    """Run ``call`` (an entry point's own code that stops with exit status 2) with its stderr captured; its last line
    becomes the UserError the table shows."""
    from retrieval_lab.errors import UserError

    def run():
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                call()
        except SystemExit as exit_:
            lines = err.getvalue().strip().splitlines()
            raise UserError(f"(exit {exit_.code}) {lines[-1].removeprefix('error: ') if lines else ''}") from None
    return run


def locked_by_another_process(folder: Path, call):
    """``call`` while a second process holds ``folder``'s lock (as a running training would)."""
    def run():
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from retrieval_lab.run_folder import lock; "
                                   f"lock({str(folder)!r}); print('held', flush=True); time.sleep(120)"],
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            holder.stdout.readline()
            call()
        finally:
            holder.kill()
            holder.wait()
    return run


def cases(folder: Path, work: Path, model: Path):
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
    # ids, outputs other tools must read
    yield "corpus id holding a space", edit(corpus, corpus.read_text() + '{"_id": "d 9", "text": "x"}\n'), load
    yield "query id holding a tab", edit(queries, queries.read_text() + '{"_id": "q\\t9", "text": "x"}\n'), load
    yield "run file: document id with a space (written)", lambda: None, \
        lambda: write_trec_run({"q0": {"d 0": 1.0}}, work / "run.trec"), work / "run.trec"
    yield "run file: NaN score (written)", lambda: None, \
        lambda: write_trec_run({"q0": {"d0": float("nan")}}, work / "run.trec"), work / "run.trec"
    yield "metrics.json: NaN metric (written)", lambda: None, \
        lambda: write_json(work / "metrics.json", {"after": {"ndcg@10": float("nan")}}), work / "metrics.json"
    # files that could run code
    from retrieval_lab.files import atomic_save_folder, atomic_write, load_checkpoint

    ckpt = work / "last.ckpt"
    yield ("checkpoint holding a pickled object (resume=...)",
           lambda: __import__("torch").save({"global_step": 1, "x": Payload(work / "marker")}, ckpt),
           lambda: load_checkpoint(ckpt, f"resume={ckpt}"))
    yield "checkpoint that is a text file", edit(ckpt, "not a checkpoint"), lambda: load_checkpoint(ckpt, "resume=auto")
    yield "checkpoint whose global_step is a word", lambda: __import__("torch").save({"global_step": "abc"}, ckpt), \
        lambda: load_checkpoint(ckpt, "resume=auto")
    yield "checkpoint without global_step", lambda: __import__("torch").save({"state_dict": {}}, ckpt), \
        lambda: load_checkpoint(ckpt, "resume=auto")
    yield "negatives file that is a pickle", edit(neg, __import__("pickle").dumps(Payload(work / "marker"))), negatives

    def cache_with_objects():
        import numpy as np

        from retrieval_lab.models.encoder import load_tokenizer
        from retrieval_lab.tokenization import TokenCache, rust_tokenizer

        tokenizer, texts = load_tokenizer(str(model)), ["a text", "another text"]
        cache = TokenCache(folder=work / "tokens")
        file = cache.file(rust_tokenizer(tokenizer, 16), texts)
        file.parent.mkdir(parents=True, exist_ok=True)
        payload = np.empty(1, dtype=object)
        payload[0] = Payload(work / "marker")
        np.savez(file, order=payload, flat=payload, offsets=payload)
        list(cache.stream(tokenizer, texts, 16))

    yield "token cache holding pickled objects (a warning: tokenised again)", lambda: None, cache_with_objects

    def cache_with_other_ids():
        from retrieval_lab.models.encoder import load_tokenizer
        from retrieval_lab.tokenization import TokenCache

        tokenizer, texts = load_tokenizer(str(model)), ["a text", "another text"]
        list(TokenCache(folder=work / "tokens").stream(tokenizer, texts, 16))
        file = next((work / "tokens").glob("*.npz"))
        import numpy as np

        with np.load(file) as saved:
            arrays = {name: saved[name] for name in saved.files}
        arrays["flat"] = np.full_like(arrays["flat"], 1037)
        np.savez(file, **arrays)
        list(TokenCache(folder=work / "tokens").stream(tokenizer, texts, 16))

    yield "token cache whose ids are not the tokenizer's (a warning: tokenised again)", lambda: None, \
        cache_with_other_ids
    from retrieval_lab.models.cross_encoder import CrossEncoder, require_trained_head
    from retrieval_lab.models.encoder import Encoder

    bad = work / "bad_model"
    yield "model folder without tokenizer files", lambda: None, \
        lambda: Encoder(str(copy_model(model, bad, drop=("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                                                         "special_tokens_map.json"))))
    yield "model weights that do not fit the config", lambda: None, \
        lambda: Encoder(str(copy_model(model, bad, change=renamed_weights)))
    yield "model weights as a pickle holding code", lambda: None, \
        lambda: Encoder(str(copy_model(model, bad, change=pickled_weights)))
    yield "model asking for custom code (auto_map)", lambda: None, \
        lambda: Encoder(str(copy_model(model, bad, change=custom_code)))
    yield "model.doc_max_length=abc", lambda: None, lambda: Encoder(str(model), doc_max_length="abc")
    yield "model.query_max_length=-5", lambda: None, lambda: Encoder(str(model), query_max_length=-5)
    yield "cross-encoder max_length=0", lambda: None, lambda: CrossEncoder(str(model), max_length=0)
    yield "model.doc_max_length=1000 on a model of 128 positions", lambda: None, \
        lambda: Encoder(str(model), doc_max_length=1000)
    yield "config.json naming an unknown model type", lambda: None, \
        lambda: Encoder(str(copy_model(model, bad, change=lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace('"model_type": "bert"', '"model_type": "no_such_type"')))))
    yield "re-ranking with an untrained score head", lambda: None, \
        lambda: require_trained_head(CrossEncoder(str(model), max_length=16), "reranker.model.name_or_path")
    yield ("score: a teacher without a trained score head, an earlier scores file at the output path",
           edit(neg, good_neg + "\n"),
           lambda: score(compose_named("score", [f"data.path={folder}", f"input={neg}", f"output={out}",
                                                 f"model.name_or_path={model}", "model.max_length=16"])), out)
    yield ("mine: denoising with an untrained score head, an earlier negatives file at the output path", lambda: None,
           lambda: mine(compose_named("mine", [f"data.path={folder}", f"output={out}", f"denoise.cross_encoder={model}",
                                               "denoise.max_length=16"])), out)
    # training settings that train nothing
    for overrides, name in [(["trainer.max_steps=0"], "trainer.max_steps=0"),
                            (["+trainer.limit_train_batches=0"], "trainer.limit_train_batches=0")]:
        yield f"config: {name}", lambda: None, lambda o=overrides: config.check_train_config(compose_train(o))
    # data fetch
    from retrieval_lab.data.fetch import fetch

    data = work / "data"
    yield "fetch: name with '..'", lambda: None, lambda: fetch("../scifact", data, folder)
    yield "fetch: --source is a plain file", lambda: None, lambda: fetch("toy", data, corpus)
    yield "fetch: --dest is a file", lambda: None, lambda: fetch("toy", work / "dest.txt", folder), \
        work / "dest.txt"
    yield "fetch: --source zip whose md5 differs from BEIR's", lambda: make_zip(folder, work / "scifact.zip"), \
        lambda: fetch("scifact", data, work / "scifact.zip")
    yield "fetch: zip member with a '..' path", \
        lambda: make_zip(folder, work / "toy.zip", {"../evil.txt": "x"}), lambda: fetch("toy", data, work / "toy.zip")
    yield "fetch: download of an unpublished name without --md5", lambda: None, lambda: fetch("mydata", data)
    # run folders and refused writes
    from retrieval_lab.run_folder import lock

    run_dir = work / "run"
    yield "run folder locked by a running process", lambda: None, \
        locked_by_another_process(run_dir, expect_exit(lambda: lock(run_dir))), run_dir / "metrics.json"
    yield "run folder under a file", lambda: None, \
        expect_exit(lambda: lock(work / "notes.txt" / "run")), work / "notes.txt"
    yield "checkpoint write on a full disk", lambda: None, lambda: atomic_write(work / "metrics.json.before", full_disk)
    yield "model folder save on a full disk", lambda: None, \
        lambda: atomic_save_folder(work / "model", lambda p: (p.mkdir(), full_disk(open(p / "w.bin", "wb")))), \
        work / "model" / "config.json"
    yield "non-finite embeddings", lambda: None, lambda: __import__("retrieval_lab.retrieval.dense").retrieval.dense \
        .refuse_non_finite([[0.1, float("nan")]], ["d0"], "document embeddings")


def main() -> None:
    print("| # | bad input | message | earlier output intact |")
    print("| --- | --- | --- | --- |")
    number = 0
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny_model")
        for index in range(1000):
            case_dir = Path(tmp) / str(index)
            folder, work = beir(case_dir / "beir"), case_dir / "work"
            work.mkdir()
            try:
                name, breaks, call, *output = list(cases(folder, work, model))[index]
            except IndexError:
                break
            kept = output[0] if output else work / "metrics.json.before"
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text('{"after": {"ndcg@10": 0.7}}\n')  # an output from an earlier, successful call
            breaks()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    call()
                told = [str(w.message) for w in caught if "retrieval_lab" in w.filename]
                message = f"warning: {told[0]}" if told else "NO ERROR"
            except Exception as err:  # noqa: BLE001  (a library may wrap our error, as Hydra's instantiate does)
                user_error = find_user_error(err)
                if user_error is None:
                    raise
                message = str(user_error)
            message = re.sub(r"process \d+ on \S+ \(started [0-9-]+ [0-9:]+:", "process <pid> on <host> (started <time>:",
                             message.replace(tmp, "<tmp>").replace(sys.executable, "python"))
            message = re.sub(r"md5 [0-9a-f]{32}, not", "md5 <md5 of the toy zip>, not", message).replace("|", "\\|")
            number += 1
            intact = kept.read_text() == '{"after": {"ndcg@10": 0.7}}\n'
            ran = (work / "marker").exists() or any(Path(tmp).rglob("marker"))
            print(f"| {number} | {name} | {message} | {'yes' if intact else 'NO'}{' (CODE RAN)' if ran else ''} |")


if __name__ == "__main__":
    main()
