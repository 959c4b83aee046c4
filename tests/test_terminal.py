"""normbench.terminal: text from outside shown with its control and invisible characters
escaped, and never read as rich markup; checked against Python's own escape decoder and
Unicode's categories, and on a rich console that writes as a terminal does."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import unicodedata
import warnings

import pytest
import yaml
from omegaconf import OmegaConf
from rich.table import Table

from normbench import terminal

# What a received results folder may hold: set the window title, clear the screen,
# recolour what follows, reverse the text's direction, and CSI in its one-byte C1 form.
HOSTILE = "\x1b]0;PWNED\x07\x1b[2J\x1b[31m\u202e\x9b"
SHOWN = r"\x1b]0;PWNED\x07\x1b[2J\x1b[31m\u202e\x9b"

# rich's own colours are SGR sequences (ESC [ ... m); anything else is not normbench's.
SGR = re.compile(rb"\x1b\[[0-9;]*m")


def assert_inert(raw: bytes) -> None:
    """No control byte, C1 control or invisible formatting character outside rich's
    colour sequences."""
    rest = SGR.sub(b"", raw).decode()
    hidden = [c for c in rest if unicodedata.category(c) in {"Cc", "Cf", "Cs"} and c != "\n"]
    assert not hidden, hidden


def terminal_console(**kwargs) -> terminal.Console:
    return terminal.Console(file=io.StringIO(), force_terminal=True, width=200, **kwargs)


def test_clean_writes_controls_as_python_escapes():
    assert terminal.clean(HOSTILE) == SHOWN
    assert terminal.clean("a\nb\r\tc\x00\x7f") == r"a\nb\r\tc\x00\x7f"
    # read back by Python's own decoder, the escapes are the characters they stand for
    assert terminal.clean(HOSTILE).encode("ascii").decode("unicode_escape") == HOSTILE


def test_clean_keeps_line_breaks_only_when_asked():
    assert terminal.clean("a\nb\x1b", newlines=True) == "a\nb\\x1b"
    assert terminal.clean("a\n\u2028b", newlines=True) == "a\n\\u2028b"


@pytest.mark.parametrize(
    "char, shown",
    [
        ("\u202e", r"\u202e"),  # right-to-left override
        ("\u2066", r"\u2066"),  # left-to-right isolate
        ("\u200b", r"\u200b"),  # zero-width space
        ("\u200d", r"\u200d"),  # zero-width joiner
        ("\ufeff", r"\ufeff"),  # byte order mark
        ("\u2028", r"\u2028"),  # line separator
        ("\u061c", r"\u061c"),  # Arabic letter mark
        ("\U000e0041", r"\U000e0041"),  # a tag character: invisible "A"
        ("\x85", r"\x85"),  # next line (C1)
        ("\ud800", r"\ud800"),  # a lone surrogate (JSON's "\ud800"): no encoding writes it
        (os.fsdecode(b"\xff"), r"\xff"),  # an undecodable byte of a path: shown as that byte
    ],
)
def test_clean_escapes_invisible_formatting_characters(char, shown):
    assert terminal.clean(f"a{char}b") == f"a{shown}b"
    terminal.clean(f"a{char}b").encode("utf-8")  # writable to any terminal


def test_clean_leaves_ordinary_text_alone():
    ordinary = "custom_bn ± 1.2 Δ – café 中文 😀 [/x] [red]x[/red] :warning: \\ 'q' \"q\""
    assert terminal.clean(ordinary) == ordinary


def test_clean_escapes_exactly_unicodes_control_format_surrogate_and_separator_characters():
    hidden = {"Cc", "Cf", "Cs", "Zl", "Zp"}
    wrong = [
        hex(code)
        for code in range(0x110000)
        if (terminal.clean(chr(code)) != chr(code)) != (unicodedata.category(chr(code)) in hidden)
    ]
    assert not wrong


def test_text_and_line_are_never_markup():
    console = terminal_console()
    console.print(terminal.text("[/x] [red]red[/red] :warning:"))
    console.print(terminal.line("error:", f"results/exp[old]/x {HOSTILE}", "bold red"))
    shown = console.file.getvalue()
    assert "[/x] [red]red[/red] :warning:" in shown
    assert f"results/exp[old]/x {SHOWN}" in shown
    assert_inert(shown.encode())


def test_line_styles_its_prefix_only():
    shown = terminal.line("error:", "[bold]x", "bold red")
    assert shown.plain == "error: [bold]x"
    assert [(span.start, span.end, str(span.style)) for span in shown.spans] == [(0, 6, "bold red")]
    parts = terminal.styled(("diverged", "yellow"), f": {HOSTILE}")
    assert parts.plain == f"diverged: {SHOWN}"
    assert [(span.start, span.end, str(span.style)) for span in parts.spans] == [(0, 8, "yellow")]


def test_console_shows_every_string_as_text():
    """Strings printed, and strings inside a table (title, header, cell, caption), even
    with markup asked for: literal, cleaned, and only rich's own colours as escapes."""
    console = terminal_console()
    console.print(f"[/x] {HOSTILE}", markup=True)
    table = Table(title=f"[bold]title {HOSTILE}", caption=f"caption [/x] {HOSTILE}")
    table.add_column(f"key {HOSTILE}", style="bold")
    table.add_row(f"[red]value {HOSTILE}")
    console.print(table)
    shown = console.file.getvalue()
    for literal in (
        f"[/x] {SHOWN}",
        f"[bold]title {SHOWN}",
        f"key {SHOWN}",
        f"[red]value {SHOWN}",
        f"caption [/x] {SHOWN}",
    ):
        assert literal in shown
    assert_inert(shown.encode())
    assert SGR.search(shown.encode())  # it did write as a terminal: the header is bold


def test_show_warning_cleans_pythons_format():
    stream = io.StringIO()
    terminal.show_warning(UserWarning(f"glyph {HOSTILE} missing"), UserWarning, "f.py", 3, stream)
    assert stream.getvalue() == f"f.py:3: UserWarning: glyph {SHOWN} missing\n"
    stream = io.StringIO()  # a multi-line warning keeps its lines
    terminal.show_warning("a\nb", RuntimeWarning, "g.py", 1, stream, line="x = 1")
    assert stream.getvalue() == "g.py:1: RuntimeWarning: a\nb\n  x = 1\n"


def test_show_warning_shows_normbenchs_notices_as_one_line():
    """As a sweep's worker shows them (its process never ran the CLI's callback)."""
    from normbench.errors import Notice

    stream = io.StringIO()
    terminal.show_warning(Notice(f"threads {HOSTILE}\n"), Notice, "f.py", 3, stream)
    assert stream.getvalue() == f"warning: threads {SHOWN}\\n\n"


def test_warnings_in_the_cli_are_shown_cleaned(capsys):
    """Once a command runs, Python's warnings show as show_warning does, and normbench's
    notices as one cleaned ``warning:`` line."""
    from typer.testing import CliRunner

    from normbench.cli import app
    from normbench.errors import Notice

    with warnings.catch_warnings():
        assert CliRunner().invoke(app, ["list"]).exit_code == 0
        stream = io.StringIO()
        warnings.showwarning(UserWarning(f"glyph {HOSTILE}"), UserWarning, "f.py", 3, stream)
        assert stream.getvalue() == f"f.py:3: UserWarning: glyph {SHOWN}\n"
        warnings.showwarning(Notice(f"threads {HOSTILE}"), Notice, "f.py", 3)
    assert capsys.readouterr().err == f"warning: threads {SHOWN}\n"


def test_yaml_is_inert_and_reads_back_as_the_same_values():
    values = {
        "name": f"exp{HOSTILE}",
        "out_dir": "plain/path",
        "tab": "a\tb",
        "flag": "true",  # a string that looks like a boolean stays a string
        "nested": {f"key{HOSTILE}": ["x\u200by", 1]},
    }
    cfg = OmegaConf.create(values)
    shown = terminal.yaml(cfg)
    assert_inert(shown.encode())
    assert yaml.safe_load(shown) == values
    assert "out_dir: plain/path\n" in shown
    plain = OmegaConf.create({"a": 1, "b": "x", "c": [0.5, "y"], "d": "1"})
    assert terminal.yaml(plain) == OmegaConf.to_yaml(plain, resolve=True)


@pytest.fixture
def record_factory():
    """The process's log record factory, restored after the test."""
    import logging

    saved = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(saved)


def test_log_records_are_cleaned_as_they_are_made(record_factory):
    """What Hydra logs in a sweep (its ``#0 : norm=...`` line, the overrides as typed),
    through handlers set up after clean_logs, as Hydra does for every job."""
    import logging

    terminal.clean_logs()
    terminal.clean_logs()  # idempotent: one factory, not two wrapped
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    log = logging.getLogger("normbench-test-hydra")
    log.addHandler(handler)
    log.propagate, log.disabled = False, False
    log.setLevel(logging.INFO)  # whatever an earlier test left the root logger's level
    try:
        log.warning("\t#%d : %s", 0, f"norm={HOSTILE}[/x]")
        try:
            raise ValueError(f"bad {HOSTILE}")
        except ValueError:
            log.exception("job %s failed", f"x{HOSTILE}")
        log.warning("%d %d", 1)  # bad arguments: left for logging to report as it does
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"[normbench-test-hydra]         #0 : norm={SHOWN}[/x]"
    assert lines[1] == f"[normbench-test-hydra] job x{SHOWN} failed"
    assert lines[2] == "Traceback (most recent call last):"
    assert f"ValueError: bad {SHOWN}" in lines
    assert_inert(stream.getvalue().encode())


def test_show_exception_writes_pythons_traceback_cleaned(capsys):
    try:
        raise RuntimeError(f"boom {HOSTILE}")
    except RuntimeError as error:
        terminal.show_exception(type(error), error, error.__traceback__)
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.endswith(f"RuntimeError: boom {SHOWN}\n")
    assert_inert(err.encode())


# --------------------------------------------- width off a terminal (a pipe, a file, a log)


def wide_table() -> Table:
    table = Table(title="a title longer than eighty columns " * 3, caption="a caption " * 12)
    for name in ("norm", "final acc %", "95% CI", "p (Holm)"):
        table.add_column(name)
    table.add_row("batch_renorm_with_a_long_name " * 3, "99.17 ± 0.12", "[98.84, 99.50]", "0.031")
    return table


def test_off_a_terminal_a_table_is_as_wide_as_its_content(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    console = terminal.Console(file=io.StringIO())
    assert not console.is_terminal and console.width == terminal.UNBOUNDED_WIDTH
    console.print(wide_table())
    lines = console.file.getvalue().splitlines()
    (row,) = [line for line in lines if "batch_renorm" in line]  # one row, one line
    rule = next(line for line in lines if "━" in line or "─" in line)
    # as wide as its widest cells, with no padding to the console's width
    assert max(map(len, lines)) == len(rule) > 80
    assert "a title longer" in lines[0] and lines[0].count("a title") == 3  # one line


@pytest.mark.parametrize(
    "kwargs, columns",
    [
        ({}, "80"),  # COLUMNS says how wide: as rich has it
        ({"width": 80}, None),
        ({"stderr": True}, None),  # progress displays fill their width: rich's 80
        ({"fit": False}, None),
        ({"force_terminal": True}, None),  # a terminal: its width
    ],
)
def test_given_a_width_or_a_terminal_a_table_wraps_as_before(monkeypatch, kwargs, columns):
    monkeypatch.delenv("COLUMNS", raising=False)
    if columns:
        monkeypatch.setenv("COLUMNS", columns)
    console = terminal.Console(file=io.StringIO(), **kwargs)
    assert console.width < 1000
    console.print(wide_table())
    lines = SGR.sub(b"", console.file.getvalue().encode()).decode().splitlines()
    assert max(map(len, lines)) <= console.width
    assert len([line for line in lines if "batch_renorm" in line]) > 1  # the cell wraps


def test_text_lines_stay_single_lines_off_a_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    console = terminal.Console(file=io.StringIO(), soft_wrap=True)
    message = "warning: " + "a long warning " * 20
    console.print(terminal.line("warning:", message, "yellow"))
    console.print(message)
    assert console.file.getvalue().splitlines() == [f"warning: {message}", message]


def _results_to_a_file(folder, tmp_path, columns: str | None) -> list[str]:
    """``normbench results FOLDER > file``: standard output a file, not a terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    out = tmp_path / f"out{columns}.txt"
    with out.open("w") as file:
        done = subprocess.run(
            [sys.executable, "-m", "normbench.cli", "results", str(folder)],
            stdout=file,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
    assert done.returncode == 0, done.stderr
    return out.read_text(encoding="utf-8").splitlines()


def test_results_piped_to_a_file_print_one_line_per_row(grid, tmp_path):
    lines = _results_to_a_file(grid, tmp_path, None)
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    table = [line for line in lines if line.startswith(" ")]  # header, rule, rows
    rows = [line for line in lines[rule + 1 :] if line.startswith((" custom_bn", " layer"))]
    # 2 norms x 3 batch sizes, one line each; the header one line
    assert len(rows) == 6 and all(len(row.split()) >= 9 for row in rows)
    assert "final acc %" in lines[rule - 1] and "p (Holm)" in lines[rule - 1]
    # as wide as its content: no line wider than the rule (rich's 80 columns no limit)
    assert max(map(len, table)) == len(lines[rule]) > 80
    # the caption and each flag's warning: one line each, however long
    assert len([line for line in lines if line.startswith(("budget:", "warning:"))]) == 3

    wrapped = _results_to_a_file(grid, tmp_path, "80")  # COLUMNS set: rich's width, as before
    table80 = [line for line in wrapped if line.startswith(" ")]
    assert max(map(len, table80)) <= 80
    assert len(table80) > len(table)  # cells wrap onto lines of their own
    assert len([line for line in wrapped if line.startswith(("budget:", "warning:"))]) == 3


def test_counts_are_said_in_the_singular_for_one():
    from normbench.terminal import plural

    assert [plural(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]
