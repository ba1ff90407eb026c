"""A run folder holds one run at a time, and a folder that cannot be written (read-only, under a file, a full disk)
stops a run with one sentence that leaves the earlier outputs intact and no temporary file behind."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_module

WAIT_IN_FIRST_STEP = """# started with the interpreter (PYTHONPATH): the first loss call says so in a file and waits for a go
import os, time
from pathlib import Path

from retrieval_lab.losses.infonce import InfoNCELoss

forward, signal_dir = InfoNCELoss.forward, Path(os.environ["SIGNAL_DIR"])


def waiting(self, *args, **kwargs):
    if not (signal_dir / "started").exists():
        (signal_dir / "started").write_text(str(os.getpid()))
        for _ in range(600):
            if (signal_dir / "go").exists():
                break
            time.sleep(0.2)
    return forward(self, *args, **kwargs)


InfoNCELoss.forward = waiting
"""


def train_args(tiny_model, beir_folder, run_dir, *extra):
    return ["data=beir", f"data.path={beir_folder}", f"model.name_or_path={tiny_model}", "logger=csv",
            "trainer.max_steps=3", "trainer.log_every_n_steps=1", "batch_size=4", "validation.enabled=false",
            "eval.before=false", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` but the lock file (whose mtime an attempt may touch) with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_second_run_into_a_locked_folder_is_refused_and_changes_nothing(tiny_model, beir_folder, tmp_path):
    """The first run waits inside its first training step; the same command started meanwhile stops with one sentence
    naming the folder and the first run's process, and the folder (Hydra's .hydra/ and log included) is byte for byte
    as it was. The first run then finishes normally, with each of its steps logged once."""
    run_dir, signals = tmp_path / "run", tmp_path / "signals"
    signals.mkdir()
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(WAIT_IN_FIRST_STEP)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(tmp_path / "hook"), "SIGNAL_DIR": str(signals)}
    first = subprocess.Popen([sys.executable, "-m", "retrieval_lab.train", *train_args(tiny_model, beir_folder, run_dir)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if (signals / "started").exists() or first.poll() is not None:
                break
            time.sleep(0.2)
        assert (signals / "started").exists(), first.communicate()[1][-2000:]
        before = snapshot(run_dir)
        assert ".hydra/config.yaml" in before and "run_info.json" in before
        second = run_module("retrieval_lab.train", *train_args(tiny_model, beir_folder, run_dir, "optim.lr=1e-3"))
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        message = second.stderr.strip().splitlines()[-1]
        assert message.startswith(f"error: run folder {run_dir} is in use by process {first.pid} on "), message
        assert message.endswith("nothing in it was changed (wait for that run to end, or choose another "
                                "hydra.run.dir / hydra.sweep.dir).")
        assert snapshot(run_dir) == before  # not even Hydra's .hydra/config.yaml (optim.lr differs) nor train.log
        (signals / "go").write_text("")
        out, err = first.communicate(timeout=600)
    finally:
        (signals / "go").write_text("")
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    rows = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert len(rows) == len(set(rows)) and not (run_dir / "previous").exists()
    assert "lr: 0.001" not in (run_dir / ".hydra" / "config.yaml").read_text()


def test_the_lock_is_the_folders_alone_and_goes_with_its_process(tmp_path):
    """Another folder is free while one is held, and a process killed while holding its folder's lock (SIGKILL: no
    clean-up) leaves it free: the lock is the operating system's, not a file that outlives the run."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from retrieval_lab.run_folder import lock; "
                               f"lock({str(tmp_path / 'a')!r}); print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        probe = f"from retrieval_lab.run_folder import lock; lock({{!r}}); print('took it')"
        refused = subprocess.run([sys.executable, "-c", probe.format(str(tmp_path / "a"))], cwd=ROOT,
                                 capture_output=True, text=True)
        assert refused.returncode == 2 and f"is in use by process {holder.pid} on" in refused.stderr
        other = subprocess.run([sys.executable, "-c", probe.format(str(tmp_path / "b"))], cwd=ROOT,
                               capture_output=True, text=True)
        assert other.returncode == 0 and "took it" in other.stdout
    finally:
        holder.kill()
        holder.wait()
    after = subprocess.run([sys.executable, "-c", probe.format(str(tmp_path / "a"))], cwd=ROOT, capture_output=True,
                           text=True)
    assert after.returncode == 0 and "took it" in after.stdout, after.stderr


def test_a_new_lock_holder_removes_what_interrupted_writes_left(tmp_path):
    """Temporary names of writes cut short by a kill (``.<name>.tmp<pid>``, ``<name>.partial/``) are removed by the
    next process to take the folder; files that only look alike stay."""
    from retrieval_lab.run_folder import lock, unlock

    (tmp_path / "checkpoints").mkdir()
    left = [tmp_path / "checkpoints" / ".last.ckpt.tmp4242", tmp_path / ".metrics.json.tmp7"]
    for path in left:
        path.write_bytes(b"half")
    (tmp_path / "model.partial").mkdir()
    kept = [tmp_path / "checkpoints" / "last.ckpt", tmp_path / "notes.tmpl", tmp_path / ".profile.tmpx"]
    for path in kept:
        path.write_bytes(b"whole")
    lock(tmp_path)
    unlock(tmp_path)
    assert not any(p.exists() for p in left) and not (tmp_path / "model.partial").exists()
    assert all(p.read_bytes() == b"whole" for p in kept)


@pytest.mark.parametrize("entry", ["train", "evaluate"])
def test_a_run_folder_under_a_file_is_one_sentence(entry, tiny_model, beir_folder, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    args = ["data=beir", f"data.path={beir_folder}", f"model.name_or_path={tiny_model}",
            f"hydra.run.dir={tmp_path / 'notes.txt' / 'run'}"]
    result = run_module(f"retrieval_lab.{entry}", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: run folder {tmp_path / 'notes.txt' / 'run'} cannot be written (")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@contextlib.contextmanager
def tmpfs(folder: Path, size: int):
    """A tmpfs of ``size`` bytes at ``folder`` (a real full disk, and a real read-only folder for root); skipped where
    this process may not mount one."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the patched-write test covers this")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_read_only_run_folder_is_one_sentence_and_keeps_its_files(tiny_model, beir_folder, tmp_path):
    with tmpfs(tmp_path / "disk", 8 << 20) as disk:
        (disk / "run").mkdir()
        (disk / "run" / "metrics.json").write_text('{"after": {"ndcg@10": 0.7}}\n')
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = run_module("retrieval_lab.train", *train_args(tiny_model, beir_folder, disk / "run"))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith(
            f"error: run folder {disk / 'run'} cannot be written (Read-only file system")
        assert (disk / "run" / "metrics.json").read_text() == '{"after": {"ndcg@10": 0.7}}\n'


def test_a_full_disk_is_one_sentence_and_leaves_the_last_checkpoint_and_no_temporary_file(tiny_model, beir_folder,
                                                                                         tmp_path):
    """A checkpoint a step is too large for the disk left: one sentence, the checkpoints written before load whole,
    and neither the run folder nor the system's temporary folder holds a partial file."""
    probe = run_module("retrieval_lab.train", *train_args(tiny_model, beir_folder, tmp_path / "probe",
                                                          "checkpoint.every_n_steps=1", "eval.after=false",
                                                          "save_model=false", "trainer.max_steps=1"))
    assert probe.returncode == 0, probe.stderr[-2000:]
    size = (tmp_path / "probe" / "checkpoints" / "last.ckpt").stat().st_size
    temp = tmp_path / "system_tmp"
    temp.mkdir()
    with tmpfs(tmp_path / "disk", int(2.6 * size)) as disk:  # step 1 and last.ckpt fit; step 2's does not
        result = run_module("retrieval_lab.train", *train_args(tiny_model, beir_folder, disk / "run",
                                                               "checkpoint.every_n_steps=1", "checkpoint.keep=5"),
                            env={"TMPDIR": str(temp)})
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        message = result.stderr.strip().splitlines()[-1]
        assert message.startswith(f"error: could not write {disk / 'run' / 'checkpoints'}") and \
            "(No space left on device)" in message, message
        assert torch.load(disk / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
        assert not [p for p in (disk / "run").rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
        assert not (disk / "run" / "metrics.json").exists()
    assert not [p for p in temp.rglob("*") if p.is_file() and p.stat().st_size > size // 4]


def test_a_refused_write_stops_training_with_one_sentence(tiny_model, beir_folder, tmp_path, monkeypatch):
    """The same, where no tmpfs can be mounted: torch.save refuses the second checkpoint (ENOSPC), in process."""
    from retrieval_lab.files import OutputError
    from retrieval_lab.train import train
    from test_combinations import compose_train

    save, calls = torch.save, []

    def full_on_second(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_second)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    cfg = compose_train(train_args(tiny_model, beir_folder, tmp_path / "run", "checkpoint.every_n_steps=1",
                                   "eval.after=false", "save_model=false")[:-1])
    with pytest.raises(OutputError, match=r"could not write .*checkpoints.* \(No space left on device\); what was "
                                          r"written before it is as it was\."):
        train(cfg, tmp_path / "run")
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step1.ckpt"] and (tmp_path / "run" / "notes.txt").read_text() == "mine"


def hold(folder: Path, env: dict | None = None) -> subprocess.Popen:
    """A process that takes ``folder``'s lock (as a running run would) and keeps it until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from retrieval_lab.run_folder import lock; "
                               f"lock({str(folder)!r}); print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_multirun_job_into_a_held_folder_changes_nothing_there(beir_folder, tmp_path):
    """Hydra sets up a job's log and (by default) writes its .hydra/ before any callback runs: here it writes neither
    (output_subdir null, the log opened at its first line), so a job refused its folder leaves it byte for byte."""
    job = tmp_path / "sweep" / "0"
    holder = hold(job)
    try:
        (job / ".hydra").mkdir()
        (job / ".hydra" / "config.yaml").write_text("the holder's config\n")
        before = snapshot(job)
        result = run_module("retrieval_lab.evaluate", "-m", "retriever=bm25", "data=beir", f"data.path={beir_folder}",
                            f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweep.subdir=0")
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"error: run folder {job} is in use by process {holder.pid} on " in result.stderr
        assert snapshot(job) == before and not (job / "evaluate.log").exists()
    finally:
        holder.kill()
        holder.wait()
    done = run_module("retrieval_lab.evaluate", "-m", "retriever=bm25", "data=beir", f"data.path={beir_folder}",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweep.subdir=0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (job / ".hydra" / "overrides.yaml").read_text().splitlines() == [
        "- retriever=bm25", "- data=beir", f"- data.path={beir_folder}"]
    assert "retriever:" in (job / ".hydra" / "config.yaml").read_text() and (job / "metrics.json").is_file()


def test_taking_a_folder_leaves_the_writes_of_a_folder_inside_it_that_has_its_own_lock(tmp_path):
    """A sweep folder taken while one of its jobs (or a run placed inside it) is writing: that job's temporary files
    are its own, and only the unlocked folders are cleaned."""
    from retrieval_lab.run_folder import lock, unlock

    holder = hold(tmp_path / "0")
    try:
        for job in ("0", "1"):  # job 0's is its holder's write in progress; job 1's, a killed process's
            (tmp_path / job / "checkpoints").mkdir(parents=True)
            (tmp_path / job / "checkpoints" / ".last.ckpt.tmp99999").write_bytes(b"being written")
        lock(tmp_path)
        unlock(tmp_path)
        assert (tmp_path / "0" / "checkpoints" / ".last.ckpt.tmp99999").read_bytes() == b"being written"
        assert not (tmp_path / "1" / "checkpoints" / ".last.ckpt.tmp99999").exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_other_processes_of_a_distributed_run_join_only_their_own_first_process(tmp_path):
    """torchrun (and SLURM) start every process of a job on its own: those after the first take no lock but wait for
    the holder to be their own job's first process; another job's is refused, and a folder nobody takes is too."""
    folder = tmp_path / "run"
    join = "from retrieval_lab.run_folder import join; join({!r}, wait={}); print('joined')"

    def other_rank(run_id, wait=20, target=folder):
        env = {**os.environ, "RANK": "1", "TORCHELASTIC_RUN_ID": run_id, "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "29500"}
        return subprocess.run([sys.executable, "-c", join.format(str(target), wait)], cwd=ROOT, env=env,
                              capture_output=True, text=True)

    holder = hold(folder, {"RANK": "0", "TORCHELASTIC_RUN_ID": "job-a", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": "29500"})
    try:
        mine = other_rank("job-a")
        assert mine.returncode == 0 and "joined" in mine.stdout, mine.stderr
        theirs = other_rank("job-b", wait=2)
        assert theirs.returncode == 2 and f"is in use by process {holder.pid} on" in theirs.stderr
    finally:
        holder.kill()
        holder.wait()
    alone = other_rank("job-a", wait=1, target=tmp_path / "nobody")
    assert alone.returncode == 2 and "was not taken by the first process of this run within 1 s" in alone.stderr


def test_a_model_folder_save_that_fails_keeps_the_earlier_folder(tmp_path, monkeypatch):
    from retrieval_lab.files import OutputError, atomic_save_folder

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("earlier")

    def save(folder):
        folder.mkdir()
        (folder / "config.json").write_text("new")

    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".partial"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match=r"could not write .*model \(Input/output error\)"):
        atomic_save_folder(tmp_path / "model", save)
    assert (tmp_path / "model" / "config.json").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("logging", ["delayed", "disabled", "default"])
def test_any_job_logging_option_runs_and_the_hydra_files_are_written(logging, beir_folder, tmp_path):
    """The log file opens at its first line by default (hydra/job_logging=delayed); Hydra's own options still work, and
    in each the lock callback writes the run's .hydra/ files as Hydra would."""
    result = run_module("retrieval_lab.evaluate", "retriever=bm25", "data=beir", f"data.path={beir_folder}",
                        f"hydra/job_logging={logging}", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert (tmp_path / ".hydra" / "overrides.yaml").read_text().splitlines() == [
        "- retriever=bm25", "- data=beir", f"- data.path={beir_folder}"]
    assert f"hydra/job_logging: {logging}" in (tmp_path / ".hydra" / "hydra.yaml").read_text()
    assert (tmp_path / "evaluate.log").exists() == (logging == "default")  # evaluate logs no line with BM25
