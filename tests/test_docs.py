"""The README and the manual hold to the code: the README's two opening commands are the
install and test commands CI runs, every ``normbench ...`` command they show names a
command and options the CLI has (and, in the README, config options that exist), and the
README stays a README (at most 250 lines)."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from normbench.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONF = ROOT / "normbench" / "conf"
PAGES = sorted((ROOT / "docs").glob("*.md"))


def _code_lines(text: str) -> list[str]:
    """The lines of the shell and output code blocks (not Python, YAML or TOML ones),
    continuation lines (``\\``) joined."""
    lines, lang, pending = [], None, ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            lang = line[3:] if lang is None else None
            continue
        if lang not in ("bash", "sh", ""):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines


# A command line: a prompt, environment assignments or a network namespace first at most.
COMMAND = re.compile(r"^(\$ )?(\w+=\S+ )*(ip netns exec \S+ )?(\S*/)?normbench( |$)")


def _commands(text: str) -> list[tuple[list[str], bool]]:
    """Every ``normbench ...`` command line (in code blocks and inline code): the words
    after ``normbench``, comments dropped, and whether it was shown after a ``$`` prompt
    (a transcript, which may show a mistake and its message)."""
    found = []
    candidates = _code_lines(text) + re.findall(r"`((?:\.venv/bin/)?normbench [^`]+)`", text)
    for line in candidates:
        # `a && b`: each part is a command of its own.
        for part in line.split("&&"):
            if not COMMAND.match(part.strip()):
                continue
            transcript = part.strip().startswith("$ ")
            words = shlex.split(part.strip().removeprefix("$ "), comments=True)
            start = next(i for i, w in enumerate(words) if w.rsplit("/", 1)[-1] == "normbench")
            found.append((words[start + 1 :], transcript))
    return found


def _cli():
    return typer.main.get_command(app)


def _options(command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


def _check(words: list[str], group) -> str | None:
    """The command ``words`` names (None for the top-level options alone), after checking
    it and its options against the CLI."""
    top = _options(group) | {"--help"}
    while words and words[0].startswith("-"):
        option = words.pop(0).split("=", 1)[0]
        assert option in top, f"normbench {option}: no such option"
        if option == "--config-dir":
            words.pop(0)
        if option == "--version":
            return "--version"
    if not words:
        return None
    name = words[0]
    assert name in group.commands, f"normbench {name}: no such command"
    known = _options(group.commands[name]) | {"--help"}
    for word in words[1:]:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in known, f"normbench {name} {word}: no such option"
    return name


def _readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _first_commands() -> list[str]:
    """The README's opening commands: the first code block's lines, comments left out."""
    block = _readme_blocks()[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _normal(command: str) -> list[str]:
    """A command's words as CI and the README may both write them: CI's ``$venv`` is the
    README's ``.venv``, and pip's ``-q`` changes nothing."""
    words = shlex.split(command.replace("$venv", ".venv"), comments=True)
    return [w for w in words if w != "-q" or "pytest" in words]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; the manual goes to docs/"


def test_readme_opens_with_the_install_commands_ci_runs():
    ci = [_normal(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = [words for words in ci if words]
    install_and_run, install_and_test = _first_commands()
    # The second installs the test tools and runs the tests: step by step what CI does.
    for step in install_and_test.split("&&"):
        assert _normal(step) in ci, f"{step.strip()!r} is not what .ci/run does"
    # The first: the same venv, the same install without the extras, then the main job.
    venv, install, job = (_normal(step) for step in install_and_run.split("&&"))
    assert venv in ci
    assert install == [".venv/bin/pip", "install", "-e", "."]
    assert [".venv/bin/pip", "install", "-e", ".[dev]"] in ci
    assert job[0] == ".venv/bin/normbench" and job[1] == "sweep"
    (preset,) = [w.split("=", 1)[1] for w in job if w.startswith("experiment=")]
    assert (CONF / "experiment" / f"{preset}.yaml").is_file()


def test_readme_commands_parse():
    group = _cli()
    commands = _commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 10
    groups = {d.name for d in CONF.iterdir() if d.is_dir()}
    for words, transcript in commands:
        name = _check(list(words), group)
        if transcript or name not in ("run", "sweep", "config"):
            continue
        # The README's overrides pick options normbench ships (not a user's own: those
        # come with --config-dir).
        if "--config-dir" in words:
            continue
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if sep and key in groups and not value.startswith(("glob(", "range(")):
                if value.startswith("[") and value.endswith("]"):  # several (logger)
                    value = value[1:-1]
                for option in value.split(","):
                    assert (CONF / key / f"{option}.yaml").is_file(), f"{word}: no {option}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_manual_commands_parse(page):
    group = _cli()
    for words, _ in _commands(page.read_text(encoding="utf-8")):
        _check(list(words), group)


# ------------------------------------ the README's example output is what the code prints


def _output_blocks() -> list[list[str]]:
    """The README's output blocks (fenced with no language): their lines."""
    blocks, current, lang = [], [], None
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            if lang is None:
                lang, current = line.strip()[3:], []
            else:
                if lang == "":
                    blocks.append(current)
                lang = None
        elif lang is not None:
            current.append(line)
    return blocks


def _transcripts() -> list[tuple[str, list[str]]]:
    """Each ``$ normbench ...`` line of an output block and the lines shown after it."""
    found = []
    for lines in _output_blocks():
        starts = [i for i, line in enumerate(lines) if line.startswith("$ normbench ")]
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(lines)
            found.append((lines[start].removeprefix("$ "), lines[start + 1 : end]))
    return found


def test_readme_has_transcripts():
    commands = [command for command, _ in _transcripts()]
    assert commands == ["normbench run norm=batchnorm", "normbench run norm=group norm.grups=4"]


@pytest.mark.parametrize("command, shown", _transcripts(), ids=lambda v: str(v)[:40])
def test_readme_transcripts_are_what_the_command_prints(command, shown, tmp_path, monkeypatch):
    """A fast command (a mistake's message, a listing) run as shown: its output, line for
    line, is the README's."""
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)  # a mistake writes nothing, and if it did: not here
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.output.splitlines() == shown
    if shown and shown[0].startswith("error: "):
        assert result.exit_code == 2 and not list(tmp_path.iterdir())


def _quick_block() -> list[str]:
    (block,) = [b for b in _output_blocks() if b and b[0].startswith("sweep: 18 runs")]
    return block


def test_readme_quick_sweep_names_the_files_and_figures_the_code_writes():
    """The quick sweep's output (an excerpt: 80 s to make, its numbers the CPU's): the
    lines whose wording is the code's, checked against the code's names."""
    from normbench.reports import TABLE_FILES
    from normbench.views.bn_figures import FIGURE_MEASURES

    block = _quick_block()
    assert f"wrote {', '.join([*TABLE_FILES, 'report.md'])} to results/quick" in block
    # every figure the code draws for BatchNorm variants at several batch sizes, by the
    # names its views give them (each _file_name("...") in normbench/views/)
    views = "".join(p.read_text() for p in (ROOT / "normbench" / "views").glob("*.py"))
    stems = re.findall(r'_file_name\(f?"(\w+?)(?:\{measure\})?"', views)
    names = [s + m if s.endswith("_") else s for s in stems for m in FIGURE_MEASURES]
    expected = {f"wrote results/quick/plots/{name}.png" for name in names}
    assert {line for line in block if line.startswith("wrote results/quick/plots/")} == expected
    assert block[-1].endswith("completed, 0 failed")


def test_readme_quick_sweep_titles_and_notes_are_the_codes(grid, monkeypatch):
    """The quick sweep's table titles, caption and warning wording against what
    ``normbench results`` prints for a synthetic experiment."""
    from normbench.reports import report

    monkeypatch.chdir(grid.parent.parent)
    console_lines: list[str] = []
    for item in report([grid.relative_to(grid.parent.parent)]):
        if isinstance(item, str):
            console_lines.append(item)
        elif hasattr(item, "plain"):
            console_lines.append(item.plain)
        elif getattr(item, "title", None) is not None:
            console_lines.append(str(getattr(item.title, "plain", item.title)))
            if item.caption is not None:
                console_lines.append(str(getattr(item.caption, "plain", item.caption)))

    def shape(line: str) -> str:  # the wording, without the numbers and names that differ
        line = line.replace("results/grid", "results/quick")
        line = re.sub(r"\[norm=.*", "[...]", line)
        return re.sub(r"\d+", "N", line)

    ours = {shape(line) for line in console_lines}
    block = _quick_block()
    titles = [line for line in block if ": test accuracy over seeds, by " in line]
    notes = [line for line in block if line.startswith(("budget:", "warning: few_seeds"))]
    assert titles and notes
    for line in [*titles, *notes]:
        assert shape(line) in ours, line


def test_the_manual_names_every_field_of_the_summary_record():
    """docs/results.md's list of summary.json's fields holds each field of the record
    (normbench.schema.RunRecord): it lacked the six of data-parallel runs."""
    from normbench.schema import record_fields

    text = (ROOT / "docs" / "results.md").read_text()
    section = text.split("### The summary record", 1)[1].split("\n### ", 1)[0]
    named = set(re.findall(r"`([a-z_0-9]+)`", section))
    missing = [f.name for f in record_fields() if f.name not in named]
    assert not missing, f"docs/results.md's summary record does not name {missing}"
