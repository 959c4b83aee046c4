"""Tests for normbench.checkpoints and the runner's resume: a run interrupted after an
epoch goes on from there, and its metrics are those of a run never interrupted, bit for
bit on the CPU."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from normbench import checkpoints, runner

TIMING = ["epoch_time_s", "img_per_s"]


class StopAt:
    """A display that interrupts the run during epoch ``epoch`` (as Ctrl-C would)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_start(self, total, epochs):
        pass

    def on_step(self, step, epoch, loss, img_per_s):
        if epoch == self.epoch:
            raise KeyboardInterrupt

    def on_epoch(self, record):
        pass


def metrics(outcome) -> pd.DataFrame:
    frame = pd.read_csv(outcome.run_dir / "metrics.csv")
    return frame[~frame.metric.isin(TIMING)].reset_index(drop=True)


@pytest.mark.parametrize("norm", ["custom_bn", "batch_renorm", "group"])
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny, tmp_path, norm):
    overrides = [f"norm={norm}", "epochs=5", "batch_size=32", "schedule.warmup_epochs=1"]
    cfg = tiny(*overrides, f"out_dir={tmp_path / 'stopped'}")
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, display=StopAt(4))
    folder = runner.run_dir(cfg)
    assert (folder / checkpoints.FILE).is_file()
    assert json.loads((folder / "summary.json").read_text())["status"] == "interrupted"

    resumed = runner.run(cfg)
    assert resumed.summary["resumed_from_epoch"] == 3
    assert not (folder / checkpoints.FILE).exists()  # deleted once complete
    straight = runner.run(tiny(*overrides, f"out_dir={tmp_path / 'straight'}"))
    assert straight.summary["resumed_from_epoch"] is None
    pd.testing.assert_frame_equal(metrics(resumed), metrics(straight))
    for key in ("final_test_acc", "test_acc_at_best_val", "steps", "test_acc_precise_bn"):
        assert resumed.summary[key] == straight.summary[key], key
    if norm != "group":  # the diagnostics' rows of epochs 1-3 kept, those of 4-5 added
        bn_stats = [pd.read_csv(o.run_dir / "bn_stats.csv") for o in (resumed, straight)]
        pd.testing.assert_frame_equal(*bn_stats)
        assert sorted(set(bn_stats[0].epoch)) == [1, 2, 3, 4, 5]


class SignalAtEpochEnd(StopAt):
    """A display that sends this process SIGINT (a real Ctrl-C) as epoch ``epoch`` is
    recorded: after its metrics, before its checkpoint."""

    def on_step(self, step, epoch, loss, img_per_s):
        pass

    def on_epoch(self, record):
        if record["epoch"] == self.epoch:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


def test_a_stop_between_an_epochs_metrics_and_its_checkpoint_waits_for_the_checkpoint(tiny):
    """Ctrl-C as an epoch is recorded stops the run once that epoch's checkpoint is
    written: the interrupted summary's steps and metrics are the checkpoint's, and the
    resume goes on after that epoch. (It stopped in between: the summary counted the
    epoch, the checkpoint held the one before, and the resume trained the epoch again.)"""
    cfg = tiny("epochs=4", "batch_size=32")
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, display=SignalAtEpochEnd(2))
    folder = runner.run_dir(cfg)
    summary = json.loads((folder / "summary.json").read_text())
    state = checkpoints.unpack((folder / checkpoints.FILE).read_bytes(), runner.run_id(cfg))
    assert summary["status"] == "interrupted" and state["loop"]["epoch"] == 2
    assert summary["steps"] == state["loop"]["steps"] > 0
    assert sorted(set(pd.read_csv(folder / "metrics.csv").epoch)) == [1, 2]
    assert runner.run(cfg).summary["resumed_from_epoch"] == 2


def test_a_run_without_a_validation_split_resumes_too(tiny, capsys):
    """Its records lack val_loss and val_acc: exactly the fields the loop writes then."""
    cfg = tiny("epochs=3", "dataset.val_size=0")
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, display=StopAt(2))
    assert runner.run(cfg).summary["resumed_from_epoch"] == 1
    assert "warning" not in capsys.readouterr().err


def test_without_checkpoints_a_stopped_run_starts_over(tiny):
    cfg = tiny("epochs=4", "checkpoint.save=none")
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, display=StopAt(3))
    assert not (runner.run_dir(cfg) / checkpoints.FILE).exists()
    assert runner.run(cfg).summary["resumed_from_epoch"] is None


def test_keep_leaves_the_last_checkpoint_of_a_completed_run(tiny):
    outcome = runner.run(tiny("epochs=2", "checkpoint.keep=true"))
    state = checkpoints.unpack((outcome.run_dir / checkpoints.FILE).read_bytes(), outcome.run_id)
    assert state is not None and state["loop"]["epoch"] == 2


def test_a_failed_run_or_a_damaged_checkpoint_starts_over(tiny, monkeypatch):
    import normbench.train

    cfg = tiny("epochs=4")
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, display=StopAt(3))
    path = runner.run_dir(cfg) / checkpoints.FILE
    path.write_bytes(b"\x00 not a checkpoint")
    assert checkpoints.unpack(path.read_bytes(), runner.run_id(cfg)) is None
    assert runner.run(cfg).summary["resumed_from_epoch"] is None

    failing = tiny("epochs=4", "seed=1")
    with pytest.raises(KeyboardInterrupt):
        runner.run(failing, display=StopAt(3))
    real = normbench.train.train

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(normbench.train, "train", broken)
    with pytest.raises(RuntimeError):
        runner.run(failing)
    assert not (runner.run_dir(failing) / checkpoints.FILE).exists()  # a failure starts over
    monkeypatch.setattr(normbench.train, "train", real)
    assert runner.run(failing).summary["resumed_from_epoch"] is None


def test_a_checkpoint_of_another_run_is_not_taken():
    import torch

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = checkpoints.pack("aaaa", model, optimizer, {"epoch": 1})
    assert checkpoints.unpack(data, "aaaa")["loop"] == {"epoch": 1}
    assert checkpoints.unpack(data, "bbbb") is None


# ------------------------------------------------- checkpoints the running code cannot use


def _drop_key(state):
    del state["model"]["0.weight"]


def _resize(state):
    weight = state["model"]["0.weight"]
    state["model"]["0.weight"] = weight[:-1].clone()


def _extra_key(state):
    state["model"]["99.weight"] = torch.zeros(3)


def _momentum(state):
    first = next(iter(state["optimizer"]["state"].values()))
    first["momentum_buffer"] = torch.zeros(7)


def _optimizer_groups(state):
    state["optimizer"]["param_groups"].append(dict(state["optimizer"]["param_groups"][0]))


def _optimizer_setting(state):
    state["optimizer"]["param_groups"][0]["momentum"] = "fast"


def _rng(state):
    state["torch_rng"] = state["torch_rng"][:100].clone()


def _generator(state):
    state["loop"]["generator"] = torch.zeros(4, dtype=torch.uint8)


def _records(state):
    state["loop"]["records"] = state["loop"]["records"][:-1]


def _record_value(state):
    state["loop"]["records"][0]["test_acc"] = 5.0


def _scheduler(state):
    state["loop"]["scheduler"] = {"last_epoch": "x"}


def _epoch(state):
    state["loop"]["epoch"] = 99


# Damage torch itself finds only when the state is set (before: a traceback after the
# model was restored, exit 1, the checkpoint kept and every rerun failing the same way),
# or that a load accepts and that fails later (recorded failed) or trains silently.


def _rng_zeros(state):
    state["torch_rng"] = torch.zeros_like(state["torch_rng"])


def _generator_zeros(state):
    state["loop"]["generator"] = torch.zeros_like(state["loop"]["generator"])


def _step_count(state):
    state["loop"]["scheduler"]["_step_count"] = "x"


def _scheduler_extra(state):
    state["loop"]["scheduler"]["optimizer"] = {}


def _record_bare(state):
    state["loop"]["records"][0] = {"epoch": 1}


def _record_extra(state):
    state["loop"]["records"][1]["test_acc_extra"] = 0.5


def _record_negative_loss(state):
    state["loop"]["records"][0]["train_loss"] = -1.0


def _version(state):
    state["version"] = 0


def _scaler(state):
    scaler = {"scale": float("nan"), "growth_factor": 2.0, "backoff_factor": 0.5}
    state["loop"]["scaler"] = {**scaler, "growth_interval": 2000, "_growth_tracker": 0}


CORRUPTIONS = {
    "a model key missing": (_drop_key, "lacks 0.weight"),
    "a model tensor resized": (_resize, "0.weight has shape [31, 1, 3, 3], the model"),
    "a model key too many": (_extra_key, "keys the model lacks: '99.weight'"),
    "a momentum of the wrong shape": (_momentum, "momentum_buffer has shape [7]"),
    "another number of parameter groups": (_optimizer_groups, "torch cannot load it"),
    "an optimizer setting of the wrong kind": (_optimizer_setting, "momentum in group 0"),
    "a random state cut short": (_rng, "torch random state"),
    "a batch generator's state cut short": (_generator, "batch order's random state"),
    "a record missing": (_records, "records are not one per epoch"),
    "an accuracy out of range": (_record_value, "test_acc 5.0"),
    "a schedule of the wrong kind": (_scheduler, "learning-rate schedule"),
    "an epoch past the run's": (_epoch, "epoch 99"),
    "another format version": (_version, "format version 0"),
    "a gradient scaler's scale that is not a number": (_scaler, "gradient scaler's scale is nan"),
    "an invalid torch random state": (
        _rng_zeros,
        "torch random state is not valid: Invalid mt19937",
    ),
    "an invalid batch generator state": (
        _generator_zeros,
        "batch order's random state is not valid",
    ),
    "a schedule step count that is text": (_step_count, "schedule's _step_count is 'x'"),
    "a schedule key LambdaLR lacks": (_scheduler_extra, "schedule's state has 'optimizer'"),
    "a record without its fields": (_record_bare, "record of epoch 1 lacks epoch_time_s"),
    "a record with a field too many": (_record_extra, "record of epoch 2 has 'test_acc_extra'"),
    "a negative loss": (_record_negative_loss, "record of epoch 1 has train_loss -1.0"),
}

ARGS = ["epochs=3", "batch_size=64", "dataset.train_size=256", "threads=1"]


@pytest.fixture(scope="module")
def stopped_and_straight(tmp_path_factory):
    """A real run stopped during its third epoch (its checkpoint after the second), and
    the metrics of the same run never stopped."""
    from normbench.config import compose

    root = tmp_path_factory.mktemp("stopped")
    cfg = compose([*ARGS, f"out_dir={root / 'stopped'}"])
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, display=StopAt(3))
    straight = runner.run(compose([*ARGS, f"out_dir={root / 'straight'}"]))
    return runner.experiment_dir(cfg), metrics(straight)


def _run_cli(out_dir):
    from typer.testing import CliRunner

    from normbench.cli import app

    return CliRunner().invoke(app, ["run", *ARGS, f"out_dir={out_dir}"])


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_checkpoint_the_code_cannot_use_is_discarded_with_one_warning(
    stopped_and_straight, tmp_path, case
):
    """A whole checkpoint of this run that does not fit the code (a model changed since,
    a damaged state): one warning naming the run and why, the file gone, and the run
    trained from the start exactly as a run never stopped, so nothing of the refused
    state trained."""
    import shutil

    stopped, straight = stopped_and_straight
    exp = shutil.copytree(stopped, tmp_path / "results" / "default")
    (folder,) = (exp / "runs").iterdir()
    path = folder / checkpoints.FILE
    state = torch.load(path, weights_only=True)
    assert state["loop"]["epoch"] == 2
    corrupt, why = CORRUPTIONS[case]
    corrupt(state)
    torch.save(state, path)

    result = _run_cli(tmp_path / "results")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert f"run {folder.name}: its checkpoint cannot be resumed" in warnings[0]
    assert why in warnings[0] and "training from the first epoch" in warnings[0]
    assert "Traceback" not in result.output
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_epoch"] is None
    assert not path.exists()
    pd.testing.assert_frame_equal(metrics(runner.RunOutcome("", folder, {})), straight)


@pytest.mark.parametrize(
    "damage, why",
    [
        (b"", "not a checkpoint torch can read"),
        (b"\x00 not a checkpoint", "not a checkpoint torch can read"),
        ("cut", "not a checkpoint torch can read"),
        ("pipe", "a named pipe, not a file"),
        ("zero", "a device, not a file"),
        ("large", "1 GiB, more than the 65.4 MiB such a file may be"),
    ],
    ids=["empty", "garbage", "truncated", "pipe", "dev-zero", "too-large"],
)
def test_a_damaged_checkpoint_file_is_discarded_with_one_warning(
    stopped_and_straight, tmp_path, damage, why
):
    """Cut short or garbage; a pipe (before: `run` hung), a link to /dev/zero (read until
    memory ran out), a file larger than this model's checkpoint can be (sparse here)."""
    import os
    import shutil

    from hostile import deadline

    stopped, straight = stopped_and_straight
    exp = shutil.copytree(stopped, tmp_path / "results" / "default")
    (folder,) = (exp / "runs").iterdir()
    path = folder / checkpoints.FILE
    if damage in ("pipe", "zero"):
        path.unlink()
        os.mkfifo(path) if damage == "pipe" else path.symlink_to("/dev/zero")
    elif damage == "large":
        with open(path, "r+b") as handle:
            handle.truncate(1 << 30)
    else:
        path.write_bytes(path.read_bytes()[:5000] if damage == "cut" else damage)
    with deadline(60):
        result = _run_cli(tmp_path / "results")
    assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert why in warning, warning
    assert not path.exists() and not path.is_symlink()
    assert os.path.exists("/dev/zero")  # the link went, not what it points to
    assert json.loads((folder / "summary.json").read_text())["resumed_from_epoch"] is None
    pd.testing.assert_frame_equal(metrics(runner.RunOutcome("", folder, {})), straight)


def test_an_intact_checkpoint_still_resumes_without_a_warning(stopped_and_straight, tmp_path):
    import shutil

    stopped, straight = stopped_and_straight
    exp = shutil.copytree(stopped, tmp_path / "results" / "default")
    (folder,) = (exp / "runs").iterdir()
    result = _run_cli(tmp_path / "results")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    assert json.loads((folder / "summary.json").read_text())["resumed_from_epoch"] == 2
    pd.testing.assert_frame_equal(metrics(runner.RunOutcome("", folder, {})), straight)
