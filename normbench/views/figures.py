"""Figures of an experiment: what they share (the runs prepared, styles, footnotes), and
training curves.

The builders take the frames of :func:`normbench.analysis.collect.collect` and return
``(file name, matplotlib Figure)`` pairs; only :func:`normbench.reports.plot_experiment`
writes them, through :func:`normbench.rundir.write_figure`, into ``<experiment>/plots/``
(:func:`save_settings`: PNG, or PDF and SVG with their text kept as text).

- :func:`normbench.views.error_figures.error_vs_batch_size`: Wu & He's Group
  Normalization figure (their Figure 1): test error (%) against batch size (the global
  one, or the one BatchNorm normalizes over) on a log2 axis, one line per norm, mean over
  seeds of the completed runs with 95% Student-t confidence intervals. The error is
  the final epoch's, or, for the runs a selection chose (``selected.csv``), that of
  the accuracy the selected table reports (at the best-validation epoch).
  Batch sizes where runs diverged get a cross at the top of the axes, with the
  number of diverged runs beside it; failed runs are counted in the footnote.
- :func:`training_curves`: test accuracy (%) per epoch, mean over seeds of the
  completed runs with a 95% band, one subplot per batch size, one line per norm.
- :func:`normbench.views.inference_figures.bn_inference`: BatchNorm's three ways of
  normalising at test time, built from this module's preparation of the runs.

The means set each value axis, not the intervals, which with two or three seeds can
span most of the scale (:mod:`normbench.views.axes`): a bar or band past it stops at the
frame, and a bar's clipped end is marked. An error axis may be logarithmic (``log``).

When config keys other than the norm, the batch size and the seed vary (``lr``,
``model``, ``optim.momentum``, ...), each builder draws one figure per combination
of their values, named in the title and in the file name. A norm's own keys
(``norm.groups``) that vary for one norm split its line into variants:
``group (groups=4)``. Every norm keeps one color and marker in every figure.

matplotlib is imported inside the functions (so ``normbench --help`` stays fast)
and figures are ``matplotlib.figure.Figure`` objects rendered by Agg, never pyplot
windows, so nothing global is touched and nothing needs closing.
"""

from __future__ import annotations

import math
import re
import textwrap
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from normbench.analysis.keys import (
    moved_with_x,
    option_keys,
    other_keys,
    resolve_key,
    swept_keys,
    unplaced_keys,
    x_column,
)
from normbench.analysis.stats import ci95
from normbench.schema import record_fields
from normbench.terminal import clean
from normbench.views.axes import (
    clip_band,
    mean_range,
    set_value_axis,
)
from normbench.views.text import format_float, format_string

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Dots per inch of every figure: sharp on screen and on paper, small files.
DPI = 150

#: The file formats a figure is written in (``normbench plot --format``); the first is
#: the default, and the one a sweep's end writes.
FIGURE_FORMATS: tuple[str, ...] = ("png", "pdf", "svg")


def save_settings(fmt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """How a figure is saved as ``fmt``: (matplotlib rcParams for the save, ``savefig``'s
    keywords). PDF embeds its fonts as TrueType (``pdf.fonttype`` 42: text a paper's
    editor can change, not Type 3 glyphs) and SVG keeps text as text; neither carries a
    creation date, so that the same runs give the same file."""
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"figure format {fmt!r}: one of {', '.join(FIGURE_FORMATS)}")
    rc = {
        "pdf.fonttype": 42,
        "ps.fonttype": 42,
        "svg.fonttype": "none",
        "svg.hashsalt": "normbench",  # the SVG's element ids the same from one save to the next
    }
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
    options: dict[str, Any] = {"format": fmt}
    if metadata is not None:
        options["metadata"] = metadata
    return rc, options


#: The built-in norms, in the order of the design; each keeps its color and marker.
NORM_ORDER: tuple[str, ...] = (
    "custom_bn",
    "torch_bn",
    "layer",
    "instance",
    "group",
    "batch_renorm",
    "ghost_bn",
    "none",
)
# matplotlib's tab10, spelled out so a user's style (prop_cycle) cannot reshuffle it.
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
# Norms added later get one of these, by a stable hash of their name.
_EXTRA_COLORS = ("#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")
_EXTRA_MARKERS = ("h", "<", ">", "p", "d")
# Variants of one norm (norm.groups=2,8) share its color and differ by line style.
_LINESTYLES = ("-", "--", ":", "-.")

_FOOT_FONT = 7.5  # points
# The mean width of a character of the footnote, in ems (DejaVu Sans, with room to spare:
# a line wrapped short is better than one cut at the edge of the figure).
_CHAR_WIDTH = 0.57


def norm_style(norm: str) -> tuple[str, str]:
    """The (color, marker) of a norm: fixed for the built-in ones, a stable hash otherwise."""
    if norm in NORM_ORDER:
        i = NORM_ORDER.index(norm)
        return _COLORS[i], _MARKERS[i]
    h = zlib.crc32(norm.encode())
    return _EXTRA_COLORS[h % len(_EXTRA_COLORS)], _EXTRA_MARKERS[h % len(_EXTRA_MARKERS)]


# ----------------------------------------------------------------------------- the runs


@dataclass
class _Runs:
    """The runs to draw, with the columns the figures group by."""

    frame: pd.DataFrame  # non-failed runs; adds _norm, _label, _style, _bs (x), _combo
    extra: list[str]  # swept config keys other than norm, those moving x, seed
    failed: pd.DataFrame  # failed runs (not drawn; counted)
    labels: list[str]  # line labels in legend order
    x: str = "batch_size"  # the column on the x axis (NaN in _bs: a run without one)


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


#: The most characters of one value a figure draws (a received folder's value may be a
#: megabyte: drawing it took minutes). Longer than any name (results.NAME_MAX), so that
#: norms drawn as lines never merge.
_DRAWN_MAX = 300


def _fmt(value: Any, key: str | None = None) -> str:
    """A config value as a user would type it, as the tables show it: values that differ
    never alike (``0.1``, ``0.1000000001``), an empty name visible (``''``), a name from
    ``key``'s closed set as it is (:func:`format_string`); cut to ``_DRAWN_MAX`` characters."""
    value = _hashable(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, str):
        text = format_string(value, key)
    elif isinstance(value, tuple):
        text = "[" + ",".join(_fmt(v) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= _DRAWN_MAX else text[: _DRAWN_MAX - 1] + "…"


def _text(value: str) -> str:
    """Text from the runs (a norm's name, a config value) as a figure draws it: control
    characters escaped (:func:`normbench.terminal.clean`: no glyph the font lacks, one
    line) and ``$`` escaped, so that it is never read as matplotlib's mathtext (which
    would draw ``$x$`` as math, or fail on ``$\\frac$``)."""
    return clean(value).replace("$", r"\$")


def _short(key: str) -> str:
    """``model.name`` -> ``model``: a group's name is the group."""
    return key.removesuffix(".name")


def _sort_key(value: Any) -> tuple:
    value = _hashable(value)
    if value is None:
        return (2, 0, "")
    if isinstance(value, bool | int | float):
        return (0, value, "")
    return (1, 0, _fmt(value))


def _prepare(runs: pd.DataFrame, tuned: Sequence[str] = (), x: str = "batch_size") -> _Runs:
    norm_key = resolve_key(runs, "norm")
    x_key = x_column(runs, x)
    status = runs["status"].astype(str)
    failed = runs[status == "failed"]
    # Interrupted runs are not results: the next sweep redoes them (as unfinished ones).
    frame = runs[~status.isin(("failed", "interrupted"))].copy()
    frame = frame.reset_index(drop=True)
    if frame.empty:
        return _Runs(frame, [], failed, [], x_key)

    # The swept keys (seed and execution keys never are), as the tables have them: the
    # norm's own ones make variants of its line, the others but those that move x (and
    # the keys tuned per point) one figure per combination of their values.
    swept = swept_keys(frame)
    keys = [k for k in swept if k not in tuned]
    moved = moved_with_x(frame, x_key, keys, norm_key)
    # what moves x still tells apart the runs of a norm that has no x (its reference lines)
    loose = unplaced_keys(frame, x_key, moved, keys)
    norm_keys = [k for k in option_keys(norm_key, swept) if k not in moved]
    norm_prefix = norm_key.rsplit(".", 1)[0] + "."
    extra = [k for k in other_keys(keys, norm_key) if k not in moved]

    frame["_norm"] = frame[norm_key].map(_fmt)
    if x == "batch_size":
        frame["_bs"] = frame[x_key].astype(int)
    else:  # NaN: a norm without batch statistics
        frame["_bs"] = pd.to_numeric(frame[x_key], errors="coerce")
    frame["_combo"] = [
        tuple(_hashable(v) for v in row) for row in frame[extra].itertuples(index=False)
    ]
    # A norm's own keys that vary among its runs make variants of its line.
    frame["_label"] = frame["_norm"]
    frame["_style"] = "-"
    order: list[tuple] = []
    for norm, runs_of_norm in frame.groupby("_norm", sort=False):
        placed = runs_of_norm["_bs"].notna()
        i = 0
        for rows, own in ((runs_of_norm[placed], norm_keys), (runs_of_norm[~placed], loose)):
            if rows.empty:
                continue
            own = list(dict.fromkeys([*norm_keys, *own]))
            varying = [k for k in own if rows[k].map(_hashable).nunique(dropna=False) > 1]
            variants = sorted(
                {tuple(_hashable(v) for v in r) for r in rows[varying].itertuples(index=False)},
                key=lambda t: tuple(_sort_key(v) for v in t),
            )
            for variant in variants:
                label = norm
                if varying:
                    inner = ", ".join(
                        f"{k.removeprefix(norm_prefix)}={_fmt(v, k)}"
                        for k, v in zip(varying, variant, strict=True)
                    )
                    label = f"{norm} ({inner})"
                mask = rows.index[
                    [
                        tuple(_hashable(v) for v in r) == variant
                        for r in rows[varying].itertuples(index=False)
                    ]
                ]
                frame.loc[mask, "_label"] = label
                frame.loc[mask, "_style"] = _LINESTYLES[i % len(_LINESTYLES)]
                rank = NORM_ORDER.index(norm) if norm in NORM_ORDER else len(NORM_ORDER)
                order.append((rank, norm, i, label))
                i += 1
    labels = list(dict.fromkeys(label for *_, label in sorted(order)))
    return _Runs(frame, extra, failed, labels, x_key)


def _combos(prepared: _Runs) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """(values of the extra keys, their runs) per combination, sorted by value."""
    frame = prepared.frame
    keys = sorted(set(frame["_combo"]), key=lambda t: tuple(_sort_key(v) for v in t))
    return [
        (dict(zip(prepared.extra, key, strict=True)), frame[[c == key for c in frame["_combo"]]])
        for key in keys
    ]


def _combo_text(combo: dict[str, Any]) -> str:
    return ", ".join(f"{_short(k)}={_fmt(v, k)}" for k, v in combo.items())


def _label_outer(axes, panels: int, ncols: int, xlabel: str, ylabel: str) -> None:
    """Axis labels on a grid of ``panels`` panels sharing their axes: the x label and
    ticks under the bottom panel of each column (the last row, or the row above an empty
    cell), the y label on the first column."""
    for ax in axes[:panels]:
        spec = ax.get_subplotspec()
        if spec.is_last_row() or spec.num1 + ncols >= panels:
            ax.set_xlabel(xlabel)
            ax.tick_params(labelbottom=True)
        if spec.is_first_col():
            ax.set_ylabel(ylabel)


def _file_name(stem: str, combo: dict[str, Any], taken: set[str]) -> str:
    """A file name safe on every file system, unique among ``taken``."""
    name = stem
    if combo:
        parts = [f"{_short(k)}-{_fmt(v, k)}" for k, v in combo.items()]
        # '+' kept: lr=1e+06 must not read as lr-1e-06 (it is safe on every file system)
        suffix = re.sub(r"[^A-Za-z0-9._+-]+", "-", "__".join(parts)).strip("-.")
        if len(suffix) > 120:
            suffix = suffix[:110].rstrip("-.")
        name = f"{stem}__{suffix}"
    candidate = name
    if candidate in taken:
        candidate = f"{name}__{zlib.crc32(repr(combo).encode()):08x}"
    taken.add(candidate)
    return candidate + ".png"


def _described(frame: pd.DataFrame) -> str:
    """``small_cnn on digits`` for the title, from the runs' model and data set (the
    columns the tables group by: ``model.name``)."""
    from normbench.errors import UserError

    def values(key: str) -> str:
        try:
            column = resolve_key(frame, key)
        except UserError:
            return "?"
        return ", ".join(sorted({_fmt(v) for v in frame[column]}))

    return f"{values('model')} on {values('dataset')}"


def _seeds_text(counts: Sequence[int]) -> str:
    counts = [c for c in counts if c > 0]
    if not counts:
        return "no completed runs"
    lo, hi = min(counts), max(counts)
    seeds = "seed" if hi == 1 else "seeds"
    return f"n = {lo} {seeds} per point" if lo == hi else f"n = {lo}–{hi} seeds per point"


def _not_shown(diverged: int, failed: int) -> str:
    parts = [
        f"{n} {what} run{'s' if n != 1 else ''}"
        for n, what in ((diverged, "diverged"), (failed, "failed"))
        if n
    ]
    return "Not shown: " + " and ".join(parts) + "." if parts else ""


def _figure(width: float, height: float, footnote: str) -> Figure:
    """A constrained-layout figure with ``footnote`` in small type under everything."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    _footnote(fig, footnote)
    return fig


def _footnote(fig: Figure, footnote: str) -> None:
    """``footnote`` in small type under everything else of ``fig`` (made by :func:`_figure`,
    once): the layout keeps its lines free."""
    if not footnote:
        return
    width, height = fig.get_size_inches()
    lines = textwrap.wrap(footnote, width=int(width * 72 / (_FOOT_FONT * _CHAR_WIDTH)))
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=_FOOT_FONT, color="0.3", va="bottom")
    reserved = (len(lines) * _FOOT_FONT * 1.25 + 6) / (height * 72)
    fig.get_layout_engine().set(rect=(0, reserved, 1, 1 - reserved))


#: The footnote's words for bars that ran past the range the means set.
CLIPPED_NOTE = "The means set the y range: ▲/▼ on the frame mark a 95% CI that runs beyond it."


def _log_note(means) -> str:
    """A log axis' footnote: that it is one, and how many means of 0% it cannot show."""
    values = np.asarray(means, dtype=float)
    zeros = int((values[np.isfinite(values)] <= 0).sum())
    note = "Logarithmic error axis."
    if zeros:
        note += f" {zeros} mean{'s' if zeros != 1 else ''} of 0% error not shown on it."
    return note


# ----------------------------------------------------------------------------- figure 2


def curve_stats(runs: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """The numbers of :func:`training_curves`: test accuracy (%) per (extra-key
    combination, line, batch size, epoch): ``combo``, ``label``, ``norm``,
    ``batch_size``, ``epoch``, ``n``, ``mean_acc``, ``ci95`` (NaN when n < 2), over
    the completed runs."""
    return _curve_stats(_prepare(runs), metrics)


def _curve_stats(prepared: _Runs, metrics: pd.DataFrame) -> pd.DataFrame:
    columns = ["combo", "label", "norm", "style", "batch_size", "epoch", "n", "mean_acc", "ci95"]
    frame = prepared.frame
    if frame.empty or metrics is None or metrics.empty:
        return pd.DataFrame(columns=columns)
    done = frame[frame["status"] == "completed"]
    acc = metrics[(metrics["split"] == "test") & (metrics["metric"] == "acc")]
    acc = acc[["run_id", "epoch", "value"]].merge(
        done[["run_id", "_label", "_norm", "_style", "_bs", "_combo"]], on="run_id"
    )
    if acc.empty:
        return pd.DataFrame(columns=columns)
    acc = acc.assign(value=100.0 * pd.to_numeric(acc["value"], errors="coerce"))
    grouped = acc.groupby(["_combo", "_label", "_norm", "_style", "_bs", "epoch"], sort=False)[
        "value"
    ].agg(["mean", "std", "count"])
    grouped = grouped.reset_index()
    n = grouped["count"].to_numpy()
    half = ci95(grouped["std"].to_numpy(dtype=float), n)
    table = pd.DataFrame(
        {
            "combo": [dict(zip(prepared.extra, c, strict=True)) for c in grouped["_combo"]],
            "label": grouped["_label"],
            "norm": grouped["_norm"],
            "style": grouped["_style"],
            "batch_size": grouped["_bs"].astype(int),
            "epoch": grouped["epoch"].astype(int),
            "n": n.astype(int),
            "mean_acc": grouped["mean"].astype(float),
            "ci95": half,
        }
    )
    return table.sort_values(["batch_size", "label", "epoch"], kind="stable").reset_index(drop=True)


def training_curves(runs: pd.DataFrame, metrics: pd.DataFrame) -> list[tuple[str, Figure]]:
    """Test accuracy (%) per epoch: a grid with one subplot per batch size, one line per
    norm (mean over seeds of the completed runs; band: 95% CI), a shared y axis.

    ``runs`` and ``metrics`` are :func:`normbench.analysis.collect.collect`'s frames. Returns
    one ``("training_curves[__key-value...].png", Figure)`` per combination of the
    other swept keys; none when no completed run has test accuracies.
    """
    from matplotlib.ticker import MaxNLocator

    prepared = _prepare(runs)
    stats = _curve_stats(prepared, metrics)
    if stats.empty:
        return []
    figures: list[tuple[str, Figure]] = []
    taken: set[str] = set()
    for combo, frame in _combos(prepared):
        curves = stats[[c == combo for c in stats["combo"]]]
        if curves.empty:
            continue
        sizes = sorted(curves["batch_size"].unique())
        ncols = 2 if len(sizes) == 4 else min(len(sizes), 3 if len(sizes) <= 9 else 4)
        nrows = math.ceil(len(sizes) / ncols)
        diverged = int((frame["status"] == "diverged").sum())
        failed = _failed_in(prepared, combo)
        per_run = curves.groupby(["label", "batch_size"])["n"].max().tolist()
        note = (
            f"Mean test accuracy after each epoch over seeds of completed runs "
            f"({_seeds_text(per_run)}); bands: 95% CI (Student t)."
        )
        # The means set the y range, not the bands: with two or three seeds a 95% band
        # can span most of the scale and would squash every curve; a band that runs
        # past the range is cut there, and the footnote says so.
        limits = mean_range(curves["mean_acc"], bounds=(0.0, 100.5))
        fig = _figure(1.2 + 3.3 * ncols + 1.6, 0.9 + 2.6 * nrows, "")
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
        for ax in axes[len(sizes) :]:
            ax.set_visible(False)
        handles: dict[str, Any] = {}
        cut = False
        for ax, bs in zip(axes, sizes, strict=False):
            panel = curves[curves["batch_size"] == bs]
            for label in prepared.labels:
                line = panel[panel["label"] == label].sort_values("epoch")
                if line.empty:
                    continue
                color, marker = norm_style(line["norm"].iloc[0])
                x, y, ci = (line[c].to_numpy(dtype=float) for c in ("epoch", "mean_acc", "ci95"))
                (drawn,) = ax.plot(
                    x, y, color=color, linestyle=line["style"].iloc[0], linewidth=1.5,
                    marker=marker, markersize=3.5, markevery=max(1, len(x) // 12),
                    label=_text(label),
                )  # fmt: skip
                if np.isfinite(ci).any():
                    low, high, clipped = clip_band(y - ci, y + ci, limits)
                    cut |= clipped
                    ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
                handles.setdefault(label, drawn)
            ax.set_title(f"batch size {bs}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        set_value_axis(axes[0], limits)
        if cut:
            note += " The means set the y range: bands are cut where they run beyond it."
        _footnote(fig, f"{note} {_not_shown(diverged, failed)}".strip())
        _label_outer(axes, len(sizes), ncols, "epoch", "test accuracy (%)")
        title = f"{_text(_described(frame))}: test accuracy per epoch"
        if combo:
            title += f"\n{_text(_combo_text(combo))}"
        fig.suptitle(title, fontsize=11)
        ordered = [label for label in prepared.labels if label in handles]
        fig.legend(
            [handles[label] for label in ordered], [_text(label) for label in ordered],
            title="normalization",
            loc="outside right upper", fontsize=8, title_fontsize=8,
        )  # fmt: skip
        figures.append((_file_name("training_curves", combo, taken), fig))
    return figures


#: BatchNorm's inference estimators: (summary field, legend label, line style), the run
#: record's fields that name one (:class:`~normbench.schema.RunRecord`); their figure is
#: :func:`normbench.views.inference_figures.bn_inference`.
ESTIMATORS: tuple[tuple[str, str, str], ...] = tuple(
    (f.name, *f.estimator) for f in record_fields() if f.estimator
)


def _failed_in(prepared: _Runs, combo: dict[str, Any]) -> int:
    failed = prepared.failed
    if failed.empty:
        return 0
    mask = pd.Series(True, index=failed.index)
    for key, value in combo.items():
        if key in failed.columns:
            mask &= failed[key].map(lambda v, want=value: _hashable(v) == want)
    return int(mask.sum())
