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


def _frame(rows):
    """collect's runs frame, by hand: (norm, group_size, batch_size, processes, norm batch)."""
    return pd.DataFrame(
        [
            {
                "status": "completed",
                "norm.name": norm,
                "norm.group_size": group,
                "batch_size": bs,
                "processes": p,
                "world_size": p,
                "norm_batch_size": nbs,
            }
            for norm, group, bs, p, nbs in rows
        ]
    )


def test_the_keys_that_move_the_norm_batch_and_those_that_still_split():
    from normbench.analysis.keys import keys_along, moved_with_x, unplaced_keys

    nan = float("nan")
    # sync_bn over groups of 1..8 of 8 processes, custom_bn local, layer without one
    study = _frame(
        [("sync_bn", g, 256, 8, 32 * g) for g in (1, 2, 4, 8)]
        + [("custom_bn", nan, 256, 8, 32), ("layer", nan, 256, 8, None)]
    )
    keys = swept_keys(study)
    assert keys == ["norm.name", "norm.group_size"]
    assert moved_with_x(study, "norm_batch_size", keys, "norm.name") == ["norm.group_size"]
    assert keys_along(study, "norm_batch_size") == ["norm.name", "norm_batch_size"]
    assert keys_along(study, "batch_size") == keys  # the global batch: as before
    assert moved_with_x(study, "batch_size", ["norm.name", "batch_size"], "norm.name") == [
        "batch_size"
    ]

    # two global batches x two process counts: 128 on 1 and 256 on 2 normalize over 128
    # images: the global batch no longer follows from the norm batch and splits
    grid = _frame(
        [
            (n, nan, bs, p, None if n == "layer" else bs // p)
            for n in ("custom_bn", "layer")
            for bs in (128, 256)
            for p in (1, 2)
        ]
    )
    keys = swept_keys(grid)
    assert keys == ["norm.name", "batch_size", "processes"]
    moved = moved_with_x(grid, "norm_batch_size", keys, "norm.name")
    assert moved == ["processes"]
    # layer's runs differ in processes with no norm batch to tell them: still a key there
    assert unplaced_keys(grid, "norm_batch_size", moved, keys) == ["processes"]
    assert keys_along(grid, "norm_batch_size") == [
        "norm.name",
        "norm_batch_size",
        "batch_size",
        "processes",
    ]


def test_the_norm_batch_of_runs_recorded_before_it_is_one_user_error():
    from normbench.analysis.keys import x_column

    old = _frame([("custom_bn", None, 64, 1, 64)] * 2).drop(columns="norm_batch_size")
    with pytest.raises(UserError, match="^x axis norm_batch_size: 2 of 2 runs were recorded"):
        x_column(old, "norm_batch_size")
    mixed = _frame([("custom_bn", None, 64, 1, 64), ("custom_bn", None, 64, 1, None)])
    mixed.loc[1, "world_size"] = None  # an older run in the same experiment
    with pytest.raises(UserError, match="1 of 2 runs"):
        x_column(mixed, "norm_batch_size")
    mixed.loc[1, "status"] = "failed"  # stopped before it was built: it has none to record
    assert x_column(mixed, "norm_batch_size") == "norm_batch_size"
    with pytest.raises(UserError, match="--x must be one of batch_size, norm_batch_size, got 'lr'"):
        x_column(mixed, "lr")
