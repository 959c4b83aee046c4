"""Tests for normbench.sweep and `normbench sweep`: grids, validation, resume, failures,
launchers. Every sweep here trains on digits with tiny settings."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normbench import sweep
from normbench.cli import app
from normbench.errors import UserError
from normbench.rundir import read_summary
from normbench.views.progress import SweepProgress

cli = CliRunner()

TINY = ["epochs=1", "dataset.train_size=128", "dataset.test_size=64", "threads=1"]


def tiny_args(tmp_path: Path, *overrides: str) -> list[str]:
    return [f"out_dir={tmp_path / 'results'}", *TINY, *overrides]


def summaries(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("runs/*/summary.json")}


# ------------------------------------------------------------------------------ the grid


def test_the_grid_is_the_product_of_the_sweeps_in_hydra_order():
    jobs = sweep.expand(["norm=custom_bn,layer", "batch_size=2,8", "seed=1"])
    assert jobs == [
        ["norm=custom_bn", "batch_size=2", "seed=1"],
        ["norm=custom_bn", "batch_size=8", "seed=1"],
        ["norm=layer", "batch_size=2", "seed=1"],
        ["norm=layer", "batch_size=8", "seed=1"],
    ]
    assert sweep.expand(["seed=range(3)"]) == [["seed=0"], ["seed=1"], ["seed=2"]]


def test_presets_define_their_grids_and_the_command_line_wins():
    quick = sweep.expand(["experiment=quick"])
    assert len(quick) == 6 * 3
    assert {j[0] for j in quick} == {
        f"norm={n}" for n in ("custom_bn", "torch_bn", "layer", "instance", "group", "batch_renorm")
    }
    study = sweep.expand(["experiment=batch_size_study"])
    assert len(study) == 5 * 6 * 3
    narrowed = sweep.expand(["experiment=quick", "norm=layer"])
    assert len(narrowed) == 3 and all("norm=layer" in job for job in narrowed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["norm=custom_bn,bogus"], "unknown norm 'bogus'"),
        (["batch_size=8,0"], "batch_size must be"),
        (["lr=0.1,-1"], "lr must be"),
        (["batch_size=16,100000"], "larger than the training set"),
        (["nope=1,2"], "unknown config key 'nope'"),
        (["hydra/launcher=nonexistent"], "launcher"),
        (
            ["hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=1"],
            "signal_delay_s=120 is not below the time limit",
        ),
        # a key of some of the swept options only: every job gets the same settings
        (
            ["norm=layer,custom_bn", "+norm.momentum=0.1"],
            r"^\+norm.momentum=0.1: norm=layer of this sweep has no momentum \(custom_bn has "
            r"it\); every job of a sweep gets the same settings: sweep norm=custom_bn "
            r"norm.momentum=0.1 on its own$",
        ),
        (["norm=group,instance,ghost_bn", "norm.groups=4"], "norm=instance,ghost_bn of this"),
        # a data-parallel sweep on SLURM: a task per process, the same for every job
        (
            ["hydra/launcher=submitit_slurm", "processes=1,2", "batch_size=16"],
            "^processes=1 nodes=1 and processes=2 nodes=1 in one SLURM sweep: each job",
        ),
        (
            ["hydra/launcher=submitit_slurm", "processes=2", "hydra.launcher.tasks_per_node=4"],
            "^hydra.launcher.tasks_per_node=4 conflicts with processes=2 nodes=1: ",
        ),
        (  # 1, the launcher's default, set by the user
            ["hydra/launcher=submitit_slurm", "processes=2", "hydra.launcher.tasks_per_node=1"],
            "^hydra.launcher.tasks_per_node=1 conflicts with processes=2",
        ),
        (
            ["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2"],
            "^hydra.launcher.nodes=2 conflicts with processes=1 nodes=1",
        ),
        (["nodes=2"], "^nodes=2: a run on several nodes starts only on SLURM"),
        (["hydra/launcher=joblib", "nodes=1,2"], "^nodes=2: a run on several nodes starts"),
        # null without a preset that sweeps
        (["hydra.sweeper.params.norm=zzz"], "hydra.sweeper.params is null here"),
    ],
)
def test_a_bad_job_anywhere_fails_the_whole_sweep_before_training(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        sweep.plan(tiny_args(tmp_path, *overrides))
    assert not (tmp_path / "results").exists()


def test_cli_bad_sweep_exits_2_with_one_line(tmp_path):
    result = cli.invoke(app, ["sweep", *tiny_args(tmp_path, "norm=layer,bogus")])
    assert result.exit_code == 2
    assert "unknown norm 'bogus'" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------ running


def test_sweep_runs_resumes_and_reports(tmp_path):
    args = ["sweep", *tiny_args(tmp_path, "norm=custom_bn,layer", "batch_size=16,32")]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    experiment = tmp_path / "results" / "default"
    runs = summaries(experiment)
    assert len(runs) == 4 and {s["status"] for s in runs.values()} == {"completed"}
    assert {(s["norm"], s["batch_size"]) for s in runs.values()} == {
        ("custom_bn", 16),
        ("custom_bn", 32),
        ("layer", 16),
        ("layer", 32),
    }
    for table in ("runs.csv", "runs.parquet", "metrics.csv", "summary.csv"):
        assert (experiment / table).is_file(), table
    assert list(experiment.glob("plots/*.png"))
    assert "4 completed" in result.stdout

    stamps = {rid: (experiment / "runs" / rid / "summary.json").stat().st_mtime_ns for rid in runs}
    again = cli.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "4 skipped" in again.stdout and "0 completed" in again.stdout
    assert stamps == {
        rid: (experiment / "runs" / rid / "summary.json").stat().st_mtime_ns for rid in runs
    }


def test_a_run_that_raises_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import normbench.train

    real_train = normbench.train.train

    def train_failing_for_layer(model, *args, **kwargs):
        if any(type(m).__name__ == "LayerNorm" for m in model.modules()):
            raise RuntimeError("injected failure \x1b]0;PWN\x07")
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(normbench.train, "train", train_failing_for_layer)
    args = ["sweep", *tiny_args(tmp_path, "norm=custom_bn,layer,group")]
    result = cli.invoke(app, args)
    assert result.exit_code == 1
    assert "2 completed" in result.stdout and "1 failed" in result.stdout
    # normbench's own failure (not a user's class): its traceback, escaped, as the basic
    # launcher's jobs print it to the terminal
    assert "Traceback (most recent call last):" in result.stderr
    assert "RuntimeError: injected failure \\x1b]0;PWN\\x07" in result.stderr
    assert "\x1b" not in result.stderr
    runs = summaries(tmp_path / "results" / "default")
    failed = [s for s in runs.values() if s["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["norm"] == "layer"
    assert failed[0]["error"] == "RuntimeError: injected failure \x1b]0;PWN\x07"  # as it was

    # Without --retry-failed the failed run counts as done; with it, it runs again.
    monkeypatch.setattr(normbench.train, "train", real_train)
    assert "3 skipped" in cli.invoke(app, args).stdout
    retried = cli.invoke(app, [*args, "--retry-failed"])
    assert retried.exit_code == 0, retried.output
    assert "1 completed" in retried.stdout and "2 skipped" in retried.stdout


def test_a_job_whose_imports_fail_leaves_its_traceback_in_its_log(monkeypatch, capsys):
    # Hydra hands the job's exception back to the sweep without its traceback: the job
    # prints it to its own stderr (a worker's or a cluster job's log) before it raises.
    monkeypatch.setitem(sys.modules, "normbench.runner", None)  # its import now fails
    with pytest.raises(ImportError):
        sweep.run_job(None)
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "Error: import of normbench.runner halted" in err


def test_a_sweep_killed_mid_way_resumes_where_it_stopped(tmp_path):
    """kill -9 during the second run; the rerun skips the first and redoes the rest."""
    experiment = tmp_path / "results" / "default"
    args = [
        f"out_dir={tmp_path / 'results'}",
        "dataset.train_size=128",
        "dataset.test_size=64",
        "threads=1",
        "epochs=20",
        "batch_size=8",
        "norm=custom_bn,layer,group",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "normbench.cli", "sweep", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            done = list(experiment.glob("runs/*/summary.json"))
            started = [p for p in experiment.glob("runs/*") if not (p / "summary.json").exists()]
            if done and started:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the sweep did not get to its second run")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()

    first = {p.parent.name: p.stat().st_mtime_ns for p in experiment.glob("runs/*/summary.json")}
    partial = [p for p in experiment.glob("runs/*") if not (p / "summary.json").exists()]
    assert first and partial
    # The partial folder does not look complete, and aggregation copes with it.
    from normbench.analysis.collect import collect

    collected = collect(experiment)
    assert len(collected.runs) == len(first) and collected.incomplete

    result = cli.invoke(app, ["sweep", *args])
    assert result.exit_code == 0, result.output
    assert f"{len(first)} skipped" in result.stdout
    assert f"{3 - len(first)} completed" in result.stdout
    runs = summaries(experiment)
    assert len(runs) == 3 and {s["status"] for s in runs.values()} == {"completed"}
    assert {
        rid: (experiment / "runs" / rid / "summary.json").stat().st_mtime_ns for rid in first
    } == first


def test_joblib_runs_jobs_in_parallel_with_shared_cores(tmp_path):
    args = [
        "sweep",
        f"out_dir={tmp_path / 'results'}",
        "epochs=1",
        "dataset.train_size=128",
        "norm=custom_bn,layer",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    ]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = summaries(tmp_path / "results" / "default")
    assert len(runs) == 2 and {s["status"] for s in runs.values()} == {"completed"}
    from normbench.cores import affinity

    assert {s["threads"] for s in runs.values()} == {max(1, len(affinity()) // 2)}


def test_submitit_slurm_config_composes():
    from hydra import compose, initialize_config_dir

    from normbench.options import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            # the SLURM example of docs/sweeps-and-clusters.md#on-a-slurm-cluster
            overrides=[
                "experiment=batch_size_study",
                "dataset.root=/shared/data",
                "out_dir=/shared/results",
                "hydra/launcher=submitit_slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=1",
                "hydra.launcher.cpus_per_task=8",
                "hydra.launcher.mem_gb=16",
                "hydra.launcher.timeout_min=120",
                "hydra.launcher.signal_delay_s=120",
                "hydra.launcher.array_parallelism=32",
            ],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu"
    assert cfg.hydra.sweep.dir.startswith("/shared/results/batch_size_study/.hydra/")
    assert cfg.hydra.launcher.submitit_folder.startswith(cfg.hydra.sweep.dir)


def test_outcome_counts_every_state(tmp_path):
    plan = sweep.plan(tiny_args(tmp_path, "norm=custom_bn,layer"))
    assert plan.outcome() == {"not run": 2}
    assert read_summary(plan.jobs[0].run_dir) is None


# ------------------------------------------------------------------ planning and skipping


def test_a_complete_sweep_hands_nothing_to_hydra_and_checks_nothing(tmp_path, monkeypatch):
    args = tiny_args(tmp_path, "norm=custom_bn,layer")
    assert cli.invoke(app, ["sweep", *args]).exit_code == 0
    launches = list((tmp_path / "results" / "default" / ".hydra").iterdir())
    assert len(launches) == 1

    import normbench.build
    import normbench.runner

    def no_check(*args, **kwargs):
        raise AssertionError("a done run was built again")

    monkeypatch.setattr(normbench.build, "prepare", no_check)  # the plan's checks
    monkeypatch.setattr(normbench.runner, "prepare", no_check)  # a run's own
    again = cli.invoke(app, ["sweep", *args])
    assert again.exit_code == 0, again.output
    assert "2 runs, 2 already done, 0 to run" in again.stderr and "2 skipped" in again.stdout
    assert list((tmp_path / "results" / "default" / ".hydra").iterdir()) == launches


def test_a_run_owned_by_a_live_process_elsewhere_is_not_launched(tmp_path):
    from normbench.lock import RunLock

    args = tiny_args(tmp_path, "norm=custom_bn,layer")
    first = sweep.plan(args).jobs[0]
    first.run_dir.mkdir(parents=True)
    with RunLock(first.run_dir):  # as another sweep's job would hold it
        planned = sweep.plan(args)
        assert [job.run_id for job in planned.elsewhere] == [first.run_id]
        assert first.run_id not in [job.run_id for job in planned.to_run]
        result = cli.invoke(app, ["sweep", *args])
    assert result.exit_code == 0, result.output
    assert "1 in progress elsewhere" in result.stderr
    assert "1 completed" in result.stdout and "1 running elsewhere" in result.stdout
    assert read_summary(first.run_dir) is None  # untouched


def test_relative_paths_survive_a_launcher_that_changes_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["out_dir=here", *TINY, "norm=custom_bn,layer", "hydra.job.chdir=true"]
    result = cli.invoke(app, ["sweep", *args])
    assert result.exit_code == 0, result.output
    assert len(summaries(tmp_path / "here" / "default")) == 2
    assert not list((tmp_path / "here" / "default" / ".hydra").glob("**/summary.json"))
    again = cli.invoke(app, ["sweep", *args])
    assert "2 skipped" in again.stdout


def test_the_jobs_overrides_are_absolute_and_leave_hydras_to_the_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    planned = sweep.plan(
        [
            "dataset.root=data",
            *TINY,
            "norm=layer,group",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
        ]
    )
    for job in planned.to_run:
        assert f"out_dir='{tmp_path / 'results'}'" in job.overrides
        assert f"dataset.root='{tmp_path / 'data'}'" in job.overrides
        assert not [o for o in job.overrides if o.startswith("hydra")]


def test_a_plus_typo_in_a_sweep_is_refused_before_anything(tmp_path):
    result = cli.invoke(app, ["sweep", *tiny_args(tmp_path, "norm=layer,group", "+bach_size=8")])
    assert result.exit_code == 2
    assert "unknown config key 'bach_size' (did you mean 'batch_size'?)" in result.stderr
    assert not (tmp_path / "results").exists()


def test_an_interrupted_run_is_redone_without_retry_failed(tmp_path):
    planned = sweep.plan(tiny_args(tmp_path, "norm=layer,group"))
    from normbench.runner import record_lost

    assert record_lost(planned.jobs[0].cfg, "SLURM job 5: cancelled", unstarted=True)
    summary = read_summary(planned.jobs[0].run_dir)
    assert (summary["status"], summary["error"]) == ("interrupted", "SLURM job 5: cancelled")
    replanned = sweep.plan(tiny_args(tmp_path, "norm=layer,group"))
    assert len(replanned.to_run) == 2
    result = cli.invoke(app, ["sweep", *tiny_args(tmp_path, "norm=layer,group")])
    assert result.exit_code == 0 and "2 completed" in result.stdout


def test_the_lr_batch_study_tunes_the_rate_on_validation_in_one_sweep(tmp_path):
    """The preset, tiny, on digits: one sweep runs the grid, chooses each norm and batch
    size's rate on validation (selected.csv) and draws the figures from the choice."""
    import pandas as pd

    args = [
        "sweep", "experiment=lr_batch_study", "dataset=digits", f"out_dir={tmp_path}",
        "norm=custom_bn,group", "batch_size=16,64", "lr=0.05,0.2", "seed=0,1",
        "epochs=1", "dataset.train_size=256", "threads=1",
    ]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "16 completed" in result.stdout
    experiment = tmp_path / "lr_batch_study"
    selected = pd.read_csv(experiment / "selected.csv")
    assert len(selected) == 4 and set(selected["tuned"]) == {"lr"}
    assert set(selected["lr"]) <= {0.05, 0.2}
    runs = pd.read_csv(experiment / "runs.csv")
    for row in selected.to_dict("records"):  # the choice: the best mean validation accuracy
        mine = (runs["norm.name"] == row["norm.name"]) & (runs["batch_size"] == row["batch_size"])
        means = runs[mine].groupby("lr")["best_val_acc"].mean()
        assert means.idxmax() == row["lr"]
    # one figure each over the runs chosen (bn_inference follows the selection)
    for figure in ("error_vs_batch_size.png", "bn_inference.png"):
        assert (experiment / "plots" / figure).is_file()
    assert "chosen on validation" in result.stdout
    assert "epochs held fixed" in result.stdout


def test_every_preset_states_its_budget():
    from normbench.options import conf_dir

    for path in (conf_dir() / "experiment").glob("*.yaml"):
        assert "\nbudget: " in path.read_text(), f"{path.name} must say budget: epochs|steps"


# ---------------------------------------------------------------------------- display


def test_a_runs_bar_in_the_sweeps_display_shows_its_norm_as_text():
    """A norm's name (a user's config) in a run's bar: escaped, never read as markup."""
    import io
    import re
    import unicodedata

    from normbench import terminal
    from normbench.config import compose

    cfg = compose(["norm=layer", "batch_size=8"])
    cfg.norm.name = "evil\x1b]0;PWNED\x07\x1b[2J\u202e[/x]"
    console = terminal.Console(file=io.StringIO(), force_terminal=True, width=200)
    display = SweepProgress(sweep.Plan([]), console=console, poll_s=0.01)
    with display, display.run_display(cfg) as bar:
        bar.on_start(total_steps=10, epochs=2)
        bar.on_step(5, 1, 0.25, 1000.0)
        display.progress.refresh()
    output = console.file.getvalue()
    rest = re.sub(r"\x1b\[\??[0-9;]*[a-zA-Z]", "", output).replace("\r", "")  # rich's own
    assert not [c for c in rest if unicodedata.category(c) in {"Cc", "Cf"} and c != "\n"]
    assert r"evil\x1b]0;PWNED\x07\x1b[2J\u202e[/x] bs=8 seed=0 · epoch 1/2" in rest


# ------------------------------------------------------------------ checked at plan time


def test_a_glob_sweeps_the_options_it_matches(tmp_path):
    """``norm=glob(*_bn)`` plans the jobs ``norm=custom_bn,ghost_bn,sync_bn,torch_bn`` plans (the
    options Hydra's glob matches: tests/test_config.py checks that against Hydra's own)."""
    globbed = sweep.plan(["norm=glob(*_bn)", *tiny_args(tmp_path)])
    listed = sweep.plan(["norm=custom_bn,ghost_bn,sync_bn,torch_bn", *tiny_args(tmp_path)])
    assert [job.run_id for job in globbed.jobs] == [job.run_id for job in listed.jobs]
    names = [job.cfg.norm.name for job in globbed.jobs]
    assert names == ["custom_bn", "ghost_bn", "sync_bn", "torch_bn"]
    assert "norm=custom_bn,ghost_bn,sync_bn,torch_bn" in globbed.overrides


@pytest.mark.parametrize(
    "grid, runs",
    [
        (["norm=custom_bn,custom_bn"], 1),
        (["lr=0.1,0.10"], 1),
        (["threads=1,2", "lr=0.1,0.2"], 2),  # an execution key: the same runs
        (["memory_format=contiguous,channels_last"], 1),
    ],
)
def test_duplicate_grid_points_are_planned_once(tmp_path, grid, runs):
    points = len(sweep.expand([*tiny_args(tmp_path), *grid]))
    planned = sweep.plan([*tiny_args(tmp_path), *grid])
    assert len(planned.jobs) == runs and planned.duplicates == points - runs
    assert len({job.run_dir for job in planned.jobs}) == runs


def test_cli_duplicate_grid_points_are_dropped_and_counted_once(tmp_path):
    result = cli.invoke(app, ["sweep", *tiny_args(tmp_path, "lr=0.1,0.10", "max_steps=1")])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == (
        "sweep: 1 run (1 duplicate grid point dropped: the same run as another), "
        "0 already done, 1 to run"
    )
    assert result.stdout.splitlines()[-1] == "1 completed, 0 failed"
    assert len(summaries(tmp_path / "results" / "default")) == 1


@pytest.mark.parametrize(
    "report, expected",
    [
        (
            ["report.baseline=instance"],
            "report.baseline=instance is not among the norms of the sweep or of the runs in ",
        ),
        (["report.select=[lr]"], "report.select: cannot select lr: the sweep does not vary it"),
        (["report.select=[lrr]"], "report.select: unknown key 'lrr' (did you mean 'lr'?)"),
        (
            ["report.select=[norm]", "dataset.val_size=0"],
            "report.select chooses on validation accuracy, but every run has dataset.val_size=0",
        ),
    ],
)
def test_a_report_the_grid_cannot_make_is_refused_before_anything_runs(tmp_path, report, expected):
    result = cli.invoke(app, ["sweep", *tiny_args(tmp_path, "norm=layer,group", *report)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.stderr
    assert not (tmp_path / "results").exists()


def test_a_baseline_among_the_runs_already_in_the_folder_is_accepted(tmp_path):
    """The tables read the whole experiment folder: a baseline run by an earlier sweep
    counts, as the report will find it."""
    first = cli.invoke(app, ["sweep", *tiny_args(tmp_path, "norm=layer", "max_steps=1")])
    assert first.exit_code == 0, first.output
    planned = sweep.plan(
        [*tiny_args(tmp_path, "norm=group", "max_steps=1"), "report.baseline=layer"]
    )
    assert [job.cfg.norm.name for job in planned.jobs] == ["group"]
    with pytest.raises(UserError, match="report.baseline=instance is not among"):
        sweep.plan([*tiny_args(tmp_path, "norm=group", "max_steps=1"), "report.baseline=instance"])


# -------------------------------------------------------------------- nothing to do


@pytest.fixture(scope="module")
def complete_sweep(tmp_path_factory) -> tuple[Path, str]:
    """A sweep of two tiny runs, with its tables and figures (the tests copy it), and what
    it printed."""
    out = tmp_path_factory.mktemp("complete") / "results"
    args = ["sweep", f"out_dir={out}", *TINY, "norm=custom_bn,layer", "name=done"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.stdout


def _copy(complete_sweep, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the complete sweep (modification times kept: a folder moved keeps its
    tables), and the command that runs it."""
    import shutil

    out = tmp_path / "results"
    shutil.copytree(complete_sweep[0], out)
    return out / "done", ["sweep", f"out_dir={out}", *TINY, "norm=custom_bn,layer", "name=done"]


def _outputs(experiment: Path) -> dict[str, int]:
    files = [*experiment.glob("*.csv"), *experiment.glob("*.md"), *experiment.glob("plots/*")]
    assert len(list(experiment.glob("plots/*"))) >= 3
    return {str(p.relative_to(experiment)): p.stat().st_mtime_ns for p in files}


def _shown_tables(stdout: str) -> list[str]:
    """What a sweep printed, but the lines about files written or kept."""
    return [line for line in stdout.splitlines() if "wrote" not in line and "kept" not in line]


def test_a_complete_sweep_keeps_its_tables_and_shows_them_again(complete_sweep, tmp_path):
    experiment, args = _copy(complete_sweep, tmp_path)
    written = _outputs(experiment)
    again = cli.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert f"{experiment}: no run changed since the tables of " in again.stdout
    assert "tables and figures kept" in again.stdout and "wrote" not in again.stdout
    assert _outputs(experiment) == written  # nothing rewritten
    first = complete_sweep[1].replace(str(complete_sweep[0]), str(experiment.parent))
    # the same tables (the last line counts the runs skipped)
    assert _shown_tables(again.stdout)[:-1] == _shown_tables(first)[:-1]
    assert "test accuracy over seeds" in again.stdout and "2 skipped" in again.stdout


@pytest.mark.parametrize("change", ["rerun", "more", "plot_removed", "results"])
def test_a_changed_run_or_file_redraws_the_tables(complete_sweep, tmp_path, change):
    experiment, args = _copy(complete_sweep, tmp_path)
    before = _outputs(experiment)
    if change == "rerun":  # a run redone (its summary written anew)
        path = next(experiment.glob("runs/*/summary.json"))
        path.write_text(path.read_text())
    elif change == "more":
        args = [*args[:-2], "norm=custom_bn,layer,group", args[-1]]
    elif change == "plot_removed":
        next(experiment.glob("plots/*.png")).unlink()
    else:  # `normbench results` always makes the tables again, and the sweep then too
        results = cli.invoke(app, ["results", str(experiment)])
        assert results.exit_code == 0, results.output
        assert (experiment / "summary.csv").stat().st_mtime_ns > before["summary.csv"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "kept" not in result.stdout and "wrote" in result.stdout
    after = _outputs(experiment)
    assert after["summary.csv"] > before["summary.csv"]
    assert all(after[name] > stamp for name, stamp in before.items() if name.startswith("plots"))


def test_a_complete_sweep_imports_no_torch(complete_sweep, tmp_path):
    experiment, args = _copy(complete_sweep, tmp_path)
    script = (
        "import sys\n"
        "from normbench.cli import app\n"
        "try:\n"
        f"    app({args!r})\n"
        "except SystemExit as end:\n"
        "    assert not end.code, end.code\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 skipped" in done.stdout and "torch imported: False" in done.stdout
    assert "tables and figures kept" in done.stdout


def test_a_complete_sweep_composes_no_job(complete_sweep, tmp_path, monkeypatch):
    """A done run's id and folder come from its values (config.compose_plain): no job is
    composed through OmegaConf, only the grid's first (expand: its preset's grid)."""
    from normbench import config

    experiment, args = _copy(complete_sweep, tmp_path)
    composed = []
    real = config.compose
    monkeypatch.setattr(config, "compose", lambda o=(): composed.append(o) or real(o))
    planned = sweep.plan(args[1:])
    assert not planned.to_run and len(planned.jobs) == 2 and len(composed) == 1
    assert planned.jobs[1].cfg.norm.name == "layer"  # composed when asked for
    assert len(composed) == 2


@pytest.mark.filterwarnings("ignore::normbench.errors.Notice")  # precise_bn_batches's
@pytest.mark.parametrize(
    "grid",
    [
        ["norm=glob(*_bn)", "batch_size=8,16", "lr=0.1,1", "seed=range(2)"],
        ["norm=group", "norm.groups=1,4", "dataset.train_size=128,256", "++epochs=2"],
        ["experiment=quick", "norm=layer,batch_renorm", "eval.precise_bn_batches=2"],
        ["model=mlp,small_cnn", "optim=adam", "optim.betas=[0.8,0.9]", "~norm.eps"],
        ["norm=batch_renorm", "norm.warmup_steps=0,5", "eval_batch_size=${batch_size}"],
    ],
    ids=["glob", "nested", "preset", "lists", "interpolation"],
)
def test_a_plans_run_ids_are_those_of_composing_each_job(tmp_path, monkeypatch, grid):
    """The plan reads each job's values without composing it: its run ids, folders and
    values are those of config.compose on every job."""
    from normbench.config import compose, flatten
    from normbench.runner import run_dir

    monkeypatch.setattr("normbench.build.prepare", lambda cfg, **where: None)  # not this test's
    planned = sweep.plan(tiny_args(tmp_path, *grid))
    assert len(planned.jobs) > 1
    for job in planned.jobs:
        cfg = compose(job.grid)
        assert job.flat == flatten(cfg) and job.run_dir == run_dir(cfg)
        assert flatten(job.cfg) == job.flat


@pytest.mark.parametrize(
    "bad",
    [
        "lr=0.1,-1",
        "norm.groups=4,abc",
        "name=ok,a/b",
        "lr=1,2e38",  # its peak after lr_scaling: over float32's largest
        "schedule.gamma=1e30 schedule.name=cosine,step",  # a key set, another one swept
    ],
)
def test_a_bad_grid_point_is_composes_one_line(tmp_path, bad):
    """The plan's message for a bad value in one grid point is compose's for that job."""
    from normbench.config import compose

    *fixed, swept = bad.split()
    scaled = ["batch_size=64", "ref_batch_size=32", "lr_scaling=linear"]
    args = tiny_args(tmp_path, "norm=group", *scaled, *fixed, swept)
    job = sweep.expand(args)[-1]  # the grid's last point: the bad value
    with pytest.raises(UserError) as composed:
        compose(job)
    with pytest.raises(UserError) as planned:
        sweep.plan(args)
    assert str(planned.value) == f"in sweep job {' '.join(job)}: {composed.value}"
    assert "\n" not in str(planned.value)
    assert not (tmp_path / "results").exists()


def test_a_gpu_sweep_for_a_cluster_is_planned_where_there_is_no_cuda(tmp_path, monkeypatch):
    """A cluster's GPU jobs planned on a machine without CUDA: planned (each probed on the
    CPU, a triton backend as the CPU's kernel), their configs as asked. Jobs this machine
    runs (the basic launcher, submitit_local, Ray's local cluster) are refused as before;
    Ray's launcher counts as elsewhere where its address is another machine's."""
    import torch

    from normbench.launchers import runs_elsewhere

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    common = [f"out_dir={tmp_path}", "device=cuda", "dataset.train_size=128", "epochs=1"]
    slurm = ["hydra/launcher=submitit_slurm", "norm.backend=triton", "precision=fp16"]
    (job,) = sweep.plan([*common, *slurm]).jobs
    assert job.elsewhere and (job.cfg.device, job.cfg.norm.backend) == ("cuda", "triton")
    for here in (["hydra/launcher=ray"], ["hydra/launcher=submitit_local"], []):
        with pytest.raises(UserError, match="device=cuda but CUDA is not available here"):
            sweep.plan([*common, *here])
    with pytest.raises(UserError, match="precision=fp16 needs CUDA"):  # no machine runs it
        sweep.plan([*common, *slurm, "device=cpu"])
    remote = ["hydra/launcher=ray", "hydra.launcher.ray.init.address=ray://10.1.2.3:10001"]
    assert sweep.plan([*common, *remote]).jobs[0].elsewhere

    def ray(address):
        target = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
        return {"_target_": target, "ray": {"init": {"address": address}}}

    here = [None, "auto", "127.0.0.1:6379", "localhost:6379", "ray://127.0.0.1:10001"]
    assert not any(runs_elsewhere(ray(address)) for address in here)
    assert all(runs_elsewhere(ray(a)) for a in ("10.0.0.5:6379", "ray://head.cluster:10001"))
