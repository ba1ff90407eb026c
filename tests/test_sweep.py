"""A Hydra multirun sweep end to end: jobs in parallel (joblib launcher) or through submitit, one folder each,
and the report."""
from __future__ import annotations

import csv
import json

from conftest import run_module


def test_parallel_sweep_then_report(tiny_model, beir_folder, tmp_path):
    """Jobs in 2 worker processes land in one sweep folder (the default multirun/<time>_<pid>, named once for the
    whole sweep, not again in each worker process)."""
    result = run_module("retrieval_lab.train", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                        "loss=infonce,samtone", "seed=1,2", "data=beir", f"data.path={beir_folder}",
                        f"model.name_or_path={tiny_model}", "trainer.max_steps=2", "batch_size=4", "eval.batch_size=16",
                        "eval.before=false", "validation.enabled=false", "save_model=false",
                        "trainer.enable_progress_bar=false", "logger.wandb.mode=offline", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        info = json.loads((job / "run_info.json").read_text())
        assert info["sweep"] == sweep.name and info["choices"]["loss"] in ("infonce", "samtone")
        seen.add((info["choices"]["loss"], info["seed"]))
        assert json.loads((job / "metrics.json").read_text())["steps"] == 2
        assert any((job / "wandb").glob("offline-run-*"))   # one W&B run per job, grouped by the sweep's name
    assert seen == {("infonce", 1), ("infonce", 2), ("samtone", 1), ("samtone", 2)}
    report = run_module("retrieval_lab.report", str(sweep), "--baseline", "loss=infonce")
    assert report.returncode == 0, report.stderr[-2000:]
    rows = list(csv.DictReader(open(sweep / "report" / "report.csv")))
    assert [(r["loss"], r["runs"]) for r in rows] == [("infonce", "2"), ("samtone", "2")]
    means = {r["loss"]: float(r["ndcg@10_mean"]) for r in rows}
    for loss in means:
        values = [json.loads((j / "metrics.json").read_text())["after"]["ndcg@10"] for j in jobs
                  if json.loads((j / "run_info.json").read_text())["choices"]["loss"] == loss]
        assert means[loss] == sum(values) / 2 or abs(means[loss] - sum(values) / 2) < 1e-6


def test_sweep_through_the_submitit_launcher(tiny_model, beir_folder, tmp_path):
    """`hydra/launcher=slurm` hands each job to submitit; its local executor (`submitit_local`, the same plugin
    without SLURM) runs the jobs here: each one is pickled, run in its own process and writes its own folder."""
    sweep = tmp_path / "sweep"
    result = run_module("retrieval_lab.train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                        "loss=infonce,samtone", "data=beir", f"data.path={beir_folder}",
                        f"model.name_or_path={tiny_model}", "trainer.max_steps=2", "batch_size=4", "eval.batch_size=16",
                        "eval.before=false", "validation.enabled=false", "save_model=false",
                        "trainer.enable_progress_bar=false", "logger.wandb.enabled=false", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = []
    for job in ("0", "1"):
        losses.append(json.loads((sweep / job / "run_info.json").read_text())["choices"]["loss"])
        assert json.loads((sweep / job / "metrics.json").read_text())["steps"] == 2
    assert losses == ["infonce", "samtone"]
    assert len([p for p in (sweep / ".submitit").glob("*/*_result.pkl")]) == 2  # submitit's record of each job
