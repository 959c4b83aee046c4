"""The run store: a run's folder on disk, and every file normbench writes.

A run folder ``<out_dir>/<name>/runs/<run_id>/`` holds ``RUN_FILES``: config.yaml,
metrics.csv (long: ``METRIC_COLUMNS``) and summary.json (``SUMMARY_FIELDS`` first).
This module knows their schemas, writes every file normbench leaves in a results
folder (run files, an experiment's tables, figures) and reads one run's files back,
telling a damaged file from a good one.

A file is written to a temporary name in its folder and renamed over the final
name, so a killed process never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from normbench import received
from normbench.errors import NotWritten, UserError
from normbench.schema import STATUSES, RunRecord, config_slots, record_fields

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

#: Fields every ``summary.json`` holds, in this order (its ``config.<key>`` entries follow):
#: :class:`~normbench.schema.RunRecord`'s.
SUMMARY_FIELDS: tuple[str, ...] = tuple(f.name for f in record_fields())

RUN_FILES = ("config.yaml", "metrics.csv", "summary.json")

#: A run's checkpoint (:mod:`normbench.checkpoints`), named here, where no torch is
#: imported: a run's files are listed before torch is (and where none will be).
CHECKPOINT_FILE = "checkpoint.pt"

#: A run's per-layer BatchNorm diagnostics (``eval.bn_stats``; :mod:`normbench.diagnostics`
#: measures them) and, beside ``runs/``, the experiment's: one row per (run, epoch, layer).
BN_STATS_FILE = "bn_stats.csv"

#: The diagnostics' measures, each averaged over the layer's channels: column -> what it is.
BN_STATS_MEASURES: dict[str, str] = {
    "mean_shift": "|running mean - true mean| / true std",
    "var_log_ratio": "|ln(running variance / true variance)|",
    "batch_mean_spread": "std of batch means / true std",
    "batch_var_spread": "std of batch variances / true variance",
    "train_eval_gap": "RMS(train-mode - eval-mode output) / train-mode output std",
}

#: Columns of every ``bn_stats.csv``: ``channels`` of the layer, ``batches`` measured.
BN_STATS_COLUMNS: tuple[str, ...] = (
    "run_id", "epoch", "layer", "channels", "batches", *BN_STATS_MEASURES,
)  # fmt: skip


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


def bn_stats_frame(run_id: str, rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The diagnostics' rows (each with ``epoch``, ``layer`` and the measures) as a table of
    ``BN_STATS_COLUMNS``."""
    frame = pd.DataFrame([{"run_id": run_id, **row} for row in rows], columns=BN_STATS_COLUMNS)
    types = {"epoch": "int64", "channels": "int64", "batches": "int64"}
    return frame.astype({**types, **dict.fromkeys(BN_STATS_MEASURES, "float64")})


def read_bn_stats(path: Path, through: int | None = None) -> pd.DataFrame:
    """A ``bn_stats.csv`` (rows of epochs up to ``through``, when given), its columns
    ``BN_STATS_COLUMNS``; an empty table when it is missing. ``ValueError`` when it is not
    such a table (damaged, another file, too large for one)."""
    try:
        data = received.read_bytes(path, received.METRICS_MAX)
    except FileNotFoundError:
        return bn_stats_frame("", [])
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype={"run_id": str, "layer": str})
        frame = bn_stats_frame("", frame[list(BN_STATS_COLUMNS)].to_dict("records"))
    except (KeyError, TypeError, UnicodeDecodeError, OverflowError, pd.errors.ParserError) as err:
        raise ValueError(
            f"{path} is not a table of {', '.join(BN_STATS_COLUMNS)} ({err})"
        ) from None
    if (frame["epoch"] < 1).any():
        raise ValueError(f"{path}: an epoch below 1")
    return frame if through is None else frame[frame["epoch"] <= through].reset_index(drop=True)


class BnStatsLog:
    """A run's ``bn_stats.csv``, written whole again as each epoch's rows come (:meth:`add`).
    It starts with the rows of epochs up to ``through`` already in the file (a resumed run's,
    its checkpoint's epoch; none from a damaged file), else empty."""

    def __init__(self, path: Path, run_id: str, through: int | None = None):
        self.path, self.run_id = Path(path), run_id
        self.rows: list[dict[str, Any]] = []
        if through:
            with contextlib.suppress(ValueError, OSError):
                self.rows = read_bn_stats(self.path, through).to_dict("records")
        write_csv(self.path, bn_stats_frame(run_id, self.rows))

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        self.rows += rows
        write_csv(self.path, bn_stats_frame(self.run_id, self.rows))


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


#: How often :func:`check_writable` looks again for the folders it needs, when one that
#: another process made went away under it.
_MKDIR_TRIES = 20


def check_writable(folder: Path) -> None:
    """Create and remove a probe file in ``folder`` (and the folders it needs, which are
    removed again): a :class:`NotWritten` now, before any work, rather than at its end."""
    folder = Path(folder)
    missing: list[Path] = []
    created: list[Path] = []
    probe = folder / f".normbench-probe.{socket.gethostname()}.{os.getpid()}"
    try:
        for attempt in range(_MKDIR_TRIES):
            missing = []
            path = folder
            while not os.path.exists(path) and path.parent != path:  # (False: not to be seen)
                missing.append(path)
                path = path.parent
            try:
                for part in reversed(missing):
                    try:
                        part.mkdir()
                    except FileExistsError:
                        # Another job made it between our look and our mkdir (a sweep's
                        # parallel jobs share their experiment's folders): it is theirs to
                        # remove, and a file in its place fails below.
                        continue
                    created.append(part)
                break
            except FileNotFoundError:
                # A parent another job had made, and removed again after its own check,
                # went away under us: look again.
                if attempt == _MKDIR_TRIES - 1:
                    raise
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
    if not isinstance(record, dict) or summary_problem(record):
        return None
    if record["status"] != "interrupted" and metrics_problem(Path(run_dir) / "metrics.csv"):
        return None
    return record


#: A run's experiment trackers' own ids of its logged runs (``normbench.trackers``), by
#: tracker: a resumed run goes on with them.
TRACKERS_FILE = "trackers.json"


def read_trackers(run_dir: Path) -> dict[str, str]:
    """The trackers' run ids kept in the run folder; {} when none are (or unreadable)."""
    try:
        data = received.read_bytes(Path(run_dir) / TRACKERS_FILE, received.SUMMARY_MAX)
        record = received.load_json(data)
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {k: v for k, v in record.items() if isinstance(k, str) and isinstance(v, str)}


def write_trackers(run_dir: Path, ids: dict[str, str]) -> None:
    write_json(Path(run_dir) / TRACKERS_FILE, ids)


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


# ---------------------------------------------------------------- summary.json's config
#
# A run's summary.json carries its config, flattened, under ``config.<dotted key>``
# (:func:`summary_of`), so aggregation reads one JSON file per run. Parsing thousands of
# config.yaml files would cost more than everything else together: config.yaml is read
# only for a summary written without those keys. A config key that a record field holds
# (``norm.name`` is ``norm``) is written once, as that field; summaries written before
# carry it twice, and read the same.

CONFIG_PREFIX = "config."

#: The config keys the record's fields hold: config key -> field.
_HELD: dict[str, str] = {f.config: f.name for f in record_fields() if f.config}
#: Where a config key goes among the others: the rank of its top-level key.
_SLOT: dict[str, int] = {key: rank for rank, key in enumerate(config_slots())}
_HELD_RANK: dict[str, int] = {key: _SLOT[key.partition(".")[0]] for key in _HELD}


def summary_of(record: RunRecord, config: dict[str, Any]) -> dict[str, Any]:
    """What a run writes to summary.json: the record's fields, then ``config`` (flattened,
    ``config.flatten``) under ``config.<key>``, less the keys the record holds."""
    own = {f.name: getattr(record, f.name) for f in record_fields()}
    rest = {f"{CONFIG_PREFIX}{k}": v for k, v in config.items() if k not in _HELD}
    return {**own, **rest}


def split_summary(summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A summary record's own fields, and its config (None when it carries none), whole:
    the keys the record holds put back in their place (``norm.name`` before ``norm.eps``)."""
    config = {k[len(CONFIG_PREFIX) :]: v for k, v in summary.items() if k.startswith(CONFIG_PREFIX)}
    own = {k: v for k, v in summary.items() if not k.startswith(CONFIG_PREFIX)}
    if not config:
        return own, None
    held = [(_HELD_RANK[k], k, own[f]) for k, f in _HELD.items() if k not in config and f in own]
    if not held:  # written before the record held them: both names, one value
        return own, config
    held.sort(key=lambda item: item[0])  # (stable: in record order within a rank)
    whole: dict[str, Any] = {}
    pending = iter(held)
    upcoming = next(pending, None)
    for key, value in config.items():
        rank = _SLOT.get(key.partition(".")[0])
        while upcoming is not None and rank is not None and upcoming[0] <= rank:
            whole[upcoming[1]] = upcoming[2]
            upcoming = next(pending, None)
        whole[key] = value
    while upcoming is not None:
        whole[upcoming[1]] = upcoming[2]
        upcoming = next(pending, None)
    return own, whole


METRICS_HEADER = ",".join(METRIC_COLUMNS).encode()
METRIC_DTYPES = {"run_id": str, "epoch": "int64", "split": str, "metric": str, "value": "float64"}


def metrics_body(path: str) -> bytes:
    """A metrics.csv without its header line, as bytes ending in a newline."""
    try:
        data = received.read_bytes(path, received.METRICS_MAX)
    except FileNotFoundError:
        return b""
    if data and not data.endswith(b"\n"):  # normbench ends every line, the last one too
        raise ValueError("metrics.csv ends within a line: cut short")
    header, _, body = data.partition(b"\n")
    if header.rstrip(b"\r") != METRICS_HEADER:
        if not data.strip():
            return b""
        # Another column order (another version): parse this one file on its own; a
        # file that is not a metrics table at all raises ValueError (unreadable).
        try:
            frame = pd.read_csv(io.BytesIO(data), dtype=METRIC_DTYPES)[list(METRIC_COLUMNS)]
        except (KeyError, UnicodeDecodeError, OverflowError) as err:
            raise ValueError(f"metrics.csv is not a metrics table ({err})") from None
        body = frame.to_csv(index=False, header=False, lineterminator="\n").encode()
    if b"\r" in body:
        body = body.replace(b"\r\n", b"\n")
    if body.startswith(b"\n") or b"\n\n" in body:  # blank lines: no rows (one row a line)
        body = b"\n".join(line for line in body.split(b"\n") if line)
    return body if not body or body.endswith(b"\n") else body + b"\n"


#: The range of the integers a table holds (int64: pandas' and Parquet's integers).
_INT64 = (-(2**63), 2**63 - 1)

#: The record's number fields (:class:`~normbench.schema.RunRecord`): (whole numbers only,
#: lowest value, highest value or None, null allowed). A value outside its range is damage
#: as much as text is: an accuracy of 5.0 would enter a table's mean as if measured.
_NUMBER_RULES: dict[str, tuple[bool, float, float | None, bool]] = {
    f.name: (f.whole, 0 if f.low is None else f.low, f.high, f.null)
    for f in record_fields()
    if f.number
}

#: The longest a name may be: an option's (a YAML file's stem, as a file name) or an
#: experiment's (a folder's name). A longer one is damage, not a name to draw or print.
NAME_MAX = 255

#: Summary fields that are names (text, or null), and the config's option names that
#: summaries written before the record held them carry too.
_TEXT_FIELDS = (
    *(f.name for f in record_fields() if f.names),
    *(f"{CONFIG_PREFIX}{f.config}" for f in record_fields() if f.names and "." in f.config),
)


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


def oversized(record: dict[str, Any]) -> str | None:
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


def summary_problem(summary: dict[str, Any]) -> str | None:
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
    return oversized(summary)


#: A lone surrogate in a summary.json's bytes: as JSON's escape (``\\ud800``; a pair of
#: them is an escaped emoji) or UTF-8-encoded (which ``json.loads`` lets through).
SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def escape_surrogates(text: str) -> str:
    """``text`` with each lone surrogate written as an escape, as :mod:`normbench.terminal`
    shows it: an undecodable byte of a folder's name (Python's ``\\udcfe``) as ``\\xfe``,
    any other (a JSON ``"\\ud800"``) as ``\\ud800``. No table format can hold one
    (Parquet and CSV are UTF-8, which has none): the run is kept, its text escaped."""

    def escape(match: re.Match) -> str:
        code = ord(match.group())
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _SURROGATE.sub(escape, text)


def escaped(record: dict[str, Any]) -> dict[str, Any]:
    """A record whose keys and text values hold no lone surrogate (lists and other values
    reach the tables as their ``repr``, which escapes them already)."""
    if all(
        (key.isascii() or not _SURROGATE.search(key))
        and (type(value) is not str or value.isascii() or not _SURROGATE.search(value))
        for key, value in record.items()
    ):
        return record
    return {
        escape_surrogates(key): escape_surrogates(value) if type(value) is str else value
        for key, value in record.items()
    }


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


def body_problem(body: bytes) -> str | None:
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


def parsed_problem(body: bytes) -> str | None:
    """:func:`body_problem` as pandas sees the file: the last resort when the lines
    looked whole but the experiment's table did not parse (a quoted line end)."""
    try:
        frame = pd.read_csv(io.BytesIO(METRICS_HEADER + b"\n" + body), dtype=METRIC_DTYPES)
    except (ValueError, OverflowError, pd.errors.ParserError):
        return "metrics.csv is not a table of run_id,epoch,split,metric,value"
    if row_problems(frame).any():
        return "metrics.csv holds a value outside its metric's range"
    return None


def row_problems(metrics: pd.DataFrame) -> np.ndarray:
    """The rows of an experiment's metrics that :func:`body_problem` would refuse
    (vectorised: thousands of runs are checked in one pass)."""
    metric = metrics["metric"].fillna("").astype(str)
    value = metrics["value"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        accuracy = metric.str.startswith("acc").to_numpy() & ~((value >= 0) & (value <= 1))
        loss = (metric == "loss").to_numpy() & (value < 0)
        amount = metric.isin(_AMOUNT_METRICS).to_numpy() & ~(np.isfinite(value) & (value >= 0))
    return (metrics["epoch"].to_numpy() < 1) | accuracy | loss | amount


def metrics_problem(path: Path) -> str | None:
    try:
        return body_problem(metrics_body(os.fspath(path)))
    except OSError as err:
        return f"metrics.csv: {err.strerror or err}"
    except ValueError as err:
        return str(err)
