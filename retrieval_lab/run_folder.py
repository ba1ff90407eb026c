"""The run folder: one process at a time in it, and what a rerun of a command finds there.

A rerun with the same folder resumes from its last checkpoint when the settings that define the run are unchanged
(``check_resumable``), and keeps the CSV rows logged before it (``csv_logger``); a run that starts afresh there moves
the earlier run's outputs into ``previous/`` (``set_aside_earlier_run``).

A Hydra callback (``hydra.callbacks.run_folder`` in every entry point's config) locks the run folder: for a run,
``hydra.run.dir`` before Hydra does anything there; for a multirun, the sweep folder for the launching process and
each job's folder for its job. Hydra itself writes nothing into a folder before it is locked: the entry points'
configs set ``hydra.output_subdir: null`` and open the log file at its first line (``hydra/job_logging=delayed``), and
the callback writes ``.hydra/`` (config.yaml, hydra.yaml, overrides.yaml, as Hydra would) once it holds the lock.

The lock is an OS file lock (``filelock.FileLock`` on ``<folder>/.lock``): it is released when the process ends, also
when it is killed, so a run stopped by SIGKILL can be resumed at once. A second run into a locked folder stops with
one sentence naming the folder and the process holding it, and changes nothing there. The other processes of a
distributed run (Lightning's, torchrun's, SLURM's) take no lock of their own: they check that the holder is the first
process of their own job (their parent, or the same job id and rendezvous address), and stop with that sentence
otherwise. The process that takes a folder also removes the temporary files that a killed process left there
(``.<name>.tmp<pid>``, ``<name>.partial/``).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from retrieval_lab.errors import ConfigError
from retrieval_lab.files import OutputError, atomic_write_text, load_checkpoint

LOCK, HOLDER, HYDRA_FILES = ".lock", ".lock.json", ".hydra"  # the lock, who holds it, Hydra's record of the run
# the same in every process of one launched job (the rendezvous address too: two jobs cannot share it at once)
JOB_IDS = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT")
JOIN_WAIT = 120  # seconds a distributed run's other process waits for its first process to take the folder
_HELD: dict[str, object] = {}  # folder -> its FileLock, at module level: Hydra's launchers pickle their callbacks


def is_first_process() -> bool:
    """Whether this is the first process of a (possibly) distributed run, known before Lightning sets one up:
    torchrun sets RANK, SLURM sets SLURM_PROCID, and Lightning's own launcher starts the other processes of a
    machine with LOCAL_RANK and the other machines with NODE_RANK. Only the first process evaluates and writes
    the run's outputs (and holds the run folder's lock); the others only train."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def stop(message: str) -> None:
    """One sentence on stderr and exit status 2, as :func:`retrieval_lab.errors.exit_on_user_error` does (a Hydra
    callback runs outside the entry point's own error handling)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def read_holder(folder: Path) -> dict:
    try:
        info = json.loads((folder / HOLDER).read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(info: dict) -> str:
    try:
        return (f"process {info['pid']} on {info['host']} (started {info['started']}: "
                f"{' '.join(map(str, info['command']))[:200]})")
    except (KeyError, TypeError):
        return "another process (it has not said which yet)"


def in_use(folder: Path, info: dict) -> None:
    stop(f"run folder {folder} is in use by {describe(info)}; nothing in it was changed (wait for that run to end, "
         f"or choose another hydra.run.dir / hydra.sweep.dir).")


def remove_interrupted_writes(folder: Path) -> list[Path]:
    """The temporary files and folders that processes killed while writing left in ``folder`` or a folder in it
    (``checkpoints/``, ``after/``, a sweep's jobs), removed: a process holding the lock is the only one writing there.
    A folder inside with a lock of its own (a sweep's job, a run inside a sweep folder) is left to its own holder."""
    left = []
    for level in ("", "*/", "*/*/"):
        found = [p for p in folder.glob(f"{level}.*.tmp*") if p.name.rsplit(".tmp", 1)[-1].isdigit()]
        found += [p for p in folder.glob(f"{level}*.partial") if p.is_dir()]
        left += [p for p in found if not any((parent / LOCK).exists() for parent in p.parents
                                             if parent != folder and folder in parent.parents)]
    for path in left:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return left


def cannot_write(folder: Path, err: OSError) -> None:
    stop(f"run folder {folder} cannot be written ({err.strerror or err}{f': {err.filename}' if err.filename else ''}).")


def lock(folder: str | Path) -> None:
    """Take ``folder``'s lock for this process (creating the folder), or stop with one sentence: the folder is in
    use, or cannot be written (read-only, under a file, no space)."""
    from filelock import FileLock, Timeout

    folder = Path(folder).absolute()
    if str(folder) in _HELD:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        held = FileLock(folder / LOCK, timeout=0)
        held.acquire()
    except Timeout:
        in_use(folder, read_holder(folder))
    except OSError as err:
        cannot_write(folder, err)
    try:
        atomic_write_text(folder / HOLDER, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": sys.argv, "job": {name: os.environ[name] for name in JOB_IDS if name in os.environ}}) + "\n")
    except OutputError as err:
        held.release()
        stop(str(err))
    _HELD[str(folder)] = held
    left = remove_interrupted_writes(folder)
    if left:
        print(f"removed {len(left)} temporary file(s) an interrupted run left in {folder}")


def unlock(folder: str | Path) -> None:
    held = _HELD.pop(str(Path(folder).absolute()), None)
    if held is not None:
        held.release()


def join(folder: str | Path, wait: float = JOIN_WAIT) -> None:
    """For a process of a distributed run other than the first: wait until the folder is locked by the first
    process of this job (this process's parent, as Lightning's launcher starts them on one machine; else the same
    torchrun or SLURM job id and rendezvous address), or stop with one sentence when another run holds it."""
    from filelock import FileLock, Timeout

    folder = Path(folder).absolute()
    job = {name: os.environ[name] for name in JOB_IDS if name in os.environ}
    deadline, held_by = time.monotonic() + wait, None
    while time.monotonic() < deadline:
        probe = FileLock(folder / LOCK, timeout=0)
        try:
            probe.acquire()
            probe.release()  # free: the first process has not taken it yet
            held_by = None
        except Timeout:  # held: by this job's first process?
            held_by = read_holder(folder)
            ours = (held_by.get("pid") == os.getppid() and held_by.get("host") == socket.gethostname()) or (
                bool(job) and held_by.get("job") == job)
            if ours:
                return
        except OSError as err:
            cannot_write(folder, err)
        time.sleep(0.5)
    if held_by is None:
        stop(f"run folder {folder} was not taken by the first process of this run within {wait:.0f} s (this process "
             f"is not the first: RANK, SLURM_PROCID or LOCAL_RANK says so).")
    in_use(folder, held_by)


def save_hydra_files(config: DictConfig) -> None:
    """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` of the job, as Hydra writes them (it does not
    here: ``hydra.output_subdir`` is null, so that nothing is written before the lock is taken)."""
    from hydra.core.hydra_config import HydraConfig

    task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    folder = Path(config.hydra.runtime.output_dir) / HYDRA_FILES
    try:
        for name, part in (("config.yaml", task), ("hydra.yaml", HydraConfig.instance().cfg),
                           ("overrides.yaml", config.hydra.overrides.task)):
            atomic_write_text(folder / name, OmegaConf.to_yaml(part))
    except OutputError as err:
        stop(str(err))


class RunFolderLock(Callback):
    """Locks ``hydra.run.dir`` for a run, ``hydra.sweep.dir`` for a multirun's launching process and each job's
    folder for the job, and writes the job's ``.hydra/`` files once it holds the lock (see the module's docstring).
    The other processes of a distributed run join the first one's lock."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        folder = OmegaConf.select(config, "hydra.run.dir")
        lock(folder) if is_first_process() else join(folder)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        unlock(OmegaConf.select(config, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        lock(OmegaConf.select(config, "hydra.sweep.dir"))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        unlock(OmegaConf.select(config, "hydra.sweep.dir"))

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode.name == "MULTIRUN":
            lock(config.hydra.runtime.output_dir) if is_first_process() else join(config.hydra.runtime.output_dir)
        if is_first_process() and config.hydra.output_subdir is None:
            save_hydra_files(config)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode.name == "MULTIRUN":
            unlock(config.hydra.runtime.output_dir)


# What a run leaves in its folder, and how a rerun of its command continues or sets it aside

RUN_OUTPUTS = ("metrics.json", "run_info.json", "model", "cross_encoder", "before", "after", "checkpoints", "csv",
               "wandb")


def set_aside_earlier_run(run_dir: Path) -> Path | None:
    """A run that starts afresh in a folder holding another run's outputs (``resume=null``, or no checkpoint left)
    moves them into ``previous/`` (``previous-2/``, ... when that is taken): nothing written before is lost, and
    the folder never mixes the two runs' files (a report would label the old metrics with the new settings)."""
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return None
    aside, n = run_dir / "previous", 1
    while aside.exists():
        n += 1
        aside = run_dir / f"previous-{n}"
    aside.mkdir()
    for name in found:
        os.replace(run_dir / name, aside / name)
    print(f"starting afresh: the earlier run's outputs in {run_dir} are now in {aside}")
    return aside


def csv_logger(run_dir: Path, resume_step: int | None = None):
    """<run dir>/csv/metrics.csv. A run resumed from a checkpoint of step N appends to it: Lightning's writer
    deletes an existing file when it starts, so the rows logged before the checkpoint are put back (those of
    steps N and later that training will log again are left out) and the writer learns their header. (A run
    that starts afresh found the folder emptied by ``set_aside_earlier_run``.)"""
    from lightning.pytorch.loggers import CSVLogger

    path = run_dir / "csv" / "metrics.csv"
    rows = list(csv.reader(path.read_text().splitlines())) if path.is_file() and resume_step is not None else []
    logger = CSVLogger(run_dir, name="csv", version="")
    writer = logger.experiment  # created here, deleting the file
    if rows:
        header = rows[0]
        step, loss = header.index("step"), header.index("train/loss") if "train/loss" in header else None

        def before(row: list[str]) -> bool:  # a row training will not log again: before step N, or not a step's
            return float(row[step]) < resume_step or (float(row[step]) == resume_step and not (loss and row[loss]))

        kept = io.StringIO(newline="")
        csv.writer(kept).writerows([header] + [row for row in rows[1:] if before(row)])
        atomic_write_text(path, kept.getvalue())
        writer.metrics_keys = header  # the columns in the file's order
    return logger


# settings a resumed run may change: how long it trains, on what hardware, how it is evaluated, logged and
# checkpointed (the rest define what it trains)
RESUMABLE_CHANGES = ("resume", "trainer.max_epochs", "trainer.max_steps", "trainer.enable_progress_bar",
                     "trainer.log_every_n_steps", "trainer.devices", "trainer.num_nodes", "trainer.accelerator",
                     "trainer.strategy", "trainer.precision", "num_workers", "eval.", "validation.", "checkpoint.",
                     "logger.", "save_model",
                     "negatives._target_")  # the strategy's class: checkpoints from before it was named resume


def resolved_config(cfg: DictConfig) -> dict:
    """The config as a dict, with the encoder's effective settings where the model config leaves them null (a saved
    folder's value, else the default; :func:`retrieval_lab.models.encoder.effective_settings`)."""
    from hydra.utils import get_class

    from retrieval_lab.models.encoder import Encoder, effective_settings

    resolved = OmegaConf.to_container(cfg, resolve=True)
    if issubclass(get_class(cfg.model._target_), Encoder):
        resolved["model"].update(effective_settings(cfg.model.name_or_path, resolved["model"]))
    return resolved


def run_settings(cfg: DictConfig) -> dict[str, str]:
    """The resolved settings that define what a run trains (dotted key -> value), written into its checkpoints."""
    def flatten(value, prefix: str = ""):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from flatten(item, f"{prefix}{key}.")
        else:
            yield prefix[:-1], repr(value)

    return {key: value for key, value in flatten(resolved_config(cfg)) if not key.startswith(RESUMABLE_CHANGES)}


# settings added after some checkpoints were written: the new key -> the older setting its value came from then
ADDED_SETTINGS = {"data.split_seed": "seed"}  # until stop 20, the dev carve and validation's sample followed seed


def check_resumable(checkpoint: str, cfg: DictConfig) -> int:
    """The step of ``checkpoint``; a ConfigError when it was written by a run with other settings (another loss,
    temperature, learning rate, ...), whose weights this run would silently continue (or, when that run had
    finished, report as its own)."""
    state = load_checkpoint(checkpoint, f"resume={cfg.resume}", mmap=True)
    step = int(state["global_step"])
    saved = state.get("retrieval_lab_settings")
    if saved is not None:
        saved = {**{key: saved[older] for key, older in ADDED_SETTINGS.items() if key not in saved and older in saved},
                 **saved}
        now = run_settings(cfg)
        changed = [f"{key}: {saved.get(key, '(unset)')} -> {now.get(key, '(unset)')}"
                   for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
        if changed:
            raise ConfigError(f"resume={cfg.resume}: {checkpoint} was written by a run with other settings "
                              f"({'; '.join(changed[:5])}{'; ...' if len(changed) > 5 else ''}); use another "
                              f"hydra.run.dir (or hydra.sweep.dir), or resume=null to start afresh there.")
    return step


def resume_from(cfg: DictConfig, run_dir: Path) -> str | None:
    """``resume=auto`` (or ``last``): the run directory's last.ckpt when there is one, so rerunning a command with
    the same ``hydra.run.dir`` continues it; ``null``: always start afresh; a path: that checkpoint."""
    if not cfg.resume:
        return None
    if cfg.resume in ("auto", "last"):
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            print(f"resuming from {last}")
            return str(last)
        return None
    if not Path(cfg.resume).is_file():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint file.")
    return str(cfg.resume)
