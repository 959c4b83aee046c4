"""Statistics over seeds: mean, std and 95% confidence interval per group of runs, the
difference to a baseline variant with the test that fits the design, values tuned on
validation, and BatchNorm's inference estimators compared within runs.

- :func:`group_stats`: one row per group of runs (those that differ only in their seed,
  or the keys given), the accuracies' mean, std and 95% CI over the completed runs, the
  difference to the baseline (:func:`differences`), the estimator comparisons
  (:func:`estimator_differences`) and the row's flags (:mod:`.flags`).
- :func:`select` (``normbench results --select lr``): for every group of the other swept
  keys (norm x batch size, say), the value of the selected key with the best mean
  validation accuracy over seeds, the test accuracy of the runs at that value and its
  difference to the baseline's selected runs. The test set chooses nothing.
- :func:`compare`: a difference of two samples with its 95% CI and p-value: paired by
  seed (:func:`paired`: Student's paired t-test, and Wilcoxon's signed-rank test from
  :data:`WILCOXON_MIN` pairs) where both sides ran the same seeds, once each; Welch's
  unequal-variance t-test (:func:`welch`) otherwise. Samples with no spread (both
  constant, or every paired difference the same) get no test: no p-value, never p = 0.
- :func:`holm`: Holm's step-down adjustment of one table's p-values (statsmodels).

Every test, interval and adjustment is scipy's or statsmodels'; nothing is computed by
hand here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from normbench.analysis import flags
from normbench.analysis.collect import defaults_note
from normbench.analysis.keys import (
    group_candidates,
    other_keys,
    resolve_key,
    sort_frame,
    swept_keys,
)
from normbench.errors import UserError
from normbench.schema import record_fields

#: The accuracies :func:`group_stats` gives mean, std and 95% CI of: the run record's
#: fields marked ``stat`` (:class:`~normbench.schema.RunRecord`).
STAT_METRICS: tuple[str, ...] = tuple(f.name for f in record_fields() if f.stat)


#: A comparison to the baseline: the reference variant, the difference, the half-width of
#: its 95% CI, the test it comes from, its p-value, Holm's adjustment of that p-value over
#: the table's comparisons, and Wilcoxon's signed-rank p (paired, n >= WILCOXON_MIN).
COMPARISON_COLUMNS: tuple[str, ...] = (
    "baseline",
    "diff_to_baseline",
    "diff_ci95",
    "test",
    "p_value",
    "p_holm",
    "p_wilcoxon",
)

#: BatchNorm's inference estimators compared with the running averages in the same runs
#: (column prefix -> the run record's field).
ESTIMATORS: dict[str, str] = {
    "precise_bn": "test_acc_precise_bn",
    "batch_stats": "test_acc_batch_stats",
}

#: The estimator every other is compared with: the running averages training kept, on
#: the final weights (the weights PreciseBN and batch statistics are measured on).
RUNNING = "final_test_acc"

#: Per estimator: its mean difference to the running averages, the half-width of its 95%
#: CI, the paired t-test's p and Holm's adjustment over the table's estimator comparisons.
ESTIMATOR_COLUMNS: tuple[str, ...] = tuple(
    f"{name}_{stat}" for name in ESTIMATORS for stat in ("diff", "ci95", "p", "p_holm")
)

#: Columns of ``summary.csv`` after the group keys.
SUMMARY_STAT_COLUMNS: tuple[str, ...] = (
    "n",
    "n_diverged",
    "n_failed",
    "n_interrupted",
    *(f"{metric}_{stat}" for metric in STAT_METRICS for stat in ("mean", "std", "ci95")),
    *COMPARISON_COLUMNS,  # of final_test_acc
    *ESTIMATOR_COLUMNS,
    "flags",
)


# ---------------------------------------------------------------------------- statistics


def t975(dof: np.ndarray) -> np.ndarray:
    """Student's t 97.5% quantile: ``scipy.stats.t.ppf(0.975, dof)``, which is this
    function of scipy.special (importing scipy.stats costs a second)."""
    from scipy.special import stdtrit

    return stdtrit(dof, 0.975)


def ci95(std, n) -> np.ndarray:
    """The half-width of the 95% confidence interval of a mean of ``n`` values of sample
    standard deviation ``std``: Student's t(0.975, n-1) · std / √n; NaN where n < 2.
    Every interval a table or a figure shows is this one (arrays or scalars)."""
    std, n = np.broadcast_arrays(np.asarray(std, dtype=float), np.asarray(n, dtype=float))
    half = np.full(n.shape, np.nan)
    many = n >= 2
    half[many] = t975(n[many] - 1) * std[many] / np.sqrt(n[many])
    return half


def spread(values) -> tuple[float, float, float, int]:
    """Mean, sample standard deviation (n-1; NaN when n < 2), :func:`ci95` and n, over
    the finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    std = float(v.std(ddof=1)) if n >= 2 else math.nan
    return mean, std, float(ci95(std, n)), n


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, half-width of its 95% confidence interval (:func:`ci95`; NaN when n < 2) and
    n, over the finite values."""
    mean, _, half, n = spread(values)
    return mean, half, n


def group_stats(
    runs: pd.DataFrame,
    group_by: Sequence[str] | None = None,
    baseline: str | None = None,
    thresholds: flags.Thresholds | None = None,
) -> pd.DataFrame:
    """Statistics per group of runs, one row per group, sorted by the group keys.

    ``group_by`` None: groups of runs that differ only in their seed (every config column
    but the seed and the execution keys is a group key). Otherwise the given keys (short
    names allowed, see :func:`~normbench.analysis.keys.resolve_key`), pooling every run of
    a coarser group.

    Columns: the group keys, ``n`` (completed runs: only they enter the statistics),
    ``n_diverged``, ``n_failed``, ``n_interrupted``, then for ``final_test_acc`` and
    ``test_acc_at_best_val``:
    ``_mean``, ``_std`` (sample, n-1) and ``_ci95``, the half-width of the 95% confidence
    interval of the mean, Student's t(0.975, n-1) · std / √n. With n = 1, std and CI are
    NaN; with n = 0, all six are. Then :data:`COMPARISON_COLUMNS` (:func:`differences`):
    the group's final test accuracy against the baseline's (``baseline``, or custom_bn
    when present; see :func:`baseline_of`) in the same group of the other keys, with
    Holm's adjustment over the table; :data:`ESTIMATOR_COLUMNS`
    (:func:`estimator_differences`); and ``flags`` (:func:`group_flags`, with
    ``thresholds``: the config's defaults when None).
    """
    if group_by is None:
        keys = group_candidates(runs)
    else:
        keys = list(dict.fromkeys(resolve_key(runs, k) for k in group_by))
    status = runs["status"] if "status" in runs else pd.Series(index=runs.index, dtype=object)
    completed = status.eq("completed")
    data = pd.DataFrame(
        {
            "n": completed.astype("int64"),
            "n_diverged": status.eq("diverged").astype("int64"),
            "n_failed": status.eq("failed").astype("int64"),
            "n_interrupted": status.eq("interrupted").astype("int64"),
        },
        index=runs.index,
    )
    for metric in STAT_METRICS:
        values = runs[metric] if metric in runs else pd.Series(index=runs.index, dtype=float)
        data[metric] = pd.to_numeric(values, errors="coerce").where(completed)
    by = [runs[k] for k in keys] if keys else [pd.Series(0, index=runs.index, name="_all")]
    grouped = data.groupby(by, dropna=False, sort=False)
    table = grouped[["n", "n_diverged", "n_failed", "n_interrupted"]].sum()
    noted = "defaulted" in runs and runs["defaulted"].notna().any()
    if noted:  # the same groups in the same order: which keys took defaults, in how many runs
        notes = runs["defaulted"].groupby(by, dropna=False, sort=False).agg(defaults_note)
        table["defaulted"] = notes.to_numpy()
    metrics = list(STAT_METRICS)
    mean, std, count = (
        grouped[metrics].mean(),
        grouped[metrics].std(ddof=1),
        grouped[metrics].count(),
    )
    for metric in metrics:
        table[f"{metric}_mean"] = mean[metric]
        table[f"{metric}_std"] = std[metric].where(count[metric] >= 2)
        table[f"{metric}_ci95"] = ci95(std[metric].to_numpy(), count[metric].to_numpy())
    table = table.reset_index()
    if not keys:
        table = table.drop(columns="_all")
    table = differences(runs, table, keys, baseline_of(runs, baseline))
    table = estimator_differences(runs, table, keys)
    table["flags"] = group_flags(runs, table, keys, thresholds or flags.Thresholds.of())
    table = table[[*keys, *SUMMARY_STAT_COLUMNS, *(["defaulted"] if noted else [])]]
    return table.loc[sort_frame(table, keys)].reset_index(drop=True)


#: The accuracy a selection is made on, and the ones it reports.
SELECT_ON = "best_val_acc"
REPORTED = ("test_acc_at_best_val", "final_test_acc")

#: The accuracy differences to the baseline are taken of (what the tables and figures show).
COMPARED = "final_test_acc"

#: The reference variant when the user names none and it is among the runs.
DEFAULT_BASELINE = "custom_bn"


def _completed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "completed"] if "status" in runs else runs.iloc[0:0]


def _stats(values: pd.Series) -> dict[str, float]:
    mean, std, half, _ = spread(pd.to_numeric(values, errors="coerce"))
    return {"mean": mean, "std": std, "ci95": half}


def select(
    runs: pd.DataFrame,
    over: Sequence[str],
    baseline: str | None = None,
    thresholds: flags.Thresholds | None = None,
) -> pd.DataFrame:
    """The value of ``over`` (one key or several, jointly) chosen on validation for every
    group of the other swept keys: one row per group with the group keys, the chosen
    values, ``tuned`` (the keys chosen), ``n`` (completed runs at them),
    ``best_val_acc_mean`` (what chose them) and mean, std and 95% CI over seeds of
    ``test_acc_at_best_val`` and ``final_test_acc``; then :data:`COMPARISON_COLUMNS` of
    ``test_acc_at_best_val`` against ``baseline``'s runs at its own chosen value in the same
    group of the other keys (:func:`differences`; none when ``baseline`` is None), and
    ``flags``: :func:`group_flags`' over the chosen runs, and ``lr_at_edge`` where a
    numeric key was chosen at the smallest or largest value its group tried.
    Ties go to the value listed first (sorted). Raises :class:`UserError` when the runs
    have no validation accuracy or ``over`` is not swept."""
    keys = list(dict.fromkeys(resolve_key(runs, k) for k in over))
    swept = swept_keys(runs)
    for key in keys:
        if key not in swept:
            raise UserError(
                f"cannot select {key}: it is not swept in these runs "
                f"(swept: {', '.join(swept) or 'nothing'})"
            )
    done = _completed(runs)
    if SELECT_ON not in done or pd.to_numeric(done[SELECT_ON], errors="coerce").isna().all():
        raise UserError(
            "selection needs validation accuracies: these runs have none "
            "(they ran with dataset.val_size=0, or before normbench had a validation split)"
        )
    groups = [k for k in swept if k not in keys]
    scores = done.assign(_score=pd.to_numeric(done[SELECT_ON], errors="coerce"))
    by = [*groups, *keys]
    means = scores.groupby(by, dropna=False, sort=False)["_score"].mean().reset_index()
    means = means.loc[sort_frame(means, by)].dropna(subset=["_score"])
    # the first best candidate of each group (idxmax keeps the first of equals)
    if groups:
        best = means.loc[means.groupby(groups, dropna=False, sort=False)["_score"].idxmax()]
    else:
        best = means.loc[[means["_score"].idxmax()]] if len(means) else means
    rows, edges = [], []
    for _, choice in best.iterrows():
        chosen = scores[_matches(scores, choice, by)]
        row = {key: choice[key] for key in by}
        row["tuned"] = ",".join(keys)
        row["n"] = len(chosen)
        row[f"{SELECT_ON}_mean"] = float(choice["_score"])
        for metric in REPORTED:
            values = chosen[metric] if metric in chosen else pd.Series(dtype=float)
            for stat, value in _stats(values).items():
                row[f"{metric}_{stat}"] = value
        rows.append(row)
        # the values this group tried: those that diverged or failed too (a larger lr
        # that diverged bounds the grid: the choice below it is no edge of what was tried)
        tried = runs[_matches(runs, choice, groups)]
        edges.append(any(flags.at_edge(choice[key], tried[key]) for key in keys))
    columns = [*by, "tuned", "n", f"{SELECT_ON}_mean"] + [
        f"{m}_{s}" for m in REPORTED for s in ("mean", "std", "ci95")
    ]
    selection = pd.DataFrame(rows, columns=columns)
    selection["flags"] = flags.add(pd.Series("", index=selection.index), edges, "lr_at_edge")
    picked = selected_runs(runs, selection)
    selection = differences(picked, selection, groups, baseline, metric=REPORTED[0])
    selection["flags"] = group_flags(picked, selection, groups, thresholds or flags.Thresholds.of())
    return selection[[*columns, *COMPARISON_COLUMNS, "flags"]]


def selection_keys(selection: pd.DataFrame) -> list[str]:
    """The config keys of a :func:`select` frame (the group keys and the chosen ones)."""
    columns = list(selection.columns)
    return columns[: columns.index("tuned")]


def tuned_keys(selection: pd.DataFrame) -> list[str]:
    """The keys a :func:`select` frame chose values of."""
    if selection.empty:
        return []
    return str(selection["tuned"].iloc[0]).split(",")


def _matches(frame: pd.DataFrame, row, keys: Sequence[str]) -> pd.Series:
    match = pd.Series(True, index=frame.index)
    for key in keys:
        match &= _same(frame[key], row[key])
    return match


def _same(column: pd.Series, value) -> pd.Series:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return column.isna()
    return column == value


def selected_runs(runs: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """The runs at the values :func:`select` chose (all seeds, every status)."""
    keys = [k for k in selection_keys(selection) if k in runs.columns]
    keep = pd.Series(False, index=runs.index)
    for _, row in selection.iterrows():
        keep |= _matches(runs, row, keys)
    return runs[keep]


def baseline_of(runs: pd.DataFrame, baseline: str | None) -> str | None:
    """The reference variant: ``baseline`` (which must be among the runs), or
    ``custom_bn`` when the runs have it, else None (no differences)."""
    names = set(runs["norm.name"].dropna()) if "norm.name" in runs else set()
    if baseline is None:
        return DEFAULT_BASELINE if DEFAULT_BASELINE in names and len(names) > 1 else None
    if baseline not in names:
        raise UserError(
            f"baseline {baseline!r} is not among these runs' norms "
            f"({', '.join(sorted(names)) or 'none'})"
        )
    return baseline


# ---------------------------------------------------------------------------- the tests

#: Paired comparisons of at least this many pairs get Wilcoxon's signed-rank p too:
#: below it the exact test cannot reach p < 0.05 (its smallest two-sided p is 2 / 2^n:
#: 0.0625 at n = 5, 0.031 at n = 6).
WILCOXON_MIN = 6

#: The ``test`` column's words for the tests :func:`compare` makes; "none" where no test
#: could be made (fewer than two values on a side, or no spread).
PAIRED, WELCH, NO_TEST = "paired t", "welch", "none"

# Two accuracies closer than this are the same (an accuracy is a count over a test set:
# differences below 1e-12 are float rounding, on which a t-test would find p ~ 0).
_SAME = 1e-12


@dataclass(frozen=True)
class Comparison:
    """A difference of two samples' means: the half-width of its 95% CI, the two-sided
    p-value and the test they come from (``test``: :data:`PAIRED`, :data:`WELCH` or
    :data:`NO_TEST`), Wilcoxon's signed-rank p where paired with n >= :data:`WILCOXON_MIN`,
    and ``no_variance`` where the samples have no spread to test against."""

    diff: float = math.nan
    ci95: float = math.nan
    p: float = math.nan
    test: str = NO_TEST
    p_wilcoxon: float = math.nan
    no_variance: bool = False


def _constant(values: np.ndarray) -> bool:
    return bool(np.ptp(values) <= _SAME) if len(values) else True


def paired(a, b) -> Comparison:
    """``a - b`` paired (``a[i]`` with ``b[i]``): the mean difference, its 95% CI and p by
    Student's paired t-test (``scipy.stats.ttest_rel``), and Wilcoxon's signed-rank p
    (``scipy.stats.wilcoxon``: exact where scipy can) from :data:`WILCOXON_MIN` pairs.
    One pair: the difference only; every difference the same: ``no_variance``, no test."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not len(a):
        return Comparison()
    diff = float(np.mean(a - b))
    if len(a) < 2:
        return Comparison(diff)
    if _constant(a - b):
        return Comparison(diff, no_variance=True)
    with warnings.catch_warnings():  # near-constant differences: scipy warns, the p stands
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(a, b)
        low, high = result.confidence_interval(0.95)
        wilcoxon = math.nan
        if len(a) >= WILCOXON_MIN:
            wilcoxon = float(stats.wilcoxon(a, b).pvalue)
    return Comparison(diff, float(high - low) / 2, float(result.pvalue), PAIRED, wilcoxon)


def welch(a, b) -> Comparison:
    """Mean of ``a`` minus mean of ``b``, its 95% CI and p by Welch's unequal-variance
    t-test (``scipy.stats.ttest_ind(equal_var=False)``). Fewer than two values on a side:
    the difference only; both sides constant: ``no_variance``, no test."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not len(a) or not len(b):
        return Comparison()
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Comparison(diff)
    if _constant(a) and _constant(b):
        return Comparison(diff, no_variance=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
        low, high = result.confidence_interval(0.95)
    return Comparison(diff, float(high - low) / 2, float(result.pvalue), WELCH)


def compare(a: pd.Series, b: pd.Series) -> Comparison:
    """``a - b`` by the test that fits: :func:`paired` when both sides ran the same seeds
    (the series' index), each once; :func:`welch` otherwise (other seeds, a seed repeated
    as in a coarser ``--group-by``, or no seeds). Values that are not finite are left out
    first."""
    a, b = a[np.isfinite(a.to_numpy(dtype=float))], b[np.isfinite(b.to_numpy(dtype=float))]
    same_seeds = (
        a.index.is_unique
        and b.index.is_unique
        and a.index.notna().all()
        and set(a.index) == set(b.index)
    )
    if same_seeds and len(a):
        return paired(a.to_numpy(dtype=float), b.loc[a.index].to_numpy(dtype=float))
    return welch(a.to_numpy(dtype=float), b.to_numpy(dtype=float))


def holm(p) -> np.ndarray:
    """Holm's step-down adjustment of the p-values of one table's comparisons
    (``statsmodels.stats.multitest.multipletests(method="holm")``); NaN (no test) stays
    NaN and is no comparison."""
    p = np.asarray(p, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.isfinite(p)
    if tested.any():
        from statsmodels.stats.multitest import multipletests

        adjusted[tested] = multipletests(p[tested], method="holm")[1]
    return adjusted


# ---------------------------------------------------------------------- the comparisons


def differences(
    runs: pd.DataFrame,
    summary: pd.DataFrame,
    keys: Sequence[str],
    baseline: str | None,
    metric: str = COMPARED,
) -> pd.DataFrame:
    """``summary`` (one row per group of ``keys``) with :data:`COMPARISON_COLUMNS`: each
    group's ``metric`` (completed runs) against the ``baseline``'s runs in the same group
    of the other keys (:func:`compare`; NaN where there is none), ``p_holm`` over the rows,
    and ``flags`` (``no_variance``; ``few_seeds`` where the baseline's side has fewer than
    three runs; any flags the frame had are kept)."""
    out = summary.copy()
    for column in COMPARISON_COLUMNS[1:]:
        out[column] = np.nan
    out["test"] = None
    out["baseline"] = baseline
    if "flags" not in out:
        out["flags"] = ""
    if baseline is None or "norm.name" not in keys:
        return out
    done = _completed(runs)
    if metric not in done:
        return out
    values = pd.to_numeric(done[metric], errors="coerce")
    # the group of the other keys: a norm's own arguments (norm.groups) do not count
    others = other_keys(keys, "norm.name")
    mine = _by(done, keys, values)
    theirs = _by(done[done["norm.name"] == baseline], others, values)
    compared, few = [], []
    for row in out[list(keys)].itertuples(index=False):
        b = theirs.get(_key(row[keys.index(k)] for k in others))
        if row[keys.index("norm.name")] == baseline or b is None or not len(b):
            compared.append(Comparison())
            few.append(False)
            continue
        compared.append(compare(mine.get(_key(row), pd.Series(dtype=float)), b))
        few.append(bool(flags.few_seeds(len(b))))
    out["diff_to_baseline"] = [c.diff for c in compared]
    out["diff_ci95"] = [c.ci95 for c in compared]
    out["test"] = [c.test if np.isfinite(c.diff) else None for c in compared]
    out["p_value"] = [c.p for c in compared]
    out["p_holm"] = holm(out["p_value"])
    out["p_wilcoxon"] = [c.p_wilcoxon for c in compared]
    out["flags"] = flags.add(out["flags"], [c.no_variance for c in compared], "no_variance")
    out["flags"] = flags.add(out["flags"], few, "few_seeds")
    return out


def estimator_differences(
    runs: pd.DataFrame, summary: pd.DataFrame, keys: Sequence[str]
) -> pd.DataFrame:
    """``summary`` with :data:`ESTIMATOR_COLUMNS`: per group, the accuracy of each of
    BatchNorm's other inference estimators (PreciseBN, batch statistics) minus the running
    averages' (:data:`RUNNING`), paired within each completed run that measured both
    (:func:`paired`), and Holm's adjustment over every estimator comparison of the table.
    NaN for variants without running statistics."""
    out = summary.copy()
    for column in ESTIMATOR_COLUMNS:
        out[column] = np.nan
    done = _completed(runs)
    present = [name for name, field in ESTIMATORS.items() if field in done]
    if RUNNING not in done or not present:
        return out
    groups = _frames(done, keys)
    running = pd.to_numeric(done[RUNNING], errors="coerce")
    for name in present:
        other = pd.to_numeric(done[ESTIMATORS[name]], errors="coerce")
        compared = []
        for row in out[list(keys)].itertuples(index=False):
            rows = groups.get(_key(row))
            both = (
                rows.index[running[rows.index].notna() & other[rows.index].notna()]
                if rows is not None
                else []
            )
            compared.append(paired(other[both], running[both]))
        out[f"{name}_diff"] = [c.diff for c in compared]
        out[f"{name}_ci95"] = [c.ci95 for c in compared]
        out[f"{name}_p"] = [c.p for c in compared]
    # one family: every estimator comparison of the table
    p = out[[f"{name}_p" for name in ESTIMATORS]].to_numpy(dtype=float)
    adjusted = holm(p.ravel()).reshape(p.shape)
    for i, name in enumerate(ESTIMATORS):
        out[f"{name}_p_holm"] = adjusted[:, i]
    return out


def group_flags(
    runs: pd.DataFrame,
    table: pd.DataFrame,
    keys: Sequence[str],
    thresholds: flags.Thresholds,
) -> pd.Series:
    """``table``'s ``flags`` with those of each group's own completed runs: ``few_seeds``
    (``n`` 1 or 2), ``stale_running_stats``, ``renorm_ramp_not_reached``, and
    ``under_trained`` against the table's best group (:mod:`.flags`)."""
    column = table["flags"] if "flags" in table else pd.Series("", index=table.index)
    column = flags.add(column, flags.few_seeds(table["n"]), "few_seeds")
    groups = _frames(_completed(runs), keys)
    chosen = [groups.get(_key(row)) for row in table[list(keys)].itertuples(index=False)]
    chosen = [rows if rows is not None else runs.iloc[0:0] for rows in chosen]
    stale = [flags.stale_running_stats(rows, thresholds.stale) for rows in chosen]
    column = flags.add(column, stale, "stale_running_stats")
    ramp = [flags.renorm_ramp_not_reached(rows) for rows in chosen]
    column = flags.add(column, ramp, "renorm_ramp_not_reached")
    train = [
        pd.to_numeric(rows.get("final_train_acc", pd.Series(dtype=float)), errors="coerce").mean()
        for rows in chosen
    ]
    behind = flags.under_trained(train, thresholds.undertrained_gap)
    return flags.add(column, behind, "under_trained")


def _key(values) -> tuple:
    """A group's values as a dictionary key (NaN, which equals nothing, as None)."""
    return tuple(None if isinstance(v, float) and np.isnan(v) else v for v in values)


def _frames(frame: pd.DataFrame, keys: Sequence[str]) -> dict[tuple, pd.DataFrame]:
    """``frame``'s rows per group of ``keys``."""
    if frame.empty:
        return {}
    if not keys:
        return {(): frame}
    groups = {}
    for group, rows in frame.groupby(list(keys), dropna=False, sort=False):
        groups[_key(group if isinstance(group, tuple) else (group,))] = rows
    return groups


def _by(frame: pd.DataFrame, keys: Sequence[str], values: pd.Series) -> dict[tuple, pd.Series]:
    """The finite ``values`` of ``frame``'s rows per group of ``keys``, indexed by their
    runs' seeds (what :func:`compare` pairs on; NaN where the runs have none)."""
    seeds = frame["seed"] if "seed" in frame else pd.Series(np.nan, index=frame.index)
    groups = {}
    for group, rows in _frames(frame, keys).items():
        found = values.loc[rows.index].dropna()
        groups[group] = pd.Series(found.to_numpy(), index=pd.Index(seeds.loc[found.index]))
    return groups
