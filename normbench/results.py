"""Result tables: their schemas, and atomic writes of run files.

A file is written to a temporary name in its folder and renamed over the final
name, so a killed process never leaves a file that looks complete.

Aggregation (:func:`aggregate`, ``normbench results``) reads an experiment's run
folders into a runs table and a metrics table, summarises groups of runs that
differ only in their seed, and writes runs.csv, runs.parquet, metrics.csv and
summary.csv beside ``runs/``.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import io
import json
import math
import os
import re
import secrets
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from normbench import received, terminal
from normbench.errors import UserError

#: Columns of every ``metrics.csv``: one row per (run, epoch, split, metric).
METRIC_COLUMNS: tuple[str, ...] = ("run_id", "epoch", "split", "metric", "value")

#: The per-epoch record keys of the training loop, as (split, metric) pairs.
RECORD_METRICS: dict[str, tuple[str, str]] = {
    "train_loss": ("train", "loss"),
    "train_acc": ("train", "acc"),
    "test_loss": ("test", "loss"),
    "test_acc": ("test", "acc"),
    "val_loss": ("val", "loss"),
    "val_acc": ("val", "acc"),
    "test_acc_precise_bn": ("test", "acc_precise_bn"),
    "test_acc_batch_stats": ("test", "acc_batch_stats"),
    "lr": ("train", "lr"),
    "epoch_time_s": ("train", "epoch_time_s"),
    "img_per_s": ("train", "img_per_s"),
}

#: Fields every ``summary.json`` holds, in this order (more may follow).
SUMMARY_FIELDS: tuple[str, ...] = (
    "run_id",
    "status",
    "name",
    "model",
    "norm",
    "dataset",
    "optim",
    "batch_size",
    "lr",
    "lr_effective",
    "epochs",
    "max_steps",
    "seed",
    "steps",
    "final_test_acc",
    "best_test_acc",
    "final_val_acc",
    "best_val_acc",
    "best_val_epoch",
    "test_acc_at_best_val",
    "test_acc_precise_bn",
    "test_acc_batch_stats",
    "bn_eval_time_s",
    "resumed_from_epoch",
    "final_test_loss",
    "final_train_loss",
    "final_train_acc",
    "train_time_s",
    "wall_time_s",
    "img_per_s",
    "num_params",
    "device",
    "threads",
    "threads_from",
    "memory_format",
    "error",
    "started_at",
    "finished_at",
    "torch_version",
    "normbench_version",
)

RUN_FILES = ("config.yaml", "metrics.csv", "summary.json")

#: A run's ``status``: ``interrupted`` runs (stopped from outside) are redone by the next
#: sweep; the others are results (failed and diverged ones unless ``--retry-failed``).
STATUSES: tuple[str, ...] = ("completed", "diverged", "failed", "interrupted")


def metrics_frame(run_id: str, records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The training loop's per-epoch records as a long table (``METRIC_COLUMNS``)."""
    rows = [
        (run_id, record["epoch"], *RECORD_METRICS[key], float(value))
        for record in records
        for key, value in record.items()
        if key in RECORD_METRICS and value is not None
    ]
    frame = pd.DataFrame(rows, columns=list(METRIC_COLUMNS))
    return frame.astype({"epoch": "int64", "value": "float64"})


#: A temporary file's name: ``.<name>.<host>.<pid>.<random>.tmp`` beside its target, so a
#: later write can tell a leftover of a killed writer from one being written now.
_TMP_SUFFIX = ".tmp"


def _tmp_name(path: Path) -> Path:
    host = socket.gethostname()
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _remove_leftovers(path: Path) -> None:
    """Delete temporary files of ``path`` whose writers are gone (killed mid-write): on
    this host a pid that no longer runs; from another host, older than a day."""
    from normbench.lock import pid_running

    host, prefix = socket.gethostname(), f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name[len(prefix) : -len(_TMP_SUFFIX)].rsplit(".", 2)
        try:
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
                gone = not pid_running(int(parts[1]))
            else:
                gone = time.time() - entry.stat().st_mtime > 86400
            if gone:
                os.unlink(entry.path)
        except OSError:  # removed meanwhile, or not ours to remove
            continue


#: Errors of the place written to, not of normbench: a full disk or quota, a read-only
#: or forbidden folder, a file where a folder should be, a name too long.
_PLACE_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.EFBIG,
    errno.ENOENT,
}


class NotWritten(UserError):
    """A file could not be written where the user asked: one line, exit status 2."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(f"cannot write {path}: {error.strerror or error}")
        self.path, self.error = path, error


def check_writable(folder: Path) -> None:
    """Create and remove a probe file in ``folder`` (and the folders it needs, which are
    removed again): a :class:`NotWritten` now, before any work, rather than at its end."""
    folder = Path(folder)
    missing: list[Path] = []
    created: list[Path] = []
    probe = folder / f".normbench-probe.{socket.gethostname()}.{os.getpid()}"
    try:
        path = folder
        while not os.path.exists(path) and path.parent != path:  # (False: not to be seen)
            missing.append(path)
            path = path.parent
        for part in reversed(missing):
            part.mkdir()
            created.append(part)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, b"\0" * 4096)  # a full disk refuses data, not always the name
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as err:
        if err.errno not in _PLACE_ERRORS:
            raise
        raise NotWritten(folder, err) from None
    finally:
        for part in reversed(created):
            with contextlib.suppress(OSError):
                part.rmdir()


def check_real_folder(folder: Path) -> None:
    """A :class:`UserError` when ``folder`` is a symbolic link: a folder normbench makes
    for itself (an experiment's ``plots/``) is written into only as a real folder, never
    through a link that a results folder someone sent may hold (pointing anywhere).
    The files themselves need no such check: the rename that puts each in place replaces
    a link of its name, never what it points to."""
    folder = Path(folder)
    try:
        linked = stat.S_ISLNK(os.lstat(folder).st_mode)
    except OSError:  # not there yet, or not to be looked at: the write says so itself
        linked = False
    if linked:
        try:
            target = f" (to {os.readlink(folder)})"
        except OSError:
            target = ""
        raise UserError(
            f"{folder} is a symbolic link{target}: normbench writes there only into a "
            "folder of its own, not through a link; remove the link to write it"
        )


def _write_atomic(path: Path, write, binary: bool = False) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
        tmp = _tmp_name(path)
        # 0o666 less the umask, as for any file a program creates (mkstemp's 0600 would
        # make results unreadable to collaborators on a shared file system)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        if err.errno not in _PLACE_ERRORS:
            raise
        raise NotWritten(path, err) from None
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in _PLACE_ERRORS:
            raise NotWritten(path, err) from None
        raise


def write_text(path: Path, text: str) -> None:
    _write_atomic(Path(path), lambda handle: handle.write(text))


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Strict JSON: NaN and inf (a diverged loss) become null."""
    clean = {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }
    text = json.dumps(clean, indent=2, allow_nan=False) + "\n"
    _write_atomic(Path(path), lambda handle: handle.write(text))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    _write_atomic(Path(path), lambda handle: frame.to_csv(handle, index=False))


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary record, or None when it has none (not finished) or its files
    cannot be used (summary.json garbage, not an object, a folder in its place, without a
    known status or a whole batch size; a finished run's metrics.csv damaged): such a run
    is not done, for the planner, the runner and the tables alike."""
    try:
        data = received.read_bytes(Path(run_dir) / "summary.json", received.SUMMARY_MAX)
        record = received.load_json(data)
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if not isinstance(record, dict) or _summary_problem(record):
        return None
    if record["status"] != "interrupted" and _metrics_problem(Path(run_dir) / "metrics.csv"):
        return None
    return record


def status_of(summary: dict[str, Any] | None) -> str | None:
    """A summary's status, or None when it has none that is a string."""
    status = summary.get("status") if summary else None
    return status if isinstance(status, str) else None


def write_bytes(path: Path, data: bytes) -> None:
    """Bytes as they are (a table already in its file format)."""
    _write_atomic(Path(path), lambda handle: handle.write(data), binary=True)


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    """A frame as Parquet (pyarrow), without its index."""
    _write_atomic(Path(path), lambda handle: frame.to_parquet(handle, index=False), binary=True)


def write_figure(path: Path, figure, **savefig: Any) -> None:
    """A matplotlib Figure as a PNG (``savefig``'s keywords pass through: dpi, bbox_inches)."""
    savefig.setdefault("format", "png")
    _write_atomic(Path(path), lambda handle: figure.savefig(handle, **savefig), binary=True)


# ----------------------------------------------------------------------------- aggregation
#
# An experiment folder ``<out_dir>/<name>/`` holds ``runs/<run_id>/``; aggregation reads
# every run folder into two frames (runs, metrics), summarises groups of runs that differ
# only in their seed, and writes four tables beside ``runs/``. It has to stay fast for
# thousands of runs, so it never calls pandas once per file: summaries (which carry the
# flattened config) are ``json.loads``, and the metrics files are joined as bytes and
# parsed once.

#: Where ``normbench results`` looks when given no folder (the default ``out_dir``).
DEFAULT_RESULTS = Path("results")

#: The tables :func:`aggregate` writes into an experiment folder.
TABLE_FILES: tuple[str, ...] = ("runs.csv", "runs.parquet", "metrics.csv", "summary.csv")

#: The accuracies :func:`summarize` gives mean, std and 95% CI of.
#: ``best_test_acc`` (a choice made on the test set) is kept in the runs, never summarised.
STAT_METRICS: tuple[str, ...] = (
    "final_test_acc",
    "test_acc_at_best_val",
    "test_acc_precise_bn",
    "test_acc_batch_stats",
)

#: Swept keys come in this order, when they vary; the others follow in config order.
KEY_ORDER: tuple[str, ...] = ("norm.name", "batch_size", "lr", "model.name", "dataset.name")

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


# ------------------------------------------------------------------------- reading configs
#
# A run's summary.json carries its config, flattened, under ``config.<dotted key>``
# (runner.summarize), so aggregation reads one JSON file per run. Parsing thousands of
# config.yaml files would cost more than everything else together (PyYAML's C loader:
# 0.3 ms each); config.yaml is read only for a summary written without those keys.

CONFIG_PREFIX = "config."


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


def split_summary(summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A summary record's own fields, and its config (None when it carries none)."""
    config = {k[len(CONFIG_PREFIX) :]: v for k, v in summary.items() if k.startswith(CONFIG_PREFIX)}
    own = {k: v for k, v in summary.items() if not k.startswith(CONFIG_PREFIX)}
    return own, config or None


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


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    keys = dict.fromkeys(key for record in records for key in record)
    data = {key: _column([record.get(key) for record in records]) for key in keys}
    return pd.DataFrame(data, index=pd.RangeIndex(len(records)))


def _same_values(a: pd.Series, b: pd.Series) -> bool:
    a, b = a.astype(object), b.astype(object)
    return bool(((a == b) | (a.isna() & b.isna())).all())


_METRICS_HEADER = ",".join(METRIC_COLUMNS).encode()
_METRIC_DTYPES = {"run_id": str, "epoch": "int64", "split": str, "metric": str, "value": "float64"}


def _metrics_body(path: str) -> bytes:
    """A metrics.csv without its header line, as bytes ending in a newline."""
    try:
        data = received.read_bytes(path, received.METRICS_MAX)
    except FileNotFoundError:
        return b""
    if data and not data.endswith(b"\n"):  # normbench ends every line, the last one too
        raise ValueError("metrics.csv ends within a line: cut short")
    header, _, body = data.partition(b"\n")
    if header.rstrip(b"\r") != _METRICS_HEADER:
        if not data.strip():
            return b""
        # Another column order (another version): parse this one file on its own; a
        # file that is not a metrics table at all raises ValueError (unreadable).
        try:
            frame = pd.read_csv(io.BytesIO(data), dtype=_METRIC_DTYPES)[list(METRIC_COLUMNS)]
        except (KeyError, UnicodeDecodeError, OverflowError) as err:
            raise ValueError(f"metrics.csv is not a metrics table ({err})") from None
        body = frame.to_csv(index=False, header=False, lineterminator="\n").encode()
    if b"\r" in body:
        body = body.replace(b"\r\n", b"\n")
    if body.startswith(b"\n") or b"\n\n" in body:  # blank lines: no rows (one row a line)
        body = b"\n".join(line for line in body.split(b"\n") if line)
    return body if not body or body.endswith(b"\n") else body + b"\n"


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


#: The range of the integers a table holds (int64: pandas' and Parquet's integers).
_INT64 = (-(2**63), 2**63 - 1)

_ACCURACY_FIELDS = (
    "final_test_acc", "best_test_acc", "final_val_acc", "best_val_acc", "test_acc_at_best_val",
    "test_acc_precise_bn", "test_acc_batch_stats", "final_train_acc",
)  # fmt: skip
_AMOUNT_FIELDS = (
    "lr", "lr_effective", "final_test_loss", "final_train_loss", "bn_eval_time_s",
    "train_time_s", "wall_time_s", "img_per_s",
)  # fmt: skip

#: Summary fields that hold numbers: (whole numbers only, lowest value, highest value
#: or None, null allowed). A value outside its range is damage as much as text is: an
#: accuracy of 5.0 would enter a table's mean as if measured.
_NUMBER_RULES: dict[str, tuple[bool, float, float | None, bool]] = {
    "batch_size": (True, 1, None, False),
    "epochs": (True, 1, None, False),
    "seed": (True, 0, None, False),
    "max_steps": (True, 1, None, True),
    "steps": (True, 0, None, True),
    "best_val_epoch": (True, 1, None, True),
    "resumed_from_epoch": (True, 0, None, True),
    "num_params": (True, 0, None, True),
    "threads": (True, 1, None, True),
    **dict.fromkeys(_ACCURACY_FIELDS, (False, 0, 1, True)),
    **dict.fromkeys(_AMOUNT_FIELDS, (False, 0, None, True)),
}

#: The longest a name may be: an option's (a YAML file's stem, as a file name) or an
#: experiment's (a folder's name). A longer one is damage, not a name to draw or print.
NAME_MAX = 255

#: Summary fields (and the config's option names) that are text, or null.
_TEXT_FIELDS = (
    "name", "model", "norm", "dataset", "optim",
    *(f"{CONFIG_PREFIX}{group}.name" for group in ("model", "norm", "dataset", "optim")),
)  # fmt: skip


def _shown(value: Any) -> str:
    """A value from a file in a message: its repr, cut short (a file may hold anything)."""
    import reprlib

    return reprlib.repr(value)


def _number_problem(key: str, value: Any, rule: tuple[bool, float, float | None, bool]):
    """What is wrong with one summary number (None: nothing)."""
    whole, low, high, null = rule
    if value is None:
        return None if null else f"{key} is null, not a whole number"
    if whole:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{key} {_shown(value)} is not a whole number"
        if not low <= value <= _INT64[1]:
            return f"{key} {_shown(value)} is not a whole number from {low} to 2**63-1"
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{key} {_shown(value)} is not a number"
    if not low <= value <= (sys.float_info.max if high is None else high):  # NaN, inf fail
        what = f"a number in [{low}, {high}]" if high is not None else f"a finite number >= {low}"
        return f"{key} {_shown(value)} is not {what}"
    return None


def _oversized(record: dict[str, Any]) -> str | None:
    """The first integer of a record (a config too) that no table column can hold."""
    low, high = _INT64
    if all(type(value) is not int or low <= value <= high for value in record.values()):
        return None  # (the common case, in one pass)
    for key, value in record.items():
        if type(value) is int and not low <= value <= high:
            return f"{key} {_shown(value)} does not fit a 64-bit integer"
    return None


#: _NUMBER_RULES as (key, whole, lowest, highest, null), the highest a finite bound:
#: a value in range of the right type passes in one comparison (NaN and inf fail it).
_FAST_RULES = [
    (key, whole, low, _INT64[1] if whole else (high if high is not None else sys.float_info.max),
     null)
    for key, (whole, low, high, null) in _NUMBER_RULES.items()
]  # fmt: skip


def _summary_problem(summary: dict[str, Any]) -> str | None:
    """What makes a summary.json unusable in tables (None: nothing): a status normbench
    does not know; a number that is text, not finite, out of its range (an accuracy
    outside [0, 1], a negative count, a time or a loss below 0) or an integer beyond 64
    bits; text fields that are not text."""
    status = summary.get("status")
    if status not in STATUSES:
        return f"status {_shown(status)} is not one of {', '.join(STATUSES)}"
    run_id = summary.get("run_id", "")
    if not isinstance(run_id, str):
        return f"run_id {_shown(run_id)} is not text"
    for key, whole, low, high, null in _FAST_RULES:
        value = summary.get(key)
        if value is None:
            if null:
                continue
        elif (type(value) is int or (not whole and type(value) is float)) and low <= value <= high:
            continue
        problem = _number_problem(key, value, _NUMBER_RULES[key])
        if problem:
            return problem
    for key in _TEXT_FIELDS:
        value = summary.get(key)
        if value is not None and not isinstance(value, str):
            return f"{key} {_shown(value)} is not text"
        if value is not None and len(value) > NAME_MAX:
            return f"{key} is {len(value):,} characters long: no name is longer than {NAME_MAX}"
    return _oversized(summary)


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
            problem = _summary_problem(summary)
            if problem:
                raise ValueError(f"summary.json: {problem}")
            if _SURROGATE_BYTES.search(summary_bytes):
                summary = _escaped(summary)
            summary, config = split_summary(summary)
            if config is None:
                data = received.read_bytes(os.path.join(folder, "config.yaml"), received.CONFIG_MAX)
                config = _escaped(read_config(data.decode()))
                problem = _oversized(config)
                if problem:
                    raise ValueError(f"config.yaml: {problem}")
            body = _metrics_body(os.path.join(folder, "metrics.csv"))
        except OSError as err:
            read.unreadable[runs_dir / name] = f"{Path(err.filename or '').name}: {err.strerror}"
            continue
        except (ValueError, yaml.YAMLError) as err:  # JSONDecodeError, UnicodeDecodeError
            read.unreadable[runs_dir / name] = " ".join(str(err).split())[:200]
            continue
        if "run_id" not in summary:
            summary["run_id"] = name if name.isascii() else _escape_surrogates(name)
        read.summaries.append(summary)
        read.configs.append(config)
        read.bodies.append(body)
        read.folders.append(runs_dir / name)
    _drop_copies(read)
    return read


#: A lone surrogate in a summary.json's bytes: as JSON's escape (``\\ud800``; a pair of
#: them is an escaped emoji) or UTF-8-encoded (which ``json.loads`` lets through).
_SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogates(text: str) -> str:
    """``text`` with each lone surrogate written as an escape, as :mod:`normbench.terminal`
    shows it: an undecodable byte of a folder's name (Python's ``\\udcfe``) as ``\\xfe``,
    any other (a JSON ``"\\ud800"``) as ``\\ud800``. No table format can hold one
    (Parquet and CSV are UTF-8, which has none): the run is kept, its text escaped."""

    def escape(match: re.Match) -> str:
        code = ord(match.group())
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _SURROGATE.sub(escape, text)


def _escaped(record: dict[str, Any]) -> dict[str, Any]:
    """A record whose keys and text values hold no lone surrogate (lists and other values
    reach the tables as their ``repr``, which escapes them already)."""
    if all(
        (key.isascii() or not _SURROGATE.search(key))
        and (type(value) is not str or value.isascii() or not _SURROGATE.search(value))
        for key, value in record.items()
    ):
        return record
    return {
        _escape_surrogates(key): _escape_surrogates(value) if type(value) is str else value
        for key, value in record.items()
    }


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


#: Metrics whose values must be finite and >= 0 (a loss may be NaN or inf: the epoch a
#: run diverged in); accuracies (acc, acc_precise_bn, ...) lie in [0, 1].
_AMOUNT_METRICS = ("lr", "epoch_time_s", "img_per_s")


def _value_problem(metric: str, value: float) -> str | None:
    """What is wrong with one metric's value (None: nothing); metrics of other names
    (a later version's) are taken as they are."""
    if metric.startswith("acc"):
        return None if 0 <= value <= 1 else "is not in [0, 1]"
    if metric == "loss":
        return None if not value < 0 else "is negative"
    if metric in _AMOUNT_METRICS:
        return None if math.isfinite(value) and value >= 0 else "is not finite and >= 0"
    return None


def _body_problem(body: bytes) -> str | None:
    """What is wrong with a metrics.csv's lines (None: nothing), without pandas: five
    fields, a whole epoch from 1 that fits 64 bits, a number in the metric's range."""
    import csv

    for number, line in enumerate(body.split(b"\n"), start=2):
        if not line:
            continue
        try:
            # one line as pandas reads it (quotes too); fields as text, decoded
            fields = next(csv.reader([line.decode()]))
            if len(fields) != len(METRIC_COLUMNS):
                raise ValueError
            epoch = int(fields[1])
            value = float(fields[4])
        except (ValueError, UnicodeDecodeError, csv.Error, StopIteration):
            return f"metrics.csv: line {number} is not run_id,epoch,split,metric,value"
        if not 1 <= epoch <= _INT64[1]:
            return f"metrics.csv: line {number}: epoch {_shown(epoch)} is not from 1 to 2**63-1"
        problem = _value_problem(fields[3], value)
        if problem:
            what = f"{_shown(fields[2])} {_shown(fields[3])}"
            return f"metrics.csv: line {number}: {what} {value!r} {problem}"
    return None


def _parsed_problem(body: bytes) -> str | None:
    """:func:`_body_problem` as pandas sees the file: the last resort when the lines
    looked whole but the experiment's table did not parse (a quoted line end)."""
    try:
        frame = pd.read_csv(io.BytesIO(_METRICS_HEADER + b"\n" + body), dtype=_METRIC_DTYPES)
    except (ValueError, OverflowError, pd.errors.ParserError):
        return "metrics.csv is not a table of run_id,epoch,split,metric,value"
    if _row_problems(frame).any():
        return "metrics.csv holds a value outside its metric's range"
    return None


def _row_problems(metrics: pd.DataFrame) -> np.ndarray:
    """The rows of an experiment's metrics that :func:`_body_problem` would refuse
    (vectorised: thousands of runs are checked in one pass)."""
    metric = metrics["metric"].fillna("").astype(str)
    value = metrics["value"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        accuracy = metric.str.startswith("acc").to_numpy() & ~((value >= 0) & (value <= 1))
        loss = (metric == "loss").to_numpy() & (value < 0)
        amount = metric.isin(_AMOUNT_METRICS).to_numpy() & ~(np.isfinite(value) & (value >= 0))
    return (metrics["epoch"].to_numpy() < 1) | accuracy | loss | amount


def _metrics_problem(path: Path) -> str | None:
    try:
        return _body_problem(_metrics_body(os.fspath(path)))
    except OSError as err:
        return f"metrics.csv: {err.strerror or err}"
    except ValueError as err:
        return str(err)


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
    (:func:`swept_keys`), then seed and run id; ``metrics`` follows the same run order.
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
            bad = [(i, why) for i, body in enumerate(read.bodies) if (why := _body_problem(body))]
            if not bad:
                bad = [(i, why) for i, b in enumerate(read.bodies) if (why := _parsed_problem(b))]
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

    from normbench.config import conf_dir, flatten

    root = OmegaConf.to_container(OmegaConf.load(conf_dir() / "config.yaml"), resolve=False)
    return flatten({k: v for k, v in root.items() if k not in ("defaults", "hydra")})


def _option_defaults(group: str, option: Any) -> dict[str, Any]:
    """A group option's keys and defaults, from its YAML (normbench's or a config folder
    the user added); {} for an option with no YAML here (a package's variant, whose code
    is not loaded to read a results folder) or one that does not load."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from normbench.config import config_dirs, flatten

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


def _fill_defaults(configs: list[dict[str, Any]]):
    """``configs`` with the keys some of them lack filled in with their defaults; the
    keys filled per run, and per key the defaults used and the number of runs."""
    from normbench.config import EXECUTION_KEYS, REQUIRED_GROUPS

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


def defaults_text(collected: Collected) -> str | None:
    """The keys filled with defaults, for a table's caption (None: none)."""
    if not collected.defaulted:
        return None
    parts = [
        f"{key} = {', '.join(map(_format_value, values))} for {_plural(count, 'run')}"
        for key, (values, count) in collected.defaulted.items()
    ]
    return "defaults filled in where older runs lack a key: " + "; ".join(parts)


def _defaults_note(notes: pd.Series) -> str | None:
    """A group's runs' filled keys (``runs.defaulted``) as ``key: n runs``, for summary.csv."""
    counts: dict[str, int] = {}
    for note in notes.dropna():
        for key in str(note).split(","):
            counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{key}: {_plural(n, 'run')}" for key, n in counts.items()) or None


def _assemble(read: _Read) -> Collected:
    configs, filled, defaulted = _fill_defaults(read.configs)
    if read.summaries:
        summary_frame = _frame(read.summaries)
        first = [f for f in SUMMARY_FIELDS if f in summary_frame.columns]
        summary_frame = summary_frame[first + [c for c in summary_frame if c not in first]]
    else:
        summary_frame = pd.DataFrame(columns=list(SUMMARY_FIELDS))
    config_frame = _frame(configs)
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
    order = _sort_frame(runs, [*swept_keys(runs), "seed", "run_id"]) if len(runs) else []
    runs = runs.loc[order].reset_index(drop=True)
    runs.attrs["config_columns"] = config_columns
    # The experiment's metrics carry the keys that tell runs apart (and the seed), so
    # that they plot without a join: each run's lines get its values appended.
    keys = [*swept_keys(runs), *(["seed"] if "seed" in runs.columns else [])]
    if keys:
        header = _METRICS_HEADER + b"," + _csv_line(keys)
        ends = [b"," + _csv_line(row) + b"\n" for row in runs[keys].itertuples(index=False)]
        bodies = [read.bodies[i].replace(b"\n", end) for i, end in zip(order, ends, strict=True)]
    else:
        header, bodies = _METRICS_HEADER, [read.bodies[i] for i in order]
    metrics_csv = header + b"\n" + b"".join(bodies)
    metrics = pd.read_csv(io.BytesIO(metrics_csv), dtype=_METRIC_DTYPES)
    if _row_problems(metrics).any():
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


def _sortable(series: pd.Series) -> pd.Series:
    """Numbers sort as numbers, everything else as text; nulls last (sort_values' key)."""
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return series
    numeric = pd.to_numeric(series, errors="coerce")
    if numeric.notna().sum() == series.notna().sum():
        return numeric
    return series.map(lambda v: v if v is None or v is pd.NA or v != v else str(v))


def _sort_frame(frame: pd.DataFrame, keys: Sequence[str]) -> pd.Index:
    keys = [k for k in dict.fromkeys(keys) if k in frame.columns]
    if not keys:
        return frame.index
    return frame.sort_values(keys, key=_sortable, na_position="last", kind="stable").index


# ------------------------------------------------------------------------------- keys


def config_columns(runs: pd.DataFrame) -> list[str]:
    """The columns of ``runs`` that hold config values (the others are outcomes).

    :func:`collect` lists them in ``runs.attrs``; for a frame read back from runs.csv
    they are the dotted names and the top-level keys of ``normbench/conf/config.yaml``.
    """
    listed = runs.attrs.get("config_columns")
    if listed is not None:
        return [c for c in listed if c in runs.columns]
    top = _top_level_config_keys()
    return [c for c in runs.columns if "." in c or c in top]


def _top_level_config_keys() -> set[str]:
    from omegaconf import OmegaConf

    from normbench.config import conf_dir

    return set(OmegaConf.load(conf_dir() / "config.yaml")) - {"defaults", "hydra"}


def _base_key(column: str) -> str:
    return column.removeprefix("config.")


def _group_candidates(runs: pd.DataFrame) -> list[str]:
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
    for key in _group_candidates(runs):
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


# ---------------------------------------------------------------------------- statistics


def t975(dof: np.ndarray) -> np.ndarray:
    """Student's t 97.5% quantile: ``scipy.stats.t.ppf(0.975, dof)``, which is this
    function of scipy.special (importing scipy.stats costs a second)."""
    from scipy.special import stdtrit

    return stdtrit(dof, 0.975)


def summarize(
    runs: pd.DataFrame, group_by: Sequence[str] | None = None, baseline: str | None = None
) -> pd.DataFrame:
    """Statistics per group of runs, one row per group, sorted by the group keys.

    ``group_by`` None: groups of runs that differ only in their seed (every config column
    but the seed and the execution keys is a group key). Otherwise the given keys (short
    names allowed, see :func:`resolve_key`), pooling every run of a coarser group.

    Columns: the group keys, ``n`` (completed runs: only they enter the statistics),
    ``n_diverged``, ``n_failed``, ``n_interrupted``, then for ``final_test_acc`` and
    ``test_acc_at_best_val``:
    ``_mean``, ``_std`` (sample, n-1) and ``_ci95``, the half-width of the 95% confidence
    interval of the mean, Student's t(0.975, n-1) · std / √n. With n = 1, std and CI are
    NaN; with n = 0, all six are. Then ``baseline`` (the reference variant: ``baseline``,
    or custom_bn when present; see :mod:`normbench.comparisons`), ``diff_to_baseline``,
    ``diff_ci95`` and ``p_value``: Welch's comparison of the group's final test accuracy
    with the baseline's in the same group of the other keys.
    """
    from normbench.comparisons import baseline_of, differences

    if group_by is None:
        keys = _group_candidates(runs)
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
        notes = runs["defaulted"].groupby(by, dropna=False, sort=False).agg(_defaults_note)
        table["defaulted"] = notes.to_numpy()
    metrics = list(STAT_METRICS)
    mean, std, count = (
        grouped[metrics].mean(),
        grouped[metrics].std(ddof=1),
        grouped[metrics].count(),
    )
    for metric in metrics:
        n = count[metric].to_numpy(dtype=float)
        half = np.full(len(n), np.nan)
        many = n >= 2
        half[many] = t975(n[many] - 1) * std[metric].to_numpy()[many] / np.sqrt(n[many])
        table[f"{metric}_mean"] = mean[metric]
        table[f"{metric}_std"] = std[metric].where(count[metric] >= 2)
        table[f"{metric}_ci95"] = half
    table = table.reset_index()
    if not keys:
        table = table.drop(columns="_all")
    table = differences(runs, table, keys, baseline_of(runs, baseline))
    table = table[[*keys, *SUMMARY_STAT_COLUMNS, *(["defaulted"] if noted else [])]]
    return table.loc[_sort_frame(table, keys)].reset_index(drop=True)


# ------------------------------------------------------------------------------ writing


def aggregate(exp_dir: Path) -> tuple[Collected, pd.DataFrame]:
    """Collect an experiment (:func:`collect`), summarise it over seeds (:func:`summarize`
    with no ``group_by``) and write its four tables (``TABLE_FILES``) beside ``runs/``,
    each atomically. Returns ``(collected, summary)``.

    - ``runs.csv``, ``runs.parquet``: ``collected.runs``, one row per run;
    - ``metrics.csv``: ``collected.metrics``, every run's metrics, long (``METRIC_COLUMNS``);
    - ``summary.csv``: the summary, one row per group of runs that differ only in seed.
    """
    collected = collect(exp_dir)
    return collected, _write_tables(Path(exp_dir), collected)


def _write_tables(exp_dir: Path, collected: Collected, baseline: str | None = None) -> pd.DataFrame:
    summary = summarize(collected.runs, baseline=baseline)
    write_parquet(exp_dir / "runs.parquet", collected.runs)
    write_csv(exp_dir / "runs.csv", collected.runs)
    if collected.metrics_csv:
        write_bytes(exp_dir / "metrics.csv", collected.metrics_csv)
    else:
        write_csv(exp_dir / "metrics.csv", collected.metrics)
    write_csv(exp_dir / "summary.csv", summary)
    return summary


# ----------------------------------------------------------------------------- display


#: The most characters of one value or key a table or a message shows: a received
#: folder's text may be a megabyte long. The files written keep it whole.
SHOWN_MAX = 200


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_MAX else text[: SHOWN_MAX - 1] + "…"


def short_key(key: str) -> str:
    """``norm.name`` -> ``norm``: a group's name is the group (cut to ``SHOWN_MAX``)."""
    return _cut(key.removesuffix(".name"))


def _format_value(value: Any) -> str:
    """A config value as a table shows it, as a user would type it (``null``, ``true``,
    ``0.1``, ``'  '``): two values that differ never show alike (:func:`format_float`,
    :func:`format_string`); cut to ``SHOWN_MAX`` characters."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, bool | np.bool_):
        return str(bool(value)).lower()
    if isinstance(value, float | np.floating):
        whole = float(value).is_integer() and abs(value) < 1e16  # 1e+20, not 21 digits
        return str(int(value)) if whole else format_float(value)
    if isinstance(value, str):
        return _cut(format_string(value))
    return _cut(str(value))


def format_float(value: float) -> str:
    """``value`` as ``%g`` writes it (``0.1``, ``1e-05``) where that reads back as the
    same number, else in the fewest digits that do (Python's and numpy's ``str``:
    ``0.1000000001``), so that two values that differ never print alike."""
    shown = f"{value:g}"
    return shown if type(value)(shown) == value else str(value)


#: Strings that would read as another type's value (null, a boolean, a number, a list)
#: or hide their own edges: quoted when shown.
_LITERALS = frozenset({"null", "~", "true", "false"})


def format_string(value: str) -> str:
    """A string value as it is, or quoted (Python's ``repr``) where it would otherwise
    show as nothing or as another value: empty or blank (``''``, ``'  '``), with spaces
    at an edge, starting with a quote or a bracket, or reading as ``null``, a boolean or
    a number (``'0.1'``)."""
    if not value or value != value.strip() or value[0] in "'\"[{" or value.lower() in _LITERALS:
        return repr(value)
    try:
        float(value)
    except ValueError:
        return value
    return repr(value)


def _percent(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.2f}" if math.isnan(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _interval(mean: float, half: float) -> str:
    """An accuracy's 95% interval in %, clipped to what an accuracy can be: [0, 100]."""
    if math.isnan(mean) or math.isnan(half):
        return "–"
    low, high = max(mean - half, 0.0), min(mean + half, 1.0)
    return f"[{100 * low:.2f}, {100 * high:.2f}]"


def budget_text(runs: pd.DataFrame) -> str | None:
    """What the runs held fixed across batch sizes, for a table's caption: epochs or
    optimizer steps (``budget``, ``max_steps``)."""

    def values(key: str) -> list:
        column = runs.get(key, runs.get(f"config.{key}"))
        return [] if column is None else sorted(column.dropna().unique().tolist(), key=str)

    steps, budget = values("max_steps"), values("budget")
    epochs, reference = values("epochs"), values("ref_batch_size")
    if steps:
        return f"budget: {', '.join(map(str, steps))} optimizer steps at every batch size"
    if budget == ["steps"]:
        return (
            f"budget: the optimizer steps of {', '.join(map(str, epochs))} epochs at batch size "
            f"{', '.join(map(str, reference))}, at every batch size (steps held fixed)"
        )
    if budget in (["epochs"], []):
        return (
            f"budget: {', '.join(map(str, epochs))} epochs at every batch size (epochs held fixed)"
        )
    return "budget: mixed (epochs and steps held fixed in different runs)"


def summary_table(
    summary: pd.DataFrame, keys: Sequence[str], title: str, caption: str | None = None
):
    """A rich Table of :func:`summarize`'s frame grouped by ``keys``: the key columns, n,
    the final test accuracy in percent (mean ± std over the completed runs) and the 95%
    CI of its mean as [low, high]; with one run there is no std or CI, with none "–". With
    a baseline variant, the difference to it (percentage points, 95% CI, Welch's p).
    Diverged and failed counts get columns when any run did. (Best accuracies are in
    summary.csv; the table stays narrow enough for a terminal.) Keys, values and the
    title come from run folders: they are shown as text, cleaned (:mod:`normbench.terminal`)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=terminal.text(title, "table.title"),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for key in keys:
        numeric = key in summary and pd.api.types.is_numeric_dtype(summary[key])
        justify = "right" if numeric and not pd.api.types.is_bool_dtype(summary[key]) else "left"
        # keys are never cut short: the numbers beside them wrap instead
        width = max(
            [len(terminal.clean(short_key(key)))]
            + [len(terminal.clean(_cell(key, v))) for v in summary.get(key, [])]
        )
        table.add_column(
            terminal.text(short_key(key)),
            style="bold",
            no_wrap=True,
            justify=justify,
            min_width=width,
        )
    if not keys:
        table.add_column("runs", style="bold")
    table.add_column("n", justify="right", no_wrap=True, min_width=len(str(summary["n"].max())))
    table.add_column("final acc %", justify="right", no_wrap=True)
    table.add_column("95% CI", justify="right")  # what wraps when the terminal is narrow
    baselines = summary["baseline"].dropna().unique() if "baseline" in summary else []
    baseline = baselines[0] if len(baselines) and "norm.name" in keys else None
    if baseline is not None:
        shown = _format_value(baseline)
        table.add_column(terminal.text(f"Δ {shown}"), justify="right", no_wrap=True)
        caption = (f"{caption}; " if caption else "") + (
            f"Δ: difference to {shown} in percentage points ± its 95% CI, p: Welch's "
            "t-test; – with fewer than two runs on a side"
        )
    table.caption = terminal.text(caption, "table.caption") if caption else None
    counted = ("n_diverged", "n_failed", "n_interrupted")
    extra = [c for c in counted if c in summary and summary[c].sum() > 0]
    for column in extra:
        table.add_column(column.removeprefix("n_"), justify="right", style="yellow")
    for row in summary.to_dict("records"):
        cells = [terminal.text(_cell(k, row[k])) for k in keys] or ["all"]
        cells += [
            str(row["n"]),
            _percent(row["final_test_acc_mean"], row["final_test_acc_std"]),
            _interval(row["final_test_acc_mean"], row["final_test_acc_ci95"]),
        ]
        if baseline is not None:
            cells.append(terminal.text(_difference(row, baseline)))
        cells += [str(row[c]) for c in extra]
        table.add_row(*cells)
    return table


def _cell(key: str, value: Any) -> str:
    """A key column's cell: a config value as typed (:func:`_format_value`); the label
    :func:`compare_experiments` gives an experiment (a folder's name) as it is."""
    return str(value) if key == "experiment" else _format_value(value)


def selection_table(selection: pd.DataFrame, title: str):
    """A rich Table of :func:`normbench.comparisons.select`'s frame: the group keys, the
    value chosen, n, the validation accuracy that chose it and the test accuracy there
    (at each run's best validation epoch: mean ± std, 95% CI)."""
    from rich import box
    from rich.table import Table

    from normbench.comparisons import selection_keys

    table = Table(
        title=terminal.text(title, "table.title"),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    keys = selection_keys(selection)
    tuned = set(str(selection["tuned"].iloc[0]).split(",")) if len(selection) else set()
    for key in keys:
        style = "bold cyan" if key in tuned else "bold"
        table.add_column(terminal.text(short_key(key)), style=style, no_wrap=True)
    table.add_column("n", justify="right")
    table.add_column("val acc %", justify="right")
    table.add_column("test acc %", justify="right", no_wrap=True)
    table.add_column("95% CI", justify="right", no_wrap=True)
    for row in selection.to_dict("records"):
        test = "test_acc_at_best_val"
        table.add_row(
            *[terminal.text(_format_value(row[k])) for k in keys],
            str(row["n"]),
            f"{100 * row['best_val_acc_mean']:.2f}",
            _percent(row[f"{test}_mean"], row[f"{test}_std"]),
            _interval(row[f"{test}_mean"], row[f"{test}_ci95"]),
        )
    return table


def _difference(row: dict[str, Any], baseline: str) -> str:
    """``+1.2±0.8 p=0.012`` in percentage points; "–" where the seeds give no
    interval (fewer than two runs on a side): a difference alone is no result."""
    if row.get("norm.name") == baseline:
        return "baseline"
    diff, half, p = row["diff_to_baseline"], row["diff_ci95"], row["p_value"]
    if any(isinstance(v, float) and math.isnan(v) for v in (diff, half, p)):
        return "–"
    return f"{100 * diff:+.1f}±{100 * half:.1f} p={p:.2g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe(exp_dir: Path, collected: Collected) -> str:
    """One line: how many runs the experiment has, by status, and how many were skipped."""
    counts = collected.counts()
    parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s] or s != "interrupted"]
    if counts["other"]:
        parts.append(f"{counts['other']} other")
    line = f"{exp_dir}: {_plural(len(collected.runs), 'run')} ({', '.join(parts)})"
    if counts["incomplete"]:
        line += f"; {counts['incomplete']} incomplete (no summary.json yet) skipped"
    if counts["unreadable"]:
        shown = ", ".join(str(p) for p in collected.unreadable[:3])
        more = "..." if counts["unreadable"] > 3 else ""
        line += f"; {counts['unreadable']} unreadable skipped ({shown}{more})"
    if collected.copies:
        copies = len(collected.copies)
        line += f"; {copies} {'copy' if copies == 1 else 'copies'} of other runs counted once"
    return line


def warnings(collected: Collected) -> list[str]:
    """One line per run folder skipped, naming it and why."""
    lines = [f"skipped {path}: {why}" for path, why in collected.problems.items()]
    lines += [
        f"{_plural(count, 'run')} of {len(collected.runs)} lack {key} (written by an older "
        f"normbench): grouped with its default, {', '.join(map(_format_value, values))}"
        for key, (values, count) in collected.defaulted.items()
    ]
    return lines + [
        f"skipped {path}: a copy of a run read from another folder" for path in collected.copies
    ]


def nothing_readable(exp_dir: Path, collected: Collected) -> str | None:
    """One line when an experiment has run folders but none can be read because they are
    damaged (not merely unfinished): the first one and why; None otherwise."""
    if not collected.runs.empty or not collected.unreadable:
        return None
    first, why = next(iter(collected.problems.items()))
    more = len(collected.unreadable) - 1
    line = f"{exp_dir}: none of its runs can be read ({first}: {why}"
    line += f"; and {more} more)" if more else ")"
    if collected.incomplete:
        line += f", {len(collected.incomplete)} not finished"
    return line


def report(
    paths: Sequence[Path] | None = None,
    group_by: Sequence[str] | None = None,
    warn: Callable[[str], None] | None = None,
    select: Sequence[str] | None = None,
    baseline: str | None = None,
    compare: bool = False,
) -> Iterator[Any]:
    """``normbench results``: aggregate every experiment under ``paths``
    (:func:`find_experiments`) and yield what to print: per experiment, its run counts,
    where the tables went, and the summary table grouped by ``group_by`` (default: the
    swept keys), with differences to ``baseline``. ``select``: keys tuned on validation
    (:func:`normbench.comparisons.select`), written to ``selected.csv`` and shown as a
    table. ``compare``: one table of every experiment instead of one each, with an
    ``experiment`` column first (:func:`compare_experiments`). Every folder and key is
    checked before any table is written.
    """
    from normbench.comparisons import baseline_of
    from normbench.comparisons import select as select_values

    experiments = find_experiments(paths, warn)
    if compare and len(experiments) < 2:
        found = ", ".join(map(str, experiments))
        raise UserError(f"--compare needs two experiments or more; found one: {found}")
    plans = []
    unusable: list[str] = []  # experiments whose every run is damaged: no tables
    for exp_dir in experiments:
        check_writable(exp_dir)  # a read-only folder says so before any work
        collected = collect(exp_dir)
        problem = nothing_readable(exp_dir, collected)
        if problem:
            unusable.append(problem)
            continue
        runs = collected.runs
        if runs.empty:
            keys, reference, selection = [], None, None
        else:
            if group_by:
                keys = list(dict.fromkeys(resolve_key(runs, k) for k in group_by))
            else:
                keys = swept_keys(runs)
            reference = baseline_of(runs, baseline)
            selection = select_values(runs, select) if select else None
        plans.append((exp_dir, collected, keys, reference, selection))
    if unusable and not plans:  # a bad folder handed over: say so, write nothing
        if len(unusable) == 1:
            raise UserError(f"{unusable[0]}: no tables written")
        raise UserError(f"no run of the {len(unusable)} experiments can be read: {unusable[0]}")
    if warn is not None:
        for line in unusable:
            warn(f"{line}: no tables for it")
    side_by_side = (
        compare_experiments({exp: c.runs for exp, c, *_ in plans}, group_by, baseline)
        if compare
        else None
    )
    for exp_dir, collected, keys, reference, selection in plans:
        _write_tables(exp_dir, collected, reference)
        written = list(TABLE_FILES)
        if selection is not None:
            write_csv(exp_dir / "selected.csv", selection)
            written.append("selected.csv")
        if warn is not None:
            for line in warnings(collected):
                warn(line)
        yield describe(exp_dir, collected)
        yield f"wrote {', '.join(written)} to {exp_dir}"
        if not collected.runs.empty and side_by_side is None:
            by = ", ".join(map(short_key, keys)) or "all runs"
            title = f"{exp_dir}: test accuracy over seeds, by {by}"
            summary = summarize(collected.runs, keys, reference)
            notes = (budget_text(collected.runs), defaults_text(collected))
            yield summary_table(summary, keys, title, "; ".join(filter(None, notes)) or None)
        if selection is not None:
            yield selection_table(selection, f"{exp_dir}: chosen on validation")
    if side_by_side is not None:
        yield side_by_side


def experiment_labels(experiments: Sequence[Path]) -> dict[Path, str]:
    """Short names for experiment folders: their own names, or, where two share a name,
    their paths from the folder the experiments have in common."""
    names = [Path(exp).name for exp in experiments]
    if len(set(names)) == len(names):
        return dict(zip(experiments, names, strict=True))
    resolved = [Path(exp).resolve() for exp in experiments]
    common = Path(os.path.commonpath(resolved))
    return {
        exp: str(path.relative_to(common)) or path.name
        for exp, path in zip(experiments, resolved, strict=True)
    }


def compare_experiments(
    runs_by_experiment: dict[Path, pd.DataFrame],
    group_by: Sequence[str] | None = None,
    baseline: str | None = None,
):
    """One summary table of several experiments side by side (``normbench results A B
    --compare``): their runs together with an ``experiment`` column, grouped by it and by
    ``group_by`` (default: every key that differs between the runs of all of them), so
    a row is one experiment's group; differences to ``baseline`` stay within each
    experiment."""
    from normbench.comparisons import baseline_of

    labels = experiment_labels(list(runs_by_experiment))
    frames = [
        runs.assign(experiment=labels[exp])
        for exp, runs in runs_by_experiment.items()
        if not runs.empty
    ]
    if not frames:
        return f"{', '.join(labels.values())}: no runs to compare"
    runs = pd.concat(frames, ignore_index=True)
    if group_by:
        keys = list(dict.fromkeys(resolve_key(runs, k) for k in group_by))
    else:
        keys = swept_keys(runs)
    keys = ["experiment", *(k for k in keys if k != "experiment")]
    summary = summarize(runs, keys, baseline_of(runs, baseline))
    by = ", ".join(map(short_key, keys))
    title = f"{' vs '.join(labels.values())}: test accuracy over seeds, by {by}"
    return summary_table(summary, keys, title, budget_text(runs))
