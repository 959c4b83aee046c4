"""The one exception type for mistakes a user can make.

The CLI turns a ``UserError`` into a one-line message and exit status 2 (1 for a
:class:`UserCodeFailed`); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input from the user: unknown option, invalid value, missing data set."""


class UserCodeFailed(UserError):
    """A user's code (their norm class) failed while a run trained, after the checks before
    it had passed: the run is recorded as failed, with the traceback in its folder. One
    line too, but exit status 1 (:attr:`exit_status`), as a sweep with failed runs: the
    command was accepted and wrote its run, which did not complete."""

    exit_status = 1


class NotWritten(UserError):
    """A file could not be written where the user asked: one line, exit status 2. Here,
    below the run store and the lock that both raise it."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(f"cannot write {path}: {error.strerror or error}")
        self.path, self.error = path, error


class Notice(UserWarning):
    """Something the user should know that is not an error: a value normbench changed or a
    file it ignores. Raised with ``warnings.warn``; the CLI prints it as one line,
    ``warning: ...``."""
