"""The rules a config value must follow, and the allowed values they name.

A rule (:class:`Rule`) checks one value and says, in the user's words, what it must be; the
schema's fields carry one each (:mod:`normbench.schema.config`), and the checks and the
reference read them from there. The allowed values of the choice keys, and float32's
limits that every number a run computes with must respect, are declared here once.

Nothing here imports torch, Hydra or OmegaConf: ``normbench --help`` reads this module.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

LR_SCALINGS = ("none", "linear", "sqrt")
BUDGETS = ("epochs", "steps")
SCHEDULES = ("constant", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
#: The memory layouts a run (``memory_format``) and ``normbench bench`` can use; their torch
#: formats are ``models.torch_memory_format``'s.
LAYOUTS = ("contiguous", "channels_last")
#: ``memory_format``: auto picks one of LAYOUTS per run (models.choose_memory_format)
MEMORY_FORMATS = ("auto", *LAYOUTS)
BACKENDS = ("auto", "cpu", "triton", "reference")
#: ``precision``: float32 | bfloat16 (CPU and CUDA) | float16 (CUDA, with a gradient scaler).
#: Strings: Hydra reads ``precision=32`` as an integer, which the string field turns into "32".
PRECISIONS = ("32", "bf16", "fp16")

#: The largest float32. Runs compute in float32, and torch converts every setting that
#: enters a tensor operation (a learning rate, momentum, weight decay, an epsilon) to the
#: parameters' dtype: a larger value stops the first optimizer step with an overflow.
FLOAT32_MAX = 3.4028234663852886e38

#: The smallest positive normal float32 (``torch.finfo(torch.float32).tiny``). A value that
#: must be above 0 must be at least this: a smaller one is 0 in float32 (1e-46), or a
#: subnormal that a GPU's kernels flush to 0, which an epsilon under a square root cannot be.
FLOAT32_TINY = 1.1754943508222875e-38

_TOO_LARGE = f"a number <= {FLOAT32_MAX:.4g} (float32's largest: runs compute in float32)"
_TOO_SMALL = (
    f"a number >= {FLOAT32_TINY:.4g} (float32's smallest normal: runs compute in float32, "
    "where a smaller one is 0 or flushed to 0)"
)


def closest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice nearest ``word``, or nothing."""
    matches = difflib.get_close_matches(word, [c for c in choices if c != word], n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def closest_key(key: str, keys: Iterable[str]) -> str:
    """:func:`closest` for a dotted config key: among the keys beside it first, by what
    follows their common prefix (``norm.grups`` with ``norm=group``: ``norm.groups``; the
    shared ``norm.`` makes no unrelated key look close), then among the others by the
    whole key (``nrom.eps``: ``norm.eps``), then by its last part (``optim.lrr``: ``lr``)."""
    parent, dot, leaf = key.rpartition(".")
    siblings = {k[len(parent) + 1 :]: k for k in keys if dot and k.startswith(f"{parent}.")}
    others = [k for k in keys if k not in siblings.values() and k != key]
    for word, pool in ((leaf, siblings), (key, others), (leaf, others)):
        names = {name: name for name in pool} if isinstance(pool, list) else pool
        matches = difflib.get_close_matches(word, [n for n in names if n != word], n=1)
        if matches:
            return f" (did you mean {names[matches[0]]!r}?)"
    return ""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


# ----------------------------------------------------------------------------- the rules
#
# A rule checks one value and says, in the user's words, what the value must be: its
# ``text`` ("an integer >= 1") follows "<key> must be" in the message, and fills the
# reference's "allowed" column; ``kind`` fills its "type" column.


class Rule:
    """What a key's value must be. :meth:`check`: None when ``value`` passes, else what
    it must be. ``options(group)`` gives a group's options, for a rule naming one."""

    kind = "any"
    text = "anything"

    def check(self, value: Any, options: Callable[[str], list[str]] | None = None) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Whole(Rule):
    """An integer in ``[low, high]`` (``null``: or None)."""

    low: int
    high: int | None = None
    null: bool = False

    @property
    def kind(self) -> str:
        return "integer" + (" or null" if self.null else "")

    @property
    def text(self) -> str:
        high = self.high
        if high is not None and high > 10**6 and (high + 1) & high == 0:  # 2**63 - 1, readably
            top = f" and <= 2**{high.bit_length()} - 1"
        else:
            top = f" and <= {high}" if high is not None else ""
        return f"an integer >= {self.low}{top}" + (" or null" if self.null else "")

    def check(self, value, options=None):
        if self.null and value is None:
            return None
        ok = is_int(value) and value >= self.low and (self.high is None or value <= self.high)
        return None if ok else self.text


@dataclass(frozen=True)
class Number(Rule):
    """A finite number above ``low`` (``strict``) or from it, at most ``high``; without a
    ``high``, at most float32's largest, and a positive one at least float32's smallest."""

    low: float
    strict: bool
    high: float | None = None
    null: bool = False

    @property
    def kind(self) -> str:
        return "number" + (" or null" if self.null else "")

    @property
    def text(self) -> str:
        rule = f"a number {'>' if self.strict else '>='} {self.low:g}"
        rule += f" and <= {self.high:g}" if self.high else ""
        return rule + (" or null" if self.null else "")

    def check(self, value, options=None):
        if self.null and value is None:
            return None
        low = self.low
        ok = is_number(value) and (value > low if self.strict else value >= low)
        if ok and self.high is None and value > FLOAT32_MAX:
            return _TOO_LARGE
        if ok and self.strict and low == 0 and value < FLOAT32_TINY:
            return _TOO_SMALL
        return None if ok and (self.high is None or value <= self.high) else self.text


@dataclass(frozen=True)
class Choice(Rule):
    """One of ``choices``; ``ints``: a choice that is a number's digits may be given as that
    integer (Hydra reads ``precision=32`` as one; the string field holds "32")."""

    choices: tuple[str, ...]
    ints: bool = False
    kind = "string"

    @property
    def text(self) -> str:
        return f"one of {', '.join(self.choices)}"

    def check(self, value, options=None):
        if value in self.choices or (self.ints and is_int(value) and str(value) in self.choices):
            return None
        return self.text + (closest(str(value), self.choices) if value else "")


@dataclass(frozen=True)
class Flag(Rule):
    """true or false (``null``: or None)."""

    null: bool = False

    @property
    def kind(self) -> str:
        return "boolean" + (" or null" if self.null else "")

    @property
    def text(self) -> str:
        return "true or false" + (" or null" if self.null else "")

    def check(self, value, options=None):
        return None if isinstance(value, bool) or (self.null and value is None) else self.text


@dataclass(frozen=True)
class Text(Rule):
    kind = "string"
    text = "a non-empty string"

    def check(self, value, options=None):
        return None if isinstance(value, str) and value.strip() else self.text


@dataclass(frozen=True)
class Wholes(Rule):
    """A list of integers >= ``low``; ``empty``: the list may be empty."""

    low: int
    empty: bool
    kind = "list of integers"

    @property
    def text(self) -> str:
        return f"a list of integers >= {self.low}" + ("" if self.empty else " (at least one)")

    def check(self, value, options=None):
        items = list(value) if isinstance(value, list | tuple) else None
        ok = (
            items is not None
            and (self.empty or items)
            and all(is_int(v) and v >= self.low for v in items)
        )
        return None if ok else self.text


@dataclass(frozen=True)
class Fractions(Rule):
    kind = "list of numbers"
    text = "a list of fractions of training between 0 and 1"

    def check(self, value, options=None):
        items = list(value) if isinstance(value, list | tuple) else None
        ok = items is not None and all(is_number(m) and 0 < m < 1 for m in items)
        return None if ok else self.text


@dataclass(frozen=True)
class Betas(Rule):
    kind = "list of two numbers"
    text = "two numbers in [0, 1), as [0.9, 0.999]"

    def check(self, value, options=None):
        items = list(value) if isinstance(value, list | tuple) else []
        ok = len(items) == 2 and all(is_number(b) and 0 <= b < 1 for b in items)
        return None if ok else self.text


@dataclass(frozen=True)
class Split(Rule):
    """A validation split: a fraction of the training images or a count of them."""

    kind = "number or integer"
    text = "a fraction in [0, 1) of the training images or a count of them (0: none)"

    def check(self, value, options=None):
        fraction = isinstance(value, float) and 0 <= value < 1
        return None if fraction or (is_int(value) and value >= 0) else self.text


@dataclass(frozen=True)
class Keys(Rule):
    kind = "list of strings or null"
    text = "a list of config keys, as [lr], or null"

    def check(self, value, options=None):
        ok = value is None or (
            isinstance(value, list | tuple)
            and value
            and all(isinstance(k, str) and k for k in value)
        )
        return None if ok else self.text


@dataclass(frozen=True)
class Option(Rule):
    """One of a config group's options, or null."""

    group: str
    kind = "string or null"

    @property
    def text(self) -> str:
        return f"a {self.group} option or null"

    def check(self, value, options=None):
        valid = options(self.group) if options is not None else None
        if value is None or (valid is not None and value in valid):
            return None
        if valid is None:
            return None if isinstance(value, str) else self.text
        return f"a {self.group} ({', '.join(valid)}) or null"
