"""Text that came from outside, made safe to show on a terminal.

A results folder someone sent, a config value, a path, a user's norm class: any of
them may hold control characters (an escape sequence that sets the window title,
clears the screen or recolours a table) or text that rich would read as markup
(``[/x]`` raises, ``[red]`` recolours, ``[old]`` vanishes). Everything shown from
such a source goes through :func:`clean` (control characters written as Python
escapes, ``\\x1b`` for ESC) and reaches rich as :class:`rich.text.Text`, never as
markup: :func:`text` builds one, :func:`line` one styled prefix and a clean message.

normbench prints through :class:`Console`, which shows every string it is handed
this way (a table's cells and title included), so a string can never be read as
markup there; normbench's own styling comes as ``Text`` (:func:`line`, :func:`styled`).
Files keep the exact values: only what is shown is escaped.
"""

from __future__ import annotations

import contextlib
import re
import sys
import unicodedata
from typing import Any, TextIO

import rich.console
from rich.text import Text

# ASCII text (the common case) needs one regex: C0 controls (newline and tab too: a
# one-line message stays one line) and DEL.
_ASCII_CONTROL = re.compile("[\x00-\x1f\x7f]")
_ASCII_CONTROL_KEEP_NEWLINES = re.compile("[\x00-\x09\x0b-\x1f\x7f]")

# Other text is read character by character against Unicode's categories (as this
# Python's unicodedata knows them, so new characters are covered as they are added):
# controls (C0, DEL, C1: CSI and OSC have one-byte forms there), formatting characters
# that reorder or hide what follows (bidirectional overrides and isolates, zero-width
# joiners, the BOM, the invisible tag characters), lone surrogates (an undecodable byte
# of a path or an argument, a JSON "\ud800") that no terminal encoding can write, and
# the line and paragraph separators.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # Python's stand-in for an undecodable byte: that byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def clean(value: Any, *, newlines: bool = False) -> str:
    """``str(value)`` with every control and invisible formatting character written as
    its escape (``\\x1b``, ``\\n``, ``\\u202e``); with ``newlines``, line breaks are
    kept (a multi-line text whose lines are cleaned, such as YAML)."""
    string = str(value)
    if string.isascii():
        pattern = _ASCII_CONTROL_KEEP_NEWLINES if newlines else _ASCII_CONTROL
        return pattern.sub(lambda match: _escape(match.group()), string)
    return "".join(
        _escape(char)
        if unicodedata.category(char) in _HIDDEN and not (newlines and char == "\n")
        else char
        for char in string
    )


def text(value: Any, style: str = "", *, newlines: bool = False) -> Text:
    """A rich Text of ``clean(value)``: printed as it reads, never parsed as markup."""
    return Text(clean(value, newlines=newlines), style=style)


def line(prefix: str, message: Any, style: str = "", *, newlines: bool = False) -> Text:
    """``prefix`` (normbench's own word, styled) followed by a cleaned message:
    ``line("error:", err, "bold red")``."""
    shown = Text()
    if prefix:  # the prefix's style is its own (a Text's style would cover the message too)
        shown.append(prefix, style=style or None)
        shown.append(" ")
    shown.append(clean(message, newlines=newlines))
    return shown


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line of several parts: a ``(words, style)`` pair is normbench's own words in a
    style, a plain string anything else (cleaned): ``styled(("diverged", "yellow"),
    f": {error}")``."""
    shown = Text()
    for part in parts:
        if isinstance(part, tuple):
            shown.append(part[0], style=part[1])
        else:
            shown.append(clean(part))
    return shown


#: The width a :class:`Console` that fits its content takes off a terminal: wide enough
#: that no table of normbench's wraps a cell (a table is as wide as its content, and
#: rich makes no line wider than that).
UNBOUNDED_WIDTH = 100_000


class Console(rich.console.Console):
    """A rich Console that shows every string as text: cleaned (:func:`clean`: a line
    break is shown as ``\\n``, so a string is one line), never read as markup or emoji
    codes (``:warning:``), not highlighted.
    That holds for strings printed and for those inside what is printed (a table's
    cells, title, caption). Styles come with ``Text``; a progress bar's ``TextColumn``
    formats its own markup, so it is made with ``markup=False`` and a cleaned label.

    With ``fit`` (the default for standard output), a console that writes to no terminal
    (a pipe, a file, a CI log) and is given no width (no ``width``, no ``COLUMNS``) is as
    wide as what it prints: a table keeps one row per line instead of rich's 80 columns,
    where cells wrap onto lines of their own. On a terminal it is the terminal's width,
    as rich has it. Standard error's console keeps rich's width: its progress displays
    fill the width they are given (``expand``)."""

    def __init__(self, *, fit: bool | None = None, **kwargs: Any):
        kwargs.setdefault("highlight", False)
        super().__init__(markup=False, emoji=False, **kwargs)
        self.fit = not kwargs.get("stderr", False) if fit is None else fit

    @property
    def size(self) -> rich.console.ConsoleDimensions:
        size = super().size
        # the file is looked up as it is written to (rich's default is sys.stdout at the
        # time, which a test runner swaps), so this is decided each time too
        if (
            self.fit
            and self._width is None
            and "COLUMNS" not in self._environ
            and not self.is_terminal
            and not self.is_jupyter
        ):
            return rich.console.ConsoleDimensions(UNBOUNDED_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        rich.console.Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    def render_str(self, text: str, **kwargs: Any) -> Text:
        kwargs.update(markup=False, emoji=False)
        return super().render_str(clean(text), **kwargs)


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` in Python's own format, control characters escaped (a
    warning may quote a user's value, a path, a compiler's output); normbench's notices
    (:class:`~normbench.errors.Notice`) as one line, ``warning: ...``, as the CLI shows
    them (in a sweep's worker or cluster job too)."""
    import warnings

    from normbench.errors import Notice

    if issubclass(category, Notice):
        shown = f"warning: {clean(message)}\n"
    else:
        formatted = warnings.formatwarning(message, category, filename, lineno, line)
        shown = clean(formatted, newlines=True)
    stream = file if file is not None else sys.stderr
    if stream is None:  # pythonw: nowhere to write, as Python's own
        return
    with contextlib.suppress(OSError):  # a closed pipe: a warning is not worth a traceback
        stream.write(shown)


def show_exception(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    """``sys.excepthook``: a traceback (a bug's, a user's norm failing inside a sweep's
    job) as Python prints it, control characters escaped: its message may quote a user's
    value or a received folder's text."""
    import traceback

    shown = "".join(traceback.format_exception(exc_type, exc, tb))
    if sys.stderr is not None:
        with contextlib.suppress(OSError):
            sys.stderr.write(clean(shown, newlines=True))
            sys.stderr.flush()


def print_exception() -> None:
    """``traceback.print_exc()``, cleaned (:func:`show_exception`)."""
    show_exception(*sys.exc_info())


def clean_logs() -> None:
    """Every log record made from now on in this process carries its message cleaned (tabs
    as spaces, line breaks kept) and its traceback too: what Hydra logs when a user turns
    its logging on (``hydra/hydra_logging=default``: ``#0 : norm=...``, the overrides as
    typed), a launcher's, a library's. Records are cleaned as they are made, not where
    they are written, as Hydra sets its handlers up anew for each job. Idempotent."""
    import logging

    previous = logging.getLogRecordFactory()
    if getattr(previous, "cleans", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # bad arguments: logging reports them itself when it emits
            return record
        record.msg, record.args = clean(message.expandtabs(), newlines=True), ()
        if record.exc_info and record.exc_info[0] is not None:
            shown = logging.Formatter().formatException(record.exc_info)
            record.exc_text = clean(shown, newlines=True)
        return record

    factory.cleans = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def yaml(cfg: Any) -> str:
    """An OmegaConf config as YAML (``OmegaConf.to_yaml``, resolved) that is safe to show
    and still reads back as the same values: a string holding a control or invisible
    character is written double-quoted, where YAML reads :func:`clean`'s escapes
    (``\\x1b``, ``\\u202e``) as the characters themselves."""
    import yaml as pyyaml
    from omegaconf import OmegaConf
    from omegaconf._utils import get_omega_conf_dumper

    omegaconf_dumper = get_omega_conf_dumper()  # what OmegaConf.to_yaml writes with

    class Dumper(omegaconf_dumper):
        pass

    def represent(dumper: Any, data: str) -> Any:
        if clean(data) != data:
            return dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"')
        return omegaconf_dumper.str_representer(dumper, data)

    Dumper.add_representer(str, represent)
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    dumped = pyyaml.dump(
        container, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=Dumper
    )
    return clean(dumped, newlines=True)


def plural(n: int, word: str) -> str:
    """``n`` and ``word``, an s added unless n is one: "1 run", "2 runs"."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
