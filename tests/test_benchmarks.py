"""The scripts under benchmarks/: the shell ones at least parse; plane_order.py runs;
norm_speed.py's ratios pair runs of the same repeat.

benchmarks/gpu_check.sh runs only where a GPU is lent, a few minutes at a time: a syntax
error found there would cost that session its run. ``bash -n`` reads a script without
running it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.sh"))


def test_there_are_shell_scripts():
    assert {p.name for p in SCRIPTS} >= {"gpu_check.sh", "gpu_wheels.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_shell_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_plane_order_script_times_both_orders():
    # a tiny shape, two repeats: the script runs and names what auto took
    script = BENCHMARKS / "plane_order.py"
    done = subprocess.run(
        [sys.executable, str(script), "--shape", "4,3,8,8", "--repeats", "2"],
        capture_output=True, text=True, timeout=600, cwd=script.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "4x3x8x8" in done.stdout
    assert "channels/channels" in done.stdout  # 768 bytes: within any core's L2


def test_norm_speed_pairs_each_run_with_the_base_run_of_its_repeat(monkeypatch):
    # each ratio against the base variant's run of the same repeat and batch size, never
    # against the median: a slow repeat slows both runs alike
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import pandas as pd
    from norm_speed import with_ratios

    frame = pd.DataFrame(
        [
            (0, 128, "custom_bn", 120.0), (0, 128, "torch_bn", 100.0),
            (1, 128, "torch_bn", 50.0), (1, 128, "custom_bn", 55.0),
            (0, 8, "torch_bn", 40.0), (0, 8, "custom_bn", 30.0),
        ],
        columns=["repeat", "batch_size", "norm", "img_per_s"],
    )  # fmt: skip
    ratios = with_ratios(frame, "torch_bn")["ratio"].tolist()
    assert ratios == pytest.approx([1.2, 1.0, 1.0, 1.1, 1.0, 0.75])
