"""User-facing errors: one sentence that names the file, line or config key at fault."""
from __future__ import annotations

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


@contextmanager
def exit_on_user_error():
    """Turn a UserError into one line on stderr and exit status 2 (no stack trace)."""
    try:
        yield
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr, flush=True)
        sys.exit(2)
