"""A run never ends "successfully" with a number that means nothing: training that takes no step is refused (before it
starts where the settings say so, after the fit where only the fit can tell), and ids that would break the run file
are refused where they are read."""
from __future__ import annotations

import json

import pytest

from conftest import run_module


def train(tiny_model, beir_folder, run_dir, *extra):
    return run_module("retrieval_lab.train", "data=beir", f"data.path={beir_folder}", f"model.name_or_path={tiny_model}",
                      "logger=csv", "batch_size=4", "validation.enabled=false", "trainer.enable_progress_bar=false",
                      f"hydra.run.dir={run_dir}", *extra)


@pytest.mark.parametrize("setting,message", [
    ("trainer.max_steps=0", "error: trainer.max_steps=0 trains nothing, so the pretrained weights would be saved and "
                            "reported as the trained model (set trainer.max_steps > 0, or -1 for no step limit)."),
    ("+trainer.limit_train_batches=0", "error: trainer.limit_train_batches=0 trains on no batch (a fraction in (0, 1], "
                                       "a number of batches, or null for all)."),
])
def test_settings_that_train_nothing_are_refused_before_anything_runs(setting, message, tiny_model, beir_folder,
                                                                      tmp_path):
    result = train(tiny_model, beir_folder, tmp_path / "run", setting)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / "run" / "before").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_a_fit_that_takes_no_step_saves_no_model_and_reports_no_after(tiny_model, beir_folder, tmp_path):
    """Only the fit can tell here (a time limit reached before the first step): the 'before' figures stay on disk, but
    no model folder and no metrics.json claim a trained model."""
    result = train(tiny_model, beir_folder, tmp_path / "run", "+trainer.max_time=00:00:00:00", "eval.corpus_sample=20")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: training took no optimiser step (40 training "
                                                             "examples, trainer.max_steps=-1, trainer.max_epochs=3)")
    assert (tmp_path / "run" / "before" / "run.trec").is_file()
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "after").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("file,record,message", [
    ("corpus.jsonl", {"_id": "d 1", "title": "t", "text": "x"}, "id 'd 1' holds white space"),
    ("corpus.jsonl", {"_id": "d\t2", "text": "x"}, "id 'd\\\\t2' holds white space"),
    ("queries.jsonl", {"_id": "q 1", "text": "a query"}, "id 'q 1' holds white space"),
])
def test_ids_with_white_space_are_refused_where_they_are_read(file, record, message, beir_folder, tmp_path):
    import shutil

    from retrieval_lab.data.beir import BeirDataset
    from retrieval_lab.errors import DataError

    folder = tmp_path / "beir"
    shutil.copytree(beir_folder, folder)
    lines = (folder / file).read_text().splitlines()
    (folder / file).write_text("\n".join(lines[:3] + [json.dumps(record)] + lines[3:]) + "\n")
    with pytest.raises(DataError, match=rf"^{folder / file} line 4: {message}, which TREC run files \(and trec_eval\) "
                                        r"cannot hold; rename it\.$"):
        BeirDataset(folder).split("test")


def test_a_run_file_is_never_written_with_a_line_trec_tools_cannot_read(tmp_path):
    """A run built elsewhere (a fusion of other files, a user's own retriever) with such an id or tag is refused, and
    an earlier run file at the path stays; every line written has the 6 fields trec_eval reads."""
    from retrieval_lab.errors import DataError
    from retrieval_lab.retrieval.runfile import read_trec_run, write_trec_run

    path = tmp_path / "run.trec"
    write_trec_run({"q1": {"d1": 0.5, "d2": 0.25}}, path)
    earlier = path.read_bytes()
    assert all(len(line.split()) == 6 for line in earlier.decode().splitlines())
    for run, tag in (({"q 1": {"d1": 1.0}}, "t"), ({"q1": {"d 1": 1.0}}, "t"), ({"q1": {"d1": 1.0}}, "my run"),
                     ({"q1": {"": 1.0}}, "t")):
        with pytest.raises(DataError, match=f"^{path} not written: .* is empty or holds white space"):
            write_trec_run(run, path, tag=tag)
        assert path.read_bytes() == earlier
    assert read_trec_run(path) == {"q1": {"d1": 0.5, "d2": 0.25}}


def test_non_finite_embeddings_or_scores_are_refused_not_ranked(tiny_model, beir_folder):
    """A model whose layer norms hold NaN embeds every text as NaN: the search would return an arbitrary order and a
    near-zero nDCG; it stops with one sentence naming the first text instead. The same for re-ranking scores."""
    import torch

    from retrieval_lab.data.beir import BeirDataset
    from retrieval_lab.errors import UserError
    from retrieval_lab.models.encoder import Encoder
    from retrieval_lab.retrieval.dense import DenseRetriever, refuse_non_finite

    split = BeirDataset(beir_folder).split("test")
    encoder = Encoder(str(tiny_model))
    with torch.no_grad():
        for name, weight in encoder.named_parameters():
            if "LayerNorm" in name:  # e.g. weights broken by an fp16 overflow in training
                weight.fill_(float("nan"))
    retriever = DenseRetriever(encoder, batch_size=16, device="cpu", progress=False, tokenize_processes=0)
    with pytest.raises(UserError, match=r"^the model gave non-finite document embeddings for 60 of 60 \(the first: "
                                        r"'d0'\), which would rank them arbitrarily"):
        retriever.retrieve(split.corpus, split.queries, 10)
    with pytest.raises(UserError, match=r"non-finite re-ranking scores for 1 of 3 \(the first: 'q2 d7'\)"):
        refuse_non_finite([0.5, float("inf"), 0.1], ["q1 d1", "q2 d7", "q3 d3"], "re-ranking scores")
    refuse_non_finite(torch.ones(3, 4).numpy(), ["a", "b", "c"], "embeddings")  # finite: nothing to say


def test_outputs_hold_no_number_other_readers_refuse(tmp_path):
    """Python writes NaN into JSON as ``NaN`` (outside the standard: jq, JavaScript and others refuse the file) and into
    a run file as ``nan``: both are refused, naming the key or the pair, and the earlier file stays."""
    from retrieval_lab.errors import DataError
    from retrieval_lab.retrieval.runfile import write_json, write_trec_run

    write_json(tmp_path / "metrics.json", {"after": {"ndcg@10": 0.5}})
    with pytest.raises(DataError, match=r"metrics.json not written: after.ndcg@10 is nan, which is no number"):
        write_json(tmp_path / "metrics.json", {"after": {"ndcg@10": float("nan")}, "steps": 3})
    with pytest.raises(DataError, match=r"not written: runs\[1\] is inf"):
        write_json(tmp_path / "metrics.json", {"runs": [1.0, float("inf")]})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"after": {"ndcg@10": 0.5}}
    with pytest.raises(DataError, match=r"run.trec not written: the score of 'd2' for 'q1' is nan, which orders"):
        write_trec_run({"q1": {"d1": 1.0, "d2": float("nan")}}, tmp_path / "run.trec")
    assert not (tmp_path / "run.trec").exists()


@pytest.mark.parametrize("entry,args,key", [
    ("evaluate", ["retriever=bm25", "reranker=cross_encoder"], "reranker.model.name_or_path"),
    ("mine", ["denoise.max_length=64"], "denoise.cross_encoder"),
    ("score", [], "model.name_or_path"),
])
def test_a_cross_encoder_without_a_trained_score_head_does_not_score(entry, args, key, tiny_model, beir_folder,
                                                                   bm25_negatives, tmp_path):
    """A base or bi-encoder model given where a trained cross-encoder belongs gets a score head at random: its
    re-ranking metrics, teacher scores or denoising would be noise. Refused, naming the key."""
    import shutil

    folder = shutil.copytree(beir_folder, tmp_path / "beir")
    given = {"evaluate": [f"reranker.model.name_or_path={tiny_model}", "reranker.model.max_length=64"],
             "mine": [f"denoise.cross_encoder={tiny_model}"],
             "score": [f"model.name_or_path={tiny_model}", f"input={bm25_negatives}",
                       f"output={tmp_path / 'ce.jsonl'}"]}[entry]
    result = run_module(f"retrieval_lab.{entry}", "data=beir", f"data.path={folder}", *args, *given,
                        f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {key}={tiny_model} has no trained score head (a new one would start at random), so its scores would "
        "mean nothing; give a cross-encoder trained with module=cross_encoder (its <run dir>/model).")
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "ce.jsonl").exists()
    assert not (folder / "negatives").exists()


def test_a_lightning_refusal_of_a_trainer_setting_is_one_sentence(tiny_model, beir_folder, tmp_path):
    """limit_train_batches=0.01 of 10 batches is 0 batches: Lightning's own sentence, not its traceback."""
    result = train(tiny_model, beir_folder, tmp_path / "run", "+trainer.limit_train_batches=0.01",
                   "eval.before=false")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "limit_train_batches" in last, last


def test_a_length_beyond_the_models_positions_is_refused_naming_the_key(tiny_model):
    """The tiny model has 128 positions: an explicit longer length is refused when the encoder is built; a default
    longer than that (256) is refused only by a batch that reaches past the positions, before the model sees it."""
    from retrieval_lab.errors import ConfigError
    from retrieval_lab.models.cross_encoder import CrossEncoder
    from retrieval_lab.models.encoder import Encoder

    with pytest.raises(ConfigError, match=rf"^model.doc_max_length=1000 is longer than the 128 positions of model "
                                          rf"'{tiny_model}'; set model.doc_max_length to 128 or less\.$"):
        Encoder(str(tiny_model), doc_max_length=1000)
    encoder = Encoder(str(tiny_model))  # doc_max_length 256 by default
    long_text = " ".join(["protein"] * 300)
    assert encoder.encode_docs(encoder.tokenize(["short text"], "doc")).shape == (1, 32)
    with pytest.raises(ConfigError, match=r"^texts of 256 tokens are longer than the 128 positions of model .*; set "
                                          r"model.query_max_length / model.doc_max_length to 128 or less\.$"):
        encoder.encode_docs(encoder.tokenize([long_text], "doc"))
    cross = CrossEncoder(str(tiny_model), max_length=320)
    with pytest.raises(ConfigError, match=r"^texts of \d+ tokens .*set the cross-encoder's max_length to 128"):
        cross(cross.tokenize(["a query"], [long_text]))
