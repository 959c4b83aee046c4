"""The error figure: test error against batch size per norm, Wu & He's Group Normalization
figure (their Figure 1), built from :mod:`normbench.views.figures`' preparation of the runs.

The x axis (log2) is either the global batch (``batch_size``, the default) or the batch one
BatchNorm normalizes over (``norm_batch_size``, recorded per run: the process's batch for
local BatchNorm, times ``norm.group_size`` for sync_bn, the ghost batch for ghost_bn;
``normbench plot --x``, ``report.x``). Against the norm batch, the keys that only move it
(sync_bn's ``norm.group_size``, ghost_bn's ``norm.virtual_batch_size``, ``processes``,
``nodes``, the global batch where it varies with it:
:func:`normbench.analysis.keys.moved_with_x`) are the points of one line instead of lines
or figures of their own, so that sync_bn over groups of 1, 2, 4 and 8 of 8 processes is
one line beside the local variants at the process's batch. Variants without batch
statistics have no norm batch: each is a horizontal line at its mean (a band: its 95% CI),
a reference the others are read against, not a point at a made-up x.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from normbench.analysis.keys import resolve_key
from normbench.analysis.stats import mean_ci
from normbench.views.axes import batch_size_axis, clipped_errorbar, mean_range, set_value_axis
from normbench.views.figures import (
    CLIPPED_NOTE,
    _combo_text,
    _combos,
    _described,
    _failed_in,
    _figure,
    _file_name,
    _fmt,
    _footnote,
    _hashable,
    _log_note,
    _not_shown,
    _prepare,
    _Runs,
    _seeds_text,
    _text,
    norm_style,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The accuracy whose error a figure draws by default: the run's last epoch.
FINAL = "final_test_acc"
#: The one a selection reports (``normbench results --select``): at the epoch of the
#: run's best validation accuracy; the error figure of the selected runs draws it.
AT_BEST_VAL = "test_acc_at_best_val"
#: The accuracies the error figure can draw, and how its axis and footnote name them.
ERROR_METRICS: dict[str, str] = {
    FINAL: "after the last epoch",
    AT_BEST_VAL: "at the best-validation epoch",
}

#: Per x axis (:data:`normbench.schema.config.X_AXES`): the axis label and the title's words.
X_LABELS: dict[str, tuple[str, str]] = {
    "batch_size": ("batch size (images per step)", "batch size"),
    "norm_batch_size": (
        "norm batch size (images one BatchNorm normalizes over)",
        "norm batch size",
    ),
}

#: A reference line's legend entry: a variant without batch statistics.
NO_BATCH = "no batch statistics"


def error_metric(runs: pd.DataFrame, tuned: Sequence[str] = ()) -> str:
    """The accuracy :func:`error_vs_batch_size` draws: with keys chosen on validation
    (``tuned``), the one the selected table reports (:data:`AT_BEST_VAL`), when the runs
    recorded it; else the final one."""
    if tuned and AT_BEST_VAL in runs:
        done = runs[runs["status"] == "completed"]
        if pd.to_numeric(done[AT_BEST_VAL], errors="coerce").notna().any():
            return AT_BEST_VAL
    return FINAL


def error_stats(runs: pd.DataFrame, metric: str = FINAL, x: str = "batch_size") -> pd.DataFrame:
    """The numbers of :func:`error_vs_batch_size`: one row per (extra-key combination,
    line, x) with ``combo`` (dict), ``label``, ``norm``, the x (a column named ``x``:
    ``batch_size`` or ``norm_batch_size``; NaN for a norm without batch statistics),
    ``n`` (completed runs), ``mean_error`` and ``ci95`` (half-width; NaN when n < 2)
    in %, ``diverged`` and ``failed`` (counts of runs not in the mean). ``metric``: the
    accuracy whose error it is (one of :data:`ERROR_METRICS`)."""
    return _error_stats(_prepare(runs, x=x), metric, x)


def _error_stats(prepared: _Runs, metric: str = FINAL, x: str = "batch_size") -> pd.DataFrame:
    rows = []
    for combo, frame in _combos(prepared):
        for (label, bs), group in frame.groupby(["_label", "_bs"], sort=False, dropna=False):
            done = group[group["status"] == "completed"]
            values = done[metric] if metric in done else pd.Series(np.nan, index=done.index)
            errors = 100.0 * (1.0 - pd.to_numeric(values, errors="coerce"))
            mean, ci, n = mean_ci(errors.to_numpy())
            rows.append(
                {
                    "combo": combo,
                    "label": label,
                    "norm": group["_norm"].iloc[0],
                    "style": group["_style"].iloc[0],
                    x: np.nan if pd.isna(bs) else int(bs),
                    "n": n,
                    "mean_error": mean,
                    "ci95": ci,
                    "diverged": int((group["status"] == "diverged").sum()),
                    "failed": _count_failed(prepared, combo, label, bs),
                }
            )
    columns = ["combo", "label", "norm", "style", x, "n", "mean_error", "ci95"]
    table = pd.DataFrame(rows, columns=[*columns, "diverged", "failed"])
    if table.empty:
        return table
    rank = {label: i for i, label in enumerate(prepared.labels)}
    table["_rank"] = table["label"].map(rank)
    table["_x"] = pd.to_numeric(table[x], errors="coerce")
    table = table.sort_values(["_rank", "_x"], kind="stable").drop(columns=["_rank", "_x"])
    return table.reset_index(drop=True)


def _count_failed(prepared: _Runs, combo, label, bs) -> int:
    """Failed runs matching this point (by norm, x and the combination's values); a
    failed run that recorded no x (it stopped before it was built) matches none."""
    failed = prepared.failed
    if failed.empty or prepared.x not in failed.columns:
        return 0
    norm = label.split(" (")[0]
    x = pd.to_numeric(failed[prepared.x], errors="coerce")
    mask = failed[resolve_key(failed, "norm")].map(_fmt) == norm
    mask &= x.isna() if pd.isna(bs) else x == bs
    for key, value in combo.items():
        if key in failed.columns:
            mask &= failed[key].map(lambda v, want=value: _hashable(v) == want)
    return int(mask.sum())


def error_vs_batch_size(
    runs: pd.DataFrame,
    tuned: Sequence[str] = (),
    *,
    log: bool = False,
    metric: str | None = None,
    x: str = "batch_size",
) -> list[tuple[str, Figure]]:
    """Test error (%) against batch size (log2 axis), one line per norm.

    ``runs``: :func:`normbench.analysis.collect.collect`'s ``runs`` frame. Returns one
    ``("error_vs_batch_size[__key-value...].png", Figure)`` per combination of the
    other swept keys; none when no run completed. Points are means over seeds of
    the completed runs, bars their 95% CI (none for a single seed); the means set the
    y range (:mod:`normbench.views.axes`): a bar past it stops at the frame, marked by
    a triangle. A cross at the top marks a batch size where runs of that norm diverged,
    with their number.
    ``x``: ``batch_size`` (the global batch) or ``norm_batch_size`` (the batch one
    BatchNorm normalizes over; files ``error_vs_norm_batch_size*.png``): the keys that
    only move it are points along one line, variants without batch statistics horizontal
    lines (the module's docstring); a :class:`~normbench.errors.UserError` for runs
    recorded before normbench wrote it.
    ``tuned``: keys whose value was chosen on validation for each point (``runs`` are
    the selected ones): they vary along a line, not between figures, the title says so,
    and the error drawn is that of the accuracy the selection reports
    (:func:`error_metric`). ``metric``: that accuracy, named (:data:`ERROR_METRICS`).
    ``log``: a logarithmic error axis.
    """
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory

    if not (runs["status"] == "completed").any():
        return []
    metric = metric or error_metric(runs, tuned)
    prepared = _prepare(runs, tuned, x)
    stats = _error_stats(prepared, metric, x)
    xlabel, xwords = X_LABELS[x]
    figures: list[tuple[str, Figure]] = []
    taken: set[str] = set()
    for combo, frame in _combos(prepared):
        points = stats[[c == combo for c in stats["combo"]]]
        # Failed runs are counted per combination: a batch size where every run failed
        # has no row in ``points``.
        diverged, failed = int(points["diverged"].sum()), _failed_in(prepared, combo)
        limits = mean_range(points["mean_error"], log=log, headroom=0.08 if diverged else 0.0)
        fig = _figure(7.2, 4.8, "")  # the footnote last: it says whether a bar was clipped
        ax = fig.add_subplot()
        top = blended_transform_factory(ax.transData, ax.transAxes)
        crosses: dict[int, int] = {}
        handles: list[Any] = []  # the legend's, by hand: matplotlib's leaves out "_name"
        labels: list[str] = []
        clipped = False
        placed = points[points[x].notna()]
        drawn = [label for label in prepared.labels if (placed["label"] == label).any()]
        for index, label in enumerate(drawn):
            line = placed[placed["label"] == label]
            color, marker = norm_style(line["norm"].iloc[0])
            done = line[line["n"] > 0]
            # Lines set a little apart at each batch size, so that one that coincides
            # with another stays visible (a twentieth of a doubling between neighbours).
            dodge = 2 ** (0.05 * (index - (len(drawn) - 1) / 2))
            bars, cut = clipped_errorbar(
                ax, done[x].to_numpy(dtype=float) * dodge, done["mean_error"].to_numpy(),
                done["ci95"].to_numpy(), limits, color=color, marker=marker,
                linestyle=line["style"].iloc[0], markersize=5, linewidth=1.5, capsize=3,
                label=_text(label),
            )  # fmt: skip
            clipped |= cut
            handles.append(bars)
            labels.append(_text(label))
            for bs, count in zip(line[x], line["diverged"], strict=True):
                if count:
                    # Several norms diverging at one batch size sit side by side.
                    k = crosses.get(bs, 0)
                    crosses[bs] = k + 1
                    at = bs * 2 ** (0.12 * k)
                    ax.plot([at], [0.95], marker="x", color=color, markersize=7, mew=2,
                            linestyle="none", transform=top, clip_on=False)  # fmt: skip
                    ax.annotate(
                        str(count), (at, 0.95), xycoords=top, xytext=(0, 5), ha="center",
                        textcoords="offset points", fontsize=7, color=color,
                    )  # fmt: skip
        references = _references(ax, points[points[x].isna()], prepared.labels, handles, labels)
        sizes = sorted(int(v) for v in placed[x].unique()) or [1]
        batch_size_axis(ax, sizes)
        ax.set_xlim(sizes[0] / 2**0.5, sizes[-1] * 2**0.5)
        if limits is None and not log:  # no mean to show
            limits = (0.0, 100.0)
        set_value_axis(ax, limits, log)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test error (%) {ERROR_METRICS[metric]}")
        ax.grid(True, which="major", alpha=0.3)
        what = "test error" if metric == FINAL else f"test error {ERROR_METRICS[metric]}"
        title = f"{_text(_described(frame))}: {what} vs {xwords}"
        if combo:
            title += f"\n{_text(_combo_text(combo))}"
        if x != "batch_size":
            title += _global_batch(frame, combo)
        if tuned:
            named = ", ".join(k.removesuffix(".name") for k in tuned)
            title += f"\n{_text(named)} chosen on validation for each norm and {xwords}"
        ax.set_title(title)
        if diverged:
            handles.append(
                Line2D([], [], marker="x", color="0.2", mew=2, linestyle="none", markersize=7)
            )
            labels.append("diverged")
        ax.legend(
            handles, labels, title="normalization", loc="upper left",
            bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8, title_fontsize=8,
        )  # fmt: skip
        notes = [
            f"Mean test error {ERROR_METRICS[metric]} ({metric}) over seeds of completed "
            f"runs ({_seeds_text(points['n'].tolist())}); bars: 95% CI (Student t), none "
            f"for one seed; lines set slightly apart at each {xwords} so that none hides "
            "another.",
        ]
        if references:
            notes.append(
                "Horizontal lines: variants without batch statistics (no norm batch), at "
                "their mean; bands: 95% CI."
            )
        if clipped:
            notes.append(CLIPPED_NOTE)
        if log:
            notes.append(_log_note(points["mean_error"]))
        if diverged:
            marked = int(placed["diverged"].sum())
            unmarked = f"; {diverged - marked} of them without a norm batch, not marked"
            notes.append(
                f"×: {xwords}s where runs diverged ({diverged} in all"
                f"{unmarked if marked < diverged else ''}; number beside), left out of the means."
            )
        if failed:
            notes.append(_not_shown(0, failed))
        _footnote(fig, " ".join(n for n in notes if n))
        # against the norm batch a file of its own (error_vs_norm_batch_size), so that the
        # two can lie side by side
        name = _file_name("error_vs_batch_size", combo, taken).replace("batch_size", x, 1)
        figures.append((name, fig))
    return figures


def _references(ax, points: pd.DataFrame, order, handles: list, labels: list) -> int:
    """Each line of ``points`` (the rows without an x) as a horizontal line at its mean
    with a band for its 95% CI, its legend entry added to ``handles`` and ``labels``;
    returns how many were drawn."""
    from matplotlib.lines import Line2D

    count = 0
    for label in order:
        row = points[(points["label"] == label) & (points["n"] > 0)]
        if row.empty:
            continue
        row = row.iloc[0]
        color, _ = norm_style(row["norm"])
        mean, half = float(row["mean_error"]), float(row["ci95"])
        ax.axhline(mean, color=color, linestyle=row["style"], linewidth=1.5, label=_text(label))
        if np.isfinite(half):
            ax.axhspan(mean - half, mean + half, color=color, alpha=0.12, linewidth=0)
        handles.append(Line2D([], [], color=color, linestyle=row["style"], linewidth=1.5))
        labels.append(f"{_text(label)} ({NO_BATCH})")
        count += 1
    return count


def _global_batch(frame: pd.DataFrame, combo: dict) -> str:
    """``\\nbatch size 256 on 8 processes`` where the figure's runs share them: what the
    norm batch is a part of. Not what the title's line of the figure's keys (``combo``)
    says already (``batch_size=256``, ``processes=2``)."""
    parts = []
    nodes = pd.to_numeric(frame.get("nodes", pd.Series([1])), errors="coerce").dropna()
    # processes=2 in the keys says the world size where the runs are on one node
    said = "world_size" in combo or ("processes" in combo and set(nodes) <= {1})
    for key, words in (("batch_size", "batch size {}"), ("world_size", "on {} process")):
        if key in combo or (key == "world_size" and said):
            continue
        if key in frame.columns:
            values = pd.to_numeric(frame[key], errors="coerce").dropna().unique()
            if len(values) == 1:
                n = int(values[0])
                parts.append(words.format(n) + ("es" if key == "world_size" and n > 1 else ""))
    return "\n" + " ".join(parts) if parts else ""
