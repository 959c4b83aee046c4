"""Tests for normbench.analysis.stats: group statistics (means, stds, 95% CIs against
hand-computed values); the value chosen on validation, against a table built
by hand; differences to a baseline (paired t, Wilcoxon, Welch) against scipy and
hand-computed cases, Holm's adjustment against statsmodels and by hand, the estimator
comparisons, and the flags on constructed run frames."""

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
    result = stats.welch(a, b)
    expected = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert result.test == "welch" and not result.no_variance
    assert result.diff == pytest.approx(a.mean() - b.mean())
    assert result.p == pytest.approx(expected.pvalue)
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3
    dof = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    assert result.ci95 == pytest.approx(scipy_stats.t.ppf(0.975, dof) * math.sqrt(va + vb))
    one = stats.welch(a, b[:1])
    assert one.diff == pytest.approx(a.mean() - b[0]) and math.isnan(one.ci95)
    assert math.isnan(one.p) and one.test == "none"


def test_differences_compare_each_group_with_the_baselines_same_group():
    """gn at bs 8 ran seeds 0 and 1, as bn did: paired by seed (it was Welch's before)."""
    summary = pd.DataFrame(
        {"norm.name": ["bn", "gn", "gn"], "batch_size": [8, 8, 64], "lr": [0.1, 0.1, 0.1]}
    )
    keys = ["norm.name", "batch_size", "lr"]
    runs = RUNS.copy()
    runs.loc[len(runs)] = ("gn", 8, 0.1, 1, "completed", 0.7, 0.6, 0.70)
    out = stats.differences(runs, summary, keys, "bn")
    gn8 = out.iloc[1]
    a, b = np.array([0.64, 0.70]), np.array([0.90, 0.92])  # seeds 0, 1
    assert gn8["diff_to_baseline"] == pytest.approx(a.mean() - b.mean())
    assert gn8["p_value"] == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    assert gn8["test"] == "paired t" and "few_seeds" in gn8["flags"]
    assert math.isnan(out.iloc[0]["diff_to_baseline"])  # the baseline itself
    gn64 = out.iloc[2]  # the baseline's only completed run at bs 64, lr 0.1: no interval
    assert gn64["diff_to_baseline"] == pytest.approx(0.56 - 0.78)
    assert math.isnan(gn64["diff_ci95"]) and math.isnan(gn64["p_value"])
    assert gn64["test"] == "none"
    assert set(out["baseline"]) == {"bn"}
    # one comparison with a p: Holm's adjustment of one p-value is that p-value
    assert gn8["p_holm"] == pytest.approx(gn8["p_value"]) and math.isnan(gn64["p_holm"])


def seeded(values, seeds=None):
    """A side of a comparison: accuracies indexed by their runs' seeds."""
    return pd.Series(values, index=pd.Index(range(len(values)) if seeds is None else seeds))


def test_paired_t_matches_scipy_and_a_hand_computed_case():
    """Differences 0.02, 0.03, 0.01: mean 0.02, sd 0.01, se 0.01/sqrt(3), t = 2*sqrt(3)
    with 2 degrees of freedom; the CI is mean ± t(0.975, 2) · se."""
    b = np.array([0.80, 0.85, 0.90])
    a = b + np.array([0.02, 0.03, 0.01])
    result = stats.compare(seeded(a), seeded(b))
    assert result.test == "paired t" and result.diff == pytest.approx(0.02)
    se = 0.01 / math.sqrt(3)
    assert result.ci95 == pytest.approx(T975_DF2 * se)
    assert result.p == pytest.approx(2 * scipy_stats.t.sf(0.02 / se, 2))
    assert result.p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    low, high = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (result.diff - result.ci95, result.diff + result.ci95) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    assert math.isnan(result.p_wilcoxon)  # 3 pairs: Wilcoxon cannot reach 0.05


def test_pairing_by_seed_finds_what_welch_does_not():
    """A gain of about one point on every seed, under a seed-to-seed spread of ten
    points: paired by seed it is significant; the same values with no seeds in common
    (Welch) are not."""
    b = np.array([0.80, 0.90, 0.70, 0.85])
    a = b + np.array([0.010, 0.012, 0.011, 0.009])
    by_seed = stats.compare(seeded(a), seeded(b[[2, 0, 3, 1]], [2, 0, 3, 1]))  # any order
    assert by_seed.test == "paired t" and by_seed.p < 0.001
    assert by_seed.p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    apart = stats.compare(seeded(a), seeded(b, [4, 5, 6, 7]))
    assert apart.test == "welch" and apart.p > 0.5
    assert apart.p == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
    # a seed run twice (a coarser --group-by pools runs of one seed): not pairs
    twice = stats.compare(seeded(a, [0, 0, 1, 1]), seeded(b, [0, 0, 1, 1]))
    assert twice.test == "welch"


def test_wilcoxon_is_reported_from_six_pairs():
    """Six positive differences of distinct sizes: the exact two-sided signed-rank p is
    2 / 2^6 = 0.03125; at five pairs (smallest p 0.0625) none is given."""
    b = np.array([0.80, 0.82, 0.84, 0.86, 0.88, 0.90])
    a = b + np.array([0.010, 0.020, 0.030, 0.040, 0.050, 0.060])
    six = stats.compare(seeded(a), seeded(b))
    assert six.p_wilcoxon == pytest.approx(2 / 2**6)
    assert six.p_wilcoxon == pytest.approx(scipy_stats.wilcoxon(a, b).pvalue)
    assert six.test == "paired t" and six.p == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    five = stats.compare(seeded(a[:5]), seeded(b[:5]))
    assert math.isnan(five.p_wilcoxon) and five.test == "paired t"


@pytest.mark.parametrize(
    ("a", "b", "seeds_b"),
    [
        ([0.975, 0.975], [0.983, 0.983], [5, 6]),  # both sides constant: Welch has no variance
        ([0.975, 0.975], [0.975, 0.975], [0, 1]),  # the case: p was 0
        ([0.91, 0.93, 0.95], [0.90, 0.92, 0.94], [0, 1, 2]),  # every paired difference 0.01
    ],
)
def test_no_variance_gives_no_test_never_p_zero(a, b, seeds_b):
    result = stats.compare(seeded(np.array(a)), seeded(np.array(b), seeds_b))
    assert result.no_variance and result.test == "none"
    assert math.isnan(result.p) and math.isnan(result.ci95)
    assert result.diff == pytest.approx(np.mean(a) - np.mean(b))


def test_one_two_and_three_seeds():
    """n = 1: a difference, nothing else; n = 2: a test with t(0.975, 1) = 12.7 standard
    errors of CI; n = 3: t(0.975, 2)."""
    one = stats.compare(seeded([0.9]), seeded([0.8]))
    assert one.diff == pytest.approx(0.1) and one.test == "none"
    assert math.isnan(one.p) and math.isnan(one.ci95)
    two = stats.compare(seeded([0.90, 0.95]), seeded([0.80, 0.84]))
    se = np.std([0.10, 0.11], ddof=1) / math.sqrt(2)
    assert two.test == "paired t" and two.ci95 == pytest.approx(scipy_stats.t.ppf(0.975, 1) * se)
    three = stats.compare(seeded([0.90, 0.95, 0.97]), seeded([0.80, 0.84, 0.88]))
    se = np.std([0.10, 0.11, 0.09], ddof=1) / math.sqrt(3)
    assert three.ci95 == pytest.approx(T975_DF2 * se)
    np.testing.assert_array_equal(stats.flags.few_seeds([0, 1, 2, 3]), [False, True, True, False])


def test_holm_adjusts_by_rank_and_keeps_the_order():
    """p = 0.01, 0.04, 0.03, none, 0.005: ranked 0.005 x 4 = 0.02, 0.01 x 3 = 0.03,
    0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (never below a smaller p's)."""
    from statsmodels.stats.multitest import multipletests

    p = [0.01, 0.04, 0.03, math.nan, 0.005]
    adjusted = stats.holm(p)
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, math.nan, 0.02])
    finite = [0.01, 0.04, 0.03, 0.005]
    expected = multipletests(finite, method="holm")[1]
    np.testing.assert_allclose(adjusted[[0, 1, 2, 4]], expected)
    assert np.isnan(stats.holm([math.nan])).all() and len(stats.holm([])) == 0
    np.testing.assert_allclose(stats.holm([0.4, 0.3]), [0.6, 0.6])  # capped by the larger


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


# ------------------------------------------------- estimators, the selected table, flags


def study(rows):
    """Runs with BatchNorm's estimators, training accuracy and steps (the issue's study,
    shrunk): (norm, batch size, lr, seed, best val, final test, PreciseBN, batch stats,
    train acc, steps)."""
    columns = [
        "norm.name", "batch_size", "lr", "seed", "best_val_acc", "final_test_acc",
        "test_acc_precise_bn", "test_acc_batch_stats", "final_train_acc", "steps",
    ]  # fmt: skip
    runs = pd.DataFrame(rows, columns=columns)
    runs.insert(4, "status", "completed")
    runs["test_acc_at_best_val"] = runs["final_test_acc"] + 0.001
    runs.attrs["config_columns"] = ["norm.name", "batch_size", "lr", "seed"]
    return runs


BN_RENORM = study(
    [
        # custom_bn: PreciseBN within a point of the running averages
        ("custom_bn", 128, 0.1, 0, 0.96, 0.95, 0.951, 0.94, 0.99, 4000),
        ("custom_bn", 128, 0.1, 1, 0.97, 0.96, 0.962, 0.95, 0.99, 4000),
        ("custom_bn", 128, 0.1, 2, 0.96, 0.94, 0.943, 0.935, 0.99, 4000),
        # batch_renorm: running averages stale (60% vs 98% with PreciseBN), ramp not over
        ("batch_renorm", 128, 0.1, 0, 0.60, 0.56, 0.98, 0.97, 0.98, 168),
        ("batch_renorm", 128, 0.1, 1, 0.70, 0.66, 0.981, 0.975, 0.98, 168),
        ("batch_renorm", 128, 0.1, 2, 0.80, 0.76, 0.982, 0.972, 0.98, 168),
        # layer: no running statistics; trains to 82%: under-trained
        ("layer", 128, 0.1, 0, 0.83, 0.82, None, None, 0.82, 168),
        ("layer", 128, 0.1, 1, 0.84, 0.83, None, None, 0.83, 168),
        ("layer", 128, 0.1, 2, 0.82, 0.80, None, None, 0.82, 168),
    ]
)


@pytest.fixture
def bn_renorm():
    runs = BN_RENORM.copy()
    runs["renorm_ramp_end_step"] = np.where(runs["norm.name"] == "batch_renorm", 2500, np.nan)
    runs.attrs = dict(BN_RENORM.attrs)
    return runs


def test_estimators_are_compared_with_the_running_averages_within_runs(bn_renorm):
    summary = group_stats(bn_renorm, ["norm", "batch_size", "lr"], "custom_bn").set_index(
        "norm.name"
    )
    renorm = bn_renorm[bn_renorm["norm.name"] == "batch_renorm"]
    expected = scipy_stats.ttest_rel(renorm.test_acc_precise_bn, renorm.final_test_acc)
    row = summary.loc["batch_renorm"]
    assert row.precise_bn_diff == pytest.approx(
        (renorm.test_acc_precise_bn - renorm.final_test_acc).mean()
    )
    assert row.precise_bn_p == pytest.approx(expected.pvalue)
    low, high = expected.confidence_interval(0.95)
    assert row.precise_bn_ci95 == pytest.approx((high - low) / 2)
    batch = scipy_stats.ttest_rel(renorm.test_acc_batch_stats, renorm.final_test_acc)
    assert row.batch_stats_p == pytest.approx(batch.pvalue)
    # Holm over the table's four estimator comparisons (layer has none)
    p = [summary.loc[n, f"{e}_p"] for n in ("batch_renorm", "custom_bn") for e in stats.ESTIMATORS]
    from statsmodels.stats.multitest import multipletests

    holm = multipletests(p, method="holm")[1]
    got = [
        summary.loc[n, f"{e}_p_holm"]
        for n in ("batch_renorm", "custom_bn")
        for e in stats.ESTIMATORS
    ]
    np.testing.assert_allclose(got, holm)
    assert summary.loc["layer", list(stats.ESTIMATOR_COLUMNS)].isna().all()


def test_flags_on_a_constructed_study(bn_renorm):
    summary = group_stats(bn_renorm, ["norm", "batch_size", "lr"], "custom_bn").set_index(
        "norm.name"
    )
    flagged = {norm: set(str(v).split(";")) - {""} for norm, v in summary["flags"].items()}
    assert flagged == {
        "batch_renorm": {"stale_running_stats", "renorm_ramp_not_reached"},
        "custom_bn": set(),
        "layer": {"under_trained"},
    }
    # the thresholds move the flags: 40 points of staleness, a 20-point training gap
    loose = stats.flags.Thresholds(stale=40.0, undertrained_gap=20.0)
    summary = group_stats(bn_renorm, ["norm", "batch_size", "lr"], "custom_bn", loose)
    assert list(summary["flags"]) == ["renorm_ramp_not_reached", "", ""]


def test_the_ramp_flag_reads_the_config_when_runs_did_not_record_it():
    """Runs from before renorm_ramp_end_step: norm.warmup_steps + norm.ramp_steps; with
    neither, no flag."""
    runs = BN_RENORM.copy()
    runs.attrs = dict(BN_RENORM.attrs)
    renorm = runs["norm.name"] == "batch_renorm"
    assert not stats.flags.renorm_ramp_not_reached(runs)
    runs["norm.warmup_steps"] = np.where(renorm, 100, np.nan)
    runs["norm.ramp_steps"] = np.where(renorm, 50, np.nan)
    assert not stats.flags.renorm_ramp_not_reached(runs)  # 168 steps >= 150: reached
    runs.loc[renorm, "norm.ramp_steps"] = 2000
    assert stats.flags.renorm_ramp_not_reached(runs)
    np.testing.assert_array_equal(stats.flags.ramp_end(runs)[renorm], [2100] * 3)
    # a recorded end step wins over the config
    runs["renorm_ramp_end_step"] = np.where(renorm, 100, np.nan)
    assert not stats.flags.renorm_ramp_not_reached(runs)


def test_the_selected_table_has_its_test_and_flags(bn_renorm):
    """Two lrs per norm; the selected runs of each norm are compared with custom_bn's at
    its own chosen lr, paired by seed, on test_acc_at_best_val."""
    other = bn_renorm.assign(lr=0.05, best_val_acc=bn_renorm.best_val_acc - 0.01)
    runs = pd.concat([bn_renorm, other], ignore_index=True)
    runs.attrs = dict(bn_renorm.attrs)
    chosen = stats.select(runs, ["lr"], "custom_bn").set_index("norm.name")
    assert list(chosen.lr) == [0.1, 0.1, 0.1]
    for column in ("diff_to_baseline", "diff_ci95", "test", "p_value", "p_holm", "flags"):
        assert column in chosen.columns
    renorm = bn_renorm[bn_renorm["norm.name"] == "batch_renorm"].test_acc_at_best_val
    bn = bn_renorm[bn_renorm["norm.name"] == "custom_bn"].test_acc_at_best_val
    row = chosen.loc["batch_renorm"]
    assert row.test == "paired t"
    assert row.diff_to_baseline == pytest.approx(renorm.mean() - bn.mean())
    assert row.p_value == pytest.approx(scipy_stats.ttest_rel(renorm, bn).pvalue)
    from statsmodels.stats.multitest import multipletests

    ps = [chosen.loc["batch_renorm", "p_value"], chosen.loc["layer", "p_value"]]
    np.testing.assert_allclose(
        [chosen.loc["batch_renorm", "p_holm"], chosen.loc["layer", "p_holm"]],
        multipletests(ps, method="holm")[1],
    )
    flags = {norm: set(v.split(";")) for norm, v in chosen["flags"].items()}
    assert flags["custom_bn"] == {"lr_at_edge"}  # 0.1 is the top of {0.05, 0.1}
    assert flags["batch_renorm"] == {"lr_at_edge", "stale_running_stats", "renorm_ramp_not_reached"}
    assert flags["layer"] == {"lr_at_edge", "under_trained"}
    # a grid of three with the middle chosen: not at the edge
    third = bn_renorm.assign(lr=0.2, best_val_acc=bn_renorm.best_val_acc - 0.02)
    runs = pd.concat([bn_renorm, other, third], ignore_index=True)
    runs.attrs = dict(bn_renorm.attrs)
    assert not stats.select(runs, ["lr"])["flags"].str.contains("lr_at_edge").any()
    # a larger lr that was tried and diverged on every seed bounds the grid as well
    diverged = third.assign(status="diverged", best_val_acc=np.nan, test_acc_at_best_val=np.nan)
    runs = pd.concat([bn_renorm, other, diverged], ignore_index=True)
    runs.attrs = dict(bn_renorm.attrs)
    assert not stats.select(runs, ["lr"])["flags"].str.contains("lr_at_edge").any()


def test_stale_running_statistics_are_running_averages_that_precise_bn_beats():
    """PreciseBN well above the running averages: stale; well below (Batch Renorm, whose
    weights were trained against its running averages): not stale."""
    lagging = pd.DataFrame({"final_test_acc": [0.60, 0.70], "test_acc_precise_bn": [0.98, 0.97]})
    assert stats.flags.stale_gap(lagging) == pytest.approx(0.325)
    assert stats.flags.stale_running_stats(lagging, 2.0)
    ahead = lagging.rename(
        columns={"final_test_acc": "test_acc_precise_bn", "test_acc_precise_bn": "final_test_acc"}
    )
    assert not stats.flags.stale_running_stats(ahead, 2.0)
    close = pd.DataFrame({"final_test_acc": [0.97], "test_acc_precise_bn": [0.985]})
    assert not stats.flags.stale_running_stats(close, 2.0)
    assert stats.flags.stale_running_stats(close, 1.0)


def test_flag_helpers():
    assert stats.flags.join(["few_seeds", "lr_at_edge", "few_seeds"]) == "lr_at_edge;few_seeds"
    assert stats.flags.at_edge(0.1, [0.05, 0.1]) and stats.flags.at_edge(0.05, [0.1, 0.05])
    assert not stats.flags.at_edge(0.1, [0.05, 0.1, 0.2]) and not stats.flags.at_edge(0.1, [0.1])
    assert not stats.flags.at_edge("group", ["group", "layer"])
    np.testing.assert_array_equal(
        stats.flags.under_trained([0.99, 0.85, 0.90, math.nan], 10.0), [False, True, False, False]
    )
    defaults = stats.flags.Thresholds.of()
    assert (defaults.stale, defaults.undertrained_gap) == (2.0, 10.0)
