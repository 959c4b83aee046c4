"""How long a sweep has left, from how long its finished runs took.

A sweep's runs finish rarely and unevenly (batch size 2 trains far slower than 128),
so a rate of runs per second, as progress bars estimate it, says nothing for most of a
long sweep. Here each run left is given the mean wall time of the finished runs of its
own configuration (its overrides but the seed), or, before any of those finished, the
mean of every finished run; runs that were done before the sweep count too. The work
left is shared by the runs seen in progress at once (their locks), so the estimate
holds for one process, joblib workers and cluster jobs alike: it reads run folders only.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normbench.lock import LOCK_NAME


def configuration(overrides: Sequence[str]) -> tuple[str, ...]:
    """A run's configuration: its overrides without the seed (seeds repeat a config)."""
    return tuple(sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "seed"))


class SweepEta:
    """Seconds left for ``jobs`` (objects with ``overrides`` and ``run_dir``), given
    ``done_before``: jobs finished before the sweep started, whose times count too.
    Each summary is read until it is found, once; ``finished`` counts the jobs done."""

    def __init__(self, jobs: Sequence[Any], done_before: Sequence[Any] = ()):
        self.jobs = list(jobs)
        self._pending = {id(job): job for job in self.jobs}
        self._keys = {id(job): configuration(job.overrides) for job in [*jobs, *done_before]}
        self._known = list(done_before)  # finished runs whose time is not read yet
        self._times: dict[tuple[str, ...], list[float]] = defaultdict(list)
        self._seen_running: dict[int, float] = {}  # job -> when its lock was first seen

    @property
    def finished(self) -> int:
        """How many of ``jobs`` have a summary (a result or a recorded stop)."""
        return len(self.jobs) - len(self._pending)

    def _read_finished(self, now: float) -> None:
        from normbench.rundir import read_summary

        for job in [*self._known, *self._pending.values()]:
            summary = read_summary(job.run_dir)
            if summary is None:
                continue
            self._pending.pop(id(job), None)
            self._seen_running.pop(id(job), None)
            wall = summary.get("wall_time_s")
            # Only runs that trained to the end say how long a run takes.
            if summary.get("status") == "completed" and isinstance(wall, int | float):
                self._times[self._keys[id(job)]].append(float(wall))
        self._known = []
        for job in self._pending.values():
            if id(job) not in self._seen_running and (Path(job.run_dir) / LOCK_NAME).exists():
                self._seen_running[id(job)] = now

    def _means(self) -> tuple[dict[tuple[str, ...], float], float | None]:
        """Mean wall time per configuration, and over every finished run."""
        means = {key: sum(times) / len(times) for key, times in self._times.items()}
        count = sum(len(times) for times in self._times.values())
        overall = sum(sum(times) for times in self._times.values()) / count if count else None
        return means, overall

    def seconds_left(self, now: float | None = None) -> float | None:
        """Seconds until every job is done, or None before any run has finished."""
        now = time.monotonic() if now is None else now
        self._read_finished(now)
        if not self._pending:
            return 0.0
        means, overall = self._means()
        if overall is None:
            return None
        work = 0.0
        for key in self._pending:
            expected = means.get(self._keys[key], overall)
            started = self._seen_running.get(key)
            work += max(expected - (now - started), 0.0) if started is not None else expected
        return work / max(len(self._seen_running), 1)
