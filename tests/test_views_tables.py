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
