"""The sweep's ETA (normbench.eta): from finished runs' wall times per configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from normbench import rundir
from normbench.eta import SweepEta, configuration
from normbench.lock import LOCK_NAME
from normbench.rundir import SUMMARY_FIELDS, metrics_frame


@dataclass
class Job:
    overrides: list[str]
    run_dir: Path


def finish(job: Job, wall: float, status: str = "completed") -> None:
    """A run folder as the runner leaves it: a summary and its metrics."""
    summary = dict.fromkeys(SUMMARY_FIELDS)
    summary.update(run_id=job.run_dir.name, status=status, batch_size=2, epochs=1, seed=0)
    summary["wall_time_s"] = wall
    records = [{"epoch": 1, "train_loss": 1.0, "test_acc": 0.5}]
    rundir.write_csv(job.run_dir / "metrics.csv", metrics_frame(job.run_dir.name, records))
    rundir.write_json(job.run_dir / "summary.json", summary)


def start(job: Job) -> None:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / LOCK_NAME).write_text("{}")


@pytest.fixture
def grid(tmp_path):
    """batch_size=2,128 x seed=0,1."""
    return {
        (bs, seed): Job([f"batch_size={bs}", f"seed={seed}"], tmp_path / f"bs{bs}-s{seed}")
        for bs in (2, 128)
        for seed in (0, 1)
    }


def test_configuration_is_the_overrides_without_the_seed():
    assert configuration(["seed=3", "norm=layer", "batch_size=2"]) == (
        "batch_size=2",
        "norm=layer",
    )
    assert configuration(["+seed=3", "lr=0.1"]) == ("lr=0.1",)


def test_no_estimate_before_a_run_finishes_then_per_configuration(grid):
    eta = SweepEta(list(grid.values()))
    assert eta.seconds_left(now=0.0) is None

    finish(grid[2, 0], wall=100.0)
    # bs=2 seed 1 takes what its own configuration took; bs=128, with none finished,
    # the mean of every finished run
    assert eta.seconds_left(now=1.0) == pytest.approx(100.0 + 100.0 + 100.0)

    finish(grid[128, 0], wall=10.0)
    assert eta.seconds_left(now=2.0) == pytest.approx(100.0 + 10.0)
    assert eta.finished == 2  # of the four runs


def test_running_runs_count_their_time_so_far_and_share_the_work(grid):
    eta = SweepEta(list(grid.values()))
    finish(grid[2, 0], wall=100.0)
    finish(grid[128, 0], wall=10.0)
    start(grid[2, 1])
    assert eta.seconds_left(now=0.0) == pytest.approx(110.0)  # one run in progress
    assert eta.seconds_left(now=30.0) == pytest.approx(70.0 + 10.0)
    start(grid[128, 1])
    # two in progress at once: the work left is shared
    assert eta.seconds_left(now=35.0) == pytest.approx((65.0 + 10.0) / 2)
    assert eta.seconds_left(now=40.0) == pytest.approx((60.0 + 5.0) / 2)
    # a run past its estimate is not counted below zero
    assert eta.seconds_left(now=500.0) == pytest.approx(0.0)
    finish(grid[2, 1], wall=120.0)
    finish(grid[128, 1], wall=12.0)
    assert eta.seconds_left(now=501.0) == 0.0


def test_runs_done_before_the_sweep_count_and_failed_ones_do_not(grid, tmp_path):
    before = Job(["batch_size=2", "seed=7"], tmp_path / "before")
    finish(before, wall=50.0)
    eta = SweepEta(list(grid.values()), done_before=[before])
    assert eta.seconds_left(now=0.0) == pytest.approx(4 * 50.0)

    finish(grid[128, 0], wall=999.0, status="failed")  # says nothing of a run's length
    assert eta.seconds_left(now=1.0) == pytest.approx(3 * 50.0)
