"""Cross-encoder, scoring step, re-ranking, RocketQA-v2 and the teacher losses through the real entry points
(tiny random models, toy data)."""
from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import ROOT, run_module
from retrieval_lab.models.family import loss_on_vectors
from retrieval_lab import config
from retrieval_lab.data.beir import BeirDataset, Document
from retrieval_lab.data.datamodule import GroupCollator
from retrieval_lab.data.negatives import QueryNegatives, read_negatives
from retrieval_lab.data.pairs import SupervisedPairs
from retrieval_lab.errors import ConfigError
from retrieval_lab.losses.listwise_kl import ListwiseKLLoss
from retrieval_lab.mining.negatives import denoise, score_negatives
from retrieval_lab.models.cross_encoder import CrossEncoder
from retrieval_lab.models.encoder import Encoder
from retrieval_lab.models.rocketqa import RocketQAModule
from retrieval_lab.retrieval.rerank import Reranker
from retrieval_lab.train import train

FAST = ["eval.before=false", "eval.after=false", "validation.enabled=false", "logger=csv", "save_model=false",
        "trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "batch_size=4"]


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


class LengthTeacher:
    """A stand-in cross-encoder whose score is known in advance: the number of query words found in the doc."""

    def score_texts(self, queries, docs, batch_size=64, device=None, progress=True):
        return [float(sum(w in d.split() for w in q.split())) for q, d in zip(queries, docs)]


@pytest.fixture(scope="module")
def saved_cross_encoder(tiny_model, tmp_path_factory):
    torch.manual_seed(0)
    return CrossEncoder(tiny_model, max_length=64).save(tmp_path_factory.mktemp("ce") / "model")


def test_cross_encoder_scores_pairs_in_input_order_and_reloads(saved_cross_encoder):
    ce = CrossEncoder(saved_cross_encoder, max_length=64)
    queries, docs = ["protein cancer", "virus", "gene cell brain"], ["a protein study", "virus gene heart", "x"]
    one_by_one = [ce.score_texts([q], [d], batch_size=1, progress=False)[0] for q, d in zip(queries, docs)]
    batched = ce.score_texts(queries, docs, batch_size=2, progress=False)
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    reloaded = CrossEncoder(saved_cross_encoder, max_length=64).score_texts(queries, docs, progress=False)
    assert reloaded == pytest.approx(batched, abs=1e-6)
    from transformers import AutoModelForSequenceClassification  # a plain Hugging Face folder

    assert AutoModelForSequenceClassification.from_pretrained(saved_cross_encoder).config.num_labels == 1


def test_reranker_orders_the_first_stage_candidates_by_cross_encoder_score():
    corpus = {f"d{i}": Document("", text) for i, text in
              enumerate(["cancer gene", "cancer", "gene virus cancer", "brain"])}

    class FirstStage:
        def retrieve(self, corpus, queries, k):
            return {"q": {"d3": 4.0, "d1": 3.0, "d0": 2.0, "d2": 1.0}}

    run = Reranker(FirstStage(), LengthTeacher(), depth=3).retrieve(corpus, {"q": "gene cancer"}, k=10)
    # depth 3 keeps d3, d1, d0 (d2 is never re-scored); scores = words of the query found: d0 2, d1 1, d3 0
    assert list(run["q"]) == ["d0", "d1", "d3"] and run["q"]["d0"] == 2.0


def test_scoring_step_scores_every_listed_document():
    records = {"q1": QueryNegatives(["d0"], ["d1", "d2"], {"d1": 9.0})}
    corpus = {f"d{i}": Document("", t) for i, t in enumerate(["gene cancer", "gene", "brain"])}
    out = score_negatives(records, {"q1": "gene cancer"}, corpus, LengthTeacher())
    assert out["q1"].pos == ["d0"] and out["q1"].neg == ["d1", "d2"]
    assert out["q1"].scores == {"d0": 2.0, "d1": 1.0, "d2": 0.0}


def test_score_cli_writes_cross_encoder_scores(saved_cross_encoder, bm25_negatives, beir_folder, tmp_path):
    out = tmp_path / "ce.jsonl"
    result = run_module("retrieval_lab.score", "data=beir", f"data.path={beir_folder}", f"input={bm25_negatives}",
                        f"output={out}", f"model.name_or_path={saved_cross_encoder}", "model.max_length=64",
                        f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    dataset = BeirDataset(beir_folder)
    scored, source = read_negatives(out, dataset), read_negatives(bm25_negatives, dataset)
    qid = sorted(scored)[0]
    r = scored[qid]
    assert (r.pos, r.neg) == (source[qid].pos, source[qid].neg) and set(r.scores) == set(r.pos + r.neg)
    docs = r.pos + r.neg
    expected = CrossEncoder(saved_cross_encoder, max_length=64).score_texts([dataset.queries[qid]] * len(docs),
                                                                      [dataset.corpus[d].full_text for d in docs])
    assert [r.scores[d] for d in docs] == pytest.approx(expected, abs=1e-5)
    same = run_module("retrieval_lab.score", "data=beir", f"data.path={beir_folder}", f"input={out}", f"output={out}",
                      f"model.name_or_path={saved_cross_encoder}", f"hydra.run.dir={tmp_path / 'run2'}")
    assert same.returncode == 2 and "would overwrite the input file" in same.stderr


def test_denoising_drops_candidates_scored_like_a_positive():
    mined = {"q": QueryNegatives(["d0"], ["d1", "d2", "d3"], {"d0": 5.0, "d1": 4.0, "d2": 3.0, "d3": 1.0})}
    corpus = {f"d{i}": Document("", t) for i, t in
              enumerate(["gene cancer x", "gene cancer", "brain", "gene"])}
    out, dropped = denoise(mined, {"q": "gene cancer"}, corpus, LengthTeacher())
    assert out["q"].neg == ["d2", "d3"] and dropped == 1 and "d1" not in out["q"].scores
    out, dropped = denoise(mined, {"q": "gene cancer"}, corpus, LengthTeacher(), margin=1.0)
    assert out["q"].neg == ["d2"] and dropped == 2


def test_teacher_scores_ride_along_with_the_group(beir_folder):
    dataset = BeirDataset(beir_folder)
    qrels = dataset.qrels("train")
    qids = sorted(qrels)
    negatives = {q: QueryNegatives(sorted(qrels[q]), ["d50", "d51", "d52"],
                                   {**{p: 10.0 for p in qrels[q]}, "d50": 1.0, "d51": 2.0, "d52": 3.0})
                 for q in qids[1:]}
    negatives[qids[0]] = QueryNegatives(sorted(qrels[qids[0]]), ["d50"], {"d50": 1.0})  # positive unscored
    pairs = SupervisedPairs(dataset, qrels, group_size=3, negatives=negatives, teacher=True)
    assert pairs.skipped == 1 and qids[0] not in pairs.qids
    examples = [pairs[i] for i in range(4)]
    for ex in examples:
        assert ex["teacher"] == [negatives[ex["qid"]].scores[d] for d in ex["doc_ids"]]
    batch = GroupCollator(None, None, None)(examples)
    assert batch["teacher"].shape == (4, 3) and "query" not in batch


def test_margin_mse_and_listwise_kl_train_on_a_scored_file(bm25_negatives, tiny_model, beir_folder, tmp_path):
    for loss in ("margin_mse", "listwise_kl"):
        overrides = ["negatives=bm25", f"negatives.file={bm25_negatives}", "negatives.group_size=3", f"loss={loss}",
                     "data=beir", f"data.path={beir_folder}", f"model.name_or_path={tiny_model}", *FAST]
        train(compose_train(overrides), tmp_path / loss)
        assert json.loads((tmp_path / loss / "metrics.json").read_text())["steps"] == 2


def test_cross_encoder_trains_and_reranks_through_the_cli(bm25_negatives, tiny_model, beir_folder, tmp_path):
    result = run_module("retrieval_lab.train", "module=cross_encoder", f"negatives.file={bm25_negatives}",
                        "negatives.group_size=3", "data=beir", f"data.path={beir_folder}",
                        f"model.name_or_path={tiny_model}", "model.max_length=64", "module.rerank_depth=10",
                        "trainer.max_epochs=1", "batch_size=4", "logger=csv", "eval.before=false",
                        f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 36 // 4 and 0 <= metrics["after"]["ndcg@10"] <= 1
    assert "val/ndcg@10" in (tmp_path / "csv" / "metrics.csv").read_text()
    rerank = run_module("retrieval_lab.evaluate", "retriever=bm25", "reranker=cross_encoder",
                        f"reranker.model.name_or_path={tmp_path / 'model'}", "reranker.model.max_length=64",
                        "reranker.depth=10", "data=beir", f"data.path={beir_folder}", f"hydra.run.dir={tmp_path / 'ev'}")
    assert rerank.returncode == 0, rerank.stderr[-3000:]
    reranked = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    # the training run's test evaluation is the same pipeline: BM25 top 10 re-ranked by the saved model
    assert reranked["ndcg@10"] == pytest.approx(metrics["after"]["ndcg@10"], abs=1e-4)


def test_rocketqa_trains_retriever_and_ranker(bm25_negatives, tiny_model, beir_folder, tmp_path):
    overrides = ["module=rocketqa", f"negatives.file={bm25_negatives}", "negatives.group_size=3", "data=beir",
                 f"data.path={beir_folder}", f"model.name_or_path={tiny_model}",
                 f"module.cross_encoder.name_or_path={tiny_model}", "module.cross_encoder.max_length=64", *FAST]
    overrides[overrides.index("save_model=false")] = "save_model=true"
    train(compose_train(overrides), tmp_path)
    log = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/retriever_loss" in log and "train/ranker_loss" in log
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "cross_encoder" / "config.json").is_file()


def test_rocketqa_ranker_learns_from_labels_only_and_retriever_from_the_ranker(tiny_model, beir_folder):
    torch.manual_seed(0)
    encoder = Encoder(tiny_model, query_max_length=16, doc_max_length=32)
    ranker = CrossEncoder(tiny_model, max_length=48).eval()  # no dropout: two forward passes agree
    encoder.eval()
    module = RocketQAModule(encoder, ListwiseKLLoss(temperature=0.1), ranker, group_size=3)
    texts = ["gene cancer study", "brain lung", "virus data", "cell role", "heart blood bone", "skin model"]
    examples = [{"qid": f"q{i}", "query": q, "doc_ids": [f"d{3 * i + j}" for j in range(3)], "positives": set(),
                 "docs": texts[3 * i:3 * i + 3]} for i, q in enumerate(["gene cancer", "heart bone"])]
    batch = GroupCollator(encoder.tokenizer, 16, 32, (ranker.tokenizer, 48))(examples)
    module.training_step(batch, 0).backward()
    grads = {n: p.grad.clone() for n, p in ranker.named_parameters() if p.grad is not None}
    module.zero_grad()
    logits = ranker(batch["pairs"]).view(2, 3)
    torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long)).backward()
    for name, p in ranker.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, atol=1e-6), name
    module.zero_grad()
    q, d = module(batch)
    kl = loss_on_vectors(ListwiseKLLoss(temperature=0.1), q, d, 3, teacher=logits.detach())
    assert module.training_step(batch, 0).item() == pytest.approx(
        kl.item() + torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long)).item(), rel=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["loss=margin_mse"], "loss=MarginMSELoss needs groups of hard negatives"),
    (["loss=listwise_kl", "negatives=moco"], "loss=ListwiseKLLoss needs teacher scores for each query's group"),
    (["loss=margin_mse", "negatives=ance"], "negatives=ance cannot be used with loss=MarginMSELoss"),
    (["module=cross_encoder", "negatives=tas"], "module=cross_encoder trains on fixed negatives files"),
    (["module=cross_encoder", "negatives.group_size=1"], "module=cross_encoder needs groups of hard negatives"),
    (["module=rocketqa", "negatives=inbatch"], "module=rocketqa needs groups of hard negatives"),
    (["model=cross_encoder", "negatives=bm25"], "a cross-encoder is trained with module=cross_encoder"),
    (["module=cross_encoder", "model=minilm"], "a cross-encoder is trained with module=cross_encoder"),
])
def test_distillation_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.check_train_config(compose_train(overrides))


@pytest.mark.parametrize("args,needle", [
    ([], "config key model.name_or_path must be set"),
    (["model.name_or_path=packaged:minilm"], "model.name_or_path=packaged:minilm is a bi-encoder, not a cross-encoder"),
])
def test_score_refuses_a_missing_or_untrained_teacher(args, needle, bm25_negatives, beir_folder, tmp_path):
    result = run_module("retrieval_lab.score", "data=beir", f"data.path={beir_folder}", f"input={bm25_negatives}",
                        f"output={tmp_path / 'ce.jsonl'}", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {needle}")
    assert not (tmp_path / "ce.jsonl").exists()


def test_rerank_without_a_cross_encoder_names_the_key(beir_folder, tmp_path):
    result = run_module("retrieval_lab.evaluate", "retriever=bm25", "reranker=cross_encoder", "data=beir",
                        f"data.path={beir_folder}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: config key reranker.model.name_or_path must be set")
