"""Every pairs x negatives x loss combination trains through the real entry point code (tiny model, 2 steps)."""
from __future__ import annotations

import itertools
import json

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, run_module
from retrieval_lab import config
from retrieval_lab.errors import ConfigError
from retrieval_lab.train import train

FAST = ["eval.before=false", "eval.after=false", "validation.enabled=false", "logger=csv", "save_model=false",
        "trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "batch_size=4", "negatives.module.queue_size=6"]


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("pairs,negatives,loss", list(itertools.product(["supervised", "cropping", "ict"],
                                                                         ["inbatch", "moco"], ["infonce", "samtone"])))
def test_combination_trains(pairs, negatives, loss, tiny_model, beir_folder, tmp_path):
    overrides = [f"pairs={pairs}", f"negatives={negatives}", f"loss={loss}", "data=beir", f"data.path={beir_folder}",
                 f"model.name_or_path={tiny_model}", *FAST]
    if negatives == "inbatch":
        overrides.remove("negatives.module.queue_size=6")
    train(compose_train(overrides), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 2
    log = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in log and ("train/queue_len" in log) == (negatives == "moco")


def test_the_users_own_command(tiny_model, beir_folder, tmp_path):
    """`python -m retrieval_lab.train loss=samtone negatives=moco`, here pointed at small data and a tiny model."""
    result = run_module("retrieval_lab.train", "loss=samtone", "negatives=moco", "data=beir", f"data.path={beir_folder}",
                        f"model.name_or_path={tiny_model}", "trainer.max_epochs=1", "batch_size=4",
                        "eval.batch_size=16", "logger=csv", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= {"before", "after"} and metrics["steps"] == 36 // 4


@pytest.mark.parametrize("overrides,key", [
    (["negatives=moco", "loss=samtone", "loss.side=document"], "loss.side"),
    (["negatives=moco", "loss=samtone", "loss.side=both"], "loss.side"),
    (["negatives=moco", "model.shared_towers=false"], "model.shared_towers"),
    (["negatives=moco", "model.shared_towers=0"], "model.shared_towers"),
    (["negatives=moco", "negatives.module.momentum=1.0"], "negatives.module.momentum"),
])
def test_combinations_that_make_no_sense_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.check_train_config(compose_train(overrides))


def test_moco_refuses_a_folder_saved_with_separate_towers_naming_the_folder(tiny_model, tmp_path):
    """model.shared_towers left null takes the saved folder's towers: separate ones cannot train with MoCo, and the
    sentence says the folder was saved so (not that the user set the key)."""
    from retrieval_lab.models.encoder import Encoder

    Encoder(str(tiny_model), shared_towers=False).save(tmp_path / "m")
    cfg = compose_train(["negatives=moco", f"model.name_or_path={tmp_path / 'm'}"])
    with pytest.raises(ConfigError, match=r"^model.name_or_path=.*/m was saved with separate query and document "
                                          r"towers, so it cannot train with negatives=moco"):
        config.check_train_config(cfg)


@pytest.mark.parametrize("negatives,extra", [("bm25", ["negatives.group_size=3"]), ("tas", []), ("tasb", []),
                                             ("ance", ["negatives.refresh.every_n_steps=1", "negatives.refresh.depth=10"])])
def test_hard_negative_methods_train(negatives, extra, bm25_negatives, tiny_model, beir_folder, tmp_path):
    overrides = [f"negatives={negatives}", f"negatives.file={bm25_negatives}", *extra, "data=beir",
                 f"data.path={beir_folder}", f"model.name_or_path={tiny_model}", *FAST]
    overrides.remove("negatives.module.queue_size=6")
    train(compose_train(overrides), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


def test_mined_negatives_need_supervised_pairs():
    with pytest.raises(ConfigError, match="pairs=CroppingPairs cannot use a mined negatives file"):
        config.check_train_config(compose_train(["negatives=bm25", "pairs=cropping"]))


def test_missing_negatives_file_is_one_sentence(beir_folder, tmp_path):
    result = run_module("retrieval_lab.train", "negatives=bm25", "data=beir", f"data.path={beir_folder}",
                        "logger=csv", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: negatives file {beir_folder}/negatives/bm25-train.jsonl not found")


def test_a_run_shorter_than_the_logging_interval_logs_its_loss(tiny_model, beir_folder, tmp_path):
    """2 steps with trainer.log_every_n_steps=50: the loss of the last step is logged, and Lightning's advice to
    lower the interval (which no longer applies) is not printed."""
    import csv

    overrides = [o for o in FAST if "log_every_n_steps" not in o and "queue_size" not in o]
    result = run_module("retrieval_lab.train", "data=beir", f"data.path={beir_folder}",
                        f"model.name_or_path={tiny_model}", *overrides, "trainer.log_every_n_steps=50",
                        f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logging interval" not in result.stderr
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [1]  # Lightning's step of the second batch


def test_label_free_pairs_train_on_a_data_set_without_training_judgements(tiny_model, beir_folder, tmp_path):
    """Cropping and ICT need no qrels of their own: a data set with test judgements only trains (validation off);
    with validation on, its dev queries would come out of the training judgements, and the missing file is named."""
    import shutil

    data = tmp_path / "test_only"
    shutil.copytree(beir_folder, data)
    (data / "qrels" / "train.tsv").unlink()
    overrides = ["data=beir", f"data.path={data}", f"model.name_or_path={tiny_model}",
                 *[o for o in FAST if "queue_size" not in o]]
    for pairs in ("cropping", "ict"):
        train(compose_train([f"pairs={pairs}", *overrides]), tmp_path / pairs)
        assert json.loads((tmp_path / pairs / "metrics.json").read_text())["steps"] == 2
    from retrieval_lab.errors import DataError

    with pytest.raises(DataError, match=r"qrels/train.tsv not found: data set .* has no 'train' split"):
        train(compose_train(["pairs=cropping", *[o for o in overrides if o != "validation.enabled=false"]]),
              tmp_path / "with_validation")


def conf_options(group: str) -> list[str]:
    """The options of a config group as found in conf/ (those that leave a key to the user, as model=hf's name,
    left out)."""
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml") if "???" not in p.read_text())


def check_or_sentence(overrides: list[str], file=None):
    """The composed config when ``check_train_config`` accepts it (``file``: the negatives file of a strategy that
    reads one); else the refusal, asserted to be one sentence."""
    cfg = compose_train(overrides)
    if file is not None and cfg.negatives.get("file"):
        cfg.negatives.file = str(file)
    try:
        config.check_train_config(cfg)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message and message.rstrip().endswith((".", ")")), (overrides, message)
        return None
    return cfg


@pytest.mark.parametrize("module", [None, *conf_options("module")])
def test_every_option_found_in_conf_is_checked_or_refused_with_a_sentence(module):
    """Every loss x negatives (x model) pair of conf/, for every module: accepted by the checks, or refused with
    one sentence. A new loss, negative strategy, model family or module is covered as soon as its YAML exists."""
    extra = [f"module={module}"] if module else []
    accepted = 0
    for loss, negatives in itertools.product(conf_options("loss"), conf_options("negatives")):
        accepted += check_or_sentence([f"loss={loss}", f"negatives={negatives}", *extra]) is not None
    for model, loss in itertools.product(conf_options("model"), conf_options("loss")):
        check_or_sentence([f"model={model}", f"loss={loss}", *extra])
    assert accepted >= 1  # every module trains with some pair of conf/


@pytest.mark.parametrize("loss", conf_options("loss"))
def test_every_accepted_loss_and_negatives_pair_of_conf_trains_a_step(loss, bm25_negatives, tiny_model, beir_folder,
                                                                        tmp_path):
    """Each loss of conf/ with every negative strategy of conf/ that the checks accept (negatives files: the
    tiny data set's BM25 negatives) takes a training step through the entry point's code."""
    for negatives in conf_options("negatives"):
        overrides = [f"loss={loss}", f"negatives={negatives}", "data=beir", f"data.path={beir_folder}",
                     f"model.name_or_path={tiny_model}", *[o for o in FAST if "queue_size" not in o],
                     "trainer.max_steps=1", *(["negatives.module.queue_size=6"] if negatives == "moco" else []),
                     *(["negatives.refresh.every_n_steps=1", "negatives.refresh.depth=10"] if negatives == "ance"
                       else [])]
        cfg = check_or_sentence(overrides, bm25_negatives)
        if cfg is None:
            continue
        train(cfg, tmp_path / negatives)
        assert json.loads((tmp_path / negatives / "metrics.json").read_text())["steps"] == 1, (loss, negatives)
