"""Tests for normbench.analysis.keys: swept keys, short names, grouping by every key that
differs."""

import pandas as pd
import pytest
from typer.testing import CliRunner

from normbench.analysis.collect import collect
from normbench.analysis.keys import resolve_key, swept_keys
from normbench.analysis.stats import group_stats
from normbench.errors import UserError
from normbench.reports import aggregate


def test_swept_keys_vary_in_order_seed_excluded(tmp_path, make_run):
    exp = tmp_path / "exp"
    for norm in ("group", "custom_bn"):  # group has its own keys (norm.groups)
        for bs in (128, 8):
            for seed in (0, 1):
                overrides = {"norm__groups": 4} if norm == "group" else {}
                make_run(exp, norm__name=norm, batch_size=bs, seed=seed, **overrides)
    runs = collect(exp).runs
    # norm.groups varies too, but norm.name already tells it.
    assert swept_keys(runs) == ["norm.name", "batch_size"]

    make_run(exp, norm__name="group", norm__groups=2, batch_size=8)  # now it does not
    assert swept_keys(collect(exp).runs) == ["norm.name", "batch_size", "norm.groups"]
    make_run(exp, norm__name="custom_bn", batch_size=8, lr=0.05)
    assert swept_keys(collect(exp).runs) == ["norm.name", "batch_size", "lr", "norm.groups"]

    single = tmp_path / "single"
    for seed in range(3):
        make_run(single, seed=seed, threads=seed + 1)
    assert swept_keys(collect(single).runs) == []


def test_resolve_key_maps_short_names(grid):
    runs = collect(grid).runs
    assert resolve_key(runs, "norm") == "norm.name"
    assert resolve_key(runs, "model") == "model.name"
    assert resolve_key(runs, "dataset") == "dataset.name"
    assert resolve_key(runs, "batch_size") == "batch_size"
    assert resolve_key(runs, "train_size") == "dataset.train_size"
    assert resolve_key(runs, "optim.momentum") == "optim.momentum"
    assert resolve_key(runs, "status") == "status"
    with pytest.raises(UserError, match="ambiguous.*optim.momentum"):
        resolve_key(runs, "momentum")
    with pytest.raises(UserError, match="did you mean 'norm'"):
        resolve_key(runs, "nrom")

    aggregate(grid)  # a frame read back from runs.csv has no attrs; the names still resolve
    from_csv = pd.read_csv(grid / "runs.csv")
    assert resolve_key(from_csv, "norm") == "norm.name"
    assert swept_keys(from_csv) == ["norm.name", "batch_size"]


def test_runs_that_differ_in_an_unswept_key_are_never_credited_to_the_norm(tmp_path):
    """Two `normbench run`s into one experiment, the second with another model and
    optimizer: the table has two groups told apart by all three keys, and the figures
    never draw the two in one plot."""

    from normbench.cli import app
    from normbench.views.error_figures import error_vs_batch_size

    common = [f"out_dir={tmp_path}", "epochs=1", "dataset.train_size=128", "threads=1"]
    runner = CliRunner()
    assert runner.invoke(app, ["run", *common]).exit_code == 0
    other = ["model=mlp", "optim=adam", "lr=0.001", "norm=layer"]
    assert runner.invoke(app, ["run", *common, *other]).exit_code == 0
    runs = collect(tmp_path / "default").runs
    keys = swept_keys(runs)
    assert {"norm.name", "model.name", "optim.name", "lr"} <= set(keys)
    summary = group_stats(runs, keys)
    assert len(summary) == 2
    assert set(zip(summary["norm.name"], summary["model.name"], strict=True)) == {
        ("custom_bn", "small_cnn"),
        ("layer", "mlp"),
    }
    figures = error_vs_batch_size(runs)
    assert len(figures) == 2  # one per model (and optimizer), each with one norm
    for _, figure in figures:
        (ax,) = [a for a in figure.axes if a.get_visible()]
        title = ax.get_title()
        assert "mlp, small_cnn" not in title and len(ax.get_legend().get_texts()) == 1
