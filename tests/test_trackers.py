"""Tests for normbench.trackers: what a run logs to TensorBoard, MLflow and W&B, read back
with each tool's own reader (TensorBoard's event accumulator, MLflow's client on the local
store, W&B's offline run file with its own protocol buffers), against the run folder's
metrics.csv and summary.json; resumed runs, sweeps and trackers that fail."""

import json
import struct
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from normbench import runner
from normbench.cli import app
from normbench.rundir import TRACKERS_FILE
from normbench.trackers import FIGURES_RUN, log_figures

pytest.importorskip("mlflow")
pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


def folder_metrics(run_dir: Path) -> dict[tuple[int, str], float]:
    """metrics.csv as {(epoch, "split/metric"): value}."""
    frame = pd.read_csv(run_dir / "metrics.csv")
    return {(int(r.epoch), f"{r.split}/{r.metric}"): float(r.value) for r in frame.itertuples()}


def interrupted_then_resumed(cfg):
    """Run ``cfg`` (3 epochs), stopped (Ctrl-C) in its second epoch, then resume it."""

    class Interrupt:
        def on_start(self, total, epochs):
            pass

        def on_step(self, step, epoch, loss, img_per_s):
            if epoch == 2:
                raise KeyboardInterrupt

        def on_epoch(self, record):
            pass

    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, display=Interrupt())
    ids = runner.run_dir(cfg) / TRACKERS_FILE
    first = json.loads(ids.read_text()) if ids.exists() else {}
    outcome = runner.run(cfg)
    assert outcome.summary["resumed_from_epoch"] == 1
    return outcome, first


# ------------------------------------------------------------------------------ config


def test_trackers_never_change_the_run_id(tiny):
    plain = runner.run_id(tiny())
    for picked in (
        ["logger=none"],
        ["logger=[]"],
        ["logger=mlflow", "logger.mlflow.tracking_uri=sqlite:///x.db"],
        ["logger=[tensorboard,mlflow,wandb]", "logger.wandb.mode=disabled"],
    ):
        assert runner.run_id(tiny(*picked)) == plain, picked


def test_a_list_is_for_the_logger_group_only(tiny):
    from normbench.errors import UserError

    with pytest.raises(UserError, match="model takes one option"):
        tiny("model=[mlp,resnet20]")
    with pytest.raises(UserError, match="unknown logger 'tb'"):
        tiny("logger=[tensorboard,tb]")
    with pytest.raises(UserError, match="logger.wandb.mode must be one of"):
        tiny("logger=wandb", "logger.wandb.mode=on")


# ------------------------------------------------------------------- each tool's reader


def test_tensorboard_logs_each_epoch_and_the_summary_and_resumes_in_place(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny("epochs=3", "logger=tensorboard")
    outcome, _ = interrupted_then_resumed(cfg)
    logdir = tmp_path / "results" / "default" / "tensorboard" / outcome.run_id
    events = EventAccumulator(str(logdir))
    events.Reload()
    logged = {
        (e.step, tag): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)
    }
    expected = folder_metrics(outcome.run_dir)
    assert {k: v for k, v in logged.items() if not k[1].startswith("summary/")} == pytest.approx(
        expected
    )
    # one value per epoch, the interrupted attempt's second epoch purged
    assert [e.step for e in events.Scalars("test/acc")] == [1, 2, 3]
    assert logged[(3, "summary/final_test_acc")] == pytest.approx(outcome.summary["final_test_acc"])


def test_mlflow_logs_params_metrics_and_summary_and_a_resumed_run_goes_on(tiny, tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny("epochs=3", "logger=mlflow", f"logger.mlflow.tracking_uri={store}", "name=study")
    outcome, first = interrupted_then_resumed(cfg)
    runs = search_runs(store, "study")
    assert len(runs) == 1 and runs.run_id[0] == first["mlflow"]
    run = runs.iloc[0]
    assert run.status == "FINISHED" and run["tags.mlflow.runName"] == outcome.run_id
    assert run["params.norm.name"] == "custom_bn" and run["params.batch_size"] == "64"
    assert run["metrics.summary/final_test_acc"] == pytest.approx(outcome.summary["final_test_acc"])
    client = MlflowClient(tracking_uri=store)
    expected = folder_metrics(outcome.run_dir)
    for name in {metric for _, metric in expected}:
        history = client.get_metric_history(first["mlflow"], name)
        assert {(m.step, name): m.value for m in history} == pytest.approx(
            {k: v for k, v in expected.items() if k[1] == name}
        ), name


def search_runs(store: str, experiment: str) -> pd.DataFrame:
    """``mlflow.search_runs`` of one experiment in the store (the tracking URI is global)."""
    import mlflow

    mlflow.set_tracking_uri(store)
    try:
        return mlflow.search_runs(experiment_names=[experiment])
    finally:
        mlflow.set_tracking_uri(None)


def wandb_records(run_file: Path, wait_s: float = 60.0):
    """:func:`read_wandb_records` once the file holds the run's ``exit`` record: wandb's
    service writes the offline file on after ``finish()`` returns (seconds, on a busy
    machine)."""
    deadline = time.monotonic() + wait_s
    while True:
        records = list(read_wandb_records(run_file))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{run_file}: no exit record after {wait_s} s"
        time.sleep(0.1)


def read_wandb_records(run_file: Path):
    """The records of a W&B run file (run-<id>.wandb), as wandb's own protocol buffers:
    LevelDB's log format (32 KiB blocks of checksummed, typed chunks) after W&B's 7-byte
    header, which wandb 0.31 ships no Python reader for."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, at, chunks = 32768, 7, b""
    while at + 7 <= len(data):
        if block - at % block < 7:  # a block's tail too short for a header: padding
            at += block - at % block
            continue
        _, length, kind = struct.unpack("<IHB", data[at : at + 7])
        if kind == 0 and length == 0:
            break
        chunks += data[at + 7 : at + 7 + length]
        at += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_wandb_logs_offline_and_a_resumed_run_keeps_its_id(tiny, tmp_path):
    cfg = tiny("epochs=3", "logger=[wandb,tensorboard]", "name=study")
    hooks = sys.exit, sys.excepthook
    outcome, first = interrupted_then_resumed(cfg)
    assert (sys.exit, sys.excepthook) == hooks  # wandb's own are not left in the process
    files = sorted((tmp_path / "results" / "study" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{first['wandb']}.wandb"] * 2  # one id, 2 attempts
    history, config, summary = {}, {}, {}
    for record in (r for f in files for r in wandb_records(f)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            assert record.run.run_group == "study" and record.run.display_name == outcome.run_id
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            history.update({(row["_step"], k): v for k, v in row.items() if "/" in k})
        elif kind == "summary":
            summary.update(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.summary.update
                }
            )
    assert config["norm.name"] == "custom_bn" and config["batch_size"] == 64
    assert history == pytest.approx(folder_metrics(outcome.run_dir))
    assert summary["summary/final_test_acc"] == pytest.approx(outcome.summary["final_test_acc"])


# -------------------------------------------------------------------------------- sweeps


def test_a_sweep_logs_each_run_once_in_its_experiment(tmp_path):
    # Two joblib workers open the new store at once: its creation must not race.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "sweep",
        f"out_dir={tmp_path / 'results'}",
        "name=grid",
        "epochs=1",
        "dataset.train_size=128",
        "dataset.test_size=64",
        "threads=1",
        "batch_size=16,32",
        "logger=mlflow",
        f"logger.mlflow.tracking_uri={store}",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    ]
    cli = CliRunner()
    for _ in range(2):  # the second: both runs skipped, nothing logged again
        result = cli.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "warning: logger" not in result.output

    runs = search_runs(store, "grid")
    figures = runs["tags.mlflow.runName"] == FIGURES_RUN
    assert figures.sum() == 1  # the sweep's figures: one run, the second sweep drew none
    runs = runs[~figures]
    assert sorted(runs["params.batch_size"]) == ["16", "32"]
    assert set(runs.status) == {"FINISHED"}
    drawn = sorted(p.name for p in (tmp_path / "results" / "grid" / "plots").glob("*.png"))
    assert drawn  # what the sweep drew is what MLflow holds
    from mlflow.tracking import MlflowClient

    held = MlflowClient(store).list_artifacts(runs_id_of(store, "grid"), "plots")
    assert sorted(Path(a.path).name for a in held) == drawn


def runs_id_of(store: str, experiment: str) -> str:
    runs = search_runs(store, experiment)
    return runs.run_id[runs["tags.mlflow.runName"] == FIGURES_RUN].item()


def test_figures_go_to_one_run_per_experiment_at_the_runs_they_show(tmp_path):
    """log_figures, as a sweep's end calls it: TensorBoard's images at the step of the
    runs they show, a later sweep's in the same folder; W&B's in one run whose id the
    experiment folder keeps, its images in the offline run's media."""
    from matplotlib import pyplot as plt
    from omegaconf import OmegaConf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    experiment = tmp_path / "results" / "grid"
    (experiment / "plots").mkdir(parents=True)
    figure = experiment / "plots" / "error_vs_batch_size.png"
    plt.imsave(figure, [[0.0, 1.0], [1.0, 0.0]])  # 2 x 2 pixels
    node = OmegaConf.create(
        {
            "tensorboard": {"dir": str(experiment / "tensorboard")},
            "wandb": {"mode": "offline", "project": "normbench", "dir": str(experiment)},
        }
    )
    log_figures(node, experiment, [figure], 2)
    log_figures(node, experiment, [figure], 4)  # a later sweep with more runs

    events = EventAccumulator(str(experiment / "tensorboard" / FIGURES_RUN))
    events.Reload()
    images = events.Images("plots/error_vs_batch_size")
    assert [(i.step, i.width, i.height) for i in images] == [(2, 2, 2), (4, 2, 2)]
    kept = json.loads((experiment / TRACKERS_FILE).read_text())
    files = sorted(experiment.glob(f"wandb/offline-run-*/run-{kept['wandb']}.wandb"))
    assert len(files) == 2  # one W&B run, logged into twice
    steps = []
    for file in files:
        for record in wandb_records(file):
            if record.WhichOneof("record_type") != "history":
                continue
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            if row.get("plots/error_vs_batch_size/_type") == "image-file":
                steps.append(row["_step"])
                image = file.parent / "files" / row["plots/error_vs_batch_size/path"]
                assert plt.imread(image).shape[:2] == (2, 2)
    assert sorted(steps) == [2, 4], (steps, [str(f) for f in files])


# ------------------------------------------------------------------------------ failures


def test_a_tracker_that_fails_warns_once_and_the_run_completes(tiny, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the event folder would go")
    cfg = tiny(
        "epochs=2",
        "logger=[tensorboard,mlflow]",
        f"logger.tensorboard.dir={blocked}",
        "logger.mlflow.tracking_uri=nosuchscheme://nowhere",
    )
    outcome = runner.run(cfg)
    assert outcome.summary["status"] == "completed"
    lines = capsys.readouterr().err.splitlines()
    warned = [line for line in lines if line.startswith("warning: logger")]
    assert len(warned) == 2, lines
    assert warned[0].startswith("warning: logger tensorboard failed to start: ")
    assert warned[1].startswith("warning: logger mlflow failed to start: ")
    assert not (outcome.run_dir / TRACKERS_FILE).exists()


def test_a_missing_package_warns_once(tiny, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import fails
    outcome = runner.run(tiny("logger=wandb"))
    assert outcome.summary["status"] == "completed"
    err = capsys.readouterr().err
    assert err.count("warning: logger") == 1
    assert 'wandb is not installed (pip install "normbench[wandb]")' in err


def test_no_tracker_imports_nothing(tiny):
    import subprocess
    import sys

    code = (
        "import sys; from normbench.config import compose; from normbench import trackers;"
        "trackers.open_trackers(compose([]), 'x', __import__('pathlib').Path('.'), None);"
        "print([m for m in ('mlflow', 'wandb', 'tensorboard') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
