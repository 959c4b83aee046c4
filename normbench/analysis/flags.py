"""Flags: the marks a table's row gets where the budget or the seeds, not the variant,
may have made its result. Each is a short name in the ``flags`` column of summary.csv
and selected.csv (``;``-separated, in :data:`FLAGS`' order) and one warning line under
the table (:mod:`normbench.views.tables` words them).

- ``lr_at_edge``: the value a numeric key was tuned to (``--select``) is the smallest or
  largest of the values tried for that group: the best may lie outside the grid.
- ``stale_running_stats``: the group's running averages disagree with PreciseBN's
  re-estimated statistics by more than ``report.stale_threshold`` points on average
  (mean of ``|test_acc_precise_bn - final_test_acc|`` over its completed runs): the
  final accuracy measures statistics training left behind, not the weights.
- ``renorm_ramp_not_reached``: a Batch Renorm run ended (``steps``) before its
  correction reached r_max/d_max (``renorm_ramp_end_step``; for runs that did not record
  it, ``norm.warmup_steps + norm.ramp_steps``).
- ``under_trained``: the group's mean ``final_train_acc`` is more than
  ``report.undertrained_gap`` points below the best group's of the same table.
- ``no_variance``: both sides of the comparison scored the same on every seed (or every
  paired difference is the same): no test, no p-value.
- ``few_seeds``: fewer than :data:`FEW_SEEDS` completed runs on a side: its 95% CIs and
  p-values are uninformative.

Nothing here reads or writes files besides normbench's own config.yaml (the thresholds'
defaults).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Every flag, in the order the ``flags`` column lists them.
FLAGS: tuple[str, ...] = (
    "lr_at_edge",
    "stale_running_stats",
    "renorm_ramp_not_reached",
    "under_trained",
    "no_variance",
    "few_seeds",
)

#: Fewer completed runs than this on a side and a comparison's CI is uninformative: with
#: n = 2, Student's t(0.975, 1) = 12.7 standard errors.
FEW_SEEDS = 3

#: The run record's field of the step at which Batch Renorm's r_max/d_max reach their
#: values, and the config keys older runs give it by.
RAMP_END = "renorm_ramp_end_step"
_RAMP_PARTS = ("norm.warmup_steps", "norm.ramp_steps")


@dataclass(frozen=True)
class Thresholds:
    """The flags' thresholds, in accuracy points (``report.*`` in the config)."""

    stale: float
    undertrained_gap: float

    @classmethod
    def of(cls, settings=None) -> Thresholds:
        """From a config's ``report`` node (a sweep's), its missing keys (and None: all)
        taking the defaults of normbench's config.yaml."""
        defaults = _defaults()
        stale = getattr(settings, "stale_threshold", None)
        gap = getattr(settings, "undertrained_gap", None)
        return cls(
            stale=float(defaults.stale if stale is None else stale),
            undertrained_gap=float(defaults.undertrained_gap if gap is None else gap),
        )


@functools.cache
def _defaults() -> Thresholds:
    from omegaconf import OmegaConf

    from normbench.options import conf_dir

    report = OmegaConf.load(conf_dir() / "config.yaml").report
    return Thresholds(float(report.stale_threshold), float(report.undertrained_gap))


def join(names: Iterable[str]) -> str:
    """Flag names as the ``flags`` column holds them: known ones in :data:`FLAGS` order,
    ``;``-separated; "" for none."""
    given = set(names)
    return ";".join(name for name in FLAGS if name in given)


def split(value) -> set[str]:
    """A ``flags`` cell's names (an empty or missing cell: none)."""
    if not isinstance(value, str) or not value:
        return set()
    return set(value.split(";"))


def add(column: pd.Series, mask, name: str) -> pd.Series:
    """``column`` (``flags`` cells) with ``name`` added where ``mask`` holds."""
    mask = np.asarray(mask, dtype=bool)
    return pd.Series(
        [join(split(v) | {name}) if m else (v or "") for v, m in zip(column, mask, strict=True)],
        index=column.index,
        dtype=object,
    )


def few_seeds(n) -> np.ndarray:
    """Where a side's count of completed runs is 1 or 2 (0: no statistics to flag)."""
    n = np.asarray(n, dtype=float)
    return (n > 0) & (n < FEW_SEEDS)


def _numbers(runs: pd.DataFrame, column: str) -> pd.Series:
    if column not in runs:
        return pd.Series(np.nan, index=runs.index)
    return pd.to_numeric(runs[column], errors="coerce")


def stale_gap(runs: pd.DataFrame) -> float:
    """Mean ``test_acc_precise_bn - final_test_acc`` over ``runs``: how much re-estimating
    the population statistics with the final weights gains (NaN: none has both)."""
    gap = _numbers(runs, "test_acc_precise_bn") - _numbers(runs, "final_test_acc")
    return float(gap.mean()) if gap.notna().any() else np.nan


def stale_running_stats(runs: pd.DataFrame, threshold: float) -> bool:
    """Whether PreciseBN beats ``runs``' running averages by more than ``threshold``
    points on average: the running averages lag the weights (stale), so the final accuracy
    measures them rather than the variant. Not the other way round: where PreciseBN does
    worse (Batch Renorm, whose weights were trained against its running averages), the
    running averages are not stale; the estimator table shows that difference."""
    gap = stale_gap(runs)
    return bool(np.isfinite(gap) and gap > threshold / 100)


def ramp_end(runs: pd.DataFrame) -> pd.Series:
    """Each run's step at which Batch Renorm's correction is fully on: its recorded
    ``renorm_ramp_end_step``, else (runs from before it was recorded) ``warmup_steps +
    ramp_steps`` of its config; NaN for other norms."""
    recorded = _numbers(runs, RAMP_END)
    if all(part in runs for part in _RAMP_PARTS):
        configured = _numbers(runs, _RAMP_PARTS[0]) + _numbers(runs, _RAMP_PARTS[1])
        recorded = recorded.fillna(configured)
    return recorded


def renorm_ramp_not_reached(runs: pd.DataFrame) -> bool:
    """Whether a run of ``runs`` ended (``steps``) before its Batch Renorm ramp did."""
    steps, end = _numbers(runs, "steps"), ramp_end(runs)
    return bool((steps < end).any())


def under_trained(train_means, gap: float) -> np.ndarray:
    """Where a group's mean final training accuracy is more than ``gap`` points below the
    best group's (NaN: never)."""
    means = np.asarray(train_means, dtype=float)
    if not np.isfinite(means).any():
        return np.zeros(means.shape, dtype=bool)
    best = np.nanmax(means)
    with np.errstate(invalid="ignore"):
        return np.isfinite(means) & (means < best - gap / 100)


def at_edge(value, grid: Iterable) -> bool:
    """Whether a numeric ``value`` chosen from ``grid`` (two values or more) is its
    smallest or largest."""
    numbers = pd.to_numeric(pd.Series(list(grid), dtype=object), errors="coerce").dropna()
    numbers = numbers.unique()
    try:
        value = float(value)
    except (TypeError, ValueError):
        return False
    if len(numbers) < 2 or not np.isfinite(value):
        return False
    return bool(value <= numbers.min() or value >= numbers.max())
