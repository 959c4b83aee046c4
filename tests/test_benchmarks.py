"""The scripts under benchmarks/: the shell ones at least parse; plane_order.py and
layout_speed.py run; norm_speed.py's ratios pair runs of the same repeat and its
variants set their environment and config for their runs only; cache_bandwidth.py sizes
an array per level and times each level; run_overhead.py, sync_bn.py, ddp_step.py and pool_fusion.py
run their quick forms.

benchmarks/gpu_check.sh runs only where a GPU is lent, a few minutes at a time: a syntax
error found there would cost that session its run. ``bash -n`` reads a script without
running it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.sh"))


def run_script(name: str, *args: str) -> str:
    """``benchmarks/<name>`` with ``args``, run from its folder as a user runs it: its
    output, once it has exited 0."""
    script = BENCHMARKS / name
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True, text=True, timeout=600, cwd=script.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_there_are_shell_scripts():
    assert {p.name for p in SCRIPTS} >= {"gpu_check.sh", "gpu_wheels.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_shell_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_plane_order_script_times_both_orders():
    # a tiny shape, two repeats: the script runs and names what auto took
    out = run_script("plane_order.py", "--shape", "4,3,8,8", "--repeats", "2")
    assert "4x3x8x8" in out
    assert "channels/channels" in out  # 768 bytes: within any core's L2


def test_the_layout_script_times_both_layouts_and_names_autos_choice():
    out = run_script(
        "layout_speed.py", "--norms", "custom_bn", "instance", "--batch-size", "2",
        "--image-size", "8", "--repeats", "2",
    )  # fmt: skip
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert rows["custom_bn"].rstrip(" │").endswith("channels_last")
    assert rows["instance"].rstrip(" │").endswith("contiguous")


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


def test_a_norm_speed_variant_sets_its_environment_and_config_for_its_runs_only(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import os

    from norm_speed import environment, split_variant

    assert split_variant("custom_bn") == ("custom_bn", {}, [])
    assert split_variant("custom_bn:A_NB_TEST=0:B_NB_TEST=x=y") == (
        "custom_bn", {"A_NB_TEST": "0", "B_NB_TEST": "x=y"}, []
    )  # fmt: skip
    # a lower-case name is a config key: an override of those runs' config
    assert split_variant("torch_bn:memory_format=contiguous:A_NB_TEST=1:norm.eps=0.1") == (
        "torch_bn", {"A_NB_TEST": "1"}, ["memory_format=contiguous", "norm.eps=0.1"]
    )  # fmt: skip
    with pytest.raises(SystemExit, match="norm:NAME=VALUE"):
        split_variant("custom_bn:A_NB_TEST")
    # the kernel's build is chosen once per process: a variant cannot switch it
    with pytest.raises(SystemExit, match="once per process"):
        split_variant("custom_bn:NORMBENCH_KERNEL_ISA=avx2")
    monkeypatch.setenv("B_NB_TEST", "before")
    monkeypatch.delenv("A_NB_TEST", raising=False)
    with environment({"A_NB_TEST": "0", "B_NB_TEST": "1"}):
        assert (os.environ["A_NB_TEST"], os.environ["B_NB_TEST"]) == ("0", "1")
    assert "A_NB_TEST" not in os.environ and os.environ["B_NB_TEST"] == "before"


def test_cache_bandwidth_sizes_each_level_and_times_every_repeat(monkeypatch, fake_cpu_caches):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import cache_bandwidth

    fake_cpu_caches([("2", "Unified", "2048K"), ("3", "Unified", "266240K")])
    # in the L2, in the L3 (8 L2s, below a quarter of it), beyond the L3
    assert cache_bandwidth.level_sizes() == {"L2": 1 << 20, "L3": 16 << 20, "memory": 1040 << 20}
    sizes = {"small": 4096, "large": 1 << 16}
    gbps = cache_bandwidth.measure(sizes, repeats=3, min_bytes=1 << 17)
    assert list(gbps) == ["small", "large"]
    assert all(len(values) == 3 and all(v > 0 for v in values) for values in gbps.values())


def test_the_run_overhead_script_times_every_phase_of_a_quick_run():
    out = run_script("run_overhead.py", "--quick", "--norms", "custom_bn")
    for phase in ("startup", "training", "evaluation", "precise_bn", "bn_stats", "exit"):
        assert phase in out
    assert "outside training steps: custom_bn" in out


def test_the_sync_bn_script_times_two_gloo_processes():
    out = run_script("sync_bn.py", "--quick")
    assert "4x8x8x8" in out and out.rstrip().endswith("x")


def test_the_ddp_step_script_splits_a_step_into_computation_and_reduction():
    out = run_script("ddp_step.py", "--quick")
    # "name   12.34 ms ..." lines
    figures = dict(re.findall(r"^(\S.*?)\s+(-?[\d.]+) ms", out, flags=re.MULTILINE))
    step, computation = float(figures["step (DDP)"]), float(figures["no_sync (computation)"])
    reduction = float(figures["gradient reduction"])
    assert step > 0 and computation > 0
    assert abs(step - computation - reduction) < 0.011  # the printed figures add up
    assert "94,186 float32" in out  # small_cnn's parameters, in one all_reduce


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_pool_fusion_script_times_the_three_forms_of_both_layers(dtype):
    out = run_script("pool_fusion.py", "--quick", "--dtype", dtype)
    assert f"{dtype} input" in out
    rows = [line for line in out.splitlines() if line.startswith(("8x32x28x28", "8x64x14x14"))]
    assert len(rows) == 2
    for row in rows:
        ratios = re.findall(r"(fused|composed|torch) [\d.]+ ms \(([\d.]+)x", row)
        assert [name for name, _ in ratios] == ["fused", "composed", "torch"]
        assert float(ratios[0][1]) == 1.0
