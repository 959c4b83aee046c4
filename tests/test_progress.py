"""normbench.progress: a run's bar, drawn on a terminal, shows its label (a user's norm
name) as text: control characters escaped, never read as markup."""

from __future__ import annotations

import io
import re
import unicodedata

from normbench import terminal
from normbench.progress import RunProgress

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
