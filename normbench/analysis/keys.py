"""Config columns, swept keys and grouping: which keys tell runs apart, in one place
that the tables and the figures both use.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import pandas as pd

from normbench.errors import UserError
from normbench.schema.config import X_AXES

#: Swept keys come in this order, when they vary; the others follow in config order.
KEY_ORDER: tuple[str, ...] = ("norm.name", "batch_size", "lr", "model.name", "dataset.name")


def _sortable(series: pd.Series) -> pd.Series:
    """Numbers sort as numbers, everything else as text; nulls last (sort_values' key)."""
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return series
    numeric = pd.to_numeric(series, errors="coerce")
    if numeric.notna().sum() == series.notna().sum():
        return numeric
    return series.map(lambda v: v if v is None or v is pd.NA or v != v else str(v))


def sort_frame(frame: pd.DataFrame, keys: Sequence[str]) -> pd.Index:
    keys = [k for k in dict.fromkeys(keys) if k in frame.columns]
    if not keys:
        return frame.index
    return frame.sort_values(keys, key=_sortable, na_position="last", kind="stable").index


# ------------------------------------------------------------------------------- keys


def config_columns(runs: pd.DataFrame) -> list[str]:
    """The columns of ``runs`` that hold config values (the others are outcomes).

    :func:`~normbench.analysis.collect.collect` lists them in ``runs.attrs``; for a frame
    read back from runs.csv they are the dotted names and the top-level keys of
    ``normbench/conf/config.yaml``.
    """
    listed = runs.attrs.get("config_columns")
    if listed is not None:
        return [c for c in listed if c in runs.columns]
    top = _top_level_config_keys()
    return [c for c in runs.columns if "." in c or c in top]


def _top_level_config_keys() -> set[str]:
    from omegaconf import OmegaConf

    from normbench.options import conf_dir

    return set(OmegaConf.load(conf_dir() / "config.yaml")) - {"defaults", "hydra"}


def _base_key(column: str) -> str:
    return column.removeprefix("config.")


def group_candidates(runs: pd.DataFrame) -> list[str]:
    """Config columns that tell runs apart: all but the seed and the execution keys."""
    from normbench.config import EXECUTION_KEYS

    columns = [
        c
        for c in config_columns(runs)
        if _base_key(c) != "seed" and _base_key(c) not in EXECUTION_KEYS
    ]
    return [k for k in KEY_ORDER if k in columns] + [k for k in columns if k not in KEY_ORDER]


def swept_keys(runs: pd.DataFrame) -> list[str]:
    """The config columns whose values vary across ``runs``, seed and execution keys left out.

    ``norm.name``, ``batch_size``, ``lr``, ``model.name``, ``dataset.name`` come first when
    they vary, then the others in config order. A group's own key whose value follows
    from the group's option is left out: sweeping ``norm=custom_bn,group`` varies
    ``norm.groups`` and ``norm.momentum`` too, but ``norm.name`` already tells them. Any
    other key that differs is kept, swept or not: two runs that differ in their model
    and their norm are two groups by both, never credited to the norm alone.
    """
    kept: list[str] = []
    for key in group_candidates(runs):
        if runs[key].nunique(dropna=False) < 2:
            continue
        group, _, rest = _base_key(key).partition(".")
        option = f"{group}.name"
        if rest and rest != "name" and option in kept:
            spread = runs.groupby(option, dropna=False, sort=False)[key].nunique(dropna=False)
            if spread.max() < 2:
                continue
        kept.append(key)
    return kept


def option_keys(key: str, keys: Sequence[str]) -> list[str]:
    """The keys among ``keys`` that belong to the group option ``key`` names: for
    ``norm.name``, the norm's own arguments (``norm.groups``, ``norm.momentum``)."""
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else key + "."
    return [k for k in keys if k.startswith(prefix) and k != key]


def other_keys(keys: Sequence[str], key: str) -> list[str]:
    """``keys`` without ``key`` and its option's own keys (:func:`option_keys`): what
    groups runs apart from a variant, for a comparison between variants (the tables'
    differences to a baseline, the figures' lines)."""
    own = {key, *option_keys(key, keys)}
    return [k for k in keys if k not in own]


def resolve_key(runs: pd.DataFrame, key: str) -> str:
    """The column of ``runs`` a user means by ``key``: ``norm`` -> ``norm.name``, ``model`` ->
    ``model.name``, ``batch_size`` -> ``batch_size``, ``train_size`` -> ``dataset.train_size``
    (a unique last part of a dotted key); any other column of ``runs`` by its exact name.
    Raises :class:`UserError` naming the valid keys.
    """
    columns = config_columns(runs)
    if f"{key}.name" in columns:
        return f"{key}.name"
    if key in columns or key in runs.columns:
        return key
    matches = [c for c in columns if c.endswith(f".{key}")]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(f"key {key!r} is ambiguous: it could be {', '.join(matches)}")
    short = [c.removesuffix(".name") for c in columns]
    close = difflib.get_close_matches(key, short + columns, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown key {key!r}{hint}; valid: {', '.join(short) or 'none (no runs)'}")


# ------------------------------------------------------------------------- the x axis


#: The keys besides a norm's own that feed its normalization batch: tried in this order,
#: the first that does not follow from it splits the figures (the global batch first, so
#: that a study of processes at one global batch draws one figure per global batch).
_FEEDS = ("batch_size", "nodes", "processes")


def check_x_axis(x: str) -> None:
    """``x`` is one of the error figure's x axes (``X_AXES``): else one UserError line."""
    if x not in X_AXES:
        raise UserError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")


def x_column(runs: pd.DataFrame, x: str) -> str:
    """The column of ``runs`` that ``x`` (one of ``X_AXES``: the error figure's x axes,
    declared with ``report.x``) is. Raises
    :class:`UserError` for another name, and for ``norm_batch_size`` when runs that were
    not stopped before they were built lack it (recorded by an older normbench: neither it
    nor ``world_size`` in their summary)."""
    check_x_axis(x)
    if x == "batch_size":
        return resolve_key(runs, x)
    built = runs[~runs["status"].astype(str).isin(("failed", "interrupted"))]
    if x in runs.columns:
        recorded = built[x].notna()
        if "world_size" in runs.columns:
            recorded |= built["world_size"].notna()
        old = int((~recorded).sum())
    else:
        old = len(built)
    if old:
        raise UserError(
            f"x axis {x}: {old} of {len(built)} runs were recorded before normbench wrote "
            f"{x} (rerun them with --force, or draw them by batch_size)"
        )
    return x


def moved_with_x(runs: pd.DataFrame, x_col: str, keys: Sequence[str], norm_key: str) -> list[str]:
    """The keys among ``keys`` (swept ones, ``norm_key`` among them) that move the x axis
    ``x_col`` instead of telling runs apart: with the global batch, ``batch_size`` itself;
    with the norm batch, those of ``batch_size``, ``nodes``, ``processes`` and the norm's
    own keys (``norm.group_size``, ``norm.virtual_batch_size``) whose value follows from
    the norm batch and the keys left: sync_bn's ``group_size=1,2,4,8`` are one line along
    x, not four. A key that does not follow (two runs at one norm batch differ in it) is
    left to tell runs apart, ``batch_size`` first: a study of processes at two global
    batches is a figure per global batch. Runs without a norm batch (null: no batch
    statistics) do not take part in the test."""
    if _base_key(x_col) == "batch_size" or x_col not in runs.columns:
        return [k for k in keys if k == x_col]
    feeds = [k for name in _FEEDS for k in keys if _base_key(k) == name]
    moved = feeds + option_keys(norm_key, keys)
    placed = runs[runs[x_col].notna()]
    if placed.empty:
        return []
    # as text, so that list values and nulls group too
    text = {k: placed[k].map(repr) for k in keys if k in placed.columns}
    while True:
        by = [text[k] for k in keys if k not in moved and k in text] + [placed[x_col]]
        spread = [
            k for k in moved if k in text and text[k].groupby(by, dropna=False).nunique().max() > 1
        ]
        if not spread:
            return moved
        moved.remove(spread[0])


def unplaced_keys(runs: pd.DataFrame, x_col: str, moved: Sequence[str], keys: Sequence[str]):
    """The keys among ``moved`` that still tell apart runs without a norm batch (null
    ``x_col``) that the other ``keys`` do not: layer at 1 and at 8 processes."""
    loose = runs[runs[x_col].isna()] if x_col in runs.columns else runs.iloc[:0]
    if loose.empty:
        return []
    by = [loose[k].map(repr) for k in keys if k not in moved] or [pd.Series(0, loose.index)]
    return [k for k in moved if loose[k].map(repr).groupby(by).nunique().max() > 1]


def keys_along(runs: pd.DataFrame, x: str) -> list[str]:
    """The keys a sweep's summary table groups by when its figures draw against ``x``:
    the swept keys (:func:`swept_keys`), and with ``norm_batch_size`` that column, after
    the norm's keys, in place of the keys that move it (:func:`moved_with_x`; those that
    still tell runs without a norm batch apart are kept: :func:`unplaced_keys`)."""
    keys = swept_keys(runs)
    column = x_column(runs, x)
    if x == "batch_size":
        return keys
    norm_key = resolve_key(runs, "norm")
    moved = moved_with_x(runs, column, keys, norm_key)
    moved = set(moved) - set(unplaced_keys(runs, column, moved, keys))
    kept = [k for k in keys if k not in moved]
    norm = [k for k in kept if k == norm_key or k in option_keys(norm_key, kept)]
    return norm + [column] + [k for k in kept if k not in norm]
