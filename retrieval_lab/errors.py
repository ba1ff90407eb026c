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


@contextmanager
def exit_on_user_error():
    """Turn a UserError into one line on stderr and exit status 2 (no stack trace)."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
