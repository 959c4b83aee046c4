"""Data-parallel runs on real processes (runner, distributed.launch, train with a rank):
the keys and their refusals, a whole 2-process run against the 1-process run of the same
config, a rank killed mid-run and the rerun that resumes it, no process left behind, and
bf16 runs of every variant on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from normbench import runner
from normbench.config import compose
from normbench.errors import UserError
from normbench.norms.registry import norm_names

# A user's norm (a config folder's _target_): sync_bn whose rank 1 dies (os._exit(3)) at
# its STEP-th training forward, on the first attempt only (the marker file says so).
DYING = """
import os
import torch
from normbench.norms import SyncBatchNorm

STEP = 5

class DyingSyncBatchNorm(SyncBatchNorm):
    steps = 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled() and os.environ.get("RANK") == "1":
            type(self).steps += 1
            marker = os.environ["NORMBENCH_TEST_MARKER"]
            if type(self).steps == STEP * 3 and not os.path.exists(marker):  # 3 layers a step
                open(marker, "w").close()
                os._exit(3)
        return super().forward(x)
"""

# 4 steps an epoch (batch 32 of 128 images), 3 epochs: rank 1 dies in epoch 2
RUN = ["batch_size=32", "dataset.train_size=128", "epochs=3", "threads=2", "eval.bn_stats=false",
       "eval.precise_bn_images=64"]  # fmt: skip


def test_new_keys_at_their_defaults_keep_every_run_id():
    # ids computed by the code on main before processes, nodes and precision existed
    # (runner.run_id(compose([...])) at commit 66b2f87)
    assert runner.run_id(compose([])) == "089b725fa424"
    earlier = ["norm=sync_bn", "batch_size=64", "max_steps=3"]
    assert runner.run_id(compose(earlier)) == "c344c9fa09c3"
    assert runner.run_id(compose([*earlier, "precision=32", "processes=1", "nodes=1"])) == (
        "c344c9fa09c3"
    )
    changed = {runner.run_id(compose([*earlier, o])) for o in ("processes=2", "precision=bf16")}
    assert len(changed) == 2 and "c344c9fa09c3" not in changed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch_size=100", "processes=3"], "batch_size=100 does not split over 3 processes"),
        (["batch_size=64", "processes=2", "nodes=2", "batch_size=66"], "over 4 processes"),
        (["nodes=2"], "nodes=2: runs on several nodes are not supported yet"),
        (["precision=fp16", "device=cpu"], "precision=fp16 needs CUDA"),
        (["processes=2", "norm=sync_bn", "norm.group_size=3"], "norm.group_size=3 does not"),
        (["precision=fp32"], "precision must be one of 32, bf16, fp16"),
    ],
)
def test_refusals(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        compose(overrides)


def _metrics(folder: Path) -> pd.DataFrame:
    frame = pd.read_csv(folder / "metrics.csv")
    wanted = frame[frame.metric.isin(["loss", "acc"])]
    return wanted.set_index(["epoch", "split", "metric"]).value.sort_index()


def _in_session(sid: int) -> list[int]:
    """The processes still in session ``sid`` (the CLI's, and every worker it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                found.append(int(entry.name))
    return found


def test_a_killed_rank_interrupts_the_run_and_the_rerun_resumes_it_as_one_process_runs(tmp_path):
    code, conf = tmp_path / "code", tmp_path / "conf" / "norm"
    code.mkdir()
    conf.mkdir(parents=True)
    (code / "dying.py").write_text(DYING)
    (conf / "dying.yaml").write_text("name: dying\n_target_: dying.DyingSyncBatchNorm\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])),
        "NORMBENCH_TEST_MARKER": str(tmp_path / "died"),
    }
    out = tmp_path / "out"
    args = [sys.executable, "-m", "normbench.cli", "--config-dir", str(tmp_path / "conf"), "run",
            "norm=dying", "processes=2", f"out_dir={out}", *RUN]  # fmt: skip

    def cli():
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)  # fmt: skip
        stdout, stderr = proc.communicate(timeout=240)
        # (multiprocessing's resource tracker ends on its own once its parent is gone)
        deadline = time.monotonic() + 5
        while _in_session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _in_session(proc.pid)]
        assert not left, f"a process outlived the run: {left}"
        return proc.returncode, stdout + stderr

    code_, text = cli()
    assert (tmp_path / "died").exists() and code_ != 0, text
    (folder,) = (out / "default" / "runs").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert "rank 1 exited with status 3" in summary["error"]
    assert (folder / "checkpoint.pt").exists()  # epoch 1's, which the rerun goes on from

    code_, text = cli()
    assert code_ == 0, text
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] == 1
    assert (summary["processes"], summary["nodes"], summary["world_size"]) == (2, 1, 2)
    assert summary["batch_size_per_process"] == 16 and summary["norm_batch_size"] == 32
    assert summary["batch_size"] == 32 and summary["precision"] == "32"

    # the same config on one process under custom_bn: the same losses and accuracies
    alone = runner.run(compose(["norm=custom_bn", f"out_dir={tmp_path / 'one'}", *RUN]))
    assert alone.summary["status"] == "completed"
    assert alone.summary["norm_batch_size"] == 32 and alone.summary["world_size"] == 1
    pd.testing.assert_series_equal(_metrics(folder), _metrics(alone.run_dir), rtol=1e-5, atol=1e-6)


def test_group_size_one_normalizes_over_each_process_batch():
    from normbench.norms import NormSpec

    assert NormSpec("sync_bn", {"group_size": 1}).norm_batch_size(16, 4) == 16
    assert NormSpec("sync_bn", {"group_size": 2}).norm_batch_size(16, 4) == 32
    assert NormSpec("sync_bn", {"group_size": None}).norm_batch_size(16, 4) == 64
    assert NormSpec("ghost_bn", {"virtual_batch_size": 8}).norm_batch_size(16, 4) == 8
    assert NormSpec("torch_bn", {}).norm_batch_size(16, 4) == 16
    assert NormSpec("layer", {}).norm_batch_size(16, 4) is None


def test_bf16_runs_of_every_variant_complete_on_the_cpu(tiny):
    for norm in norm_names():
        outcome = runner.run(tiny(f"norm={norm}", "precision=bf16", "max_steps=2",
                                  "eval.bn_stats=false", "eval.precise_bn_images=64"))  # fmt: skip
        assert outcome.summary["status"] == "completed", (norm, outcome.summary["error"])
        assert outcome.summary["precision"] == "bf16"
