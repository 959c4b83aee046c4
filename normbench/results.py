"""Result tables: their schemas, and atomic writes of run files.

A file is written to a temporary name in its folder and renamed over the final
name, so a killed process never leaves a file that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

#: Columns of every ``metrics.csv``: one row per (run, epoch, split, metric).
METRIC_COLUMNS: tuple[str, ...] = ("run_id", "epoch", "split", "metric", "value")

#: The per-epoch record keys of the training loop, as (split, metric) pairs.
RECORD_METRICS: dict[str, tuple[str, str]] = {
    "train_loss": ("train", "loss"),
    "train_acc": ("train", "acc"),
    "test_loss": ("test", "loss"),
    "test_acc": ("test", "acc"),
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
    "final_test_loss",
    "final_train_loss",
    "final_train_acc",
    "train_time_s",
    "wall_time_s",
    "img_per_s",
    "num_params",
    "device",
    "threads",
    "error",
    "started_at",
    "finished_at",
    "torch_version",
    "normbench_version",
)

RUN_FILES = ("config.yaml", "metrics.csv", "summary.json")


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


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
    """The run's summary record, or None when it has none (not finished) or it is unreadable."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
