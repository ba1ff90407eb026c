"""A non-finite loss stops the run with the promised message and a usable last-good checkpoint; resuming a
run directory continues from its last checkpoint; checkpoints are written atomically."""
from __future__ import annotations

import csv
import json
import signal

import lightning as L
import pytest
import torch

from retrieval_lab.callbacks import AtomicCheckpointIO, NumericFault
from retrieval_lab.files import OutputError
from retrieval_lab.losses.infonce import InfoNCELoss
from retrieval_lab.train import train
from conftest import run_module
from test_combinations import FAST, compose_train


class NaNOnThirdCall(InfoNCELoss):
    """InfoNCE whose third call (the third training step) returns NaN."""

    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        loss = super().forward(*args, **kwargs)
        return loss * float("nan") if type(self).calls == 3 else loss


def weights(path):
    state = torch.load(path, weights_only=False)
    return state["global_step"], {k: v for k, v in state["state_dict"].items() if v.is_floating_point()}


def overrides(tiny_model, beir_folder, steps):
    out = ["data=beir", f"data.path={beir_folder}", f"model.name_or_path={tiny_model}", *FAST,
           "checkpoint.every_n_steps=1"]
    out[out.index("trainer.max_steps=2")] = f"trainer.max_steps={steps}"
    out.remove("negatives.module.queue_size=6")  # in-batch negatives here
    return out


@pytest.mark.parametrize("negatives,chunk", [("inbatch", None), ("moco", None), ("inbatch", 2)])
def test_nan_loss_stops_with_the_step_ids_and_last_good_checkpoint(negatives, chunk, tiny_model, beir_folder,
                                                                   tmp_path):
    """The last-good checkpoint is the state a clean run has after two steps: with MoCo, the key encoder and the
    queue too (neither follows a step that never updated the encoder); with gradient caching too."""
    extra = [f"negatives={negatives}"] + ["negatives.module.queue_size=6"] * (negatives == "moco")
    extra += [f"trainer.grad_cache_chunk={chunk}"] * bool(chunk)
    cfg = compose_train(overrides(tiny_model, beir_folder, 5) + extra + [f"loss._target_={__name__}.NaNOnThirdCall"])
    NaNOnThirdCall.calls = 0
    with pytest.raises(NumericFault) as err:
        train(cfg, tmp_path / "nan")
    message = str(err.value)
    what = "the loss (or its gradient: gradient caching)" if chunk else "the loss"
    assert message.startswith(f"step 2: {what} is nan on the batch of queries q")
    assert "last-good.ckpt" in message and not (tmp_path / "nan" / "metrics.json").exists()
    # the saved state is the one a clean run of the same command has after two steps
    train(compose_train(overrides(tiny_model, beir_folder, 5) + extra + ["checkpoint.keep=10"]), tmp_path / "clean")
    step, bad_run = weights(tmp_path / "nan" / "checkpoints" / "last-good.ckpt")
    clean_step, clean = weights(tmp_path / "clean" / "checkpoints" / "step2.ckpt")
    assert step == clean_step == 2 and ("queue" in clean) == (negatives == "moco")
    buffers = {k: v for k, v in torch.load(tmp_path / "clean" / "checkpoints" / "step2.ckpt",
                                           weights_only=False)["state_dict"].items() if "queue_" in k}
    saved = torch.load(tmp_path / "nan" / "checkpoints" / "last-good.ckpt", weights_only=False)["state_dict"]
    for name, value in buffers.items():  # MoCo's pointer, length and document ids
        assert torch.equal(saved[name], value), name
    for name, value in clean.items():
        assert torch.isfinite(bad_run[name]).all() and torch.allclose(bad_run[name], value, atol=1e-6), name


def test_resuming_from_last_good_replays_the_failed_step_as_an_uninterrupted_run(tiny_model, beir_folder, tmp_path):
    """Resuming from last-good.ckpt (the bad batch fixed, here: the loss no longer fails) trains the failed step on
    the same batch with the same dropout, logs it under the same step number, and ends with the weights of a run
    that never failed. Step and epoch checkpoints share one last.ckpt (no last-v1.ckpt)."""
    args = overrides(tiny_model, beir_folder, 5) + ["trainer.log_every_n_steps=1", "checkpoint.keep=10",
                                                    f"loss._target_={__name__}.NaNOnThirdCall"]
    NaNOnThirdCall.calls = 0
    with pytest.raises(NumericFault):
        train(compose_train(args), tmp_path / "nan")
    NaNOnThirdCall.calls = -100  # no NaN from now on
    train(compose_train(args + [f"resume={tmp_path / 'nan' / 'checkpoints' / 'last-good.ckpt'}"]), tmp_path / "resumed")
    train(compose_train(args), tmp_path / "clean")

    def losses(run):
        rows = csv.DictReader(open(tmp_path / run / "csv" / "metrics.csv"))
        return {int(r["step"]): float(r["train/loss"]) for r in rows if r["train/loss"]}

    clean = losses("clean")
    assert sorted(clean) == [0, 1, 2, 3, 4] and losses("resumed") == {s: clean[s] for s in (2, 3, 4)}
    step, resumed = weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    clean_step, straight = weights(tmp_path / "clean" / "checkpoints" / "last.ckpt")
    assert step == clean_step == 5
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
    for run in ("resumed", "clean"):
        assert [p.name for p in (tmp_path / run / "checkpoints").glob("last*")] == ["last.ckpt"]


CRASH_ON_THIRD_CALL = """# started with the interpreter (PYTHONPATH): the third loss call, during step 3, after step 2's checkpoint
# was written, kills its process (SIGKILL: no clean-up at all); the command itself is unchanged
import os, signal

from retrieval_lab.losses.infonce import InfoNCELoss

forward, calls = InfoNCELoss.forward, []


def crashing(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return forward(self, *args, **kwargs)


InfoNCELoss.forward = crashing
"""


@pytest.mark.parametrize("negatives,workers", [("inbatch", 0), ("moco", 0), ("inbatch", 1)])
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(negatives, workers, tiny_model, beir_folder,
                                                                        tmp_path):
    """Kill a training process during step 3 of an epoch of 9 batches, rerun the command in the same run folder: the
    weights after step 4 (MoCo: queue and key encoder included, they are in the state dict) and the metrics equal
    those of a run that was never interrupted; also with a DataLoader worker making the batches."""
    args = [a for a in overrides(tiny_model, beir_folder, 4) if not a.startswith("eval.after")]
    args += [f"negatives={negatives}", "eval.batch_size=16", f"num_workers={workers}"]
    args += ["negatives.module.queue_size=6"] * (negatives == "moco")
    (tmp_path / "crash").mkdir()
    (tmp_path / "crash" / "sitecustomize.py").write_text(CRASH_ON_THIRD_CALL)

    def run(folder, env=None):
        return run_module("retrieval_lab.train", *args, f"hydra.run.dir={tmp_path / folder}", env=env)

    assert run("straight").returncode == 0
    killed = run("resumed", env={"PYTHONPATH": str(tmp_path / "crash")})
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "resumed" / "metrics.json").exists()
    resumed_run = run("resumed")  # the same command in the same run directory
    assert resumed_run.returncode == 0, resumed_run.stderr[-2000:]
    step, resumed = weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    _, straight = weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert step == 4 and ("queue" in straight) == (negatives == "moco")
    for name, value in straight.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), name
    metrics = [json.loads((tmp_path / f / "metrics.json").read_text()) for f in ("straight", "resumed")]
    assert metrics[0]["after"]["ndcg@10"] == pytest.approx(metrics[1]["after"]["ndcg@10"], abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step*.ckpt")) == ["step3.ckpt",
                                                                                                  "step4.ckpt"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(2)}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OutputError, match=f"could not write {path} \\(disk full\\); what was written before it is as it"):
        io.save_checkpoint({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # and the failed write left nothing


def test_epoch_end_checkpoints_and_a_resume_with_other_settings(tiny_model, beir_folder, tmp_path):
    """With step checkpoints rarer than an epoch, every epoch end still writes last.ckpt. Rerunning the folder with
    more epochs continues it, and metrics.csv holds each step's training loss once; rerunning it with another
    temperature is refused with the changed setting named, instead of continuing (or, once finished, reporting)
    another run's weights; a fresh start there keeps the old metrics.csv aside."""
    from retrieval_lab.errors import ConfigError

    args = [a for a in overrides(tiny_model, beir_folder, 5) if not a.startswith(("trainer.max_steps", "checkpoint"))]
    args += ["trainer.max_steps=-1", "checkpoint.every_n_steps=1000", "loss.temperature=0.05"]
    run = tmp_path / "run"
    train(compose_train(args + ["trainer.max_epochs=1"]), run)
    first_step, _ = weights(run / "checkpoints" / "epoch0.ckpt")  # written at the end of epoch 0
    assert first_step > 0 and weights(run / "checkpoints" / "last.ckpt")[0] == first_step
    train(compose_train(args + ["trainer.max_epochs=2"]), run)  # continues: one more epoch
    step, _ = weights(run / "checkpoints" / "last.ckpt")
    assert step == 2 * first_step
    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert sorted(int(r["step"]) for r in rows) == list(range(step))  # each step's loss once
    with pytest.raises(ConfigError, match=r"other settings \(loss.temperature: 0.05 -> 0.5\)"):
        train(compose_train(args + ["trainer.max_epochs=2", "loss.temperature=0.5"]), run)
    (run / "wandb" / "offline-run-1").mkdir(parents=True)  # what an offline W&B logger leaves
    (run / "wandb" / "offline-run-1" / "run-1.wandb").write_bytes(b"\x00logged")
    earlier = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    train(compose_train(args + ["trainer.max_epochs=1", "resume=null"]), run)
    aside = {p.relative_to(run / "previous"): p.read_bytes() for p in (run / "previous").rglob("*") if p.is_file()}
    assert aside == earlier  # the earlier run's files, every one, byte for byte, moved aside
    assert {"metrics.json", "run_info.json", "checkpoints", "csv"} <= {p.name for p in (run / "previous").iterdir()}
    fresh = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert sorted(int(r["step"]) for r in fresh) == list(range(first_step))
    assert weights(run / "checkpoints" / "last.ckpt")[0] == first_step  # the new run's own checkpoints


def test_a_checkpoint_from_before_split_seed_resumes_when_the_split_is_the_same(tmp_path):
    """Checkpoints written before `data.split_seed` existed carved the dev split with `seed`: resuming one is
    accepted when split_seed equals that seed, and refused, naming data.split_seed, when it does not."""
    from retrieval_lab.errors import ConfigError
    from retrieval_lab.run_folder import check_resumable, run_settings

    cfg = compose_train(["seed=7", "data.split_seed=7"])
    old = {key: value for key, value in run_settings(cfg).items() if key != "data.split_seed"}
    assert old["seed"] == "7"
    path = tmp_path / "old.ckpt"
    torch.save({"global_step": 3, "retrieval_lab_settings": old}, path)
    assert check_resumable(str(path), cfg) == 3
    with pytest.raises(ConfigError, match=r"other settings \(data.split_seed: 7 -> 42\)"):
        check_resumable(str(path), compose_train(["seed=7"]))


def test_checkpoints_hold_the_encoder_settings_in_effect_not_the_configs_nulls(tmp_path, tiny_model):
    """The model config leaves pooling, max lengths, ... null: a saved folder's value, else the default. Checkpoints
    (and run_info.json) hold the values in effect. So a checkpoint from before stop 23, which holds the defaults
    written out, resumes; and a run on a folder saved with doc_max_length 12 is refused when resumed with an
    explicit doc_max_length=256 (before, the written-out default could not be told from null)."""
    from retrieval_lab.errors import ConfigError
    from retrieval_lab.models.encoder import Encoder
    from retrieval_lab.run_folder import check_resumable, run_settings

    cfg = compose_train([])
    assert run_settings(cfg)["model.pooling"] == "'mean'" and run_settings(cfg)["model.doc_max_length"] == "256"
    path = tmp_path / "old.ckpt"
    torch.save({"global_step": 5, "retrieval_lab_settings": run_settings(cfg)}, path)
    assert check_resumable(str(path), cfg) == 5
    torch.save({"global_step": 5, "retrieval_lab_settings": {**run_settings(cfg), "model.pooling": "'cls'"}}, path)
    with pytest.raises(ConfigError, match=r"other settings \(model.pooling: 'cls' -> 'mean'\)"):
        check_resumable(str(path), cfg)

    Encoder(str(tiny_model), doc_max_length=12).save(tmp_path / "m")
    saved_folder = compose_train([f"model.name_or_path={tmp_path / 'm'}"])
    assert run_settings(saved_folder)["model.doc_max_length"] == "12"
    torch.save({"global_step": 5, "retrieval_lab_settings": run_settings(saved_folder)}, path)
    assert check_resumable(str(path), saved_folder) == 5
    with pytest.raises(ConfigError, match=r"other settings \(model.doc_max_length: 12 -> 256\)"):
        check_resumable(str(path), compose_train([f"model.name_or_path={tmp_path / 'm'}", "model.doc_max_length=256"]))


class EpochTagged(torch.utils.data.Dataset):
    """Example i of epoch e is (i, e): what a batch holds shows the order and the epoch the dataset was at."""

    def __init__(self):
        self.epoch = 0

    def __len__(self):
        return 20

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        return index, self.epoch


class RecordBatches(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w, self.seen = torch.nn.Parameter(torch.zeros(1)), []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch))
        return (self.w ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("tas", [False, True])
def test_a_resume_goes_on_with_the_epochs_order_with_loader_workers(workers, tas, tmp_path):
    """3 epochs of 5 batches. Resumed from a checkpoint mid-epoch 0, at the end of epoch 0 and mid-epoch 1, the run
    trains on the batches the uninterrupted run trained on from there, its dataset at the same epoch, with or
    without DataLoader workers (they start, drawing the order and copying the dataset, before any epoch hook)."""
    from retrieval_lab.callbacks import ExactResume
    from retrieval_lab.data.datamodule import RetrievalDataModule
    from retrieval_lab.data.sampling import ClusterBatchSampler

    def fit(checkpoint=None, save=False):
        data = EpochTagged()
        sampler = ClusterBatchSampler(data, [i % 2 for i in range(20)], 4, 2, seed=1) if tas else None
        datamodule = RetrievalDataModule(data, lambda examples: [list(e) for e in examples], batch_size=4,
                                         num_workers=workers, seed=1, batch_sampler=sampler)
        callbacks = [ExactResume()] + ([L.pytorch.callbacks.ModelCheckpoint(
            dirpath=tmp_path, filename="s{step}", every_n_train_steps=1, save_top_k=-1)] if save else [])
        module = RecordBatches()
        L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=callbacks, use_distributed_sampler=False, enable_checkpointing=save).fit(
            module, datamodule=datamodule, ckpt_path=checkpoint)
        return module.seen

    straight = fit(save=True)
    assert len(straight) == 15 and {batch[0][1] for epoch, batch in straight} == {0, 1, 2}
    for step in (2, 5, 7):
        assert fit(next(tmp_path.glob(f"s*step={step}.ckpt"))) == straight[step:], step


@pytest.mark.parametrize("max_epochs,max_steps", [(3, -1), (3, 7), (2, 100), (None, 4)])
def test_the_schedule_counts_the_runs_steps_without_building_the_loader(max_epochs, max_steps):
    """BiEncoderModule.total_steps gives Lightning's estimated_stepping_batches, without building the training
    loader (which, before a checkpoint is restored, would start its workers at the wrong place)."""
    from retrieval_lab.data.datamodule import RetrievalDataModule
    from retrieval_lab.models.biencoder import BiEncoderModule

    counted = {}

    class Counting(RecordBatches):
        def configure_optimizers(self):
            counted["ours"] = BiEncoderModule.total_steps(self)
            counted["loader built"] = self.trainer.train_dataloader is not None
            counted["lightning"] = self.trainer.estimated_stepping_batches
            return super().configure_optimizers()

    datamodule = RetrievalDataModule(EpochTagged(), lambda examples: examples, batch_size=3, seed=1)  # 6 batches
    L.Trainer(max_epochs=max_epochs, max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False).fit(
        Counting(), datamodule=datamodule)
    assert counted["ours"] == counted["lightning"] and not counted["loader built"]


@pytest.mark.parametrize("every", [0, 1])
def test_continuing_a_finished_run_trains_the_batches_an_uninterrupted_run_trains(every, tiny_model, beir_folder,
                                                                                tmp_path, monkeypatch):
    """A run stopped by trainer.max_steps inside an epoch, continued with a larger max_steps (what the rerun message
    suggests), and again with trainer.max_epochs: its batches are those of one run to that length, across the
    epoch boundary (10 batches an epoch here), with epoch-end checkpoints only (every 0) or step checkpoints too."""
    from retrieval_lab.data import datamodule

    trained, call = [], datamodule.GroupCollator.__call__
    monkeypatch.setattr(datamodule.GroupCollator, "__call__", lambda self, ex: trained.append(
        [e["qid"] for e in ex]) or call(self, ex))
    args = [a for a in overrides(tiny_model, beir_folder, 2) if not a.startswith("checkpoint.every_n_steps")]
    args += [f"checkpoint.every_n_steps={every}"]

    def batches(folder, *lengths):
        trained.clear()
        for length in lengths:
            train(compose_train(args + length), tmp_path / folder)
        return list(trained)

    straight = batches("straight", ["trainer.max_steps=12"])
    assert len(straight) == 12
    assert batches("continued", ["trainer.max_steps=2"], ["trainer.max_steps=5"], ["trainer.max_steps=12"]) == straight
    two_epochs = batches("epochs", ["trainer.max_steps=-1", "trainer.max_epochs=2"])
    assert len(two_epochs) == 20 and two_epochs[:12] == straight
    assert batches("cut", ["trainer.max_steps=3"], ["trainer.max_steps=-1", "trainer.max_epochs=2"]) == two_epochs
