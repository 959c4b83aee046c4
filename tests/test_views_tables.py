"""Tests for normbench.views.tables and views.text: values shown as typed, apart from each
other, cut on the terminal."""

import re

import pandas as pd
import pytest
from run_folders import edit_summary, invoke, runs_of, skipped_lines

from normbench.views import text


def test_values_that_differ_show_differently_and_empty_names_show(tmp_path, make_run):
    """lr 0.1 and 0.1000000001 are two rows that read apart (``%g`` showed both as 0.1);
    an empty or blank norm name is quoted, not an empty cell."""
    exp = tmp_path / "results" / "cells"
    for norm in ("custom_bn", "", "  "):
        for lr in (0.1, 0.1000000001):
            make_run(exp, norm__name=norm, lr=lr)
    result = invoke("results", exp)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for norm in ("custom_bn", "''", "'  '"):
        for lr in ("0.1", "0.1000000001"):
            row = re.compile(rf"\s*{re.escape(norm)}\s+{re.escape(lr)}\s+1\s+90\.00\s")
            assert sum(bool(row.match(line)) for line in lines) == 1, (norm, lr, result.stdout)


@pytest.mark.parametrize(
    "value, shown",
    [
        (0.1, "0.1"),
        (0.1000000001, "0.1000000001"),
        (1e-05, "1e-05"),
        (2.5e-05, "2.5e-05"),
        (128.0, "128"),
        (1e20, "1e+20"),
        (float("nan"), "null"),
        (None, "null"),
        (True, "true"),
        ("custom_bn", "custom_bn"),
        ("", "''"),
        ("  ", "'  '"),
        (" a", "' a'"),
        ("null", "'null'"),
        ("true", "'true'"),
        ("0.1", "'0.1'"),
        ("[1, 2]", "'[1, 2]'"),
        ("''", "\"''\""),
    ],
)
def test_a_cell_shows_a_value_as_typed_and_apart_from_every_other(value, shown):
    assert text.format_value(value) == shown


def test_a_name_from_a_keys_closed_set_shows_as_it_is():
    """precision's 32 is one of three names (32, bf16, fp16), never a number: shown as
    typed, where the same text under a key that could hold a number is quoted. A value
    outside the key's names is shown by the general rule."""
    assert text.format_value("32", "precision") == "32"
    assert text.format_value("bf16", "precision") == "bf16"
    assert text.format_value("32", "norm.foo") == "'32'"
    assert text.format_value("16", "precision") == "'16'"  # not one of its names
    assert text.format_value(" 32", "precision") == "' 32'"


def test_a_long_value_is_cut_on_the_terminal_and_kept_in_the_files(real_copy):
    """A swept config value of 200,000 characters (a summary may hold up to 1 MiB):
    before, the table printed it whole (a 100 MB summary: 450 MB printed) and a figure
    drew it (minutes). Shown cut to SHOWN_MAX characters with an ellipsis, drawn cut;
    runs.csv keeps it. A name that long is no name: its run is damaged."""
    from hostile import deadline

    first, second = runs_of(real_copy)[:2]
    long_value = "w" * 200_000
    edit_summary(first, **{"config.model.widths": long_value})
    edit_summary(second, norm="n" * 256)
    with deadline(60):
        result = invoke("results", real_copy)
        assert result.exit_code == 0, result.output
        assert "w" * (text.SHOWN_MAX - 1) + "…" in result.stdout
        assert "w" * (text.SHOWN_MAX + 1) not in result.stdout
        (skipped,) = skipped_lines(result)
        assert skipped.endswith(": norm is 256 characters long: no name is longer than 255")
        assert long_value in set(pd.read_csv(real_copy / "runs.csv")["model.widths"])
        assert invoke("plot", real_copy).exit_code == 0


# ------------------------------------------------------------ the comparison columns


def _summary():
    """A small summary: custom_bn and layer over three seeds, paired."""
    from normbench.analysis.stats import group_stats

    rows = []
    for seed, (bn, ln) in enumerate([(0.95, 0.90), (0.96, 0.93), (0.94, 0.90)]):
        rows.append(("custom_bn", 8, seed, "completed", bn))
        rows.append(("layer", 8, seed, "completed", ln))
        rows.append(("group", 8, seed, "completed", bn - 0.02))  # no variance against bn
    runs = pd.DataFrame(
        rows, columns=["norm.name", "batch_size", "seed", "status", "final_test_acc"]
    )
    runs.attrs["config_columns"] = ["norm.name", "batch_size", "seed"]
    return group_stats(runs, ["norm", "batch_size"], "custom_bn")


def test_the_rich_table_shows_the_test_p_holm_and_flags():
    """Layer against custom_bn: the difference, p (Holm's p) and the test, paired by seed;
    group, the same -2 points on every seed: the difference, no p, its flag."""
    from normbench import terminal
    from normbench.analysis.flags import Thresholds
    from normbench.views import tables

    summary = _summary()
    keys = ["norm.name", "batch_size"]
    console = terminal.Console(width=200, record=True)
    console.print(tables.summary_table(summary, keys, "t"))
    out = console.export_text()
    for header in ("Δ custom_bn", "p (Holm)", "test", "flags"):
        assert header in out
    layer = next(line for line in out.splitlines() if line.strip().startswith("layer"))
    p = summary.set_index("norm.name").loc["layer", ["p_value", "p_holm"]]
    assert "-4.0±" in layer and f"{p.p_value:.2g} ({p.p_holm:.2g})  paired" in layer
    group = next(line for line in out.splitlines() if line.strip().startswith("group"))
    assert "-2.0 " in group and "novar" in group and "p=0" not in out
    lines = tables.flag_lines(summary, keys, Thresholds.of())
    assert len(lines) == 1 and lines[0].startswith("no_variance (novar), 1 of 3 rows: ")
    assert lines[0].endswith("[norm=group batch_size=8]")


def test_markdown_latex_and_csv_have_the_csv_columns():
    from normbench.views import tables

    summary = _summary()
    keys = ["norm.name", "batch_size"]
    markdown = tables.markdown_table(summary, keys).splitlines()
    header = [cell.strip() for cell in markdown[0].strip("|").split("|")]
    assert header == list(summary.columns)
    assert set(markdown[1]) <= set("|-: ") and len(markdown) == 2 + len(summary)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown[2:]]
    assert [row[0] for row in rows] == ["custom_bn", "group", "layer"]
    assert rows[2][header.index("test")] == "paired t"
    assert rows[1][header.index("flags")] == "no_variance"
    assert rows[1][header.index("p_value")] == ""  # no test, no p: never 0

    latex = tables.latex_table(summary, keys)
    assert latex.startswith("\\begin{tabular}{")
    assert latex.rstrip().endswith("\\end{tabular}")
    assert "\\toprule" in latex and "\\midrule" in latex and "\\bottomrule" in latex
    body = latex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    assert len(body) == len(summary) and all(line.endswith("\\\\") for line in body)
    assert body[0].startswith("custom\\_bn & 8 & 3 &")
    assert "diff\\_to\\_baseline" in latex and "no\\_variance" in latex

    import io

    back = pd.read_csv(io.StringIO(tables.csv_table(summary)))
    assert list(back.columns) == list(summary.columns) and len(back) == len(summary)

    text = tables.paper_text(summary, keys, "title", ["a note"], "markdown")
    assert text.startswith("**title**\n\n|") and text.endswith("\n- a note\n")
    text = tables.paper_text(summary, keys, "title", ["a note"], "latex")
    assert text.startswith("% title\n\\begin{tabular}") and text.endswith(
        "\\end{tabular}\n% a note\n"
    )


def test_a_pipe_in_a_value_does_not_break_the_markdown_row():
    from normbench.views import tables

    frame = pd.DataFrame({"norm.name": ["a|b"], "n": [1]})
    (row,) = tables.markdown_table(frame, ["norm.name"]).splitlines()[2:]
    assert "a\\|b" in row and row.count(" | ") == 1
