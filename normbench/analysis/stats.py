"""Statistics over seeds: mean, std and 95% confidence interval per group of runs, the
difference to a baseline variant (Welch's test), and values tuned on validation.

- :func:`group_stats`: one row per group of runs (those that differ only in their seed,
  or the keys given), the accuracies' mean, std and 95% CI over the completed runs.
- :func:`select` (``normbench results --select lr``): for every group of the other swept
  keys (norm x batch size, say), the value of the selected key with the best mean
  validation accuracy over seeds, and the test accuracy of the runs at that value. The
  test set chooses nothing.
- :func:`differences`: for every group of the summary, the difference of its mean test
  accuracy to the baseline variant's in the same group of the other keys (``norm``'s own
  arguments aside), with Welch's 95% confidence interval and p-value. With fewer than
  two runs on either side there is no interval and no p-value: a reader sees "–", not a
  number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

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


#: Columns of ``summary.csv`` after the group keys.
SUMMARY_STAT_COLUMNS: tuple[str, ...] = (
    "n",
    "n_diverged",
    "n_failed",
    "n_interrupted",
    *(f"{metric}_{stat}" for metric in STAT_METRICS for stat in ("mean", "std", "ci95")),
    # final_test_acc against the baseline variant's in the same group of the other keys
    "baseline",
    "diff_to_baseline",
    "diff_ci95",
    "p_value",
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
    runs: pd.DataFrame, group_by: Sequence[str] | None = None, baseline: str | None = None
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
    NaN; with n = 0, all six are. Then ``baseline`` (the reference variant: ``baseline``,
    or custom_bn when present; see :func:`baseline_of`), ``diff_to_baseline``,
    ``diff_ci95`` and ``p_value``: Welch's comparison of the group's final test accuracy
    with the baseline's in the same group of the other keys.
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


def select(runs: pd.DataFrame, over: Sequence[str]) -> pd.DataFrame:
    """The value of ``over`` (one key or several, jointly) chosen on validation for every
    group of the other swept keys: one row per group with the group keys, the chosen
    values, ``tuned`` (the keys chosen), ``n`` (completed runs at them),
    ``best_val_acc_mean`` (what chose them) and mean, std and 95% CI over seeds of
    ``test_acc_at_best_val`` and ``final_test_acc``.
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
    rows = []
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
    columns = [*by, "tuned", "n", f"{SELECT_ON}_mean"] + [
        f"{m}_{s}" for m in REPORTED for s in ("mean", "std", "ci95")
    ]
    return pd.DataFrame(rows, columns=columns)


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


def welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Mean of ``a`` minus mean of ``b``, the half-width of its 95% confidence interval
    and the two-sided p-value, by Welch's unequal-variance t-test (scipy's); NaN for
    the last two with fewer than two values on either side."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else np.nan
    if len(a) < 2 or len(b) < 2:
        return diff, np.nan, np.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = np.sqrt(va + vb)
    if se == 0:
        return diff, 0.0, (1.0 if diff == 0 else 0.0)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    with warnings.catch_warnings():  # near-identical samples: scipy warns, the p stands
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return diff, float(t975(np.array(dof)) * se), p


def differences(
    runs: pd.DataFrame, summary: pd.DataFrame, keys: Sequence[str], baseline: str | None
) -> pd.DataFrame:
    """``summary`` (one row per group of ``keys``) with ``baseline``, ``diff_to_baseline``,
    ``diff_ci95`` and ``p_value`` (of ``final_test_acc``, completed runs) against the
    baseline's runs in the same group of the other keys; NaN where there is none."""
    out = summary.copy()
    for column in ("diff_to_baseline", "diff_ci95", "p_value"):
        out[column] = np.nan
    out["baseline"] = baseline
    if baseline is None or "norm.name" not in keys:
        return out
    done = _completed(runs)
    if COMPARED not in done:
        return out
    values = pd.to_numeric(done[COMPARED], errors="coerce")
    # the group of the other keys: a norm's own arguments (norm.groups) do not count
    others = other_keys(keys, "norm.name")
    mine = _by(done, keys, values)
    theirs = _by(done[done["norm.name"] == baseline], others, values)
    compared = []
    for row in out[list(keys)].itertuples(index=False):
        b = theirs.get(_key(row[keys.index(k)] for k in others))
        if row[keys.index("norm.name")] == baseline or b is None or not len(b):
            compared.append((np.nan, np.nan, np.nan))
            continue
        compared.append(welch(mine.get(_key(row), np.array([])), b))
    out[["diff_to_baseline", "diff_ci95", "p_value"]] = np.array(compared, dtype=float).reshape(
        -1, 3
    )
    return out


def _key(values) -> tuple:
    """A group's values as a dictionary key (NaN, which equals nothing, as None)."""
    return tuple(None if isinstance(v, float) and np.isnan(v) else v for v in values)


def _by(frame: pd.DataFrame, keys: Sequence[str], values: pd.Series) -> dict[tuple, np.ndarray]:
    """The finite ``values`` of ``frame``'s rows, per group of ``keys``."""
    groups: dict[tuple, np.ndarray] = {}
    if frame.empty:
        return groups
    for group, rows in (
        frame.groupby(list(keys), dropna=False, sort=False) if keys else [((), frame)]
    ):
        group = group if isinstance(group, tuple) else (group,)
        groups[_key(group)] = values.loc[rows.index].dropna().to_numpy()
    return groups
