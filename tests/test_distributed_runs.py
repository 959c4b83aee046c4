"""Data-parallel runs on real processes (runner, distributed.launch, train with a rank):
the keys and their refusals, a whole 2-process run against the 1-process run of the same
config, a rank killed mid-run and the rerun that resumes it, a hung rank ended by the
process group's timeout, Ctrl-C on the launcher, no process left behind, and bf16 runs
of every variant on the CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from normbench import runner
from normbench.config import add_config_dir, compose
from normbench.errors import UserError
from normbench.interrupts import ProcessLost
from normbench.lock import read_owner
from normbench.norms.registry import norm_names

# A user's norm (a config folder's _target_): sync_bn whose rank 1, at its ODD_STEP-th
# training step, on the first attempt only (the marker file says so), does ODD_DOES: "die"
# (os._exit(3)), "hang" (sleeps an hour) or "slow" (sleeps 0.1 s each step from then on).
ODD = """
import os
import time

import torch
from normbench.norms import SyncBatchNorm


class OddSyncBatchNorm(SyncBatchNorm):
    calls = 0

    def forward(self, x):
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))  # local, SLURM task
        if self.training and torch.is_grad_enabled() and rank == "1":
            type(self).calls += 1
            marker, does = os.environ["ODD_MARKER"], os.environ["ODD_DOES"]
            if type(self).calls == int(os.environ["ODD_STEP"]) * 3:  # 3 layers a step
                if os.path.exists(marker):
                    return super().forward(x)
                open(marker, "w").close()
                if does == "die":
                    os._exit(3)
                if does == "hang":
                    time.sleep(3600)
            if does == "slow" and type(self).calls % 3 == 0 and os.path.exists(marker):
                time.sleep(0.1)
        return super().forward(x)
"""

# 4 steps an epoch (batch 32 of 128 images), 2 epochs
RUN = ["batch_size=32", "dataset.train_size=128", "epochs=2", "threads=2", "eval.bn_stats=false",
       "eval.precise_bn_images=64"]  # fmt: skip


@pytest.fixture
def odd(tmp_path, monkeypatch):
    """The odd norm's code and config folder; the environment a run of it needs, here
    (for runs in this process) and as a dict (for the CLI's subprocess)."""
    code, conf = tmp_path / "code", tmp_path / "conf" / "norm"
    code.mkdir()
    conf.mkdir(parents=True)
    (code / "odd.py").write_text(ODD)
    (conf / "odd.yaml").write_text("name: odd\n_target_: odd.OddSyncBatchNorm\n")
    monkeypatch.syspath_prepend(str(code))
    add_config_dir(tmp_path / "conf")

    def env(does: str, step: int) -> dict[str, str]:
        values = {"ODD_DOES": does, "ODD_STEP": str(step), "ODD_MARKER": str(tmp_path / "odd")}
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "PYTHONPATH": path}

    return env


def _workers_left() -> list[int]:
    """The processes of this one's fork server (:data:`distributed.START_METHOD`): the
    workers of its runs, none once they have ended."""
    from multiprocessing import forkserver

    server = forkserver._forkserver._forkserver_pid
    deadline = time.monotonic() + 5
    while (left := _children(server)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _children(parent: int | None) -> list[int]:
    return _processes(1, parent)  # stat's field after the state: the parent's pid


def _processes(field: int, value: int | None) -> list[int]:
    """The processes whose /proc stat field ``field`` (counted after the command name's
    closing parenthesis) is ``value``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[field]) == value:
                found.append(int(entry.name))
    return found


def _cli(tmp_path, env, *overrides: str) -> subprocess.Popen:
    """``normbench run`` of the odd norm on 2 processes, in a session of its own."""
    args = [sys.executable, "-m", "normbench.cli", "--config-dir", str(tmp_path / "conf"), "run",
            "norm=odd", "processes=2", f"out_dir={tmp_path / 'out'}", *RUN, *overrides]  # fmt: skip
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def _ended(proc: subprocess.Popen) -> tuple[int, str]:
    """The CLI's exit status and output, once it and every process of its session are gone."""
    stdout, stderr = proc.communicate(timeout=120)
    # (multiprocessing's fork server and resource tracker end once their parent is gone)
    deadline = time.monotonic() + 5
    while _in_session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _in_session(proc.pid)]
    assert not left, f"a process outlived the run: {left}"
    return proc.returncode, stdout + stderr


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
        (["precision=fp16", "device=cpu"], "precision=fp16 needs CUDA"),
        (["processes=2", "norm=sync_bn", "norm.group_size=3"], "norm.group_size=3 does not"),
        (
            ["norm=sync_bn", "norm.group_size=2"],
            "does not divide the 1 process into whole groups; use a divisor of 1 .processes=1 x",
        ),
        (["precision=fp32"], "precision must be one of 32, bf16, fp16"),
    ],
)
def test_refusals(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        compose(overrides)


def test_a_run_on_several_nodes_starts_only_on_slurm(tmp_path, monkeypatch):
    """Outside a SLURM job's tasks, nodes > 1 is refused in one line, nothing written;
    inside a step whose tasks are not the run's processes too."""
    cfg = compose(["nodes=2", "batch_size=32", f"out_dir={tmp_path}"])
    with pytest.raises(UserError, match="^nodes=2: a run on several nodes starts only on SLURM"):
        runner.run(cfg)
    for name, value in {"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "3"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match="^this SLURM job step has 3 tasks, but the run has 2 proc"):
        runner.run(cfg)
    assert not list(tmp_path.iterdir())


def _metrics(folder: Path) -> pd.DataFrame:
    frame = pd.read_csv(folder / "metrics.csv")
    wanted = frame[frame.metric.isin(["loss", "acc"])]
    return wanted.set_index(["epoch", "split", "metric"]).value.sort_index()


def _in_session(sid: int) -> list[int]:
    """The processes still in session ``sid`` (the CLI's, and every worker it started)."""
    return _processes(3, sid)


def test_a_killed_rank_interrupts_the_run_and_the_rerun_resumes_it_as_one_process_runs(
    tmp_path, odd
):
    odd("die", 5)  # rank 1 dies at the first step of epoch 2
    cfg = compose(["norm=odd", "processes=2", f"out_dir={tmp_path / 'out'}", *RUN])
    with pytest.raises(ProcessLost, match="rank 1 exited with status 3"):
        runner.run(cfg)
    assert (tmp_path / "odd").exists()
    assert not _workers_left(), "a worker outlived the run"
    folder = runner.run_dir(cfg)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert "rank 1 exited with status 3" in summary["error"]
    assert (folder / "checkpoint.pt").exists()  # epoch 1's, which the rerun goes on from
    assert read_owner(folder) is None

    rerun = runner.run(cfg)
    summary = rerun.summary
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] == 1
    assert (summary["processes"], summary["nodes"], summary["world_size"]) == (2, 1, 2)
    assert summary["batch_size_per_process"] == 16 and summary["norm_batch_size"] == 32
    assert summary["batch_size"] == 32 and summary["precision"] == "32"

    # the same config on one process under custom_bn: the same losses and accuracies
    alone = runner.run(compose(["norm=custom_bn", f"out_dir={tmp_path / 'one'}", *RUN]))
    assert alone.summary["status"] == "completed"
    assert alone.summary["norm_batch_size"] == 32 and alone.summary["world_size"] == 1
    pd.testing.assert_series_equal(_metrics(folder), _metrics(alone.run_dir), rtol=1e-5, atol=1e-6)


def test_a_sweep_in_joblibs_workers_goes_on_past_a_run_that_lost_a_process(tmp_path, odd):
    """joblib's workers make their own start method (loky) multiprocessing's default, which
    a run's workers could not take ("cannot find context for 'loky'"): they start with
    the standard one. A job whose rank dies is recorded interrupted, in one line, and the
    sweep goes on with the other job, ending with its tables and status 1."""
    env = odd("die", 5)
    args = [sys.executable, "-m", "normbench.cli", "--config-dir", str(tmp_path / "conf"),
            "sweep", "norm=odd,custom_bn", "processes=2", "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2", f"out_dir={tmp_path / 'out'}", *RUN]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "loky" not in done.stderr, done.stderr
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("out/*/runs/*/summary.json")]
    ended = {s["norm"]: (s["status"], s["error"]) for s in summaries}
    assert ended["custom_bn"] == ("completed", None), ended
    assert ended["odd"][0] == "interrupted" and "rank 1 exited with status 3" in ended["odd"][1]
    said = [line for line in done.stderr.splitlines() if "rank 1 exited with status 3" in line]
    assert len(said) == 1, done.stderr
    assert done.stdout.splitlines()[-1] == "1 completed, 0 failed, 1 interrupted", done.stdout


def test_a_hung_rank_ends_the_run_within_the_process_group_timeout(tmp_path, odd):
    odd("hang", 2)
    cfg = compose(["norm=odd", "processes=2", f"out_dir={tmp_path / 'out'}", "dist_timeout_s=5",
                   *RUN])  # fmt: skip
    start = time.monotonic()
    with pytest.raises(ProcessLost, match="lost its peers"):
        runner.run(cfg)
    # the timeout, rank 0's wait before it exits, the agent's stop of the hung rank
    assert time.monotonic() - start < 5 + 25
    folder = runner.run_dir(cfg)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert "rank 0 lost its peers (a collective failed or timed out)" in summary["error"]
    assert read_owner(folder) is None


#: What the CLI says and records of each stop signal.
SAID = {
    signal.SIGINT: "interrupted by SIGINT (Ctrl-C)",
    signal.SIGTERM: "terminated by SIGTERM",
    signal.SIGHUP: "hung up by SIGHUP",
}


@pytest.mark.parametrize(
    ("signum", "to", "when"),
    [
        # kill -INT on the launching process alone, then kill on it while it stops the workers
        (signal.SIGINT, "launcher", "training"),
        (signal.SIGINT, "session", "training"),  # Ctrl-C at its terminal
        (signal.SIGINT, "session", "starting"),  # the same, while the fork server imports
        (signal.SIGTERM, "session", "training"),  # kill -- -PGID
        (signal.SIGHUP, "session", "training"),  # the terminal closed
    ],
)
def test_a_stop_signal_ends_every_process_in_one_line_and_records_the_run(
    tmp_path, odd, signum, to, when
):
    """Every process of the session got Ctrl-C or SIGHUP from a terminal, or SIGTERM:
    one line saying so, the shell's exit status, nothing left running, and a run that
    had trained recorded as interrupted with the steps of its finished epochs. (The fork
    server and each worker printed a KeyboardInterrupt traceback; SIGTERM printed each
    rank's; the elastic agent logged a line of its own; the resource tracker, ended by
    SIGHUP and started again, printed a KeyError traceback per semaphore; and the agent
    stopped the workers with the SIGINT they ignore, then killed them 10 s later, before
    rank 0 recorded the run; a second signal cut its stopping of the workers short.)"""
    env = odd("slow", 2)  # rank 1 marks its second step, then takes 0.1 s a step
    proc = _cli(tmp_path, env, "epochs=100")
    runs = tmp_path / "out" / "default" / "runs"

    def ready() -> bool:
        if when == "starting":  # the fork server is there, importing torch
            # and the launcher no longer ignores SIGINT, as it does for the milliseconds of
            # the server's start (distributed._ignoring: where another thread of it takes
            # a signal then, the signal is lost)
            return any(
                b"forkserver" in _cmdline(pid) for pid in _children(proc.pid)
            ) and not _ignores(proc.pid, signal.SIGINT)
        return bool(list(runs.glob("*/checkpoint.pt")))  # an epoch done, to resume after

    deadline = time.monotonic() + 120
    while not ready() and proc.poll() is None:
        assert time.monotonic() < deadline, f"the run never got to {when}"
        time.sleep(0.02)
    if to == "launcher":
        proc.send_signal(signum)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # ignored: it cut the stopping short, unrecorded
    else:
        os.killpg(proc.pid, signum)
    status, text = _ended(proc)
    assert status == 128 + signum, text
    assert "Traceback" not in text and not re.search(r"(?m)^[IWEF]\d{4} ", text), text
    last = text.strip().splitlines()[-1]
    if when == "starting":
        assert last == f"{SAID[signum]}: stopped before the run trained; nothing of it is " + (
            "recorded, the same command again runs it"
        )
        return
    assert last.startswith(SAID[signum]), text
    assert last.endswith("the same command again resumes it after its last finished epoch")
    (folder,) = runs.iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert summary["error"].startswith(SAID[signum]), summary
    epochs = pd.read_csv(folder / "metrics.csv").epoch.nunique()
    assert summary["steps"] == 4 * epochs, summary  # 4 steps an epoch
    assert read_owner(folder) is None


def test_a_launcher_killed_outright_leaves_no_worker_training(tmp_path, odd):
    """kill -9 (or the OOM killer) on the launching process: its workers see it gone
    within a second or two, rank 0 records the run interrupted, every process of the
    session ends, and its checkpoint and lock leave the same command free to resume it.
    (They trained on, orphans of the fork server, which their pipes kept alive.)"""
    env = odd("slow", 2)
    proc = _cli(tmp_path, env, "epochs=100")
    runs = tmp_path / "out" / "default" / "runs"
    deadline = time.monotonic() + 120
    while not list(runs.glob("*/checkpoint.pt")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never finished an epoch"
        time.sleep(0.02)
    proc.kill()
    out, err = proc.communicate(timeout=30)
    deadline = time.monotonic() + 30  # the watch's poll, rank 0's record, the server's end
    while _in_session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [_cmdline(pid) for pid in _in_session(proc.pid)]
    assert not left, f"a process outlived the launcher: {left}"
    (folder,) = runs.iterdir()
    assert (folder / "summary.json").exists(), out + err + str(list(folder.iterdir()))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert summary["error"].startswith("the launching process died"), (summary, out + err)
    owner = read_owner(folder)  # the dead launcher's lock, if any, blocks nobody
    assert owner is None or not owner.alive
    assert (folder / "checkpoint.pt").exists()  # which the same command goes on from


def _ignores(pid: int, signum: int) -> bool:
    """Whether process ``pid`` ignores signal ``signum`` now (/proc: its SigIgn mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_group_size_one_normalizes_over_each_process_batch():
    from normbench.norms import NormSpec

    assert NormSpec("sync_bn", {"group_size": 1}).norm_batch_size(16, 4) == 16
    assert NormSpec("sync_bn", {"group_size": 2}).norm_batch_size(16, 4) == 32
    assert NormSpec("sync_bn", {"group_size": None}).norm_batch_size(16, 4) == 64
    assert NormSpec("ghost_bn", {"virtual_batch_size": 8}).norm_batch_size(16, 4) == 8
    assert NormSpec("torch_bn", {}).norm_batch_size(16, 4) == 16
    assert NormSpec("batch_renorm", {}).norm_batch_size(16, 4) == 16  # not a _BatchNorm
    assert NormSpec("layer", {}).norm_batch_size(16, 4) is None


def test_a_model_alone_takes_what_one_processs_layers_normalized_over():
    """The batch rank 0's measures (PreciseBN, batch statistics, bn_stats) and the probe
    give one copy of the model, synchronizing with nobody: a sync_bn group's batches
    together, else a process's batch (ghost batches split it themselves)."""
    from normbench.norms import NormSpec

    assert NormSpec("sync_bn", {"group_size": 1}).local_batch(16, 4) == 16
    assert NormSpec("sync_bn", {"group_size": 2}).local_batch(16, 4) == 32
    assert NormSpec("sync_bn", {"group_size": None}).local_batch(16, 4) == 64
    assert NormSpec("ghost_bn", {"virtual_batch_size": 8}).local_batch(16, 4) == 16
    assert NormSpec("custom_bn", {}).local_batch(16, 4) == 16
    assert NormSpec("layer", {}).local_batch(16, 4) == 16
    assert NormSpec("custom_bn", {}).local_batch(64, 1) == 64
    with pytest.raises(UserError, match="norm.group_size=3 does not divide the 4"):
        NormSpec("sync_bn", {"group_size": 3}).local_batch(16, 4)


def test_only_sync_bns_group_size_must_divide_the_processes():
    """A user's norm may mean something else by a key named group_size."""
    from omegaconf import OmegaConf

    from normbench.distributed import check_parallel

    def cfg(name: str) -> object:
        norm = {"name": name, "group_size": 16}
        return OmegaConf.create(
            {"batch_size": 32, "processes": 1, "nodes": 1, "precision": "32", "norm": norm}
        )

    check_parallel(cfg("channel_groups"), "cpu")
    with pytest.raises(UserError, match="norm.group_size=16 does not divide the 1 process"):
        check_parallel(cfg("sync_bn"), "cpu")


def test_bf16_runs_of_every_variant_complete_on_the_cpu(tiny):
    for norm in norm_names():
        outcome = runner.run(tiny(f"norm={norm}", "precision=bf16", "max_steps=2",
                                  "eval.bn_stats=false", "eval.precise_bn_images=64"))  # fmt: skip
        assert outcome.summary["status"] == "completed", (norm, outcome.summary["error"])
        assert outcome.summary["precision"] == "bf16"
