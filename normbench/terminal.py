"""Text that came from outside, made safe to show on a terminal.

A results folder someone sent, a config value, a path, a user's norm class: any of
them may hold control characters (an escape sequence that sets the window title,
clears the screen or recolours a table) or text that rich would read as markup
(``[/x]`` raises, ``[red]`` recolours, ``[old]`` vanishes). Everything shown from
such a source goes through :func:`clean` (control characters written as Python
escapes, ``\\x1b`` for ESC) and reaches rich as :class:`rich.text.Text`, never as
markup: :func:`text` builds one, :func:`line` one styled prefix and a clean message.
"""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text

# C0 controls (newline and tab too: a one-line message stays one line), DEL, the C1
# controls (0x80-0x9f: CSI and OSC have one-byte forms there), and the Unicode
# formatting characters that reorder or hide what follows (bidirectional overrides and
# isolates, zero-width joiners, the line and paragraph separators, the BOM).
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]"
)
_CONTROL_KEEP_NEWLINES = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffb]"
)


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: Any, *, newlines: bool = False) -> str:
    """``str(value)`` with every control and invisible formatting character written as
    its escape (``\\x1b``, ``\\n``, ``\\u202e``); with ``newlines``, line breaks are
    kept (a multi-line message of normbench's own whose parts are clean)."""
    pattern = _CONTROL_KEEP_NEWLINES if newlines else _CONTROL
    return pattern.sub(_escaped, str(value))


def text(value: Any, style: str = "", *, newlines: bool = False) -> Text:
    """A rich Text of ``clean(value)``: printed as it reads, never parsed as markup."""
    return Text(clean(value, newlines=newlines), style=style)


def line(prefix: str, message: Any, style: str = "", *, newlines: bool = False) -> Text:
    """``prefix`` (normbench's own word, styled) followed by a cleaned message:
    ``line("error:", err, "bold red")``."""
    shown = Text(prefix, style=style) if prefix else Text()
    if prefix:
        shown.append(" ")
    shown.append(clean(message, newlines=newlines))
    return shown
