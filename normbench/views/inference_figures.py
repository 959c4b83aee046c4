"""The figure of BatchNorm's statistics at inference: test error against batch size for
the three ways a BatchNorm layer can normalise at test time (:mod:`normbench.inference`),
one subplot per variant with running statistics.

Built like the figures of :mod:`normbench.views.figures` (whose run preparation, styles
and file names it shares) and written only by :func:`normbench.reports.plot_experiment`.
With a selection (``selected.csv``), it draws the selected runs, as the error figure does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from normbench.analysis.stats import mean_ci
from normbench.views.axes import batch_size_axis, clipped_errorbar, mean_range, set_value_axis
from normbench.views.figures import (
    CLIPPED_NOTE,
    ESTIMATORS,
    _combo_text,
    _combos,
    _described,
    _figure,
    _file_name,
    _footnote,
    _label_outer,
    _log_note,
    _prepare,
    _seeds_text,
    _text,
    norm_style,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def bn_inference(
    runs: pd.DataFrame, tuned: Sequence[str] = (), *, log: bool = False
) -> list[tuple[str, Figure]]:
    """Test error (%) against batch size for the three ways BatchNorm can normalise at
    inference, one subplot per variant with running statistics; means over seeds of the
    completed runs, bars their 95% CI, stopped (and marked) at the range the means set
    (:mod:`normbench.views.axes`). One ``("bn_inference[__key-value...].png", Figure)``
    per combination of the other swept keys; none when no run measured them.
    ``tuned``: keys chosen on validation for each point (``runs`` are the selected ones):
    they vary within a panel, not between figures, and the title says so. ``log``: a
    logarithmic error axis."""
    from matplotlib.lines import Line2D

    if "test_acc_precise_bn" not in runs or runs["test_acc_precise_bn"].isna().all():
        return []
    prepared = _prepare(runs, tuned)
    figures: list[tuple[str, Figure]] = []
    taken: set[str] = set()
    for combo, frame in _combos(prepared):
        done = frame[(frame["status"] == "completed") & frame["test_acc_precise_bn"].notna()]
        labels = [label for label in prepared.labels if (done["_label"] == label).any()]
        if not labels:
            continue
        points = _points(done, labels)
        limits = mean_range(points["mean"], log=log)
        sizes = sorted(done["_bs"].unique())
        ncols = min(len(labels), 3)
        nrows = math.ceil(len(labels) / ncols)
        fig = _figure(1.0 + 3.4 * ncols + 1.6, 1.0 + 2.8 * nrows, "")
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
        for ax in axes[len(labels) :]:
            ax.set_visible(False)
        clipped = False
        for ax, label in zip(axes, labels, strict=False):
            color, _ = norm_style(done.loc[done["_label"] == label, "_norm"].iloc[0])
            for field, name, style in ESTIMATORS:
                line = points[(points["label"] == label) & (points["field"] == field)]
                _, cut = clipped_errorbar(
                    ax, line["batch_size"].to_numpy(dtype=float), line["mean"].to_numpy(),
                    line["ci95"].to_numpy(), limits, color=color, linestyle=style,
                    marker="o", markersize=4, capsize=2.5, label=name,
                )  # fmt: skip
                clipped |= cut
            ax.set_title(_text(label), fontsize=10)
            batch_size_axis(ax, sizes)
            ax.grid(True, alpha=0.3)
        _label_outer(axes, len(labels), ncols, "batch size", "test error (%)")
        set_value_axis(axes[0], limits, log)
        title = f"{_text(_described(frame))}: BatchNorm's statistics at inference"
        if combo:
            title += f"\n{_text(_combo_text(combo))}"
        if tuned:
            named = ", ".join(k.removesuffix(".name") for k in tuned)
            title += f"\n{_text(named)} chosen on validation for each norm and batch size"
        fig.suptitle(title, fontsize=11)
        # colours tell the variants (one per panel); the legend tells the line styles
        handles = [Line2D([], [], color="0.3", linestyle=st, marker="o", markersize=4)
                   for _, _, st in ESTIMATORS]  # fmt: skip
        fig.legend(
            handles, [name for _, name, _ in ESTIMATORS], title="test-time statistics",
            loc="outside right upper", fontsize=8, title_fontsize=8,
        )  # fmt: skip
        counts = done.groupby(["_label", "_bs"]).size().tolist()
        notes = [
            f"Mean test error with the final weights over seeds of completed runs "
            f"({_seeds_text(counts)}); bars: 95% CI (Student t). Running averages: the "
            "statistics training kept; PreciseBN: a true average of per-batch statistics "
            "over training batches with the final weights; batch statistics: each test "
            "batch of the training batch size normalised by itself.",
        ]
        if clipped:
            notes.append(CLIPPED_NOTE)
        if log:
            notes.append(_log_note(points["mean"]))
        _footnote(fig, " ".join(notes))
        figures.append((_file_name("bn_inference", combo, taken), fig))
    return figures


def _points(done: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Per (line, estimator, batch size): the mean test error (%) over the completed
    runs and its 95% CI half-width (NaN for one seed)."""
    rows = []
    for label in labels:
        runs = done[done["_label"] == label]
        for field, _, _ in ESTIMATORS:
            for bs, group in runs.groupby("_bs"):
                errors = 100.0 * (1.0 - pd.to_numeric(group[field], errors="coerce"))
                mean, ci, _n = mean_ci(errors.to_numpy())
                rows.append((label, field, int(bs), mean, ci))
    columns = ["label", "field", "batch_size", "mean", "ci95"]
    return pd.DataFrame(rows, columns=columns).astype({"mean": float, "ci95": float})
