"""What the entry points share: conf/model choices that need a name refuse to run without one, and metrics.json
names the model that ran."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT, run_module


def test_hf_model_has_minilm_settings_but_no_name():
    """conf/model/hf.yaml writes minilm.yaml's settings out (a `???` over a default list's name would be lost)."""
    hf, minilm = (yaml.safe_load((ROOT / "conf" / "model" / f"{n}.yaml").read_text()) for n in ("hf", "minilm"))
    assert hf == {**minilm, "name_or_path": "???"}


@pytest.mark.parametrize("entry,args", [
    ("train", ["logger=csv", "eval.before=false", "eval.after=false", "save_model=false", "trainer.max_steps=1"]),
    ("evaluate", []),
    ("mine", ["retriever=dense"]),
])
def test_model_hf_without_a_name_is_refused(entry, args, beir_folder, tmp_path):
    if entry == "mine":
        args = [*args, f"output={tmp_path / 'neg.jsonl'}"]
    result = run_module(f"retrieval_lab.{entry}", "model=hf", "data=beir", f"data.path={beir_folder}", *args,
                        f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: config key model.name_or_path must be set")


def test_hybrid_evaluation_records_the_dense_model(tiny_model, beir_folder, tmp_path):
    result = run_module("retrieval_lab.evaluate", "retriever=hybrid", f"model.name_or_path={tiny_model}",
                        "retriever.alpha=0.1", "data=beir", f"data.path={beir_folder}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["model"] == str(tiny_model)


def test_the_dev_split_follows_split_seed_not_seed(tiny_model, beir_folder):
    """The runs of a seed sweep validate on one dev set (and train on the same queries); `data.split_seed` picks
    it, and `evaluate` (retriever=hybrid tunes on it) holds out the same queries as training."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from retrieval_lab.data.beir import BeirDataset
    from retrieval_lab.data.datamodule import build_datamodule
    from retrieval_lab.evaluate import dev_split

    dataset = BeirDataset(beir_folder)

    def split(primary, *overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name=primary, overrides=["data=beir", f"data.path={beir_folder}",
                                                          f"model.name_or_path={tiny_model}", *overrides])
        if primary == "evaluate":
            return sorted(dev_split(dataset, cfg).qrels)
        module = instantiate(cfg.negatives.module)(encoder=instantiate(cfg.model), loss=instantiate(cfg.loss))
        datamodule, dev = build_datamodule(cfg, dataset, module, instantiate(cfg.negatives))
        assert not set(dev) & set(datamodule.train_set.qids)
        return sorted(dev)

    dev = split("train", "seed=1")
    assert len(dev) == 4  # 10% of the 40 training queries
    assert split("train", "seed=2") == dev == split("evaluate")
    assert split("train", "seed=1", "data.split_seed=7") != dev
    assert split("evaluate", "data.split_seed=7") == split("train", "data.split_seed=7")


@pytest.mark.parametrize("args,needle", [
    (["retriever=bm25", "k=5"], "error: k=5 retrieves fewer documents than ndcg@10 looks at"),
    (["retriever=bm25", "k=0"], "error: k=0 must be at least 1."),
    (["retriever=bm25", "k=abc"], "error: k=abc must be a whole number."),
    (["retriever.index=foo"], "error: retriever.index must be 'flat', 'hnsw' or 'torch' for Encoder models, got 'foo'."),
    (["retriever=bm25", "+retriever.k_1=0.9"], "error: retriever.k_1 is not a setting of BM25Retriever (did you "
                                                "mean retriever.k1? its settings: b, k1, stemmer, stopwords)."),
])
def test_evaluate_refuses_a_search_that_cannot_give_its_metrics(args, needle, tiny_model, beir_folder, tmp_path):
    """k below a metric's cutoff (recall@100 on 5 documents), not a number, an unknown index, or a key the retriever
    does not take: one sentence, before the corpus is encoded, and no metrics.json."""
    result = run_module("retrieval_lab.evaluate", f"model.name_or_path={tiny_model}", "data=beir",
                        f"data.path={beir_folder}", *args, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(needle), result.stderr[-2000:]
    assert "encode" not in result.stderr and not (tmp_path / "metrics.json").exists()


def test_resuming_from_a_file_that_is_no_checkpoint_is_refused(tiny_model, beir_folder, tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    result = run_module("retrieval_lab.train", "data=beir", f"data.path={beir_folder}",
                        f"model.name_or_path={tiny_model}", f"resume={tmp_path / 'notes.ckpt'}", "logger=csv",
                        f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: resume={tmp_path / 'notes.ckpt'}: {tmp_path / 'notes.ckpt'} is not a training checkpoint (torch.load "
        "could not read it: RuntimeError).")
