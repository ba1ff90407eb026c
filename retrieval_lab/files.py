"""The files a run writes and the checkpoints it reads.

Every output is written to a temporary name beside its final one (the same folder, so the rename is atomic) and
renamed: a reader never sees half a file, and a write that fails (a full disk, a read-only folder) removes what it
had written and leaves the earlier file as it was. Checkpoints are read with ``torch.load(weights_only=True)``:
tensors and plain values only, so a crafted file cannot run code.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import IO, Callable

from retrieval_lab.errors import ConfigError, UserError, find_unwritable


class OutputError(UserError):
    """An output could not be written (no space left, a read-only folder, a path under a file)."""


def write_failed(path: str | Path, err: BaseException) -> OutputError | None:
    """The one sentence for a write of ``path`` that the machine refused (any OSError of the write, also one wrapped
    in another error: torch.save raises a RuntimeError for the OSError of a full disk); None for any other error."""
    refused = err if isinstance(err, OSError) else find_unwritable(err, context=True)
    if refused is None:
        return None
    return OutputError(f"could not write {path} ({refused.strerror or refused}); what was written before it is as it "
                       f"was.")


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a binary file that becomes ``path`` once it is complete and on disk."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        refused = write_failed(path, err)
        if refused is not None:
            raise refused from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_save_folder(path: str | Path, save: Callable[[Path], None]) -> None:
    """Call ``save`` on ``<path>.partial`` and put it in place of ``path``: a crash or a full disk while saving never
    leaves a complete-looking folder, and a failed save removes the partial one (an earlier ``path`` stays, and is
    removed only once the new one is in place)."""
    path = Path(path)
    partial, old = path.with_name(path.name + ".partial"), temporary_name(path)
    try:
        shutil.rmtree(partial, ignore_errors=True)
        save(partial)
        if path.exists():
            os.replace(path, old)  # a folder cannot be renamed over a folder: the earlier one steps aside first
        try:
            os.replace(partial, path)
        except BaseException:
            if old.exists():
                os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        refused = write_failed(path, err)
        if refused is not None:
            raise refused from None
        raise


def load_checkpoint(path: str | Path, what: str, mmap: bool = False) -> dict:
    """A training checkpoint's contents, read without running any code it might hold; ``what`` (e.g.
    ``resume=last``) names the setting that pointed at it in the one sentence a file of another kind gets."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... for other files
        blocked = re.search(r"GLOBAL (\S+)", str(err))  # what torch's weights-only unpickler refused to import
        if blocked:
            raise ConfigError(f"{what}: {path} was not loaded: it asks to import {blocked.group(1)}, and a checkpoint "
                              f"holds only tensors and plain values (loading Python objects could run code).") from None
        raise ConfigError(f"{what}: {path} is not a training checkpoint (torch.load could not read it: "
                          f"{type(err).__name__}).") from None
    step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"{what}: {path} is not a training checkpoint (it has no global_step that is a whole "
                          f"number).")
    settings = state.get("retrieval_lab_settings")
    if settings is not None and not (isinstance(settings, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                         for k, v in settings.items())):
        raise ConfigError(f"{what}: {path} is not a checkpoint of this project (its retrieval_lab_settings are not "
                          f"names and values).")
    return state
