"""Tests for normbench.analysis.stats: group statistics (means, stds, 95% CIs against
hand-computed values); the value chosen on validation, against a table built
by hand; differences to a baseline, against scipy's Welch test on a hand-made frame."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from normbench.analysis import stats
from normbench.analysis.collect import collect
from normbench.analysis.stats import SUMMARY_STAT_COLUMNS, group_stats
from normbench.errors import UserError

# Student's t 97.5% quantile with 2 degrees of freedom, as in any table.
T975_DF2 = 4.302652729911275


def frame(rows):
    """Runs as collect() gives them: the summary fields and the config's dotted keys."""
    runs = pd.DataFrame(
        rows,
        columns=[
            "norm.name", "batch_size", "lr", "seed", "status",
            "best_val_acc", "test_acc_at_best_val", "final_test_acc",
        ],
    )  # fmt: skip
    runs.attrs["config_columns"] = ["norm.name", "batch_size", "lr", "seed"]
    return runs


# (norm, batch size, lr, seed, status, best val, test at best val, final test)
RUNS = frame(
    [
        # bn, bs 8: lr 0.1 wins on validation (0.90 vs 0.85), though 0.01 has the better test
        ("bn", 8, 0.01, 0, "completed", 0.84, 0.95, 0.94),
        ("bn", 8, 0.01, 1, "completed", 0.86, 0.97, 0.96),
        ("bn", 8, 0.1, 0, "completed", 0.89, 0.91, 0.90),
        ("bn", 8, 0.1, 1, "completed", 0.91, 0.93, 0.92),
        # bn, bs 64: lr 0.01 wins; the diverged run at 0.1 does not count
        ("bn", 64, 0.01, 0, "completed", 0.80, 0.81, 0.80),
        ("bn", 64, 0.01, 1, "completed", 0.82, 0.83, 0.82),
        ("bn", 64, 0.1, 0, "completed", 0.78, 0.79, 0.78),
        ("bn", 64, 0.1, 1, "diverged", None, None, None),
        # gn, bs 8: a tie (0.70 both): the first value listed, 0.01, is kept
        ("gn", 8, 0.01, 0, "completed", 0.70, 0.60, 0.61),
        ("gn", 8, 0.1, 0, "completed", 0.70, 0.65, 0.64),
        ("gn", 64, 0.01, 0, "completed", 0.50, 0.52, 0.51),
        ("gn", 64, 0.1, 0, "completed", 0.55, 0.57, 0.56),
    ]
)


def test_selection_picks_the_best_mean_validation_value_per_group():
    chosen = stats.select(RUNS, ["lr"])
    by_group = {(r["norm.name"], r["batch_size"]): r for r in chosen.to_dict("records")}
    assert {k: v["lr"] for k, v in by_group.items()} == {
        ("bn", 8): 0.1,
        ("bn", 64): 0.01,
        ("gn", 8): 0.01,
        ("gn", 64): 0.1,
    }
    bn8 = by_group["bn", 8]
    assert bn8["n"] == 2 and bn8["best_val_acc_mean"] == pytest.approx(0.90)
    assert bn8["test_acc_at_best_val_mean"] == pytest.approx(0.92)
    std = np.std([0.91, 0.93], ddof=1)
    assert bn8["test_acc_at_best_val_std"] == pytest.approx(std)
    assert bn8["test_acc_at_best_val_ci95"] == pytest.approx(
        scipy_stats.t.ppf(0.975, 1) * std / 2**0.5
    )
    assert bn8["final_test_acc_mean"] == pytest.approx(0.91)
    assert math.isnan(by_group["gn", 8]["test_acc_at_best_val_std"])  # one seed: no spread
    assert set(chosen["tuned"]) == {"lr"}
    # the runs at the chosen values, every seed and status
    picked = stats.selected_runs(RUNS, chosen)
    assert len(picked) == 2 + 2 + 1 + 1


def test_selection_refuses_what_it_cannot_choose():
    with pytest.raises(UserError, match="not swept"):
        stats.select(RUNS[RUNS["lr"] == 0.1], ["lr"])
    without_val = RUNS.assign(best_val_acc=None)
    with pytest.raises(UserError, match="validation accuracies"):
        stats.select(without_val, ["lr"])


def test_welch_matches_scipy():
    a = np.array([0.91, 0.93, 0.88, 0.95])
    b = np.array([0.85, 0.90, 0.80])
    diff, half, p = stats.welch(a, b)
    expected = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert p == pytest.approx(expected.pvalue)
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3
    dof = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    assert half == pytest.approx(scipy_stats.t.ppf(0.975, dof) * math.sqrt(va + vb))
    # the interval scipy gives for the same test (scipy >= 1.11)
    low, high = expected.confidence_interval(0.95)
    assert (diff - half, diff + half) == (pytest.approx(low), pytest.approx(high))
    one = stats.welch(a, b[:1])
    assert one[0] == pytest.approx(a.mean() - b[0]) and math.isnan(one[1]) and math.isnan(one[2])


def test_differences_compare_each_group_with_the_baselines_same_group():
    summary = pd.DataFrame(
        {"norm.name": ["bn", "gn", "gn"], "batch_size": [8, 8, 64], "lr": [0.1, 0.1, 0.1]}
    )
    keys = ["norm.name", "batch_size", "lr"]
    runs = RUNS.copy()
    runs.loc[len(runs)] = ("gn", 8, 0.1, 1, "completed", 0.7, 0.6, 0.70)
    out = stats.differences(runs, summary, keys, "bn")
    gn8 = out.iloc[1]
    a, b = np.array([0.64, 0.70]), np.array([0.90, 0.92])
    assert gn8["diff_to_baseline"] == pytest.approx(a.mean() - b.mean())
    assert gn8["p_value"] == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert math.isnan(out.iloc[0]["diff_to_baseline"])  # the baseline itself
    gn64 = out.iloc[2]  # the baseline's only completed run at bs 64, lr 0.1: no interval
    assert gn64["diff_to_baseline"] == pytest.approx(0.56 - 0.78)
    assert math.isnan(gn64["diff_ci95"]) and math.isnan(gn64["p_value"])
    assert set(out["baseline"]) == {"bn"}


def test_the_baseline_defaults_to_custom_bn_when_present():
    runs = RUNS.replace({"norm.name": {"bn": "custom_bn"}})
    assert stats.baseline_of(runs, None) == "custom_bn"
    assert stats.baseline_of(RUNS, None) is None
    assert stats.baseline_of(RUNS, "gn") == "gn"
    with pytest.raises(UserError, match="not among"):
        stats.baseline_of(RUNS, "layer")


# ----------------------------------------------------------------- group statistics


def test_summary_statistics_match_hand_computed_values(tmp_path, make_run):
    exp = tmp_path / "exp"
    finals, bests = [0.90, 0.92, 0.97], [0.91, 0.95, 0.98]
    for seed, (final, best) in enumerate(zip(finals, bests, strict=True)):
        make_run(exp, final=final, at_best_val=best, seed=seed)
    make_run(exp, status="diverged", seed=3)
    make_run(exp, status="failed", seed=4)
    make_run(exp, final=0.99, status="interrupted", seed=5)  # partial: not a result
    make_run(exp, final=0.8, norm__name="layer", seed=0)
    make_run(exp, status="diverged", norm__name="group", seed=0)

    summary = group_stats(collect(exp).runs).set_index("norm.name")
    assert list(summary.columns[-len(SUMMARY_STAT_COLUMNS) :]) == list(SUMMARY_STAT_COLUMNS)
    bn = summary.loc["custom_bn"]
    assert (bn.n, bn.n_diverged, bn.n_failed, bn.n_interrupted) == (3, 1, 1, 1)
    std = math.sqrt(((0.90 - 0.93) ** 2 + (0.92 - 0.93) ** 2 + (0.97 - 0.93) ** 2) / 2)
    assert bn.final_test_acc_mean == pytest.approx(0.93)
    assert bn.final_test_acc_std == pytest.approx(std)
    assert bn.final_test_acc_ci95 == pytest.approx(T975_DF2 * std / math.sqrt(3))
    assert bn.test_acc_at_best_val_mean == pytest.approx(statistics.mean(bests))
    assert bn.test_acc_at_best_val_std == pytest.approx(statistics.stdev(bests))
    ci = T975_DF2 * statistics.stdev(bests) / math.sqrt(3)
    assert bn.test_acc_at_best_val_ci95 == pytest.approx(ci)

    layer = summary.loc["layer"]  # one run: a mean, no spread
    assert (layer.n, layer.final_test_acc_mean) == (1, pytest.approx(0.8))
    assert math.isnan(layer.final_test_acc_std) and math.isnan(layer.final_test_acc_ci95)

    group = summary.loc["group"]  # diverged only: counted, no statistics
    assert (group.n, group.n_diverged) == (0, 1)
    stats = [c for c in SUMMARY_STAT_COLUMNS if c.startswith(("final_test_acc", "test_acc_at"))]
    assert len(stats) == 6 and all(math.isnan(group[c]) for c in stats)

    # Against the baseline (custom_bn, there): layer's one run gives a difference but no
    # interval or p-value; group has no completed run, so no difference at all.
    assert set(summary["baseline"]) == {"custom_bn"}
    assert math.isnan(bn.diff_to_baseline)
    assert layer.diff_to_baseline == pytest.approx(0.8 - 0.93)
    assert math.isnan(layer.diff_ci95) and math.isnan(layer.p_value)
    assert math.isnan(group.diff_to_baseline) and math.isnan(group.p_value)


def test_t_quantile_is_scipy_stats(tmp_path):
    from scipy.stats import t

    assert stats.t975(2.0) == pytest.approx(T975_DF2)
    assert stats.t975(9.0) == pytest.approx(t.ppf(0.975, 9))


def test_default_groups_differ_only_in_seed(tmp_path, make_run):
    exp = tmp_path / "exp"
    for momentum in (0.9, 0.8):
        for seed in (0, 1):
            # Execution keys (device, threads) differ between seeds: not a different group.
            make_run(
                exp,
                final=momentum,
                seed=seed,
                optim__momentum=momentum,
                threads=seed + 1,
                device=["auto", "cpu"][seed],
            )
    summary = group_stats(collect(exp).runs)
    assert len(summary) == 2 and list(summary.n) == [2, 2]
    assert list(summary["optim.momentum"]) == [0.8, 0.9]
    for key in ("seed", "threads", "device", "config.device", "name", "out_dir"):
        assert key not in summary.columns
    assert "dataset.train_size" in summary.columns and "norm.eps" in summary.columns


def test_group_by_pools_coarser_groups(grid):
    runs = collect(grid).runs
    by_norm = group_stats(runs, ["norm"])
    assert list(by_norm.columns) == ["norm.name", *SUMMARY_STAT_COLUMNS]
    assert list(by_norm["norm.name"]) == ["custom_bn", "layer"] and list(by_norm.n) == [6, 6]
    custom = runs[runs["norm.name"] == "custom_bn"].final_test_acc
    assert by_norm.final_test_acc_mean[0] == pytest.approx(custom.mean())
    assert by_norm.final_test_acc_std[0] == pytest.approx(custom.std())

    by_bs = group_stats(runs, ["batch_size"])
    assert list(by_bs.batch_size) == [8, 32, 128] and list(by_bs.n) == [4, 4, 4]
    both = group_stats(runs, ["norm", "batch_size"])
    assert len(both) == 6 and list(both.n) == [2] * 6
    assert list(zip(both["norm.name"], both.batch_size, strict=True))[:3] == [
        ("custom_bn", 8),
        ("custom_bn", 32),
        ("custom_bn", 128),
    ]
    overall = group_stats(runs, [])
    assert list(overall.columns) == list(SUMMARY_STAT_COLUMNS) and overall.n[0] == 12


def test_mean_ci_is_student_t():
    mean, half, n = stats.mean_ci([1.0, 2.0, 6.0])
    assert n == 3 and mean == pytest.approx(3.0)
    assert half == pytest.approx(T975_DF2 * np.std([1, 2, 6], ddof=1) / math.sqrt(3))
    assert stats.mean_ci([4.0])[:2] == (4.0, pytest.approx(math.nan, nan_ok=True))
    assert math.isnan(stats.mean_ci([4.0])[1]) and stats.mean_ci([])[2] == 0
    assert stats.mean_ci([1.0, float("nan"), 3.0])[2] == 2
