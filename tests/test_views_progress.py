"""normbench.views.progress: a run's bar, drawn on a terminal, shows its label (a user's norm
name) as text: control characters escaped, never read as markup."""

from __future__ import annotations

import io
import re
import unicodedata

from normbench import terminal
from normbench.views.progress import RunProgress

HOSTILE = "\x1b]0;PWNED\x07\x1b[2J\x1b[31m\u202e\x9b[/x]"
SHOWN = r"\x1b]0;PWNED\x07\x1b[2J\x1b[31m\u202e\x9b[/x]"


def drawn(output: str) -> str:
    """What a terminal shows: rich's own control sequences (colours, cursor moves,
    hiding the cursor) taken out; anything left that is a control character is not
    normbench's."""
    rest = re.sub(r"\x1b\[\??[0-9;]*[a-zA-Z]", "", output).replace("\r", "")
    hidden = [c for c in rest if unicodedata.category(c) in {"Cc", "Cf", "Cs"} and c != "\n"]
    assert not hidden, hidden
    return rest


def test_a_runs_label_is_shown_as_text():
    console = terminal.Console(file=io.StringIO(), force_terminal=True, width=200)
    with RunProgress(f"evil{HOSTILE} bs=8", console=console) as progress:
        progress.on_start(total_steps=10, epochs=2)
        progress.on_step(5, 1, 0.25, 1000.0)
        progress.on_epoch({"test_acc": 0.5})
        progress.progress.refresh()
    shown = drawn(console.file.getvalue())
    assert f"evil{SHOWN} bs=8 epoch 1/2" in shown
    assert "\x1b]" not in console.file.getvalue()  # no title set, no screen cleared


def test_off_a_terminal_a_bar_never_drawn_writes_nothing():
    """A run refused before training (its bar not started) writes not even a line break
    where stderr is a pipe or a file: the error after it is one line."""
    console = terminal.Console(file=io.StringIO(), width=120)
    assert not console.is_terminal
    with RunProgress("custom_bn bs=8", console=console):
        pass
    assert console.file.getvalue() == ""


def test_off_a_terminal_a_drawn_bar_is_its_last_state_on_one_line():
    console = terminal.Console(file=io.StringIO(), width=120)
    with RunProgress("custom_bn bs=8", console=console) as progress:
        progress.on_start(total_steps=10, epochs=2)
        progress.on_step(10, 2, 0.25, 1000.0)
    (shown,) = console.file.getvalue().splitlines(keepends=True)
    assert shown.startswith("custom_bn bs=8 epoch 2/2") and "10/10" in shown
    assert shown.endswith("\n")


def test_on_a_terminal_the_bar_stays_drawn_and_its_line_ends():
    console = terminal.Console(file=io.StringIO(), force_terminal=True, width=120)
    with RunProgress("custom_bn bs=8", console=console) as progress:
        progress.on_start(total_steps=10, epochs=2)
        progress.on_step(10, 2, 0.25, 1000.0)
    shown = drawn(console.file.getvalue())
    assert "custom_bn bs=8 epoch 2/2" in shown and shown.endswith("\n")
    assert "\n\n" not in shown
