"""Re-planning a complete sweep: how long a repeated ``normbench sweep`` takes when every
run is done already.

Writes two grids of completed runs where ``normbench sweep`` puts them: 6 runs (2 norms
x 3 batch sizes) and N (8 norms x batch sizes x learning rates x seeds on digits;
default 1,000). The run ids are the real ones of the grid's composed configs, each
folder holds config.yaml, metrics.csv and a summary.json (as :mod:`aggregate_speed`
writes them). Then times, median of ``--repeats``:

- ``plan``: :func:`normbench.sweep.plan` in this process (expand the grid, compose every
  job, find it done), and per run;
- the whole command, ``normbench sweep <grid>`` in a new process as a user runs it
  (imports, plan, no job launched, the tables shown), which must start no training and
  launch nothing. Each grid's first sweep makes its tables and figures (not timed); the
  timed ones find no run changed.

``--compare DIR``: the same commands with the normbench of another checkout (DIR on
PYTHONPATH and the process's working folder, e.g. a ``git worktree`` of an earlier
commit; each process is checked to import the checkout it should), each on a copy of the
runs of its own, interleaved with this checkout's, repeat by repeat.

Usage: python benchmarks/plan_speed.py [--seeds 5] [--repeats 5] [--keep DIR] [--compare DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from normbench.config import flatten
from normbench.sweep import plan

NORMS = "custom_bn,torch_bn,layer,instance,group,batch_renorm,ghost_bn,none"
BATCH_SIZES = "2,4,8,16,32"
LRS = "0.01,0.02,0.05,0.1,0.2"


def _aggregate_speed():
    path = Path(__file__).with_name("aggregate_speed.py")
    spec = importlib.util.spec_from_file_location("aggregate_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grid(out_dir: Path, seeds: int) -> list[str]:
    return [
        f"out_dir={out_dir}",
        "name=plan_speed",
        f"norm={NORMS}",
        f"batch_size={BATCH_SIZES}",
        f"lr={LRS}",
        f"seed=range({seeds})",
    ]


def small_grid(out_dir: Path) -> list[str]:
    return [f"out_dir={out_dir}", "name=six", "norm=custom_bn,layer", "batch_size=8,16,32"]


def write_completed(overrides: list[str]) -> int:
    """A completed run folder for every job of the grid; how many."""
    fake = _aggregate_speed()
    rng = random.Random(0)
    jobs = plan(overrides).jobs  # composes each job once; nothing is done yet, so checks run
    for job in jobs:
        cfg = job.cfg
        job.run_dir.mkdir(parents=True)
        (job.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (job.run_dir / "metrics.csv").write_text(fake.metrics_text(job.run_id, rng, cfg.epochs))
        record = fake.summary_record(
            job.run_id, cfg.norm.name, cfg.batch_size, cfg.seed, "completed", rng, flatten(cfg)
        )
        record["lr"] = cfg.lr
        (job.run_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    return len(jobs)


#: This checkout (the one this file is in).
HERE = Path(__file__).resolve().parents[1]


def _process(source: Path | None) -> tuple[dict[str, str], Path]:
    """The environment and folder a new process imports ``source``'s normbench (None: this
    checkout's) with: ``python -m`` puts its working folder first on the path, so it
    starts in the checkout itself, never in another."""
    folder = (source or HERE).resolve()
    return {**os.environ, "PYTHONPATH": str(folder)}, folder


def imported_from(source: Path | None) -> str:
    """Where a new process set up as the timed ones are finds normbench."""
    env, cwd = _process(source)
    command = [sys.executable, "-c", "import normbench; print(normbench.__file__)"]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd).stdout


def sweep_command(overrides: list[str], count: int, source: Path | None) -> float:
    """Wall time of ``normbench sweep`` over a complete grid, in a new process (``source``:
    another checkout's normbench)."""
    env, cwd = _process(source)
    command = [sys.executable, "-m", "normbench.cli", "sweep", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - start
    if done.returncode != 0 or f"{count} skipped" not in done.stdout:
        sys.exit(f"the repeated sweep did not skip every run:\n{done.stdout}{done.stderr}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per cell (200 runs each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="write here and keep it")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout to time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = (args.keep or Path(tmp)).resolve()
        start = time.perf_counter()
        count = write_completed(grid(root / "this", args.seeds))
        small = write_completed(small_grid(root / "this"))
        print(f"wrote {count} + {small} completed runs in {time.perf_counter() - start:.1f} s")

        overrides = grid(root / "this", args.seeds)
        plan_times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            planned = plan(overrides)
            plan_times.append(time.perf_counter() - start)
            assert not planned.to_run, "every run should be done"
        plan_s = statistics.median(plan_times)
        print(
            f"plan: {plan_s:.2f} s for {count} runs, {1000 * plan_s / count:.2f} ms per run "
            f"(median of {args.repeats})"
        )

        sources: dict[str, Path | None] = {"this checkout": None}
        if args.compare is not None:
            sources[str(args.compare)] = args.compare.resolve()
            # its own copy (modification times kept), so neither redraws the other's tables
            shutil.copytree(root / "this", root / "other", copy_function=shutil.copy2)
        cases = {}
        for label, source in sources.items():
            found = Path(imported_from(source).strip()).resolve()
            if not found.is_relative_to((source or HERE).resolve()):
                sys.exit(f"{label}: a new process imports normbench from {found}")
            folder = root / ("this" if source is None else "other")
            for runs, overrides in ((small, small_grid(folder)), (count, grid(folder, args.seeds))):
                sweep_command(overrides, runs, source)  # makes the tables (and their stamp)
                cases[(label, runs)] = (overrides, source)
        wall: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
        for _ in range(args.repeats):  # interleaved: a load that comes and goes hits all
            for case, (overrides, source) in cases.items():
                wall[case].append(sweep_command(overrides, case[1], source))
        launched = list(root.glob("*/*/.hydra/*/multirun.yaml"))
        print(
            f"normbench sweep, every run done ({len(launched)} launches), median of {args.repeats}:"
        )
        for (label, runs), times in wall.items():
            print(
                f"  {label}, {runs} runs: {statistics.median(times):.2f} s "
                f"({', '.join(f'{w:.2f}' for w in times)})"
            )


if __name__ == "__main__":
    main()
