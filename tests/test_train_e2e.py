"""End to end: the train and evaluate entry points on a toy BEIR folder with a tiny model."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import run_module


@pytest.fixture(scope="module")
def train_run(tiny_model, beir_folder, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train_run")
    result = run_module("retrieval_lab.train", "data=beir", f"data.path={beir_folder}",
                        f"model.name_or_path={tiny_model}", "batch_size=8", "trainer.max_epochs=2",
                        "optim.lr=1e-3", "eval.batch_size=16", "validation.corpus_sample=30",
                        "validation.every_n_steps=3", "trainer.log_every_n_steps=1",
                        f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_train_writes_metrics_runs_and_logs(train_run):
    run_dir, result = train_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for stage in ("before", "after"):
        assert 0.0 <= metrics[stage]["ndcg@10"] <= 1.0
        assert (run_dir / stage / "run.trec").is_file()
    assert metrics["steps"] == 2 * (36 // 8)  # 40 train queries, 10% carved for dev, drop_last
    assert metrics["commit"] is None or len(metrics["commit"]) == 40
    assert "before" in result.stdout and "after" in result.stdout and "ndcg@10" in result.stdout
    csv_text = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/loss" in csv_text and "val/ndcg@10" in csv_text
    # validation at steps 3 and 6 (every_n_steps=3) and at the two epoch ends (steps 4 and 8)
    rows = list(csv.DictReader(csv_text.splitlines()))
    assert sum(1 for row in rows if row.get("val/ndcg@10")) == 4
    assert list((run_dir / "wandb").glob("offline-run-*")), "an offline W&B run is recorded"
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["batch_size"] == 8 and "commit" in info["git"]
    # the encoder settings in effect, not the model config's nulls (a tiny model, not a saved folder: the defaults)
    assert {k: info["model"][k] for k in ("pooling", "normalize", "shared_towers", "doc_max_length")} == \
           {"pooling": "mean", "normalize": True, "shared_towers": True, "doc_max_length": 256}
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_training_on_toy_data_improves_retrieval(train_run):
    run_dir, _ = train_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["after"]["mrr@10"] > metrics["before"]["mrr@10"]


def test_saved_model_loads_in_transformers_and_sentence_transformers(train_run, beir_folder):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from retrieval_lab.models.encoder import Encoder

    run_dir, _ = train_run
    texts = ["what about protein and cancer", "virus neuron study results"]
    ours = Encoder(str(run_dir / "model")).eval()
    with torch.no_grad():
        expected = ours.encode_docs(ours.tokenize(texts, "doc"))
        tok = AutoTokenizer.from_pretrained(run_dir / "model")
        hf = AutoModel.from_pretrained(run_dir / "model").eval()
        inputs = tok(texts, padding=True, return_tensors="pt")
        hidden = hf(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        by_hand = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    st = SentenceTransformer(str(run_dir / "model"), device="cpu")
    st_emb = torch.tensor(st.encode(texts))
    assert torch.allclose(by_hand, expected, atol=1e-5)
    assert torch.allclose(st_emb, expected, atol=1e-5)


def test_evaluate_dense_and_bm25(tiny_model, beir_folder, tmp_path):
    for retriever in ("dense", "bm25"):
        out = tmp_path / retriever
        result = run_module("retrieval_lab.evaluate", "data=beir", f"data.path={beir_folder}",
                            f"model.name_or_path={tiny_model}", f"retriever={retriever}", f"hydra.run.dir={out}")
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["retriever"] == ("DenseRetriever" if retriever == "dense" else "BM25Retriever")
        lines = (out / "run.trec").read_text().splitlines()
        assert len({line.split()[0] for line in lines}) == 12  # every test query has a ranking
    # BM25 on this toy data finds the right topic words: near-perfect
    assert json.loads((tmp_path / "bm25" / "metrics.json").read_text())["metrics"]["recall@100"] == 1.0
    # exact search with torch instead of faiss, and texts tokenised into a folder: the same rankings
    result = run_module("retrieval_lab.evaluate", "data=beir", f"data.path={beir_folder}",
                        f"model.name_or_path={tiny_model}", "retriever.index=torch", f"hydra.run.dir={tmp_path / 'torch'}",
                        f"token_cache_dir={tmp_path / 'tokens'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "tokens").glob("tokens-*.npz"))) == 2  # the corpus and the queries
    ranked = lambda run: [line.split()[:3] for line in (tmp_path / run / "run.trec").read_text().splitlines()]  # noqa: E731
    assert ranked("torch") == ranked("dense")


def test_sample_corpus_keeps_judged_documents_and_a_fixed_random_rest():
    from retrieval_lab.callbacks import sample_corpus
    from retrieval_lab.data.beir import BeirSplit

    corpus = {f"d{i}": f"text {i}" for i in range(50)}
    split = BeirSplit(corpus, {"q1": "a", "q2": "b"}, {"q1": {"d3": 1}, "q2": {"d40": 1, "d7": 2}})
    sample = sample_corpus(split, 10, seed=0)
    assert len(sample) == 10 and {"d3", "d7", "d40"} <= set(sample)
    assert all(sample[d] == corpus[d] for d in sample)
    assert sample == sample_corpus(split, 10, seed=0)
    assert set(sample) != set(sample_corpus(split, 10, seed=1))
    assert sample_corpus(split, None, seed=0) is corpus and sample_corpus(split, 60, seed=0) is corpus


def test_train_with_a_sampled_test_corpus_and_bad_wandb_mode(tiny_model, beir_folder, tmp_path):
    from retrieval_lab.callbacks import sample_corpus
    from retrieval_lab.data.beir import BeirDataset

    common = ["data=beir", f"data.path={beir_folder}", f"model.name_or_path={tiny_model}", "batch_size=8",
              "trainer.max_steps=1", "eval.before=false", "validation.enabled=false", "save_model=false"]
    bad = run_module("retrieval_lab.train", *common, "logger.wandb.mode=offlin", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode != 0
    assert "logger.wandb.mode=offlin is not offline, online or disabled." in bad.stderr
    result = run_module("retrieval_lab.train", *common, "eval.corpus_sample=30", "logger.wandb.mode=disabled",
                        f"hydra.run.dir={tmp_path / 'ok'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "ok" / "wandb").exists()
    kept = set(sample_corpus(BeirDataset(beir_folder).split("test"), 30, seed=0))
    ranked = {line.split()[2] for line in (tmp_path / "ok" / "after" / "run.trec").read_text().splitlines()}
    assert ranked <= kept and len(ranked) > 12


def test_a_resumed_run_keeps_the_csv_rows_logged_before(tiny_model, beir_folder, tmp_path):
    args = ["data=beir", f"data.path={beir_folder}", f"model.name_or_path={tiny_model}", "batch_size=8",
            "eval.before=false", "eval.after=false", "save_model=false", "logger=csv", "trainer.log_every_n_steps=1",
            f"hydra.run.dir={tmp_path}"]
    for epochs in (1, 2):  # the second command continues the first run from its last.ckpt
        result = run_module("retrieval_lab.train", *args, f"trainer.max_epochs={epochs}")
        assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines()))
    loss_steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    assert loss_steps == list(range(8))  # 4 steps an epoch: epoch 1's rows after epoch 0's
    assert sum(1 for row in rows if row.get("val/ndcg@10")) == 2


def test_a_step_validation_at_an_epoch_end_is_not_repeated(tiny_model, beir_folder, tmp_path):
    """With validation.every_n_steps=4 and epochs of 4 steps, each epoch end is also a step validation: the same
    weights are validated (and logged) once, not twice."""
    from test_combinations import compose_train

    from retrieval_lab.train import train

    cfg = compose_train(["data=beir", f"data.path={beir_folder}", f"model.name_or_path={tiny_model}", "batch_size=8",
                         "trainer.max_epochs=2", "eval.before=false", "eval.after=false", "logger=csv",
                         "save_model=false", "trainer.enable_progress_bar=false", "eval.batch_size=16",
                         "validation.corpus_sample=30", "validation.every_n_steps=4", "trainer.log_every_n_steps=1"])
    train(cfg, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert [int(row["step"]) for row in rows if row.get("val/ndcg@10")] == [3, 7]


def test_rerunning_a_finished_run_changes_nothing_and_continuing_it_keeps_its_before_scores(tiny_model, beir_folder,
                                                                                         tmp_path):
    """The command of a finished run, rerun in its folder, trains nothing and rewrites nothing (metrics.json, the run
    files, the CSV log stay as they were); rerun with one more epoch, it continues and reuses the untrained model's
    test scores instead of evaluating it again."""
    from test_combinations import compose_train

    from retrieval_lab.train import train

    args = ["data=beir", f"data.path={beir_folder}", f"model.name_or_path={tiny_model}", "batch_size=8",
            "logger=csv", "save_model=false", "trainer.enable_progress_bar=false", "eval.batch_size=16",
            "validation.enabled=false", "trainer.log_every_n_steps=1"]
    first = train(compose_train(args + ["trainer.max_epochs=1"]), tmp_path)

    def files():  # each file's bytes, and for the outputs when they were written
        outputs = ("metrics.json", "before/run.trec", "after/run.trec", "checkpoints/last.ckpt")
        return {p.relative_to(tmp_path): (p.read_bytes(), str(p.relative_to(tmp_path)) in outputs and p.stat().st_mtime_ns)
                for p in tmp_path.rglob("*") if p.is_file()}

    before = files()
    assert train(compose_train(args + ["trainer.max_epochs=1"]), tmp_path) == first
    assert files() == before
    continued = train(compose_train(args + ["trainer.max_epochs=2"]), tmp_path)
    assert continued["before"] == first["before"] and files()[Path("before/run.trec")] == before[Path("before/run.trec")]
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2 * json.loads(
        before[Path("metrics.json")][0])["steps"]
