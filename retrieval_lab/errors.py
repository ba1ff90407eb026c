"""User-facing errors: one sentence that names the file, line or config key at fault."""
from __future__ import annotations

import errno
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input or an impossible configuration; the message is shown to the user as is."""


class DataError(UserError):
    """A data file is missing or malformed."""


class ConfigError(UserError):
    """A configuration value or combination that cannot work."""


def find_user_error(err: BaseException | None) -> UserError | None:
    """The UserError behind ``err``, also when a library (e.g. Hydra's instantiate) wrapped it."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


def warn(message: str) -> None:
    """Input the run goes on with, told in one line on stderr (``warning: ...``), as errors are."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# what the machine says when a file cannot be written (or read): no space, a read-only or forbidden folder, a path
# under a file, a folder where a file belongs
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def find_unwritable(err: BaseException | None, context: bool = False) -> OSError | None:
    """The OSError of that kind behind ``err`` (raised by a library's own write, e.g. a logger's), following the
    errors it was raised from (``context``: also those it was raised while handling, as torch.save does with the
    OSError of a full disk)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in UNWRITABLE:
            return err
        err = err.__cause__ or (err.__context__ if context else None)
    return None


def lightning_settings_error(err: BaseException) -> Exception | None:
    """Lightning's refusal of a Trainer setting (e.g. a limit_train_batches fraction that leaves no batch), whose
    message is a sentence already; None for anything else (and when Lightning was never imported)."""
    module = sys.modules.get("lightning.fabric.utilities.exceptions")
    if module is not None and isinstance(err, module.MisconfigurationException):
        return err
    return None


@contextmanager
def exit_on_user_error():
    """Turn a UserError, or an output the machine refused to write, into one line on stderr and exit status 2 (no
    stack trace)."""
    try:
        yield
    except Exception as err:
        user_error, unwritable = find_user_error(err) or lightning_settings_error(err), find_unwritable(err)
        if user_error is None and unwritable is None:
            raise
        if user_error is None:
            where = f": {unwritable.filename}" if unwritable.filename else ""
            user_error = f"{unwritable.strerror}{where}; the run stopped there."
        print(f"error: {user_error}", file=sys.stderr, flush=True)
        sys.exit(2)
