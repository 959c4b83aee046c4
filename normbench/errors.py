"""The one exception type for mistakes a user can make.

The CLI turns a ``UserError`` into a one-line message and exit status 2; any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: unknown option, invalid value, missing data set."""


class Notice(UserWarning):
    """Something the user should know that is not an error: a value normbench changed or a
    file it ignores. Raised with ``warnings.warn``; the CLI prints it as one line,
    ``warning: ...``."""
