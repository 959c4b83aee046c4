"""Aggregation speed: how long ``normbench results`` takes on an experiment of N runs.

Writes N synthetic run folders into a temporary experiment folder, as the runner
writes them: config.yaml (the real composed config through ``OmegaConf.to_yaml``,
with norm, batch size and seed varied), metrics.csv (10 epochs x 7 metrics) and
summary.json (every summary field and the flattened config); about 2% diverged,
1% failed, and 1% of the folders unfinished (config.yaml and a partial metrics.csv only). Then times
:func:`normbench.analysis.collect.collect` (reading) and :func:`normbench.reports.aggregate`
(reading, summarising, writing the four tables), median of ``--repeats``; the files
are in the page cache after the first repeat, as they are right after a sweep.

Usage: python benchmarks/aggregate_speed.py [--runs 5000] [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from normbench.analysis.collect import collect
from normbench.analysis.keys import swept_keys
from normbench.config import compose, flatten
from normbench.reports import aggregate
from normbench.rundir import CONFIG_PREFIX, RECORD_METRICS, SUMMARY_FIELDS

NORMS = ("custom_bn", "torch_bn", "layer", "instance", "group", "batch_renorm", "ghost_bn", "none")
BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512)
EPOCHS = 10


def configs() -> dict[tuple[str, int], tuple[str, dict]]:
    """The config.yaml text and the flattened config of seed 0 for every (norm, batch size)."""
    made = {}
    for norm in NORMS:
        cfg = compose([f"norm={norm}", f"epochs={EPOCHS}", "name=speed"])
        for batch_size in BATCH_SIZES:
            cfg.batch_size = batch_size
            made[norm, batch_size] = (OmegaConf.to_yaml(cfg, resolve=True), flatten(cfg))
    return made


def metrics_text(run_id: str, rng: random.Random, epochs: int) -> str:
    lines = [",".join(("run_id", "epoch", "split", "metric", "value"))]
    for epoch in range(1, epochs + 1):
        for split, metric in RECORD_METRICS.values():
            lines.append(f"{run_id},{epoch},{split},{metric},{rng.random()!r}")
    return "\n".join(lines) + "\n"


def summary_record(run_id, norm, batch_size, seed, status, rng, config: dict):
    acc = None if status != "completed" else 0.9 + 0.09 * rng.random()
    record = dict.fromkeys(SUMMARY_FIELDS)
    record.update(
        run_id=run_id,
        status=status,
        name="speed",
        model="small_cnn",
        norm=norm,
        dataset="digits",
        optim="sgd",
        batch_size=batch_size,
        lr=0.1,
        lr_effective=0.1,
        epochs=EPOCHS,
        seed=seed,
        steps=EPOCHS * (1437 // batch_size),
        final_test_acc=acc,
        best_test_acc=None if acc is None else acc + 0.005,
        final_train_loss=rng.random(),
        train_time_s=10 * rng.random(),
        wall_time_s=11 * rng.random(),
        img_per_s=10000 * rng.random(),
        num_params=94186,
        device="cpu",
        threads=1,
        error={"failed": "RuntimeError: boom", "diverged": "loss is nan"}.get(status),
        started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:00:10+00:00",
        torch_version="2.4.0",
        normbench_version="0.1.0",
    )
    # as runner.summary_record writes it: the flattened config rides along
    record.update({f"{CONFIG_PREFIX}{k}": v for k, v in {**config, "seed": seed}.items()})
    return record


def write_runs(exp_dir: Path, count: int, seed: int = 0) -> int:
    """Write ``count`` run folders under ``exp_dir/runs``; returns how many are unfinished."""
    rng = random.Random(seed)
    made = configs()
    grid = [(norm, bs) for norm in NORMS for bs in BATCH_SIZES]
    unfinished = 0
    for i in range(count):
        norm, batch_size = grid[i % len(grid)]
        run_seed = i // len(grid)
        run_id = hashlib.sha256(f"{norm}-{batch_size}-{run_seed}".encode()).hexdigest()[:12]
        folder = exp_dir / "runs" / run_id
        folder.mkdir(parents=True)
        text, config = made[norm, batch_size]
        (folder / "config.yaml").write_text(text.replace("\nseed: 0\n", f"\nseed: {run_seed}\n"))
        draw = rng.random()
        if draw < 0.01:  # interrupted half-way: no summary
            (folder / "metrics.csv").write_text(metrics_text(run_id, rng, EPOCHS // 2))
            unfinished += 1
            continue
        status = "failed" if draw < 0.02 else "diverged" if draw < 0.04 else "completed"
        epochs = EPOCHS if status == "completed" else rng.randint(1, EPOCHS)
        (folder / "metrics.csv").write_text(metrics_text(run_id, rng, epochs))
        record = summary_record(run_id, norm, batch_size, run_seed, status, rng, config)
        (folder / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    return unfinished


def timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000, help="run folders to write")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="write here and keep it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        exp_dir = (args.keep or Path(tmp)) / "speed"
        start = time.perf_counter()
        unfinished = write_runs(exp_dir, args.runs)
        print(
            f"wrote {args.runs} run folders ({unfinished} unfinished) in "
            f"{time.perf_counter() - start:.1f} s: {exp_dir}"
        )
        read_s, collected = timed(lambda: collect(exp_dir), args.repeats)
        total_s, _ = timed(lambda: aggregate(exp_dir), args.repeats)
        runs = collected.runs
        print(
            f"{len(runs)} runs ({len(collected.incomplete)} incomplete skipped), "
            f"{len(collected.metrics)} metric rows, swept: {', '.join(swept_keys(runs))}"
        )
        print(f"collect (read every run folder): {read_s:.2f} s, median of {args.repeats}")
        print(
            f"aggregate (collect, summarize, write 4 tables): {total_s:.2f} s, "
            f"median of {args.repeats}"
        )


if __name__ == "__main__":
    main()
