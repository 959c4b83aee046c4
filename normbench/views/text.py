"""Values as the tables, messages and figures show them: as a user would type them, two
values that differ never alike, cut to a length a terminal can hold.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pandas as pd

# ----------------------------------------------------------------------------- display


#: The most characters of one value or key a table or a message shows: a received
#: folder's text may be a megabyte long. The files written keep it whole.
SHOWN_MAX = 200


def cut(text: str) -> str:
    return text if len(text) <= SHOWN_MAX else text[: SHOWN_MAX - 1] + "…"


def short_key(key: str) -> str:
    """``norm.name`` -> ``norm``: a group's name is the group (cut to ``SHOWN_MAX``)."""
    return cut(key.removesuffix(".name"))


def format_value(value: Any, key: str | None = None) -> str:
    """A config value as a table shows it, as a user would type it (``null``, ``true``,
    ``0.1``, ``'  '``): two values that differ never show alike (:func:`format_float`,
    :func:`format_string`, told the value's ``key`` where it is known); cut to
    ``SHOWN_MAX`` characters."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    if isinstance(value, float | np.floating):
        whole = float(value).is_integer() and abs(value) < 1e16  # 1e+20, not 21 digits
        return str(int(value)) if whole else format_float(value)
    if isinstance(value, str):
        return cut(format_string(value, key))
    return cut(str(value))


def format_float(value: float) -> str:
    """``value`` as ``%g`` writes it (``0.1``, ``1e-05``) where that reads back as the
    same number, else in the fewest digits that do (Python's and numpy's ``str``:
    ``0.1000000001``), so that two values that differ never print alike."""
    shown = f"{value:g}"
    return shown if type(value)(shown) == value else str(value)


#: Strings that would read as another type's value (null, a boolean, a number, a list)
#: or hide their own edges: quoted when shown.
_LITERALS = frozenset({"null", "~", "true", "false"})


@functools.cache
def _labels() -> dict[str, frozenset[str]]:
    """The config keys whose values are names from a closed set (the schema's ``Choice``
    rules: ``precision``'s 32, bf16 and fp16, ``device``, ``schedule``), with their names."""
    from normbench.schema.config import rules
    from normbench.schema.rule import Choice

    return {k: frozenset(r.choices) for k, r in rules().items() if isinstance(r, Choice)}


def format_string(value: str, key: str | None = None) -> str:
    """A string value as it is, or quoted (Python's ``repr``) where it would otherwise
    show as nothing or as another value: empty or blank (``''``, ``'  '``), with spaces
    at an edge, starting with a quote or a bracket, or reading as ``null``, a boolean or
    a number (``'0.1'``). One of the names a ``key`` takes from a closed set is shown as
    it is (``precision`` 32: that key holds no number for it to be confused with)."""
    if key is not None and value in _labels().get(key, ()):
        return value
    if not value or value != value.strip() or value[0] in "'\"[{" or value.lower() in _LITERALS:
        return repr(value)
    try:
        float(value)
    except ValueError:
        return value
    return repr(value)
