"""Collecting an experiment: finding experiment folders, reading their run folders into
frames (runs, metrics), and the defaults of config keys older runs lack.

An experiment folder ``<out_dir>/<name>/`` holds ``runs/<run_id>/``. Collecting has to
stay fast for thousands of runs, so it never calls pandas once per file: summaries
(which carry the flattened config) are ``json.loads``, and the metrics files are
joined as bytes and parsed once. Nothing here writes.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from normbench import received
from normbench.analysis.keys import sort_frame, swept_keys
from normbench.errors import UserError
from normbench.rundir import (
    METRIC_DTYPES,
    METRICS_HEADER,
    STATUSES,
    SUMMARY_FIELDS,
    SURROGATE_BYTES,
    body_problem,
    escape_surrogates,
    escaped,
    metrics_body,
    oversized,
    parsed_problem,
    row_problems,
    split_summary,
    summary_problem,
)
from normbench.schema import RENORM_PHASES, is_int

#: Where ``normbench results`` looks when given no folder (the default ``out_dir``).
DEFAULT_RESULTS = Path("results")

# How far below a folder given to ``normbench results`` experiment folders are looked for.
_SEARCH_DEPTH = 3


@dataclass
class Collected:
    """An experiment's runs, read from its run folders (nothing written).

    ``runs``: one row per run with a summary: every summary.json field, then the config's
    dotted keys (see :func:`collect`). ``metrics``: every run's metrics.csv, long.
    ``incomplete``: run folders without summary.json (unfinished or interrupted).
    ``unreadable``: run folders whose files cannot be used (``problems`` says why for
    each). ``copies``: folders holding a run already read from another folder.
    """

    runs: pd.DataFrame
    metrics: pd.DataFrame
    incomplete: list[Path]
    unreadable: list[Path] = field(default_factory=list)
    #: ``metrics`` as the CSV text it was parsed from (the files' own lines, headers
    #: dropped): what :func:`aggregate` writes, with no second formatting pass.
    metrics_csv: bytes = field(default=b"", repr=False)
    problems: dict[Path, str] = field(default_factory=dict)
    copies: list[Path] = field(default_factory=list)
    #: Config keys some runs lack (written by an older normbench) and that took their
    #: default in those runs: key -> (the defaults filled in, how many runs).
    defaulted: dict[str, tuple[list[Any], int]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Runs per status (completed, diverged, failed, other) plus incomplete and unreadable."""
        status = self.runs["status"] if "status" in self.runs else pd.Series(dtype=object)
        counts = {s: int((status == s).sum()) for s in STATUSES}
        counts["other"] = len(status) - sum(counts.values())
        counts["incomplete"] = len(self.incomplete)
        counts["unreadable"] = len(self.unreadable)
        return counts


# ------------------------------------------------------------------- finding experiments


#: Errors of a path that is simply not there (as ``Path.is_dir`` ignores them); any other
#: (no permission) means a folder that cannot be read.
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG)


def _is_experiment(folder: Path) -> bool:
    """Whether ``folder`` holds a ``runs/`` folder; ``OSError`` when it cannot be read."""
    try:
        return stat.S_ISDIR(os.stat(folder / "runs").st_mode)
    except OSError as err:
        if err.errno in _ABSENT:
            return False
        raise


def _has_runs(exp_dir: Path) -> bool:
    with os.scandir(exp_dir / "runs") as entries:
        return any(_is_folder(e) and not e.name.startswith(".") for e in entries)


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether a folder entry is a folder, without opening it: a named pipe or a device is
    never opened while searching; an entry that cannot be looked at is none."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _unreadable(path: Path, err: OSError) -> str:
    return f"skipped {path}: cannot read it ({err.strerror or err})"


def _experiments_below(root: Path, depth: int, warn: Callable[[str], None] | None) -> list[Path]:
    """Experiment folders under ``root`` (not inside one), skipping hidden folders, and
    folders that cannot be read (with a line to ``warn``)."""
    found: list[Path] = []
    if depth == 0:
        return found
    try:
        with os.scandir(root) as entries:
            children = sorted(
                Path(e.path)
                for e in entries
                if not e.name.startswith(".") and e.name != "runs" and _is_folder(e)
            )
    except OSError as err:
        if warn is not None and err.errno not in _ABSENT:
            warn(_unreadable(root, err))
        return found
    for child in children:
        try:
            experiment = _is_experiment(child) and (_has_runs(child) or None)
        except OSError as err:
            if warn is not None:
                warn(_unreadable(child, err))
            continue
        if experiment:
            found.append(child)
        elif experiment is False:
            found += _experiments_below(child, depth - 1, warn)
    return found


def find_experiments(
    paths: Sequence[Path] | None = None, warn: Callable[[str], None] | None = None
) -> list[Path]:
    """The experiment folders named by ``paths``, or all under ``results/`` when None or empty.

    An experiment folder holds ``runs/<run_id>/``. A path that is not one but holds some
    (up to three levels down; hidden folders skipped) stands for them; a path to a
    ``runs/`` folder stands for its experiment. Raises :class:`UserError` for a path that
    does not exist, cannot be read or holds no run folders; folders below it that cannot
    be read are skipped, each with a line to ``warn``.
    """
    if not paths:
        if not DEFAULT_RESULTS.is_dir():
            raise UserError(
                f"no {DEFAULT_RESULTS}/ folder here; name experiment folders "
                "(normbench results DIR...) or run `normbench run` first"
            )
        paths = [DEFAULT_RESULTS]
    found: dict[Path, Path] = {}
    for path in map(Path, paths):
        try:
            mode = os.stat(path).st_mode
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                raise UserError(f"{path}: no such folder") from None
            raise UserError(f"cannot read {path}: {err.strerror or err}") from None
        if not stat.S_ISDIR(mode):
            raise UserError(f"{path} is not a folder: expected an experiment folder")
        try:
            experiment = _is_experiment(path)
        except OSError as err:  # not to be looked into
            raise UserError(f"cannot read {path}: {err.strerror or err}") from None
        try:
            if experiment:
                experiments = [path] if _has_runs(path) else []
            elif path.name == "runs" and path.parent != path:
                experiments = [path.parent] if _has_runs(path.parent) else []
            else:
                experiments = _experiments_below(path, _SEARCH_DEPTH, warn)
        except OSError as err:  # the folder named, or its runs/, cannot be read
            where = Path(err.filename) if err.filename else path
            raise UserError(f"cannot read {where}: {err.strerror or err}") from None
        if not experiments:
            raise UserError(
                f"{path} holds no runs: expected {path / 'runs'}/<run_id>/ "
                "or experiment folders below it"
            )
        for exp in experiments:
            found.setdefault(exp.resolve(), exp)
    return list(found.values())


def read_config(text: str) -> dict[str, Any]:
    """A run's config.yaml as one flat record, ``config.flatten``'s dotted keys.

    Raises ``ValueError`` (or ``yaml.YAMLError``) when the text is not a YAML mapping, or
    uses anchors and aliases (``&a``, ``*a``): normbench never writes them
    (``OmegaConf.to_yaml`` writes every value out), and a few hundred bytes of aliases
    nested in aliases expand to gigabytes (a "billion laughs").
    """
    import yaml

    from normbench.config import flatten

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    if "&" in text or "*" in text:  # (an anchor or alias needs one: else no second pass)
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ValueError(
                    "config.yaml uses YAML anchors or aliases (&, *), which normbench never writes"
                )
    try:
        loaded = yaml.load(text, Loader=loader)
        if not isinstance(loaded, dict):
            raise ValueError("config.yaml is not a mapping")
        return flatten(loaded)
    except RecursionError:
        raise ValueError("config.yaml is nested too deep") from None


# ---------------------------------------------------------------------------- collecting


def _column(values: list[Any]) -> Any:
    """One column's values, typed so that CSV and parquet agree: ints with nulls stay
    ints (nullable Int64), lists become their string form, mixed kinds become strings."""
    kinds = {type(v) for v in values if v is not None}
    nulls = any(v is None for v in values)
    if not kinds:
        return pd.array(values, dtype=object)
    if kinds == {int}:
        return pd.array(values, dtype="Int64" if nulls else "int64")
    if kinds <= {int, float}:
        return pd.array([math.nan if v is None else v for v in values], dtype="float64")
    if kinds & {list, tuple, dict} or len(kinds) > 1:
        return pd.array([None if v is None else str(v) for v in values], dtype=object)
    return values


def frame_of(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Records (dicts) as a frame, one row each, columns typed by :func:`_column`."""
    keys = dict.fromkeys(key for record in records for key in record)
    data = {key: _column([record.get(key) for record in records]) for key in keys}
    return pd.DataFrame(data, index=pd.RangeIndex(len(records)))


def _same_values(a: pd.Series, b: pd.Series) -> bool:
    a, b = a.astype(object), b.astype(object)
    return bool(((a == b) | (a.isna() & b.isna())).all())


@dataclass
class _Read:
    summaries: list[dict[str, Any]] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    incomplete: list[Path] = field(default_factory=list)
    unreadable: dict[Path, str] = field(default_factory=dict)
    copies: list[Path] = field(default_factory=list)

    def drop(self, index: int, why: str) -> None:
        self.unreadable[self.folders[index]] = why
        for column in (self.summaries, self.configs, self.bodies, self.folders):
            del column[index]


def _read_runs(runs_dir: Path) -> _Read:
    """Every run folder's three files, with plain ``open`` (pathlib costs as much as
    the reads here). A folder whose files cannot be used is ``unreadable``, with the
    reason; a second folder holding the same run (a copy) is counted once."""
    import yaml

    try:
        with os.scandir(runs_dir) as entries:
            names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError as err:  # made unreadable since it was found
        raise UserError(f"cannot read {runs_dir}: {err.strerror or err}") from None
    read = _Read()
    base = os.fspath(runs_dir)
    for name in names:
        folder = os.path.join(base, name)
        try:
            summary_bytes = received.read_bytes(
                os.path.join(folder, "summary.json"), received.SUMMARY_MAX
            )
        except FileNotFoundError:
            read.incomplete.append(runs_dir / name)
            continue
        except OSError as err:  # a folder or a pipe in its place, too large, no permission
            read.unreadable[runs_dir / name] = f"summary.json: {err.strerror or err}"
            continue
        try:
            try:
                summary = received.load_json(summary_bytes)
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError: say which file
                raise ValueError(f"summary.json is not JSON: {err}") from None
            if not isinstance(summary, dict):
                raise ValueError("summary.json is not a JSON object")
            problem = summary_problem(summary)
            if problem:
                raise ValueError(f"summary.json: {problem}")
            if SURROGATE_BYTES.search(summary_bytes):
                summary = escaped(summary)
            summary, config = split_summary(summary)
            if config is None:
                data = received.read_bytes(os.path.join(folder, "config.yaml"), received.CONFIG_MAX)
                config = escaped(read_config(data.decode()))
                problem = oversized(config)
                if problem:
                    raise ValueError(f"config.yaml: {problem}")
            body = metrics_body(os.path.join(folder, "metrics.csv"))
        except OSError as err:
            read.unreadable[runs_dir / name] = f"{Path(err.filename or '').name}: {err.strerror}"
            continue
        except (ValueError, yaml.YAMLError) as err:  # JSONDecodeError, UnicodeDecodeError
            read.unreadable[runs_dir / name] = " ".join(str(err).split())[:200]
            continue
        if "run_id" not in summary:
            summary["run_id"] = name if name.isascii() else escape_surrogates(name)
        read.summaries.append(summary)
        read.configs.append(config)
        read.bodies.append(body)
        read.folders.append(runs_dir / name)
    _drop_copies(read)
    return read


def _drop_copies(read: _Read) -> None:
    """One row per run id: a run folder copied under another name is the same run. The
    folder named by the run id is kept, else the first."""
    keep: dict[str, int] = {}
    for index, summary in enumerate(read.summaries):
        rid = str(summary["run_id"])
        if rid not in keep or read.folders[index].name == rid:
            keep[rid] = index
    extra = sorted(set(range(len(read.summaries))) - set(keep.values()), reverse=True)
    for index in extra:
        read.copies.append(read.folders[index])
        for column in (read.summaries, read.configs, read.bodies, read.folders):
            del column[index]
    read.copies.reverse()


def collect(exp_dir: Path) -> Collected:
    """Read every run folder of an experiment; write nothing.

    A folder without summary.json is not a run yet (``incomplete``); one whose
    summary.json or config.yaml does not parse is ``unreadable``; both are skipped.

    ``runs`` columns: the summary fields (``SUMMARY_FIELDS`` first, then any others), then
    every config key flattened to its dotted name (``norm.name``, ``optim.momentum``,
    ``dataset.train_size``); a config key with the name of a summary field is left out
    when its values are the same in every run (``batch_size``, ``lr``, ``seed``) and kept
    as ``config.<key>`` when not (``device``: ``auto`` in the config, ``cpu`` in the
    summary). Lists become their string form (``"[0.5, 0.75]"``). The config columns are
    listed in ``runs.attrs["config_columns"]``. Rows are sorted by the swept keys
    (:func:`~normbench.analysis.keys.swept_keys`), then seed and run id; ``metrics``
    follows the same run order.
    """
    exp_dir = Path(exp_dir)
    read = _read_runs(exp_dir / "runs")
    while True:
        try:
            return _assemble(read)
        except (ValueError, OverflowError, pd.errors.ParserError):
            # Some metrics.csv is damaged inside (the fast path parses all of them as one
            # table, and checks its values in one pass): find it, count its run
            # unreadable, and assemble the rest.
            bad = [(i, why) for i, body in enumerate(read.bodies) if (why := body_problem(body))]
            if not bad:
                bad = [(i, why) for i, b in enumerate(read.bodies) if (why := parsed_problem(b))]
            if not bad:
                raise
            for index, why in reversed(bad):
                read.drop(index, why)


def _csv_line(values) -> bytes:
    """One CSV row of plain values, no line end (None and NaN empty, as pandas writes)."""
    import csv

    buffer = io.StringIO()
    clean = [
        "" if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA else v
        for v in values
    ]
    csv.writer(buffer, lineterminator="").writerow(clean)
    return buffer.getvalue().encode()


# ------------------------------------------------------------- keys older runs lack
#
# A run written by an older normbench lacks the config keys added since
# (``eval.precise_bn_batches``); its column would be null there and a value in newer runs,
# and every table group would split on it. Such a key takes its default in the runs that
# lack it, as the config that ships now composes it: the option's YAML for a group's key
# (``norm.groups`` of norm=group; a key the run's option does not have is left missing),
# the root config.yaml for the others. The tables say which keys and how many runs.

_MISSING = object()


def _root_defaults() -> dict[str, Any]:
    from omegaconf import OmegaConf

    from normbench.config import flatten
    from normbench.options import conf_dir

    root = OmegaConf.to_container(OmegaConf.load(conf_dir() / "config.yaml"), resolve=False)
    return flatten({k: v for k, v in root.items() if k not in ("defaults", "hydra")})


def _option_defaults(group: str, option: Any) -> dict[str, Any]:
    """A group option's keys and defaults, from its YAML (normbench's or a config folder
    the user added); {} for an option with no YAML here (a package's variant, whose code
    is not loaded to read a results folder) or one that does not load."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from normbench.config import flatten
    from normbench.options import config_dirs

    if not isinstance(option, str):
        return {}
    for folder in config_dirs():  # the option's name is matched, never joined into a path
        files = {p.stem: p for p in (folder / group).glob("*.yaml")}
        if option in files:
            try:
                loaded = OmegaConf.to_container(OmegaConf.load(files[option]), resolve=False)
            except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException):
                return {}
            return flatten(loaded) if isinstance(loaded, dict) else {}
    return {}


_PHASES = tuple((f"norm.{share}", f"norm.{count}") for share, count in RENORM_PHASES)


def _replaced(config: dict[str, Any]) -> dict[str, Any]:
    """An older run's config with the keys replaced since read as a run now composes them
    (``validation.settle``): ``eval.precise_bn_batches`` as ``eval.precise_bn_images`` =
    batches x batch_size, the images PreciseBN averaged (the same batches either way);
    batch_renorm's phases, given in steps then, with a null share (the count won), not
    the share its YAML's default would invent."""
    old = "eval.precise_bn_batches"
    phases = _PHASES if config.get("norm.name") == "batch_renorm" else ()
    if old not in config and all(s in config or c not in config for s, c in phases):
        return config  # (the common case, at once)
    config = dict(config)
    if old in config:
        batches, size = config.pop(old), config.get("batch_size")
        if "eval.precise_bn_images" not in config and is_int(batches) and is_int(size):
            config["eval.precise_bn_images"] = batches * size
    for share, count in phases:
        if count in config and share not in config:
            config[share] = None
    return config


def _fill_defaults(configs: list[dict[str, Any]]):
    """``configs`` with the keys some of them lack filled in with their defaults (the keys
    replaced since read as now: :func:`_replaced`); the keys filled per run, and per key
    the defaults used and the number of runs."""
    from normbench.options import REQUIRED_GROUPS
    from normbench.schema import EXECUTION_KEYS

    configs = [_replaced(config) for config in configs]
    filled: list[list[str]] = [[] for _ in configs]
    used: dict[str, tuple[list[Any], int]] = {}
    every = len(set().union(*configs))
    if all(len(config) == every for config in configs):  # (the common case, at once)
        return configs, filled, used
    keys = dict.fromkeys(key for config in configs for key in config)
    defaults: dict[Any, dict[str, Any]] = {}  # per option, and "root"
    # per set of keys: the keys lacking and the option names they depend on; per set of
    # keys and options: what to fill in (so that 5,000 runs cost a few dictionary lookups)
    lacking: dict[frozenset, tuple[list[str], list[str]]] = {}
    plans: dict[Any, list[tuple[str, Any]]] = {}

    def default(key: str, config: dict[str, Any]) -> Any:
        group, _, rest = key.partition(".")
        if group in REQUIRED_GROUPS and rest:
            option = config.get(f"{group}.name")
            where = (group, option if isinstance(option, str) else None)
            if where not in defaults:
                defaults[where] = _option_defaults(group, option)
            return defaults[where].get(rest, _MISSING)
        if "root" not in defaults:
            defaults["root"] = _root_defaults()
        return defaults["root"].get(key, _MISSING)

    out = []
    for index, config in enumerate(configs):
        signature = frozenset(config)
        if signature not in lacking:
            missing = [k for k in keys if k not in config and k not in EXECUTION_KEYS]
            groups = {k.partition(".")[0] for k in missing} & set(REQUIRED_GROUPS)
            lacking[signature] = (missing, [f"{group}.name" for group in sorted(groups)])
        missing, names = lacking[signature]
        if not missing:
            out.append(config)
            continue
        options = tuple(v if isinstance(v := config.get(name), str) else None for name in names)
        if (signature, options) not in plans:
            # a key the run's option does not have, or one the config no longer has: none
            found = [(key, default(key, config)) for key in missing]
            plans[signature, options] = [(k, v) for k, v in found if v is not _MISSING]
        plan = plans[signature, options]
        if not plan:
            out.append(config)
            continue
        out.append({**config, **dict(plan)})
        for key, value in plan:
            filled[index].append(key)
            values, count = used.get(key, ([], 0))
            used[key] = (values if value in values else [*values, value], count + 1)
    return out, filled, used


def defaults_note(notes: pd.Series) -> str | None:
    """A group's runs' filled keys (``runs.defaulted``) as ``key: n runs``, for summary.csv."""
    counts: dict[str, int] = {}
    for note in notes.dropna():
        for key in str(note).split(","):
            counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{key}: {n} run{'' if n == 1 else 's'}" for key, n in counts.items()) or None


def _assemble(read: _Read) -> Collected:
    configs, filled, defaulted = _fill_defaults(read.configs)
    if read.summaries:
        summary_frame = frame_of(read.summaries)
        first = [f for f in SUMMARY_FIELDS if f in summary_frame.columns]
        summary_frame = summary_frame[first + [c for c in summary_frame if c not in first]]
    else:
        summary_frame = pd.DataFrame(columns=list(SUMMARY_FIELDS))
    for name in SUMMARY_FIELDS:  # that summaries written before it existed lack: null
        if name not in summary_frame.columns:
            summary_frame[name] = None
    config_frame = frame_of(configs)
    config_columns: list[str] = []
    renamed: dict[str, str] = {}
    for key in list(config_frame.columns):
        if key in summary_frame.columns:
            if _same_values(summary_frame[key], config_frame[key]):
                config_frame = config_frame.drop(columns=key)
                config_columns.append(key)
                continue
            renamed[key] = f"config.{key}"
        config_columns.append(renamed.get(key, key))
    runs = pd.concat([summary_frame, config_frame.rename(columns=renamed)], axis=1)
    if defaulted:  # which keys of each run are defaults, not what it recorded
        runs["defaulted"] = pd.array([",".join(keys) or None for keys in filled], dtype=object)
    runs.attrs["config_columns"] = config_columns
    order = sort_frame(runs, [*swept_keys(runs), "seed", "run_id"]) if len(runs) else []
    runs = runs.loc[order].reset_index(drop=True)
    runs.attrs["config_columns"] = config_columns
    # The experiment's metrics carry the keys that tell runs apart (and the seed), so
    # that they plot without a join: each run's lines get its values appended.
    keys = [*swept_keys(runs), *(["seed"] if "seed" in runs.columns else [])]
    if keys:
        header = METRICS_HEADER + b"," + _csv_line(keys)
        ends = [b"," + _csv_line(row) + b"\n" for row in runs[keys].itertuples(index=False)]
        bodies = [read.bodies[i].replace(b"\n", end) for i, end in zip(order, ends, strict=True)]
    else:
        header, bodies = METRICS_HEADER, [read.bodies[i] for i in order]
    metrics_csv = header + b"\n" + b"".join(bodies)
    metrics = pd.read_csv(io.BytesIO(metrics_csv), dtype=METRIC_DTYPES)
    if row_problems(metrics).any():
        raise ValueError("a metrics.csv holds a value out of its range")  # collect finds it
    return Collected(
        runs,
        metrics,
        read.incomplete,
        list(read.unreadable),
        metrics_csv,
        problems=dict(read.unreadable),
        copies=list(read.copies),
        defaulted=defaulted,
    )
