"""Every config option composes; impossible settings are refused with one sentence."""
from __future__ import annotations


import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, run_module
from retrieval_lab import config
from retrieval_lab.errors import ConfigError

CONF = ROOT / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}


PRIMARY_GROUPS = {"train": {"data", "model", "pairs", "negatives", "loss", "trainer", "logger", "module"},
                  "evaluate": {"data", "model", "retriever", "reranker"}}


def options(primary):
    return [(group, option) for group, names in GROUPS.items() for option in names if group in PRIMARY_GROUPS[primary]]


@pytest.mark.parametrize("primary", ["train", "evaluate"])
def test_every_group_option_composes(primary):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for group, option in options(primary):
            cfg = compose(config_name=primary, overrides=[f"{group}={option}", "data.path=/x", "model.name_or_path=m"],
                          return_hydra_config=True)
            assert cfg[group] is not None


@pytest.mark.parametrize("experiment", GROUPS.get("experiment", []))
def test_every_experiment_composes_and_passes_the_checks(experiment):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        config.check_train_config(cfg)


@pytest.mark.parametrize("override,key", [
    ("batch_size=1", "batch_size"),
    ("optim.lr=0", "optim.lr"),
    ("optim.warmup_ratio=1.5", "optim.warmup_ratio"),
    ("data.dev_fraction=0", "data.dev_fraction"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("trainer.max_epochs=null trainer.max_steps=0", "trainer.max_epochs"),
    ("trainer.max_steps=1.5", "trainer.max_steps"),
    ("checkpoint.every_n_steps=-1", "checkpoint.every_n_steps"),
    ("validation.every_n_epochs=0", "validation.every_n_epochs"),
    ("validation.every_n_steps=0", "validation.every_n_steps"),
    ("eval.index=ivf", "eval.index"),
    ("eval.metrics=[ndcg@10,recal@100]", "eval.metrics: 'recal@100'"),
    ("negatives=tas negatives.clusters_per_batch=0", "negatives.clusters_per_batch"),
    ("negatives=ance negatives.refresh.every_n_steps=0", "negatives.refresh.every_n_steps"),
    ("module=cross_encoder negatives=moco", "negatives=moco cannot be used with module=CrossEncoderModule"),
    ("module=cross_encoder loss=margin_mse", "loss=MarginMSELoss would be ignored"),
    ("negatives=moco loss=margin_mse +negatives.file=s.jsonl negatives.group_size=2", "loss=MarginMSELoss needs teacher"),
    ("negatives=moco loss=listwise_kl +negatives.file=s.jsonl negatives.group_size=2", "loss=ListwiseKLLoss needs"),
    ("+trainer.accumulate_grad_batches=4", "trainer.accumulate_grad_batches=4 is not supported"),
    ("negatives=tasb +negatives.refresh.every_n_steps=5", "negatives.balanced_bins=10 draws negatives by their"),
    ("negatives=tasb negatives.balanced_bins=null +negatives.refresh.every_n_steps=5",
     "negatives.refresh re-mines negatives under negatives=ance only"),
    ("negatives=tas negatives.clusters=null", "negatives.clusters=null must be at least 1"),
    ("batch_size=abc", "batch_size=abc must be a whole number"),
    ("batch_size=2.5", "batch_size=2.5 must be a whole number"),
    ("seed=abc", "seed=abc must be a whole number"),
    ("optim.lr=abc", "optim.lr=abc must be a number"),
    ("loss.temperature=abc", "loss.temperature=abc must be a number"),
    ("negatives=bm25 negatives.group_size=abc", "negatives.group_size=abc must be a whole number"),
    ("validation.corpus_sample=abc", "validation.corpus_sample=abc must be a whole number \\(or null\\)"),
    ("eval.corpus_sample=-5", "eval.corpus_sample=-5 must be a number of documents"),
    ("validation.corpus_sample=0", "validation.corpus_sample=0 must be a number of documents"),
    ("eval.k=0", "eval.k=0 must be at least 1"),
    ("data.dev_split=train", "data.dev_split=train is also the training or the test split"),
    ("data.dev_split=test", "data.dev_split=test is also the training or the test split"),
    ("eval.k=5", "eval.k=5 retrieves fewer documents than ndcg@10 looks at"),
    ("eval.k=50", "eval.k=50 retrieves fewer documents than recall@100 looks at"),
    ("+loss.temprature=0.1", "loss.temprature is not a setting of InfoNCELoss"),  # Hydra takes an added key
    ("+trainer.foo=1", "trainer.foo is not a setting of Trainer"),
    ("negatives=moco +negatives.module.queue_sise=8", "negatives.module.queue_sise is not a setting of MoCoModule"),
    ("module=rocketqa +module.cross_encoder.max_len=8", "module.cross_encoder.max_len is not a setting of CrossEncoder"),
])
def test_impossible_settings_are_refused(override, key):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=override.split(), return_hydra_config=True)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config.check_train_config(cfg)


@pytest.mark.parametrize("args,needle", [
    (["model.name_or_path=./missing/model"], "model path ./missing/model does not exist"),
    (["batch_size=1"], "batch_size=1"),
    (["data.path=/nonexistent/beir"], "data folder /nonexistent/beir not found"),
    (["eval.split=dev"], "no 'dev' split"),
    (["loss.temperature=-1"], "loss.temperature"),
    (["model.name_or_path=no-such-org/no-such-model"], "could not load model 'no-such-org/no-such-model'"),
    (["model.pooling=max"], "model.pooling must be one of mean, cls"),
    (["+loss.temprature=0.1"], "loss.temprature is not a setting of InfoNCELoss (did you mean loss.temperature? its "
                               "settings: bidirectional, temperature)."),
    (["+trainer.max_step=3"], "trainer.max_step is not a setting of Trainer (did you mean trainer.max_steps? see "
                              "Trainer's documentation for its "),
])
def test_train_entry_point_exits_with_one_sentence(args, needle, beir_folder, tmp_path):
    base = {"data.path": f"data.path={beir_folder}"}
    overrides = [a for k, a in base.items() if not any(x.startswith(k) for x in args)]
    result = run_module("retrieval_lab.train", "data=beir", *overrides, *args, "logger=csv",
                        f"hydra.run.dir={tmp_path}", "eval.before=false")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and needle in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_num_workers_auto_feeds_gpus_and_stays_off_on_a_cpu_and_with_ance(monkeypatch):
    """``num_workers=auto``: 0 on a CPU and with ANCE, else up to 8 per GPU within half the cores; a number is
    taken as it is, anything else refused."""
    from test_combinations import compose_train

    import os

    import torch
    from hydra.utils import instantiate

    from retrieval_lab.data.datamodule import data_workers

    def workers(*overrides):
        cfg = compose_train(list(overrides))
        return data_workers(cfg, instantiate(cfg.negatives).uses_workers)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert workers() == 0 and workers("num_workers=3") == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert workers("trainer.devices=1") == 8 and workers("trainer.devices=2") == 4 and workers() == 2  # auto: all 4
    assert workers("trainer.accelerator=cpu") == 0 and workers("negatives=ance") == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert workers() == 1
    for bad in ("num_workers=-1", "num_workers=many"):
        with pytest.raises(ConfigError, match="num_workers"):
            workers(bad)
