"""Tests for normbench.runner: the run folder, skipping, failures, run ids."""

import contextlib
import json
import os
import subprocess

import pandas as pd
import pytest
import torch
from fixtures import write_dataset

from normbench import runner
from normbench.errors import UserError
from normbench.rundir import BN_STATS_COLUMNS, METRIC_COLUMNS, SUMMARY_FIELDS


def test_run_writes_config_metrics_and_summary(tiny):
    cfg = tiny("epochs=2")
    outcome = runner.run(cfg)
    folder = outcome.run_dir
    assert folder == runner.experiment_dir(cfg) / "runs" / outcome.run_id
    assert sorted(p.name for p in folder.iterdir()) == [
        "bn_stats.csv",  # (eval.bn_stats, on by default)
        "config.yaml",
        "metrics.csv",
        "summary.json",
    ]

    summary = json.loads((folder / "summary.json").read_text())
    assert list(summary)[: len(SUMMARY_FIELDS)] == list(SUMMARY_FIELDS)
    assert summary["status"] == "completed" and summary["error"] is None
    assert (summary["model"], summary["norm"], summary["dataset"]) == (
        "small_cnn",
        "custom_bn",
        "digits",
    )
    assert summary["steps"] == 2 * (256 // 64)
    assert 0 <= summary["final_test_acc"] <= summary["best_test_acc"] <= 1
    # chosen on the validation split (144 of digits' 1437 training images: 10%)
    assert 1 <= summary["best_val_epoch"] <= 2 and 0 <= summary["best_val_acc"] <= 1
    assert summary["torch_version"] == torch.__version__

    metrics = pd.read_csv(folder / "metrics.csv")
    assert list(metrics.columns) == list(METRIC_COLUMNS)
    assert set(metrics.run_id) == {outcome.run_id}
    assert set(metrics.epoch) == {1, 2}
    pairs = set(zip(metrics.split, metrics.metric, strict=True))
    assert pairs == {
        ("train", "loss"),
        ("train", "acc"),
        ("test", "loss"),
        ("test", "acc"),
        ("train", "lr"),
        ("train", "epoch_time_s"),
        ("train", "img_per_s"),
        ("val", "loss"),
        ("val", "acc"),
        # on the last epoch, for BatchNorm (normbench.inference)
        ("test", "acc_precise_bn"),
        ("test", "acc_batch_stats"),
    }
    at_best = metrics.query(
        f"epoch == {summary['best_val_epoch']} and split == 'test' and metric == 'acc'"
    ).value.item()
    assert at_best == pytest.approx(summary["test_acc_at_best_val"])
    final = metrics.query("epoch == 2 and split == 'test' and metric == 'acc'").value.item()
    assert final == pytest.approx(summary["final_test_acc"])

    from omegaconf import OmegaConf

    assert OmegaConf.load(folder / "config.yaml") == cfg


def test_a_completed_run_is_skipped(tiny):
    cfg = tiny()
    first = runner.run(cfg)
    stamp = (first.run_dir / "summary.json").stat().st_mtime_ns
    again = runner.run(cfg)
    assert again.skipped and again.summary == first.summary
    assert (first.run_dir / "summary.json").stat().st_mtime_ns == stamp
    forced = runner.run(cfg, force=True)
    assert not forced.skipped


def test_run_id_is_a_stable_hash_of_what_the_run_computes(tiny, tmp_path):
    a = tiny("seed=1")
    assert runner.run_id(a) == runner.run_id(tiny("seed=1"))
    assert runner.run_id(a) != runner.run_id(tiny("seed=2"))
    assert runner.run_id(a) != runner.run_id(tiny("seed=1", "norm=layer"))
    # Where and how it runs does not change what it computes.
    moved = tiny("seed=1", f"out_dir={tmp_path}/elsewhere", "name=other", "threads=2", "device=cpu")
    assert runner.run_id(a) == runner.run_id(moved)
    assert len(runner.run_id(a)) == 12


def test_same_config_gives_identical_metrics(tiny, tmp_path):
    timing = ["epoch_time_s", "img_per_s"]

    def metrics(out):
        outcome = runner.run(tiny(f"out_dir={tmp_path / out}", "epochs=2"))
        frame = pd.read_csv(outcome.run_dir / "metrics.csv")
        return frame[~frame.metric.isin(timing)].reset_index(drop=True)

    pd.testing.assert_frame_equal(metrics("a"), metrics("b"))


def test_bn_stats_has_one_row_per_layer_and_epoch_and_changes_no_result(tiny, tmp_path):
    timing = ["epoch_time_s", "img_per_s"]
    on = runner.run(tiny("epochs=2", f"out_dir={tmp_path / 'on'}"))
    off = runner.run(tiny("epochs=2", "eval.bn_stats=false", f"out_dir={tmp_path / 'off'}"))
    assert on.run_id == off.run_id  # an execution key: the same run
    table = pd.read_csv(on.run_dir / "bn_stats.csv", dtype={"layer": str})
    assert list(table.columns) == list(BN_STATS_COLUMNS)
    assert set(table.run_id) == {on.run_id}
    # small_cnn's three BatchNorm layers, in the model's order, each epoch
    assert list(zip(table.epoch, table.layer, strict=True)) == [
        (e, layer) for e in (1, 2) for layer in ("1", "5", "9")
    ]
    assert (table.channels.tolist(), set(table.batches)) == ([32, 64, 128] * 2, {2})
    assert table.drop(columns=["run_id", "layer"]).notna().all().all()
    assert on.summary["bn_stats_time_s"] > 0
    # eval.bn_stats=false: no file, nothing measured, the same training bit for bit
    assert not (off.run_dir / "bn_stats.csv").exists()
    assert off.summary["bn_stats_time_s"] is None
    metrics = [pd.read_csv(o.run_dir / "metrics.csv") for o in (on, off)]
    a, b = (m[~m.metric.isin(timing)].reset_index(drop=True) for m in metrics)
    pd.testing.assert_frame_equal(a, b)
    # a norm without running statistics: none either
    layer = runner.run(tiny("norm=layer", f"out_dir={tmp_path / 'on'}"))
    assert not (layer.run_dir / "bn_stats.csv").exists()
    assert layer.summary["bn_stats_time_s"] is None


def test_a_diverged_run_is_recorded_not_raised(tiny):
    outcome = runner.run(tiny("lr=1e12", "epochs=3", "schedule.name=constant"))
    summary = outcome.summary
    assert summary["status"] == "diverged"
    assert "loss became" in summary["error"]
    assert summary["steps"] < 3 * (256 // 64)
    on_disk = json.loads((outcome.run_dir / "summary.json").read_text())
    assert on_disk["status"] == "diverged"


def test_a_run_that_raises_is_recorded_as_failed(tiny, monkeypatch):
    import normbench.train

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(normbench.train, "train", broken)
    cfg = tiny()
    with pytest.raises(RuntimeError, match="boom"):
        runner.run(cfg)
    summary = json.loads((runner.run_dir(cfg) / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom"


def test_an_interrupted_run_is_recorded_as_such_and_redone(tiny):
    class Interrupt:
        def on_start(self, total, epochs):
            pass

        def on_step(self, step, epoch, loss, img_per_s):
            if epoch == 2:
                raise KeyboardInterrupt

        def on_epoch(self, record):
            pass

    cfg = tiny("epochs=3")
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, display=Interrupt())
    folder = runner.run_dir(cfg)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["error"] == "interrupted by SIGINT (Ctrl-C)"
    assert not list(folder.glob(".*tmp")) and not (folder / ".lock").exists()
    # The epoch that finished is on disk; rerunning completes the run.
    assert set(pd.read_csv(folder / "metrics.csv").epoch) == {1}
    outcome = runner.run(cfg)
    assert not outcome.skipped and outcome.summary["status"] == "completed"


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=257", "larger than the training set"),
        ("norm=group norm.groups=0", "norm.groups must be an integer >= 1"),
        ("norm.not_an_arg=1", "unknown config key"),
        ("optim.momentum=0", "invalid optim"),  # nesterov needs momentum
        ("model=mlp batch_size=1", "Expected more than 1 value per channel"),
        ("norm.eps=0", "norm.eps must be"),
        ("norm.momentum=1.5", "norm.momentum must be"),
    ],
)
def test_bad_input_writes_nothing(tiny, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        runner.run(tiny(*override.split()))
    assert not (tmp_path / "results").exists()


def test_threads_are_applied_and_recorded(tiny):
    before = torch.get_num_threads()
    try:
        summary = runner.run(tiny("threads=1")).summary
        assert torch.get_num_threads() == 1
        assert (summary["threads"], summary["threads_from"]) == (1, "threads=")
    finally:
        torch.set_num_threads(before)


def test_rank_0_measures_alone_on_the_runs_threads_and_a_processs_batch(monkeypatch, tmp_path):
    """A data-parallel run's rank 0 takes the end-of-run measures alone, once the others
    have finished: on the run's threads (``alone_threads``), not its share, then its own;
    in batches of what one process's layers normalized over, not the global batch."""
    from types import SimpleNamespace

    from normbench import inference
    from normbench.norms import NormSpec

    seen, batches = [], []

    def measure(model, data, batch_size, *args):
        seen.append(torch.get_num_threads())
        batches.append(batch_size)
        return {}

    monkeypatch.setattr(inference, "measure", measure)
    cfg = SimpleNamespace(batch_size=8, eval_batch_size=8, seed=0, processes=2, nodes=1,
                          eval=SimpleNamespace(precise_bn_images=64))  # fmt: skip
    prepared = SimpleNamespace(model=None, data=None, norm=NormSpec("custom_bn", {}))
    result, recorder = SimpleNamespace(records=[{}]), SimpleNamespace(path=tmp_path / "m.csv")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runner._measure_inference(cfg, prepared, result, recorder, 2)
        assert seen == [2] and torch.get_num_threads() == 1
        runner._measure_inference(cfg, prepared, result, recorder)  # a one-process run's
        assert seen == [2, 1] and torch.get_num_threads() == 1
        # each of the 2 processes' layers normalized 4 images; a sync_bn group, all 8
        prepared.norm = NormSpec("sync_bn", {"group_size": None})
        runner._measure_inference(cfg, prepared, result, recorder)
        assert batches == [4, 4, 8]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "override, layout",
    [
        ("", "channels_last"),  # auto, on the CPU, with custom_bn
        ("norm=instance", "contiguous"),  # auto, with a variant slower on channels_last
        ("memory_format=contiguous", "contiguous"),
    ],
)
def test_memory_format_is_recorded_and_changes_no_result(tiny, override, layout):
    """The layout is how a run executes, not what it computes: recorded in the summary,
    left out of the run id, and the run's figures are those of the other layout up to
    float rounding."""
    summary = runner.run(tiny(*override.split())).summary
    assert summary["memory_format"] == layout
    other = "contiguous" if layout == "channels_last" else "channels_last"
    again = runner.run(tiny(*override.split(), f"memory_format={other}"), force=True).summary
    assert again["memory_format"] == other
    assert again["run_id"] == summary["run_id"]
    assert again["final_train_loss"] == pytest.approx(summary["final_train_loss"], rel=1e-4)
    assert again["final_test_loss"] == pytest.approx(summary["final_test_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "dataset, model, norm",
    [
        ("cifar10", "resnet20", "batch_renorm"),
        ("cifar100", "small_cnn", "group"),
        ("mnist", "mlp", "custom_bn"),
        ("fashion_mnist", "small_cnn", "instance"),
    ],
)
def test_runs_on_torchvision_data_sets(tiny, tmp_path, monkeypatch, dataset, model, norm):
    """The issue's example command, and the others, on fixture files read by torchvision."""
    root = tmp_path / "data"
    write_dataset(root, dataset, monkeypatch, n_train=24, n_test=8)
    cfg = tiny(
        f"norm={norm}",
        "batch_size=8",
        "lr=0.05",
        "epochs=3",
        f"model={model}",
        f"dataset={dataset}",
        "seed=1",
        f"dataset.root={root}",
        "dataset.train_size=null",
    )
    summary = runner.run(cfg).summary
    assert summary["status"] == "completed"
    assert (summary["dataset"], summary["model"], summary["norm"]) == (dataset, model, norm)
    assert summary["steps"] == 3 * ((24 - 2) // 8)  # 10% of 24 held out for validation


def test_a_lost_job_never_overwrites_a_finished_or_owned_run(tiny, monkeypatch):
    from normbench.lock import LOCK_NAME, RunLock

    cfg = tiny()
    done = runner.run(cfg).summary
    assert not runner.record_lost(cfg, "SLURM job 9: cancelled")
    assert json.loads((runner.run_dir(cfg) / "summary.json").read_text()) == done

    other = tiny("seed=1")
    folder = runner.run_dir(other)
    folder.mkdir(parents=True)
    with RunLock(folder):  # a live owner on this machine
        assert not runner.record_lost(other, "lost")
    # A lock held by a SLURM job the scheduler says is gone is taken over at once,
    # even from another machine with a fresh heartbeat.
    (folder / LOCK_NAME).write_text(
        json.dumps({"host": "node7", "boot_id": "b", "pid": 1, "slurm_job": "41_2", "token": "x"})
    )
    assert not runner.record_lost(other, "lost", slurm_job="41_3")
    assert runner.record_lost(other, "SLURM job 41_2: cancelled", slurm_job="41_2")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "SLURM job 41_2: cancelled"
    assert summary["run_id"] == runner.run_id(other) and summary["seed"] == 1
    assert list(summary)[: len(SUMMARY_FIELDS)] == list(SUMMARY_FIELDS)  # the same schema
    assert summary["final_test_acc"] is None and summary["threads"] is None
    assert not (folder / LOCK_NAME).exists()


def test_a_run_owned_elsewhere_is_refused_before_anything_loads(tiny):
    from normbench.lock import RunLock

    cfg = tiny()
    folder = runner.run_dir(cfg)
    folder.mkdir(parents=True)
    with RunLock(folder), pytest.raises(runner.RunInProgress, match="in progress elsewhere"):
        runner.run(cfg)
    assert sorted(p.name for p in folder.iterdir()) == []


@contextlib.contextmanager
def read_only(folder):
    """``folder`` read-only, its parent writable: by its mode for a user, by a read-only
    bind mount of it for root (whom modes do not stop)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield "Permission denied"
        finally:
            folder.chmod(0o755)
        return
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield "Read-only file system"
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def _tree(root):
    return sorted((str(p), p.stat().st_size if p.is_file() else 0) for p in root.rglob("*"))


@pytest.mark.parametrize("place", ["read-only", "a file"])
def test_a_run_folder_that_cannot_be_written_is_one_line_before_training(tmp_path, place):
    """An interrupted run's folder left read-only (or a file where it should be), under
    a writable experiment folder: exit 2, one line naming it, nothing written (before:
    an OSError traceback from the lock)."""
    from typer.testing import CliRunner

    from normbench.cli import app
    from normbench.config import compose

    args = [f"out_dir={tmp_path / 'results'}", "epochs=1", "dataset.train_size=128", "threads=1"]
    folder = runner.run_dir(compose(args))
    folder.parent.mkdir(parents=True)
    if place == "a file":
        folder.write_text("not a folder")
        context, expected = contextlib.nullcontext("Not a directory"), "Not a directory"
    else:
        folder.mkdir()
        (folder / "config.yaml").write_text("from an earlier session\n")
        context = read_only(folder)
    with context as expected:
        before = _tree(tmp_path)
        for command in (["run", *args], ["sweep", *args, "seed=0,1"]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 2, result.output
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and "Traceback" not in result.output, result.output
            assert f"cannot write {folder}: {expected}" in lines[0]
            assert _tree(tmp_path) == before


def _victim(root):
    """A folder of someone else's that a received link may point at."""
    (root / "checkpoint.pt").mkdir(parents=True)
    (root / "checkpoint.pt" / "data").write_text("x")
    (root / "metrics.csv").write_text("x")
    return root


@pytest.mark.parametrize("link", ["run folder", "runs folder", "folder in a file's place"])
def test_nothing_is_written_or_removed_through_a_link_or_in_a_folder(tmp_path, link):
    """A run folder or a runs/ folder that is a symbolic link (before: exit 0, the
    target's checkpoint.pt/ removed recursively, its metrics.csv replaced, config.yaml
    and summary.json written there), or a folder with files where a run file goes
    (before: removed recursively): `run` and `sweep` refuse in one line, exit 2,
    before anything is written; the lost-job records write nothing there either."""
    from typer.testing import CliRunner

    from normbench.cli import app
    from normbench.config import compose

    args = [f"out_dir={tmp_path / 'results'}", "epochs=1", "dataset.train_size=128", "threads=1"]
    cfg = compose(args)
    folder = runner.run_dir(cfg)
    victim = _victim(tmp_path / "victim")
    if link == "run folder":
        folder.parent.mkdir(parents=True)
        folder.symlink_to(victim)
        expected = f"{folder} is a symbolic link (to {victim})"
    elif link == "runs folder":
        folder.parent.parent.mkdir(parents=True)
        folder.parent.symlink_to(victim)
        expected = f"{folder.parent} is a symbolic link (to {victim})"
    else:
        folder.mkdir(parents=True)
        (folder / "checkpoint.pt").symlink_to(victim / "checkpoint.pt")  # a link: removed
        (folder / "summary.json").mkdir()
        (folder / "summary.json" / "notes").write_text("mine")
        expected = f"{folder / 'summary.json'} is a folder with something in it"
    before = _tree(tmp_path)
    for command in (["run", *args], ["sweep", *args, "seed=0,1"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert lines[0].startswith(f"error: {expected}"), lines[0]
        assert _tree(tmp_path) == before
    assert not runner.record_unfinished(cfg, "failed", "lost")
    assert not runner.record_lost(cfg, "lost", unstarted=True)
    assert _tree(tmp_path) == before


def test_an_empty_folder_in_a_run_files_place_is_removed_and_out_dir_may_be_a_link(tmp_path):
    """The line drawn: out_dir (and the experiment folder) may be links a user made, as
    results -> /scratch/results; an empty folder where a run file goes is removed (no
    recursion needed), and the run goes on."""
    (tmp_path / "scratch").mkdir()
    (tmp_path / "results").symlink_to(tmp_path / "scratch")
    from normbench.config import compose

    cfg = compose(
        [f"out_dir={tmp_path / 'results'}", "epochs=1", "dataset.train_size=128", "threads=1"]
    )
    folder = runner.run_dir(cfg)
    (folder / "metrics.csv").mkdir(parents=True)
    outcome = runner.run(cfg)
    assert outcome.summary["status"] == "completed"
    real = tmp_path / "scratch" / "default" / "runs" / outcome.run_id
    assert (real / "metrics.csv").is_file() and (real / "summary.json").is_file()


@pytest.mark.parametrize("record", ["unfinished", "lost"])
def test_a_job_recorded_before_its_run_began_is_recorded_under_the_plans_run_id(tmp_path, record):
    """A sweep job's config is Hydra's composition, which still holds the keys the plan's
    form drops (``eval.precise_bn_batches``): recorded before its run settled it (SLURM's
    time-limit signal in the job's first second), the run went into a twin folder under
    another id, and the plan's run stayed without a record."""
    import copy

    from normbench.config import _compose_groups, compose, with_searchpath

    # as Hydra hands it to a job (a copy: the composition is shared)
    composed = copy.deepcopy(_compose_groups((), with_searchpath([])).cfg)
    composed.out_dir = str(tmp_path)
    assert "precise_bn_batches" in composed.eval
    planned = runner.run_dir(compose([f"out_dir={tmp_path}"]))
    assert runner.run_dir(composed) != planned  # the keys the plan's form drops
    if record == "unfinished":
        assert runner.record_unfinished(composed, "interrupted", "stopped early")
    else:
        assert runner.record_lost(composed, "stopped early", unstarted=True)
    assert [p.parent for p in tmp_path.glob("*/runs/*/summary.json")] == [planned]
    summary = json.loads((planned / "summary.json").read_text())
    assert (summary["run_id"], summary["status"]) == (planned.name, "interrupted")
