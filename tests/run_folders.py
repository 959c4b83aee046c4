"""Helpers for the tests of collecting, statistics, reports and tables: run folders
found, edited, and the lines ``normbench results`` warns with. (The fixtures that write
run folders are in conftest.py.)"""

import json

from typer.testing import CliRunner

from normbench.cli import app

cli = CliRunner()


def invoke(*args):
    return cli.invoke(app, [str(a) for a in args])


def runs_of(exp):
    return sorted(p for p in (exp / "runs").iterdir() if (p / "summary.json").exists())


def edit_summary(folder, **fields):
    record = json.loads((folder / "summary.json").read_text())
    record.update(fields)
    (folder / "summary.json").write_text(json.dumps(record))


def skipped_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
