"""Tests for normbench.views.error_figures against the norm batch (``x="norm_batch_size"``):
the keys that only move the norm batch are points along one line, variants without batch
statistics horizontal lines, other keys still split; the numbers drawn are checked against
means and Student-t intervals computed here. (Against the global batch:
test_views_figures.py.)"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from run_folders import edit_summary, invoke

from normbench.errors import UserError
from normbench.views import error_figures
from normbench.views.figures import norm_style

SEEDS = (0, 1, 2)
T975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (3 seeds)
NBS = "norm_batch_size"


def acc(norm: str, nbs: int | None, seed: int, **more) -> float:
    """A made-up final accuracy: each (norm, norm batch, more) its own level."""
    level = 0.8 + 0.01 * len(norm) + 0.003 * math.log2(nbs or 1) + 0.1 * sum(more.values())
    return level + (0.004, -0.006, 0.011)[seed]


def run(norm, seed, nbs, *, batch_size=256, processes=8, **config):
    """One row of collect's runs frame: summary fields and the config's dotted keys."""
    norm_bs = None if nbs is None else nbs
    row = {
        "run_id": f"{norm}-{seed}-{nbs}-{batch_size}-{processes}-{sorted(config.items())}",
        "status": "completed",
        "norm": norm,
        "batch_size": batch_size,
        "seed": seed,
        "world_size": processes,
        "batch_size_per_process": batch_size // processes,
        NBS: norm_bs,
        "final_test_acc": acc(norm, nbs, seed, **{k: v for k, v in config.items() if "mom" in k}),
        "norm.name": norm,
        "processes": processes,
        "nodes": 1,
        "model.name": "small_cnn",
        "dataset.name": "digits",
    }
    row |= config
    return row


def study() -> list[dict]:
    """Global batch 256 on 8 processes: sync_bn over groups of 1, 2, 4, 8 processes, the
    local variants at the process's batch of 32, layer without batch statistics."""
    rows = []
    for seed in SEEDS:
        for group in (1, 2, 4, 8):
            rows.append(run("sync_bn", seed, 32 * group, **{"norm.group_size": group}))
        rows += [run("custom_bn", seed, 32), run("torch_bn", seed, 32), run("layer", seed, None)]
    return rows


def errors(norm, nbs, **more):
    return [100 * (1 - acc(norm, nbs, seed, **more)) for seed in SEEDS]


def mean_half(values):
    return np.mean(values), T975_DF2 * np.std(values, ddof=1) / math.sqrt(len(values))


def bars_of(ax) -> dict[str, ErrorbarContainer]:
    return {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}


def legend_of(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_study_of_sync_bn_groups_is_one_figure_with_one_line_per_norm():
    runs = pd.DataFrame(study())
    ((name, figure),) = error_figures.error_vs_batch_size(runs, x=NBS)
    assert name == "error_vs_norm_batch_size.png"  # no figure per group size or split line
    (ax,) = figure.axes
    bars = bars_of(ax)
    assert list(bars) == ["custom_bn", "torch_bn", "sync_bn"]
    drawn = {label: bars[label].lines[0] for label in bars}
    for index, (label, xs) in enumerate(
        [("custom_bn", [32]), ("torch_bn", [32]), ("sync_bn", [32, 64, 128, 256])]
    ):
        dodge = 2 ** (0.05 * (index - 1))
        assert list(drawn[label].get_xdata()) == pytest.approx([x * dodge for x in xs])
        means = [np.mean(errors(label, x)) for x in xs]
        assert list(drawn[label].get_ydata()) == pytest.approx(means)
        assert drawn[label].get_color() == norm_style(label)[0]
    # layer: a horizontal line at its mean, its 95% CI a band, named as having no x
    (line,) = [ln for ln in ax.lines if ln.get_label() == "layer"]
    mean, half = mean_half(errors("layer", None))
    assert list(line.get_ydata()) == pytest.approx([mean, mean])
    assert line.get_color() == norm_style("layer")[0]
    (band,) = ax.patches
    low, high = band.get_y(), band.get_y() + band.get_height()  # (axhspan's Rectangle)
    assert (low, high) == pytest.approx((mean - half, mean + half))
    assert legend_of(ax) == ["custom_bn", "torch_bn", "sync_bn", "layer (no batch statistics)"]
    assert ax.get_xlabel() == "norm batch size (images one BatchNorm normalizes over)"
    assert list(ax.get_xticks()) == [32, 64, 128, 256] and ax.xaxis.get_transform().base == 2
    assert "vs norm batch size" in ax.get_title()
    assert "batch size 256 on 8 processes" in ax.get_title()
    footnote = " ".join(t.get_text() for t in figure.texts).replace("\n", " ")
    assert "Horizontal lines: variants without batch statistics" in footnote

    stats = error_figures.error_stats(runs, x=NBS)
    sync = stats[stats["label"] == "sync_bn"]
    assert list(sync[NBS]) == [32, 64, 128, 256] and list(sync["n"]) == [3] * 4
    assert sync["ci95"].iloc[1] == pytest.approx(mean_half(errors("sync_bn", 64))[1])
    (layer,) = stats[stats["label"] == "layer"].itertuples()
    assert math.isnan(getattr(layer, NBS)) and layer.mean_error == pytest.approx(mean)


def test_against_the_global_batch_the_same_runs_split_sync_bn_by_group_size():
    ((name, figure),) = error_figures.error_vs_batch_size(pd.DataFrame(study()))
    assert name == "error_vs_batch_size.png"
    labels = list(bars_of(figure.axes[0]))
    assert labels[-4:] == [f"sync_bn (group_size={g})" for g in (1, 2, 4, 8)]
    assert "layer" in labels  # a point at batch size 256 like every other


def test_keys_that_do_not_move_the_norm_batch_still_split_figures_and_lines():
    rows = [
        run(norm, seed, nbs, lr=lr, **{"norm.momentum": m} if norm == "sync_bn" else {})
        for lr in (0.1, 0.05)
        for seed in SEEDS
        for norm, nbs in [("custom_bn", 32), ("layer", None)]
        + [("sync_bn", 32 * g) for g in (1, 8)]
        for m in ((0.1, 0.01) if norm == "sync_bn" else (None,))
    ]
    for row in rows:  # sync_bn's group size, and so its norm batch
        if row["norm"] == "sync_bn":
            row["norm.group_size"] = row[NBS] // 32
    figures = error_figures.error_vs_batch_size(pd.DataFrame(rows), x=NBS)
    assert [name for name, _ in figures] == [
        "error_vs_norm_batch_size__lr-0.05.png",
        "error_vs_norm_batch_size__lr-0.1.png",
    ]
    ax = figures[1][1].axes[0]
    bars = bars_of(ax)
    # momentum is swept at every norm batch: two lines, each along x
    assert list(bars) == ["custom_bn", "sync_bn (momentum=0.01)", "sync_bn (momentum=0.1)"]
    line = bars["sync_bn (momentum=0.01)"].lines[0]
    means = [np.mean(errors("sync_bn", x, **{"norm.momentum": 0.01})) for x in (32, 256)]
    assert list(line.get_ydata()) == pytest.approx(means)
    assert "lr=0.1" in ax.get_title()


def test_processes_move_the_norm_batch_and_two_global_batches_are_two_figures():
    rows = [
        run(norm, seed, None if norm == "layer" else bs // p, batch_size=bs, processes=p)
        for bs in (128, 256)
        for p in (1, 2, 4)
        for norm in ("custom_bn", "layer")
        for seed in SEEDS
    ]
    figures = error_figures.error_vs_batch_size(pd.DataFrame(rows), x=NBS)
    assert [name for name, _ in figures] == [
        "error_vs_norm_batch_size__batch_size-128.png",
        "error_vs_norm_batch_size__batch_size-256.png",
    ]
    ax = figures[1][1].axes[0]
    (custom,) = bars_of(ax).values()
    # at 128, 64, 32 images per process (the only line with points: none dodged)
    assert sorted(custom.lines[0].get_xdata()) == pytest.approx([64, 128, 256])
    # layer at each number of processes: one reference line each, told apart
    assert legend_of(ax)[1:] == [f"layer (processes={p}) (no batch statistics)" for p in (1, 2, 4)]
    # the global batch said once: batch_size=256 in the keys' line, not again under it
    assert ax.get_title().count("256") == 1, ax.get_title()


def test_ghost_batches_are_points_of_one_line():
    rows = [
        run("ghost_bn", seed, vb, batch_size=64, processes=1, **{"norm.virtual_batch_size": vb})
        for vb in (8, 16, 32)
        for seed in SEEDS
    ] + [run("custom_bn", seed, 64, batch_size=64, processes=1) for seed in SEEDS]
    ((_, figure),) = error_figures.error_vs_batch_size(pd.DataFrame(rows), x=NBS)
    bars = bars_of(figure.axes[0])
    assert list(bars) == ["custom_bn", "ghost_bn"]
    assert list(bars["ghost_bn"].lines[0].get_xdata() / 2**0.025) == pytest.approx([8, 16, 32])
    assert "on 1 process" in figure.axes[0].get_title()


def test_runs_recorded_before_the_norm_batch_are_one_user_error():
    runs = pd.DataFrame(study()).drop(columns=[NBS, "world_size"])
    with pytest.raises(UserError, match=r"21 of 21 runs were recorded before normbench wrote"):
        error_figures.error_vs_batch_size(runs, x=NBS)
    assert error_figures.error_vs_batch_size(runs)  # the global batch still draws them


def test_cli_plot_against_the_norm_batch(tmp_path, make_run):
    exp = tmp_path / "results" / "exp"
    folders = [make_run(exp, seed=s, norm__name="custom_bn", batch_size=64) for s in (0, 1)]
    folders += [make_run(exp, seed=s, norm__name="layer", batch_size=64) for s in (0, 1)]
    old = invoke("plot", exp, "--x", NBS)
    assert old.exit_code == 2, old.output
    (line,) = old.output.strip().splitlines()
    assert f"{exp}: x axis norm_batch_size: 4 of 4 runs were recorded before" in line
    assert not (exp / "plots").exists()
    for i, folder in enumerate(folders):  # custom_bn's, then layer's
        edit_summary(folder, world_size=1, norm_batch_size=64 if i < 2 else None)
    done = invoke("plot", exp, "--x", NBS)
    assert done.exit_code == 0, done.output
    assert (exp / "plots" / "error_vs_norm_batch_size.png").is_file()
    assert not (exp / "plots" / "error_vs_batch_size.png").exists()
    wrong = invoke("plot", exp, "--x", "lr")
    assert wrong.exit_code == 2
    assert wrong.stderr == "error: --x must be one of batch_size, norm_batch_size, got 'lr'\n"


def test_the_cli_offers_the_schemas_x_axes():
    import typing

    from normbench import cli
    from normbench.schema.config import X_AXES

    hint = typing.get_type_hints(cli.plot, include_extras=True)["x"]
    assert typing.get_args(hint)[1].metavar == "[" + "|".join(X_AXES) + "]"
    assert tuple(error_figures.X_LABELS) == X_AXES
