"""Tests for normbench.views.figures and reports' plotting: the figures' numbers, axes
and files, and ``normbench plot``.

Runs are synthetic: frames built here for the figure builders, and run folders
(summary.json, config.yaml, metrics.csv) written by hand for the paths that read
an experiment from disk. Nothing trains.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.container import ErrorbarContainer
from matplotlib.image import imread
from typer.testing import CliRunner

from normbench import reports
from normbench.cli import app
from normbench.errors import UserError
from normbench.rundir import METRIC_COLUMNS
from normbench.views import axes, error_figures, inference_figures
from normbench.views import figures as draw

NORMS = ("custom_bn", "layer", "group")
SIZES = (2, 8, 32)
SEEDS = (0, 1, 2)
EPOCHS = 4
T975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (3 seeds)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def final_acc(norm: str, bs: int, seed: int, lr: float = 0.1) -> float:
    """A made-up accuracy: each (norm, batch size, lr) its own level, seeds spread around it."""
    level = 0.9 + 0.01 * NORMS.index(norm) + 0.002 * math.log2(bs) + 0.1 * (0.1 - lr)
    return level + (0.004, -0.006, 0.011)[seed]


def accuracies(norm: str, bs: int, seed: int, lr: float = 0.1) -> list[float]:
    """Test accuracy after each epoch, ending at ``final_acc``."""
    last = final_acc(norm, bs, seed, lr)
    return [last - 0.1 * (EPOCHS - epoch) / EPOCHS for epoch in range(1, EPOCHS + 1)]


def config(norm: str, bs: int, seed: int, lr: float = 0.1, optim: str = "sgd", **norm_keys):
    """A resolved config, nested as in a run's config.yaml."""
    norm_cfg = {"name": norm, "eps": 1e-5, **norm_keys}
    if norm == "custom_bn":
        norm_cfg["momentum"] = 0.1
    return {
        "name": "study",
        "out_dir": "results",
        "batch_size": bs,
        "lr": lr,
        "epochs": EPOCHS,
        "seed": seed,
        "device": "cpu",
        "threads": 1,
        "model": {"name": "small_cnn", "widths": [32, 64, 128]},
        "norm": norm_cfg,
        "dataset": {"name": "digits", "root": "data", "download": False},
        "optim": {"name": optim, "momentum": 0.9},
    }


def flat(tree: dict, prefix: str = "") -> dict:
    """Dotted keys, lists in their string form: the config columns of ``collect``'s runs."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value) if isinstance(value, list) else value
    return out


def summary(cfg: dict, run_id: str, status: str, acc: float | None) -> dict:
    return {
        "run_id": run_id,
        "status": status,
        "name": cfg["name"],
        "model": cfg["model"]["name"],
        "norm": cfg["norm"]["name"],
        "dataset": cfg["dataset"]["name"],
        "optim": cfg["optim"]["name"],
        "batch_size": cfg["batch_size"],
        "lr": cfg["lr"],
        "epochs": EPOCHS,
        "seed": cfg["seed"],
        "final_test_acc": acc,
        "best_test_acc": acc,
        "error": {"diverged": "loss is nan", "failed": "RuntimeError: boom"}.get(status),
    }


def grid(norms=NORMS, sizes=SIZES, seeds=SEEDS, lrs=(0.1,), optims=("sgd",), status=None):
    """(run_id, config, status, per-epoch accuracies) of every run of a grid.

    ``status`` maps (norm, batch size, seed) to a status other than completed.
    """
    status = status or {}
    out = []
    for lr in lrs:
        for optim in optims:
            for norm in norms:
                for bs in sizes:
                    for seed in seeds:
                        cfg = config(norm, bs, seed, lr, optim)
                        rid = f"{norm}-{bs}-{seed}-{lr}-{optim}"
                        state = status.get((norm, bs, seed), "completed")
                        out.append((rid, cfg, state, accuracies(norm, bs, seed, lr)))
    return out


def frames(runs):
    """The runs and metrics frames of ``results.collect`` for ``grid``'s runs."""
    rows, metrics = [], []
    for rid, cfg, state, accs in runs:
        acc = accs[-1] if state == "completed" else None
        rows.append({**flat(cfg), **summary(cfg, rid, state, acc)})
        done = accs if state == "completed" else accs[:2]
        metrics += [(rid, epoch, "test", "acc", a) for epoch, a in enumerate(done, 1)]
        metrics += [(rid, epoch, "train", "loss", 0.5) for epoch in range(1, len(done) + 1)]
    return pd.DataFrame(rows), pd.DataFrame(metrics, columns=list(METRIC_COLUMNS))


def write_experiment(root, runs, name="study", fields=None):
    """Run folders as ``normbench run`` leaves them, written by hand. ``fields(cfg, acc)``:
    more recorded fields of a run (validation, BatchNorm estimators)."""
    exp = root / name
    for rid, cfg, state, accs in runs:
        folder = exp / "runs" / rid
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({**cfg, "name": name}))
        done = accs if state == "completed" else accs[:2]
        rows = [(rid, epoch, "test", "acc", a) for epoch, a in enumerate(done, 1)]
        pd.DataFrame(rows, columns=list(METRIC_COLUMNS)).to_csv(folder / "metrics.csv", index=False)
        acc = accs[-1] if state == "completed" else None
        record = summary({**cfg, "name": name}, rid, state, acc)
        if fields is not None and acc is not None:
            record |= fields(cfg, acc)
        (folder / "summary.json").write_text(json.dumps(record))
    return exp


def the_axes(figure):
    return [ax for ax in figure.axes if ax.get_visible()]


def errorbars(ax) -> dict[str, ErrorbarContainer]:
    return {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}


def legend_labels(legend) -> list[str]:
    return [text.get_text() for text in legend.get_texts()]


def footnote_of(figure) -> str:
    return " ".join(text.get_text() for text in figure.texts).replace("\n", " ")


def marks(ax, gid: str) -> list[float]:
    """The x of the triangles marking intervals clipped at one end of the frame."""
    return sorted(float(x) for line in ax.lines if line.get_gid() == gid for x in line.get_xdata())


def check_png(path, figure=None):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    image = imread(path)
    if figure is not None:
        width, height = figure.get_size_inches() * figure.dpi
        assert image.shape[:2] == (round(height), round(width))
    return image


# ----------------------------------------------------------------------------- figure 1


def test_error_vs_batch_size_draws_means_and_hand_computed_intervals():
    runs, _ = frames(grid())
    figures = error_figures.error_vs_batch_size(runs)
    assert [name for name, _ in figures] == ["error_vs_batch_size.png"]
    (ax,) = the_axes(figures[0][1])
    bars = errorbars(ax)
    assert list(bars) == ["custom_bn", "layer", "group"]  # the design's order
    for index, (norm, container) in enumerate(bars.items()):
        line, _caps, (collection,) = container.lines
        # set a twentieth of a doubling apart, so that coinciding lines stay visible
        dodge = 2 ** (0.05 * (index - 1))
        assert list(line.get_xdata()) == pytest.approx([bs * dodge for bs in SIZES])
        for i, bs in enumerate(SIZES):
            errors = [100 * (1 - final_acc(norm, bs, seed)) for seed in SEEDS]
            mean = np.mean(errors)
            half = T975_DF2 * np.std(errors, ddof=1) / math.sqrt(len(errors))
            assert line.get_ydata()[i] == pytest.approx(mean)
            # the bar stops at the frame the means set (3 seeds: t(0.975, 2) = 4.3)
            (low, high) = sorted(collection.get_segments()[i][:, 1])
            bottom, top = ax.get_ylim()
            assert (low, high) == (
                pytest.approx(max(mean - half, bottom)),
                pytest.approx(min(mean + half, top)),
            )
        assert line.get_color() == draw.norm_style(norm)[0]
    means = [100 * (1 - np.mean([final_acc(n, b, s) for s in SEEDS])) for n in NORMS for b in SIZES]
    pad = max(0.12 * (max(means) - min(means)), 0.5)  # an eighth of their span, or half a point
    assert ax.get_ylim() == pytest.approx((min(means) - pad, max(means) + pad))
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert list(ax.get_xticks()) == list(SIZES)
    formatter = ax.xaxis.get_major_formatter()
    assert [formatter(v, i) for i, v in enumerate(SIZES)] == ["2", "8", "32"]
    assert "%" in ax.get_ylabel() and "batch size" in ax.get_xlabel()
    assert "small_cnn" in ax.get_title() and "digits" in ax.get_title()
    assert legend_labels(ax.get_legend()) == ["custom_bn", "layer", "group"]


def test_one_seed_draws_no_bar_and_diverged_runs_are_marked_not_averaged():
    status = {("custom_bn", 2, 0): "diverged", ("custom_bn", 2, 1): "diverged"}
    status |= {("layer", 8, 0): "diverged", ("layer", 8, 1): "diverged"}
    status |= {("layer", 8, 2): "diverged", ("group", 32, 0): "failed"}
    runs, _ = frames(grid(status=status))
    stats = error_figures.error_stats(runs)
    point = stats[(stats["label"] == "custom_bn") & (stats["batch_size"] == 2)].iloc[0]
    assert (point["n"], point["diverged"]) == (1, 2) and math.isnan(point["ci95"])
    assert point["mean_error"] == pytest.approx(100 * (1 - final_acc("custom_bn", 2, 2)))
    failed = stats[(stats["label"] == "group") & (stats["batch_size"] == 32)].iloc[0]
    assert (failed["n"], failed["failed"]) == (2, 1)

    ((_, figure),) = error_figures.error_vs_batch_size(runs)
    (ax,) = the_axes(figure)
    bars = errorbars(ax)
    line, _caps, (collection,) = bars["custom_bn"].lines
    assert len(collection.get_segments()[0]) == 0  # one seed: no bar
    # Every seed of layer at batch size 8 diverged: no point there, but a cross.
    assert list(bars["layer"].lines[0].get_xdata()) == [2, 32]
    crosses = [line for line in ax.lines if line.get_marker() == "x"]
    assert sorted(float(c.get_xdata()[0]) for c in crosses) == [2, 8]
    assert {c.get_color() for c in crosses} == {
        draw.norm_style(n)[0] for n in ("custom_bn", "layer")
    }
    counts = sorted(text.get_text() for text in ax.texts)
    assert counts == ["2", "3"]
    assert legend_labels(ax.get_legend())[-1] == "diverged"
    footnote = " ".join(text.get_text() for text in figure.texts).replace("\n", " ")
    assert "diverged (5 in all" in footnote and "1 failed run." in footnote

    # A point whose runs all failed has no row, but the footnote still counts them.
    status |= {("group", 2, seed): "failed" for seed in SEEDS}
    ((_, figure),) = error_figures.error_vs_batch_size(frames(grid(status=status))[0])
    footnote = " ".join(text.get_text() for text in figure.texts).replace("\n", " ")
    assert "4 failed runs" in footnote


def test_one_figure_per_combination_of_other_swept_keys():
    runs, metrics = frames(grid(lrs=(0.1, 0.05), optims=("sgd", "adam")))
    figures = error_figures.error_vs_batch_size(runs)
    names = [name for name, _ in figures]
    assert names == [
        "error_vs_batch_size__lr-0.05__optim-adam.png",
        "error_vs_batch_size__lr-0.05__optim-sgd.png",
        "error_vs_batch_size__lr-0.1__optim-adam.png",
        "error_vs_batch_size__lr-0.1__optim-sgd.png",
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+\.png", name) for name in names)
    (ax,) = the_axes(figures[0][1])
    assert ax.get_title().endswith("lr=0.05, optim=adam")
    expected = np.mean([100 * (1 - final_acc("layer", 8, s, lr=0.05)) for s in SEEDS])
    assert errorbars(ax)["layer"].lines[0].get_ydata()[1] == pytest.approx(expected)
    curves = draw.training_curves(runs, metrics)
    assert [name for name, _ in curves] == [
        n.replace("error_vs_batch_size", "training_curves") for n in names
    ]
    assert curves[3][1].get_suptitle().endswith("lr=0.1, optim=sgd")


def test_a_norms_own_swept_key_splits_its_line_and_keeps_its_color():
    runs, _ = frames(grid(norms=("custom_bn", "group")))
    is_group = runs["norm"] == "group"
    runs.loc[is_group, "norm.groups"] = np.where(runs.loc[is_group, "seed"] == 0, 4, 8)
    ((name, figure),) = error_figures.error_vs_batch_size(runs)
    assert name == "error_vs_batch_size.png"  # not a figure per norm.groups
    (ax,) = the_axes(figure)
    bars = errorbars(ax)
    assert list(bars) == ["custom_bn", "group (groups=4)", "group (groups=8)"]
    group4, group8 = (bars[f"group (groups={g})"].lines[0] for g in (4, 8))
    assert group4.get_color() == group8.get_color() == draw.norm_style("group")[0]
    assert group4.get_linestyle() != group8.get_linestyle()


def test_a_single_batch_size_still_renders(tmp_path):
    runs, metrics = frames(grid(sizes=(16,)))
    ((_, figure),) = error_figures.error_vs_batch_size(runs)
    (ax,) = the_axes(figure)
    assert list(errorbars(ax)["layer"].lines[0].get_xdata()) == [16]
    low, high = ax.get_xlim()
    assert low < 16 < high and list(ax.get_xticks()) == [16]
    ((_, curves),) = draw.training_curves(runs, metrics)
    assert [ax.get_title() for ax in the_axes(curves)] == ["batch size 16"]
    figure.savefig(tmp_path / "one.png")
    check_png(tmp_path / "one.png", figure)


# ----------------------------------------------------------------------------- figure 2


def test_training_curves_one_panel_per_batch_size_shared_y_in_percent():
    status = {("group", 8, 1): "diverged"}
    runs, metrics = frames(grid(status=status))
    ((name, figure),) = draw.training_curves(runs, metrics)
    assert name == "training_curves.png"
    axes = the_axes(figure)
    assert [ax.get_title() for ax in axes] == [f"batch size {bs}" for bs in SIZES]
    assert all(axes[0].get_shared_y_axes().joined(axes[0], ax) for ax in axes)
    assert "%" in axes[0].get_ylabel() and axes[0].get_xlabel() == "epoch"
    for ax, bs in zip(axes, SIZES, strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines) == list(NORMS)
        for norm, line in lines.items():
            seeds = [s for s in SEEDS if (norm, bs, s) not in status]
            mean = np.mean([accuracies(norm, bs, s) for s in seeds], axis=0) * 100
            assert list(line.get_xdata()) == list(range(1, EPOCHS + 1))
            assert line.get_ydata() == pytest.approx(mean)
            assert line.get_color() == draw.norm_style(norm)[0]
    low, high = axes[0].get_ylim()
    means = [line.get_ydata() for ax in axes for line in ax.get_lines()]
    assert low <= np.min(means) and np.max(means) <= high <= 100.5
    (legend,) = figure.legends
    assert legend_labels(legend) == list(NORMS)
    assert "small_cnn on digits" in figure.get_suptitle()
    footnote = " ".join(text.get_text() for text in figure.texts).replace("\n", " ")
    assert "1 diverged run" in footnote
    stats = draw.curve_stats(runs, metrics)
    row = stats[(stats["label"] == "group") & (stats["batch_size"] == 8)].iloc[0]
    assert row["n"] == 2
    values = [100 * accuracies("group", 8, s)[0] for s in (0, 2)]
    expected = 12.706204736174696 * np.std(values, ddof=1) / math.sqrt(2)  # t(0.975, 1)
    assert row["ci95"] == pytest.approx(expected)


def test_no_completed_runs_no_figures():
    runs, metrics = frames(
        grid(status={(n, b, s): "failed" for n in NORMS for b in SIZES for s in SEEDS})
    )
    assert error_figures.error_vs_batch_size(runs) == []
    assert draw.training_curves(runs, metrics) == []


# ----------------------------------------------------------------------------- on disk


def test_plot_experiment_writes_readable_pngs(tmp_path):
    from normbench.analysis.collect import collect

    exp = write_experiment(tmp_path / "results", grid(lrs=(0.1, 0.05)))
    written = reports.plot_experiment(exp)
    assert [p.name for p in written] == [
        "error_vs_batch_size__lr-0.05.png",
        "error_vs_batch_size__lr-0.1.png",
        "training_curves__lr-0.05.png",
        "training_curves__lr-0.1.png",
    ]
    assert all(p.parent == exp / "plots" for p in written)
    assert sorted(p.name for p in (exp / "plots").iterdir()) == sorted(p.name for p in written)
    collected = collect(exp)
    built = error_figures.error_vs_batch_size(collected.runs) + draw.training_curves(
        collected.runs, collected.metrics
    )
    for path, (_, figure) in zip(written, built, strict=True):
        image = check_png(path, figure)
        assert image.std() > 0  # something is drawn


def test_only_failed_runs_message_and_nothing_written(tmp_path):
    failed = {(n, b, s): "failed" for n in NORMS for b in SIZES for s in SEEDS}
    exp = write_experiment(tmp_path / "results", grid(status=failed))
    with pytest.raises(UserError, match=r"no completed runs to plot \(27 failed\)"):
        reports.plot_experiment(exp)
    assert not (exp / "plots").exists()

    result = CliRunner().invoke(app, ["plot", str(exp)])
    assert result.exit_code == 2
    assert "no completed runs" in result.stderr and "Traceback" not in result.output
    assert not (exp / "plots").exists()


def test_cli_plot_prints_each_written_path(tmp_path):
    root = tmp_path / "results"
    exp = write_experiment(root, grid(sizes=(4, 16)))
    failed = {(n, b, s): "failed" for n in NORMS for b in (4,) for s in SEEDS}
    write_experiment(root, grid(sizes=(4,), status=failed), name="broken")

    result = CliRunner().invoke(app, ["plot", str(root)])
    assert result.exit_code == 0, result.output
    printed = result.stdout.split()
    assert printed == [
        str(exp / "plots" / "error_vs_batch_size.png"),
        str(exp / "plots" / "training_curves.png"),
    ]
    for path in printed:
        check_png(Path(path))
    assert "broken" in result.stderr and "no completed runs" in result.stderr
    assert not (root / "broken" / "plots").exists()


def test_cli_plot_missing_dir_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "error" in result.stderr and "Traceback" not in result.output


def test_intervals_stop_at_what_an_error_can_be():
    """A wide interval near 0% error is drawn down to 0, not below (the 95% CI of the
    mean is clipped to the axis, at most [0, 100]); the table does the same."""
    from normbench.views.tables import _interval

    bars, low, high = axes.clip_bars([1.0, 50.0, 99.0], [3.0, 3.0, 3.0], (0.0, 100.0))
    assert bars.tolist() == [[1.0, 3.0, 3.0], [3.0, 3.0, 1.0]]
    assert low.tolist() == [True, False, False] and high.tolist() == [False, False, True]
    assert _interval(0.99, 0.05) == "[94.00, 100.00]" and _interval(0.01, 0.05) == "[0.00, 6.00]"


def test_bars_stop_at_the_axis_and_say_which_end_was_cut():
    """Hand-computed: a bar stops at a limit, flagged at the end it was cut; one seed
    (NaN half-width) has no bar and no flag; no limits clip nothing."""
    bars, low, high = axes.clip_bars([5.0, 5.0, 5.0, 5.0], [1.0, 4.0, 9.0, np.nan], (2.0, 8.0))
    assert bars[:, :3].tolist() == [[1.0, 3.0, 3.0], [1.0, 3.0, 3.0]]
    assert np.isnan(bars[:, 3]).all()
    assert low.tolist() == [False, True, True, False]
    assert high.tolist() == [False, True, True, False]
    bars, low, high = axes.clip_bars([5.0], [9.0], None)
    assert bars.tolist() == [[9.0], [9.0]] and not low.any() and not high.any()
    # the range: the means' span plus an eighth of it (at least half a point), in [0, 100]
    assert axes.mean_range([2.0, 10.0, np.nan]) == pytest.approx((2.0 - 0.96, 10.0 + 0.96))
    assert axes.mean_range([0.2, 0.4]) == pytest.approx((0.0, 0.9))
    assert axes.mean_range([np.nan]) is None
    factor = max((10 / 0.5) ** 0.12, 1.15)  # a log axis: the margin is a factor
    assert axes.mean_range([0.0, 0.5, 10.0], log=True) == pytest.approx((0.5 / factor, 10 * factor))


def test_a_name_from_a_keys_closed_set_is_drawn_and_named_as_typed():
    """precision=32 in a title and a file name as the user typed it, not quoted
    ('32', which gave files named precision--32 beside precision-bf16)."""
    taken: set[str] = set()
    assert draw._file_name("training_curves", {"precision": "32"}, taken) == (
        "training_curves__precision-32.png"
    )
    assert draw._combo_text({"precision": "32", "lr": 0.1}) == "precision=32, lr=0.1"


def test_file_names_keep_a_plus_so_large_and_small_values_differ():
    """lr=1e+06 and lr=1e-06 are two figures with two names."""
    taken: set[str] = set()
    big = draw._file_name("training_curves", {"lr": 1e6}, taken)
    small = draw._file_name("training_curves", {"lr": 1e-6}, taken)
    assert big == "training_curves__lr-1e+06.png"
    assert small == "training_curves__lr-1e-06.png"
    odd = draw._file_name("training_curves", {"model.name": "a b/c"}, taken)
    assert odd == "training_curves__model-a-b-c.png"


# ------------------------------------------------------------------ links in a received folder


def test_a_plots_link_is_never_written_through(tmp_path):
    """A received experiment whose ``plots`` is a symbolic link (to anywhere): one line
    naming it, exit 2, nothing written there or anywhere else."""
    root = tmp_path / "results"
    good = write_experiment(root, grid(sizes=(4, 16)), name="a")
    exp = write_experiment(root, grid(sizes=(4, 16)), name="b")
    outside = tmp_path / "outside"
    outside.mkdir()
    (exp / "plots").symlink_to(outside)
    for args in ([exp], [root]):
        result = CliRunner().invoke(app, ["plot", *map(str, args)])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert f"{exp / 'plots'} is a symbolic link (to {outside})" in lines[0]
        assert list(outside.iterdir()) == [] and not (good / "plots").exists()


def test_a_linked_figure_is_replaced_not_followed(tmp_path):
    """A figure's name in ``plots/`` that is a link to a file elsewhere: the new figure
    replaces the link (a rename does not follow it), and the file it pointed to is kept."""
    exp = write_experiment(tmp_path / "results", grid(sizes=(4, 16)))
    (exp / "plots").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (exp / "plots" / "error_vs_batch_size.png").symlink_to(victim)
    result = CliRunner().invoke(app, ["plot", str(exp)])
    assert result.exit_code == 0, result.output
    figure = exp / "plots" / "error_vs_batch_size.png"
    assert not figure.is_symlink() and victim.read_text() == "mine"
    check_png(figure)


# ------------------------------------------------------------- text from a received folder


def _renamed(runs: pd.DataFrame, names: dict[str, str]) -> pd.DataFrame:
    """``runs`` with their norms named as a received folder may name them."""
    for column in ("norm", "norm.name"):
        runs[column] = runs[column].map(names)
    return runs


def test_names_are_drawn_escaped_never_as_math_and_every_one_in_the_legend(tmp_path):
    """A control character would be a glyph the font lacks, ``$...$`` math (``$\\frac$``
    fails to draw), and matplotlib's own legend leaves out a name starting with ``_``
    and an empty one."""
    names = {"custom_bn": "evil\x1b[31m\u202e", "layer": "", "group": "$\\frac$_x"}
    runs, metrics = frames(grid(sizes=(4, 16), seeds=(0, 1)))
    runs = _renamed(runs, names)
    shown = {r"evil\x1b[31m\u202e", "''", r"\$\frac\$_x"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not one glyph missing
        ((_, errors),) = error_figures.error_vs_batch_size(runs)
        ((_, curves),) = draw.training_curves(runs, metrics)
        for figure in (errors, curves):
            figure.savefig(tmp_path / "figure.png")  # draws every text: math would fail here
    (ax,) = the_axes(errors)
    assert set(legend_labels(ax.get_legend())) == shown
    assert set(errorbars(ax)) == shown
    (legend,) = curves.legends
    assert set(legend_labels(legend)) == shown


def test_glyphs_the_font_lacks_are_one_warning_line(tmp_path):
    """A name in a script the font does not cover: one ``warning:`` line naming the
    characters, not matplotlib's two-line warning per character and figure."""
    exp = write_experiment(tmp_path, grid(norms=("custom_bn", "layer"), sizes=(4, 16), seeds=(0,)))
    for folder in (exp / "runs").iterdir():
        if "layer" in folder.name:
            cfg = yaml.safe_load((folder / "config.yaml").read_text())
            cfg["norm"]["name"] = "归一化"
            (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
            record = json.loads((folder / "summary.json").read_text())
            (folder / "summary.json").write_text(json.dumps({**record, "norm": "归一化"}))
    result = CliRunner().invoke(app, ["plot", str(exp)])
    assert result.exit_code == 0, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"warning: {exp}/plots: the figures' font (")  # DejaVu Sans
    assert line.endswith("has no glyph for 归 (U+5F52), 一 (U+4E00), 化 (U+5316): drawn as boxes")
    assert len(result.stdout.splitlines()) == 2  # the two figures written


def test_values_that_differ_by_little_are_two_figures_named_apart():
    runs, metrics = frames(grid(norms=("layer",), sizes=(4, 16), lrs=(0.1, 0.1000000001)))
    figures = error_figures.error_vs_batch_size(runs)
    assert [name for name, _ in figures] == [
        "error_vs_batch_size__lr-0.1.png",
        "error_vs_batch_size__lr-0.1000000001.png",
    ]
    titles = [the_axes(figure)[0].get_title() for _, figure in figures]
    assert titles[0].endswith("\nlr=0.1") and titles[1].endswith("\nlr=0.1000000001")


# ------------------------------------------------------------------- axes set by the means


def _errors_frame(errors: dict[tuple[str, int], tuple[float, float]]) -> pd.DataFrame:
    """Two seeds per (norm, batch size), with the given test errors (%)."""
    norms = sorted({n for n, _ in errors}, key=NORMS.index)
    sizes = sorted({b for _, b in errors})
    runs, _ = frames(grid(norms=norms, sizes=sizes, seeds=(0, 1)))
    for (norm, bs), pair in errors.items():
        for seed, error in enumerate(pair):
            mine = (runs["norm"] == norm) & (runs["batch_size"] == bs) & (runs["seed"] == seed)
            runs.loc[mine, "final_test_acc"] = 1 - error / 100
    return runs


def test_the_means_set_the_error_axis_and_a_huge_interval_is_clipped_and_marked():
    """Two seeds (t(0.975, 1) = 12.7): one point's 95% CI spans -23..28%; the axis still
    follows the means (2.25-3.75% error, padded by half a point), that bar stops at both
    ends of the frame with a triangle at each, the tight bars are whole."""
    errors = {("custom_bn", 2): (2.24, 2.26), ("custom_bn", 8): (0.5, 4.5)}
    errors |= {("custom_bn", 32): (3.24, 3.26), ("layer", 2): (2.74, 2.76)}
    errors |= {("layer", 8): (3.24, 3.26), ("layer", 32): (3.74, 3.76)}
    ((_, figure),) = error_figures.error_vs_batch_size(_errors_frame(errors))
    (ax,) = the_axes(figure)
    assert ax.get_ylim() == pytest.approx((1.75, 4.25))
    bars = errorbars(ax)
    _, _, (wide,) = bars["custom_bn"].lines
    assert sorted(wide.get_segments()[1][:, 1]) == pytest.approx([1.75, 4.25])
    half = 12.706204736174696 * np.std([2.74, 2.76], ddof=1) / math.sqrt(2)
    _, _, (tight,) = bars["layer"].lines
    assert sorted(tight.get_segments()[0][:, 1]) == pytest.approx([2.75 - half, 2.75 + half])
    x = 8 * 2 ** (0.05 * -0.5)  # custom_bn, set a fortieth of a doubling to the left
    assert marks(ax, axes.CLIPPED_HIGH) == pytest.approx([x])
    assert marks(ax, axes.CLIPPED_LOW) == pytest.approx([x])
    assert "▲/▼ on the frame mark a 95% CI that runs beyond it" in footnote_of(figure)

    errors[("custom_bn", 8)] = (2.49, 2.51)  # nothing clipped: no mark, no note
    ((_, figure),) = error_figures.error_vs_batch_size(_errors_frame(errors))
    (ax,) = the_axes(figure)
    assert marks(ax, axes.CLIPPED_HIGH) == marks(ax, axes.CLIPPED_LOW) == []
    assert "▲" not in footnote_of(figure)


def test_a_log_error_axis():
    """``log``: the error axis is logarithmic, its range the means' times and divided by a
    factor; a mean of 0% error cannot be on it, and the footnote says so. The accuracy
    axis of the training curves is never logarithmic."""
    errors = {("custom_bn", 2): (0.99, 1.01), ("custom_bn", 8): (0.0, 0.0)}
    errors |= {("layer", 2): (9.99, 10.01), ("layer", 8): (3.99, 4.01)}
    runs = _errors_frame(errors)
    ((_, figure),) = error_figures.error_vs_batch_size(runs, log=True)
    (ax,) = the_axes(figure)
    assert ax.get_yscale() == "log"
    factor = max(10**0.12, 1.15)  # the means span a decade, 1% to 10%
    assert ax.get_ylim() == pytest.approx((1 / factor, 10 * factor))
    assert "Logarithmic error axis. 1 mean of 0% error not shown on it." in footnote_of(figure)
    ((_, linear),) = error_figures.error_vs_batch_size(runs)
    assert the_axes(linear)[0].get_yscale() == "linear"

    runs = runs.assign(test_acc_precise_bn=runs["final_test_acc"] - 0.01,
                       test_acc_batch_stats=runs["final_test_acc"] - 0.02)  # fmt: skip
    ((_, figure),) = inference_figures.bn_inference(runs, log=True)
    assert {ax.get_yscale() for ax in the_axes(figure)} == {"log"}


def test_training_curve_bands_are_cut_at_the_range_the_curves_set():
    runs, metrics = frames(grid(seeds=(0, 1)))  # two seeds: bands of about 6 points
    ((_, figure),) = draw.training_curves(runs, metrics)
    stats = draw.curve_stats(runs, metrics)
    low, high = stats["mean_acc"].min(), stats["mean_acc"].max()
    pad = max(0.12 * (high - low), 0.5)
    panels = the_axes(figure)
    assert panels[0].get_ylim() == pytest.approx((low - pad, high + pad))
    bands = [c for ax in panels for c in ax.collections]
    assert len(bands) == len(NORMS) * len(SIZES)
    edges = np.concatenate([path.vertices[:, 1] for c in bands for path in c.get_paths()])
    assert edges.min() == pytest.approx(low - pad) and edges.max() == pytest.approx(high + pad)
    assert "bands are cut where they run beyond it" in footnote_of(figure)


# ------------------------------------------------------------------ the selection's figures


def test_the_selected_figure_draws_the_error_at_the_best_validation_epoch():
    """With keys chosen on validation, the error is that of ``test_acc_at_best_val``
    (what the selected table reports), and the axis and footnote say so; without, the
    final epoch's. Runs without it (older ones) fall back to the final epoch's."""
    runs, _ = frames(grid())
    runs["test_acc_at_best_val"] = runs["final_test_acc"] - 0.03
    ((_, chosen),) = error_figures.error_vs_batch_size(runs, tuned=["lr"])
    ((_, final),) = error_figures.error_vs_batch_size(runs)
    for figure, shift, words in ((chosen, 3, "best-validation"), (final, 0, "last epoch")):
        (ax,) = the_axes(figure)
        line = errorbars(ax)["group"].lines[0]
        expected = [np.mean([100 * (1 - final_acc("group", bs, s)) for s in SEEDS]) + shift
                    for bs in SIZES]  # fmt: skip
        assert list(line.get_ydata()) == pytest.approx(expected)
        assert words in ax.get_ylabel()
    assert "test_acc_at_best_val" in footnote_of(chosen)
    title = the_axes(chosen)[0].get_title()
    assert "test error at the best-validation epoch vs batch size" in title
    assert "lr chosen on validation" in title
    stats = error_figures.error_stats(runs, metric=error_figures.AT_BEST_VAL)
    assert stats["mean_error"].iloc[0] == pytest.approx(
        np.mean([100 * (1 - final_acc("custom_bn", 2, s)) + 3 for s in SEEDS])
    )
    older = runs.drop(columns="test_acc_at_best_val")
    assert (
        error_figures.error_metric(older, ["lr"])
        == error_figures.FINAL
        == error_figures.error_metric(runs)
    )


def _chosen(norm: str) -> float:
    """The lr validation prefers in :func:`_validated`'s runs."""
    return 0.05 if norm == "group" else 0.1


def _validated(cfg: dict, acc: float) -> dict:
    """Validation, test at the best-validation epoch, and BatchNorm's estimators (for
    custom_bn, the only norm with running statistics here)."""
    norm = cfg["norm"]["name"]
    out = {
        "best_val_acc": acc + (0.02 if cfg["lr"] == _chosen(norm) else 0.0),
        "test_acc_at_best_val": acc - 0.03,
        "test_acc_precise_bn": None,
        "test_acc_batch_stats": None,
    }
    if norm == "custom_bn":
        out |= {"test_acc_precise_bn": acc + 0.001, "test_acc_batch_stats": acc - 0.01}
    return out


def test_a_selection_draws_its_metric_and_bn_inference_over_the_chosen_runs(tmp_path, monkeypatch):
    """``selected.csv`` (``results --select lr``): one error figure and one BatchNorm
    figure over the runs chosen, not one per lr; the error is test_acc_at_best_val's;
    the training curves stay per lr."""
    exp = write_experiment(tmp_path / "results", grid(lrs=(0.1, 0.05)), fields=_validated)
    list(reports.report([exp], select=["lr"]))
    assert (exp / "selected.csv").is_file()
    drawn = {}

    def spy(builder):
        def wrapper(*args, **kwargs):
            figures = builder(*args, **kwargs)
            drawn.update(figures)
            return figures

        return wrapper

    for name in ("error_vs_batch_size", "bn_inference"):
        monkeypatch.setattr(reports, name, spy(getattr(reports, name)))
    written = reports.plot_experiment(exp)
    assert [p.name for p in written] == [
        "error_vs_batch_size.png",
        "training_curves__lr-0.05.png",
        "training_curves__lr-0.1.png",
        "bn_inference.png",
    ]
    (ax,) = the_axes(drawn["error_vs_batch_size.png"])
    for norm, container in errorbars(ax).items():
        lr = _chosen(norm)
        expected = [np.mean([100 * (1 - final_acc(norm, bs, s, lr) + 0.03) for s in SEEDS])
                    for bs in SIZES]  # fmt: skip
        assert list(container.lines[0].get_ydata()) == pytest.approx(expected), norm
    (panel,) = the_axes(drawn["bn_inference.png"])
    running = errorbars(panel)["running averages"].lines[0]
    expected = [np.mean([100 * (1 - final_acc("custom_bn", bs, s, 0.1)) for s in SEEDS])
                for bs in SIZES]  # fmt: skip
    assert list(running.get_ydata()) == pytest.approx(expected)
    assert "lr chosen on validation" in drawn["bn_inference.png"].get_suptitle()


# ----------------------------------------------------------------------------- file formats


def test_figures_as_pdf_and_svg_keep_their_text(tmp_path):
    """``--format pdf``: a PDF with its fonts embedded as TrueType (pdf.fonttype 42, text
    a paper's editor can change; no Type 3 glyphs); ``svg``: XML whose text is text.
    Neither carries a date: the same runs give the same file."""
    from xml.etree import ElementTree

    exp = write_experiment(tmp_path / "results", grid(sizes=(4, 16)))
    pdfs = reports.plot_experiment(exp, fmt="pdf")
    assert [p.name for p in pdfs] == ["error_vs_batch_size.pdf", "training_curves.pdf"]
    for path in pdfs:
        data = path.read_bytes()
        assert data.startswith(b"%PDF") and b"/FontFile2" in data and b"/Type3" not in data
    first = pdfs[0].read_bytes()
    assert reports.plot_experiment(exp, fmt="pdf")[0].read_bytes() == first

    result = CliRunner().invoke(app, ["plot", str(exp), "--format", "svg", "--log-error"])
    assert result.exit_code == 0, result.output
    svgs = [Path(p) for p in result.stdout.split()]
    assert [p.name for p in svgs] == ["error_vs_batch_size.svg", "training_curves.svg"]
    shown = []
    for path in svgs:
        root = ElementTree.parse(path).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        texts = " ".join(
            "".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")
        )
        assert "batch size" in texts or "epoch" in texts
        shown.append(texts)
    assert "Logarithmic error axis." in shown[0] and "Logarithmic" not in shown[1]
    assert sorted(p.suffix for p in (exp / "plots").iterdir()) == [".pdf", ".pdf", ".svg", ".svg"]


def test_a_format_not_offered_is_refused_and_nothing_written(tmp_path):
    import typing

    from normbench import cli

    exp = write_experiment(tmp_path / "results", grid(sizes=(4, 16)))
    result = CliRunner().invoke(app, ["plot", str(exp), "--format", "jpg"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr == "error: --format must be one of png, pdf, svg, got 'jpg'\n"
    with pytest.raises(UserError, match="--format must be one of png, pdf, svg, got 'jpg'"):
        reports.plot_experiments([exp], fmt="jpg")
    assert not (exp / "plots").exists()
    hint = typing.get_type_hints(cli.plot, include_extras=True)["fmt"]
    metavar = typing.get_args(hint)[1].metavar
    assert metavar == "[" + "|".join(draw.FIGURE_FORMATS) + "]"
