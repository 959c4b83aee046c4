"""Tests for normbench.checkpoints and the runner's resume: a run interrupted after an
epoch goes on from there, and its metrics are those of a run never interrupted, bit for
bit on the CPU."""

from __future__ import annotations

import json

import pandas as pd
import pytest

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
