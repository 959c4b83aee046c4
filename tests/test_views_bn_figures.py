"""Tests for normbench.views.bn_figures: the layer x epoch heatmaps draw (Agg) each
norm and batch size's mean over seeds, one figure per measure and per combination of the
other swept keys."""

from __future__ import annotations

import numpy as np
import pandas as pd

from normbench.rundir import BN_STATS_MEASURES
from normbench.views import bn_figures


def frames(lrs=(0.1,)):
    runs, rows = [], []
    for norm in ("custom_bn", "batch_renorm"):
        for bs in (2, 32):
            for lr in lrs:
                for seed in (0, 1):
                    rid = f"{norm}-{bs}-{lr}-{seed}"
                    runs.append(
                        {"run_id": rid, "status": "completed", "norm.name": norm,
                         "batch_size": bs, "lr": lr, "seed": seed}
                    )  # fmt: skip
                    for epoch in (1, 2, 3):
                        for k, layer in enumerate(("conv.bn1", "conv.bn2")):
                            value = seed + epoch + 10 * k + (bs == 32)
                            rows.append(
                                {"run_id": rid, "epoch": epoch, "layer": layer, "channels": 4,
                                 "batches": 2, **dict.fromkeys(BN_STATS_MEASURES, value)}
                            )  # fmt: skip
    runs.append({"run_id": "x", "status": "failed", "norm.name": "group", "batch_size": 2,
                 "lr": lrs[0], "seed": 0})  # fmt: skip
    return pd.DataFrame(runs), pd.DataFrame(rows)


def test_one_heatmap_per_norm_and_batch_size_of_the_mean_over_seeds():
    runs, bn_stats = frames()
    figures = bn_figures.bn_stats_figures(runs, bn_stats)
    assert [name for name, _ in figures] == [
        f"bn_layers_{m}.png" for m in bn_figures.FIGURE_MEASURES
    ]
    figure = figures[0][1]
    panels = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title() for ax in panels] == [
        "custom_bn, batch 2 (n=2)", "custom_bn, batch 32 (n=2)",
        "batch_renorm, batch 2 (n=2)", "batch_renorm, batch 32 (n=2)",
    ]  # fmt: skip
    grid = np.asarray(panels[1].images[0].get_array())
    # mean over seeds 0 and 1: epoch + 0.5 + 10 * layer + 1 (batch 32); layers top down
    expected = [[e + 0.5 + 10 * k + 1 for e in (1, 2, 3)] for k in (0, 1)]
    np.testing.assert_allclose(grid, expected)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["conv.bn1", "conv.bn2"]
    figure.canvas.draw()  # renders under Agg


def test_other_swept_keys_split_the_figures_and_no_diagnostics_draw_none():
    runs, bn_stats = frames(lrs=(0.05, 0.1))
    names = [name for name, _ in bn_figures.bn_stats_figures(runs, bn_stats)]
    assert names[:2] == [
        "bn_layers_mean_shift__lr-0.05.png",
        "bn_layers_var_log_ratio__lr-0.05.png",
    ]
    assert len(names) == 2 * len(bn_figures.FIGURE_MEASURES)
    assert bn_figures.bn_stats_figures(runs, bn_stats.iloc[:0]) == []
