"""One process at a time in a run folder.

A Hydra callback (``hydra.callbacks.run_folder`` in every entry point's config) locks the run folder
(``hydra.run.dir``; for a multirun the sweep folder, and each job's folder while it runs) before Hydra writes
anything into it (``.hydra/``, the log file) and before the run does. The lock is an OS file lock
(``filelock.FileLock`` on ``<folder>/.lock``): it is released when the process ends, also when it is killed, so a
run stopped by SIGKILL can be resumed at once. A second run into a locked folder stops with one sentence naming the
folder and the process holding it, and changes nothing there. The folder is also where the interrupted writes of
an earlier process are cleaned up: its temporary files (``.<name>.tmp<pid>``, ``<name>.partial``).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

LOCK, HOLDER = ".lock", ".lock.json"  # the lock file, and who holds it (written once the lock is taken)
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


def holder(folder: Path) -> str:
    try:
        info = json.loads((folder / HOLDER).read_text())
        return (f"process {info['pid']} on {info['host']} (started {info['started']}: "
                f"{' '.join(info['command'])[:200]})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"


def remove_interrupted_writes(folder: Path) -> list[Path]:
    """The temporary files and folders that processes killed while writing left in ``folder`` or a folder in it
    (``checkpoints/``, ``after/``, a sweep's jobs), removed: a process holding the lock is the only one writing."""
    left = []
    for level in ("", "*/", "*/*/"):
        left += [p for p in folder.glob(f"{level}.*.tmp*") if p.name.rsplit(".tmp", 1)[-1].isdigit()]
        left += [p for p in folder.glob(f"{level}*.partial") if p.is_dir()]
    for path in left:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return left


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
        stop(f"run folder {folder} is in use by {holder(folder)}; nothing in it was changed (wait for that run to "
             f"end, or choose another hydra.run.dir / hydra.sweep.dir).")
    except OSError as err:
        stop(f"run folder {folder} cannot be written ({err.strerror or err}{f': {err.filename}' if err.filename else ''}).")
    try:
        (folder / HOLDER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                 "command": sys.argv}) + "\n")
    except OSError as err:
        held.release()
        stop(f"run folder {folder} cannot be written ({err.strerror or err}).")
    _HELD[str(folder)] = held
    left = remove_interrupted_writes(folder)
    if left:
        print(f"removed {len(left)} temporary file(s) an interrupted run left in {folder}")


def unlock(folder: str | Path) -> None:
    held = _HELD.pop(str(Path(folder).absolute()), None)
    if held is not None:
        held.release()


class RunFolderLock(Callback):
    """Locks ``hydra.run.dir`` for a run, ``hydra.sweep.dir`` for a multirun's launching process and each job's
    folder for the job, from before Hydra writes there until the run ends (see the module's docstring). The other
    processes of a distributed run share the first one's folder and lock."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if is_first_process():
            lock(OmegaConf.select(config, "hydra.run.dir"))

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        unlock(OmegaConf.select(config, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if is_first_process():
            lock(OmegaConf.select(config, "hydra.sweep.dir"))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        unlock(OmegaConf.select(config, "hydra.sweep.dir"))

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode.name == "MULTIRUN" and is_first_process():
            lock(config.hydra.runtime.output_dir)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode.name == "MULTIRUN":
            unlock(config.hydra.runtime.output_dir)
