"""Figures of the per-layer BatchNorm diagnostics (``bn_stats.csv``, :mod:`normbench.diagnostics`).

:func:`bn_stats_figures` draws, for each of ``FIGURE_MEASURES``, a grid of heatmaps: one
row per norm, one column per batch size, each panel the layers (top to bottom in the
model's order) against the epochs, colored by the measure's mean over the seeds of the
completed runs, on one color scale per figure (logarithmic when the values span more
than two decades). When config keys other than the norm, the batch size and the seed
vary (``lr``, ``model``), one figure per combination of their values, named in the
title and in the file name. Builders return ``(file name, Figure)`` pairs; only
:func:`normbench.reports.plot_experiment` writes them. matplotlib is imported inside.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from normbench.analysis.keys import other_keys, resolve_key, swept_keys
from normbench.rundir import BN_STATS_MEASURES
from normbench.terminal import clean
from normbench.views.figures import DPI, NORM_ORDER
from normbench.views.text import format_float

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The measures drawn, one figure each: the running statistics against the true ones,
#: and what the mismatch does to a layer's output.
FIGURE_MEASURES: tuple[str, ...] = ("mean_shift", "var_log_ratio", "train_eval_gap")

_PANEL = (2.4, 1.9)  # inches per panel (width, height)


def _value(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_value(v) for v in value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fmt(value: Any) -> str:
    value = _value(value)
    if isinstance(value, float):
        return format_float(value)
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    # control characters escaped and mathtext's $ too: text from the runs, drawn as it is
    return clean(str(text))[:300].replace("$", r"\$")


def _norm_rank(norm: str) -> tuple[int, str]:
    return (NORM_ORDER.index(norm) if norm in NORM_ORDER else len(NORM_ORDER), norm)


def _file_name(stem: str, combo: dict[str, Any], taken: set[str]) -> str:
    name = stem
    if combo:
        parts = [f"{k.removesuffix('.name')}-{_fmt(v)}" for k, v in combo.items()]
        suffix = re.sub(r"[^A-Za-z0-9._+-]+", "-", "__".join(parts)).strip("-.")[:110]
        name = f"{stem}__{suffix}"
    if name in taken:
        name = f"{name}__{zlib.crc32(repr(combo).encode()):08x}"
    taken.add(name)
    return name + ".png"


def bn_stats_figures(runs: pd.DataFrame, bn_stats: pd.DataFrame) -> list[tuple[str, Figure]]:
    """``bn_layers_<measure>.png`` per measure of ``FIGURE_MEASURES`` (and combination of
    the other swept keys), from an experiment's runs and its ``bn_stats.csv`` rows; none
    when no completed run has diagnostics."""
    if runs.empty or bn_stats.empty or "status" not in runs:
        return []
    done = runs[runs["status"] == "completed"]
    norm_key, bs_key = resolve_key(runs, "norm"), resolve_key(runs, "batch_size")
    extra = [k for k in other_keys(swept_keys(done), norm_key) if k != bs_key]
    columns = ["run_id", norm_key, bs_key, *extra]
    frame = bn_stats.merge(done[columns].rename(columns={norm_key: "_norm", bs_key: "_bs"}))
    if frame.empty:
        return []
    frame["_norm"] = frame["_norm"].map(_fmt)
    frame["_combo"] = [tuple(_value(v) for v in row) for row in frame[extra].itertuples(False)]
    figures: list[tuple[str, Figure]] = []
    taken: set[str] = set()
    for combo_values in sorted(set(frame["_combo"]), key=repr):
        part = frame[[c == combo_values for c in frame["_combo"]]]
        combo = dict(zip(extra, combo_values, strict=True))
        for measure in FIGURE_MEASURES:
            figure = _heatmaps(part, measure, combo)
            figures.append((_file_name(f"bn_layers_{measure}", combo, taken), figure))
    return figures


def _heatmaps(frame: pd.DataFrame, measure: str, combo: dict[str, Any]) -> Figure:
    """One figure: norms x batch sizes, each a layers x epochs heatmap of ``measure``."""
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    layers = list(dict.fromkeys(frame["layer"]))  # the model's order (rows are written so)
    epochs = sorted(frame["epoch"].unique())
    norms = sorted(frame["_norm"].unique(), key=_norm_rank)
    sizes = sorted(frame["_bs"].unique())
    means = frame.groupby(["_norm", "_bs", "layer", "epoch"])[measure].mean()
    seeds = frame.groupby(["_norm", "_bs"])["run_id"].nunique()
    values = means.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    high = float(finite.max()) if finite.size else 1.0
    if positive.size and high / positive.min() > 100:
        scale = LogNorm(vmin=max(float(positive.min()), high / 1e4), vmax=high)
    else:
        scale = Normalize(vmin=0.0, vmax=high if high > 0 else 1.0)
    width = max(4.0, _PANEL[0] * len(sizes) + 1.2)
    height = _PANEL[1] * len(norms) + 1.0
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(norms), len(sizes), squeeze=False, sharex=True, sharey=True)
    image = None
    for i, norm in enumerate(norms):
        for j, bs in enumerate(sizes):
            ax = axes[i][j]
            grid = np.full((len(layers), len(epochs)), np.nan)
            if (norm, bs) in seeds.index:
                cell = means.loc[(norm, bs)]
                for (layer, epoch), value in cell.items():
                    grid[layers.index(layer), epochs.index(epoch)] = value
            image = ax.imshow(
                np.ma.masked_invalid(grid),
                aspect="auto",
                interpolation="nearest",
                cmap="viridis",
                norm=scale,
                extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(layers) - 0.5, -0.5),
            )
            n = int(seeds.get((norm, bs), 0))
            ax.set_title(f"{norm}, batch {bs} (n={n})", fontsize=8)
            ax.tick_params(labelsize=6)
            if i == len(norms) - 1:
                ax.set_xlabel("epoch", fontsize=7)
            if j == 0:
                ax.set_ylabel("layer", fontsize=7)
    axes[0][0].set_yticks(range(len(layers)), [_fmt(layer) for layer in layers])
    if len(epochs) <= 12:
        axes[0][0].set_xticks(epochs)
    colorbar = fig.colorbar(image, ax=axes, shrink=0.9)
    colorbar.set_label(BN_STATS_MEASURES[measure], fontsize=7)
    colorbar.ax.tick_params(labelsize=6)
    where = ", ".join(f"{k.removesuffix('.name')}={_fmt(v)}" for k, v in combo.items())
    title = f"Per-layer BatchNorm: {measure}, mean over seeds"
    fig.suptitle(title + (f"\n{where}" if where else ""), fontsize=9)
    return fig
