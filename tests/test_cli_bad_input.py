"""normbench's promise on bad input, through the CLI: a user's mistake is one line with
exit status 2, found before any training and with nothing written (the folder tree is
unchanged); a damaged file among many is skipped with a one-line warning naming it.

One parametrized test per kind of mistake. Where a file system must misbehave (read
only, full), the test mounts a small tmpfs of its own, which needs root: it is skipped
elsewhere with the reason, and fails under CI (``CI`` set) rather than skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normbench.cli import app

cli = CliRunner()
TINY = ["epochs=1", "dataset.train_size=128", "threads=1"]


def tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (folders 0): what 'nothing written' keeps."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else 0) for p in root.rglob("*")
    }


def assert_one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small file system of its own at ``path`` (root only)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        if os.environ.get("CI"):
            pytest.fail("CI must run this test: mounting a tmpfs needs root")
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------------------ an unwritable out_dir


@pytest.mark.parametrize(
    "place, expected",
    [
        ("a file", "Not a directory"),
        ("/proc", "No such file or directory"),
        ("a long name", "File name too long"),
    ],
)
def test_an_unwritable_out_dir_is_refused_before_training(tmp_path, place, expected):
    if place == "a file":
        (tmp_path / "taken").write_text("")
        out_dir = tmp_path / "taken"
    elif place == "/proc":
        out_dir = Path("/proc/normbench-results")
    else:
        out_dir = tmp_path / ("x" * 300)
    before = tree(tmp_path)
    for command in ("run", "sweep"):
        result = cli.invoke(
            app,
            [
                command,
                f"out_dir={out_dir}",
                *TINY,
                "norm=layer,group" if command == "sweep" else "norm=layer",
            ],
        )
        assert_one_line_error(result, expected)
        assert tree(tmp_path) == before


@pytest.mark.parametrize("state", ["read-only", "full"])
def test_a_read_only_or_full_file_system_is_refused_before_training(tmp_path, state):
    mount = tmp_path / "fs"
    with tmpfs(mount, "64k", read_only=state == "read-only"):
        if state == "full":
            with contextlib.suppress(OSError), open(mount / "filler", "wb") as handle:
                handle.write(b"\0" * 1024 * 1024)  # up to the last byte
        before = tree(mount)
        result = cli.invoke(app, ["run", f"out_dir={mount}", *TINY])
        expected = "Read-only file system" if state == "read-only" else "No space left"
        assert_one_line_error(result, expected)
        assert tree(mount) == before


def test_a_disk_that_fills_during_a_run_gives_one_line_and_nothing_complete(tmp_path):
    """A run long enough that its metrics outgrow 96 KB: exit 2, one line naming the
    file, no summary, no temporary files, no lock."""
    mount = tmp_path / "fs"
    with tmpfs(mount, "96k"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "normbench.cli",
                "run",
                f"out_dir={mount}",
                "epochs=400",
                "dataset.train_size=128",
                "threads=1",
                "norm=layer",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert "No space left on device" in done.stderr.strip().splitlines()[-1]
        (folder,) = (mount / "default" / "runs").iterdir()
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "metrics.csv"]


# --------------------------------------------------------- values that crashed the build


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.widths=[0,0,0]"], "model.widths must be a list of integers >= 1"),
        (["model=resnet20", "model.width=0"], "model.width must be an integer >= 1"),
        (["model=mlp", "model.hidden=[0]"], "model.hidden must be a list of integers >= 1"),
        (["seed=18446744073709551616"], "seed must be an integer >= 0 and <= 2"),
        (["norm=null"], "norm cannot be null; pick one of"),
        (["~norm"], "norm is missing"),
        (["norm=group", "norm.groups=abc"], "norm.groups must be an integer >= 1, got 'abc'"),
        (["norm=batch_renorm", "norm.warmup_steps=-1"], "norm.warmup_steps must be"),
        (["norm=ghost_bn", "norm.virtual_batch_size=0"], "norm.virtual_batch_size must be"),
        (["optim=adam", "optim.betas=[0.9,1.5]"], "optim.betas must be two numbers"),
        (["optim.nesterov=maybe"], "optim.nesterov must be true or false"),
        (["dataset.augment=3"], "dataset.augment must be true or false or null"),
        (["norm.backend=gpu"], "norm.backend must be one of auto, cpu, triton, reference"),
    ],
)
def test_values_that_would_crash_the_build_are_refused(tmp_path, overrides, expected):
    for command in ("run", "sweep"):
        result = cli.invoke(app, [command, f"out_dir={tmp_path / 'out'}", *TINY, *overrides])
        assert_one_line_error(result, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["lr=1e308"], "lr must be a number <= 3.403e+38"),
        (["schedule.name=step", "schedule.gamma=1e308"], "schedule.gamma must be a number <="),
        (["schedule.name=step", "schedule.gamma=1e30"], "schedule.gamma=1e+30 multiplies"),
        (["schedule.warmup_epochs=1e308"], "schedule.warmup_epochs must be a number <="),
        (["optim=adam", "optim.betas=[0.9999999,0.5]", "lr=1e33"], "optim.betas=[0.9999999, 0.5]"),
        (
            ["budget=steps", "ref_batch_size=100000", "batch_size=2"],
            "ref_batch_size=100000 is larger than the training set (128 images of digits)",
        ),
        # more than any machine's address space: refused by every allocator
        (["model.widths=[1000000000000000,2,2]"], "its parameters need more memory than"),
    ],
)
def test_values_that_overflowed_after_the_folder_was_written_are_refused(
    tmp_path, overrides, expected
):
    for command in ("run", "sweep"):
        result = cli.invoke(app, [command, f"out_dir={tmp_path / 'out'}", *TINY, *overrides])
        assert_one_line_error(result, expected)
    assert tree(tmp_path) == {}


def test_an_out_dir_too_long_for_the_run_files_is_refused(tmp_path):
    """Every folder name fits, but the run folder's files would not: refused before any
    folder exists, not at the first checkpoint."""
    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
    deep = tmp_path
    while len(str(deep)) < path_max - 60:  # folder names of 200 or less, 60 bytes short
        deep = deep / ("d" * (min(200, path_max - 60 - len(str(deep)) - 1) or 1))
    for command in ("run", "sweep"):
        result = cli.invoke(app, [command, f"out_dir={deep}", *TINY])
        assert_one_line_error(result, "File name too long: with the files normbench writes")
    assert tree(tmp_path) == {}


def test_threads_above_the_cpus_are_capped_with_one_warning(tmp_path):
    """threads=1000 took minutes a step: the run uses the CPUs it may, says so, records it."""
    cpus = len(os.sched_getaffinity(0))
    done = subprocess.run(
        [sys.executable, "-m", "normbench.cli", "run", f"out_dir={tmp_path}", *TINY,
         "threads=1000", "max_steps=2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: threads=1000 is more than the {cpus} CPUs this process may use: "
        f"the run uses {cpus}"
    ]
    (summary,) = [json.loads(p.read_text()) for p in tmp_path.glob("default/runs/*/summary.json")]
    assert (summary["threads"], summary["threads_from"]) == (
        cpus,
        f"threads=1000, capped at {cpus} CPUs",
    )


def test_a_sweep_with_a_zero_width_job_is_refused_whole(tmp_path):
    result = cli.invoke(
        app, ["sweep", f"out_dir={tmp_path}", *TINY, "model=mlp", "model.hidden=[64],[0]"]
    )
    assert_one_line_error(result, "model.hidden must be a list of integers >= 1, got [0]")
    assert tree(tmp_path) == {}


def test_launcher_settings_that_would_stop_every_job_are_refused(tmp_path):
    result = cli.invoke(
        app,
        [
            "sweep",
            f"out_dir={tmp_path}",
            *TINY,
            "norm=layer,group",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=0",
        ],
    )
    assert_one_line_error(result, "hydra.launcher.n_jobs must be a non-zero integer")
    assert tree(tmp_path) == {}


# ------------------------------------------------------------ data files that are wrong


def _mnist(root: Path, monkeypatch, broken: str) -> None:
    from fixtures import _write_idx, write_dataset

    write_dataset(root, "mnist", monkeypatch, n_train=24, n_test=8)
    raw = root / "MNIST" / "raw"
    import numpy as np

    if broken == "counts":
        _write_idx(raw / "train-labels-idx1-ubyte", 0x00000801, np.zeros(20, dtype=np.uint8))
    else:
        labels = np.full(24, 3, dtype=np.uint8)
        labels[5] = 12
        _write_idx(raw / "train-labels-idx1-ubyte", 0x00000801, labels)


@pytest.mark.parametrize(
    "broken, expected",
    [
        ("counts", "the training split has 24 images but 20 labels"),
        ("labels", "1 training labels are outside the 10 classes 0-9 (label 12 at index 5)"),
    ],
)
def test_data_files_torchvision_reads_but_are_wrong(tmp_path, monkeypatch, broken, expected):
    _mnist(tmp_path / "data", monkeypatch, broken)
    before = tree(tmp_path)
    result = cli.invoke(
        app,
        [
            "run",
            f"out_dir={tmp_path / 'out'}",
            "dataset=mnist",
            f"dataset.root={tmp_path / 'data'}",
            "epochs=1",
            "batch_size=8",
        ],
    )
    assert_one_line_error(result, expected)
    assert str(tmp_path / "data" / "MNIST") in result.stderr
    assert tree(tmp_path) == before


# ------------------------------------------------------- damaged run files among many


def _experiment(tmp_path: Path) -> Path:
    args = ["sweep", f"out_dir={tmp_path}", *TINY, "norm=layer,group,instance"]
    assert cli.invoke(app, args).exit_code == 0
    return tmp_path / "default"


DAMAGE = {
    "summary garbage": lambda run: (run / "summary.json").write_text("{not json"),
    "summary a list": lambda run: (run / "summary.json").write_text("[1, 2]"),
    "summary a folder": lambda run: (
        (run / "summary.json").unlink(),
        (run / "summary.json").mkdir(),
    ),
    "summary without status": lambda run: _edit(run, status=None),
    "summary unknown status": lambda run: _edit(run, status="weird"),
    "summary without batch size": lambda run: _edit(run, batch_size=None),
    "summary text number": lambda run: _edit(run, final_test_acc="high"),
    "metrics garbage": lambda run: (run / "metrics.csv").write_text("\x00\x01garbage\n1,2"),
    "metrics damaged lines": lambda run: (run / "metrics.csv").write_text(
        "run_id,epoch,split,metric,value\nabc,one,train,loss,x\n"
    ),
    "metrics a folder": lambda run: ((run / "metrics.csv").unlink(), (run / "metrics.csv").mkdir()),
}


def _edit(run: Path, **changes) -> None:
    record = json.loads((run / "summary.json").read_text())
    for key, value in changes.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    (run / "summary.json").write_text(json.dumps(record))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_run_file_is_skipped_with_a_warning(tmp_path, damage):
    experiment = _experiment(tmp_path)
    runs = sorted((experiment / "runs").iterdir())
    victim = runs[0]
    DAMAGE[damage](victim)

    for command in (["results", str(experiment)], ["plot", str(experiment)]):
        result = cli.invoke(app, command)
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert len(warning) == 1 and str(victim) in warning[0], result.stderr
    runs_csv = (experiment / "runs.csv").read_text()
    assert victim.name not in runs_csv and runs[1].name in runs_csv

    # The sweep plans the damaged run as not done (planner, runner and tables agree) and
    # redoes it; the others stay as they were.
    again = cli.invoke(app, ["sweep", f"out_dir={tmp_path}", *TINY, "norm=layer,group,instance"])
    assert again.exit_code == 0, again.output
    assert "Traceback" not in again.output
    assert "1 completed, 2 skipped" in again.stdout
    assert json.loads((victim / "summary.json").read_text())["status"] == "completed"


def test_the_same_run_copied_into_a_second_folder_is_counted_once(tmp_path):
    experiment = _experiment(tmp_path)
    first = sorted((experiment / "runs").iterdir())[0]
    shutil.copytree(first, experiment / "runs" / f"{first.name}-backup")
    result = cli.invoke(app, ["results", str(experiment)])
    assert result.exit_code == 0, result.output
    assert "3 runs" in result.stdout and "1 copy of other runs counted once" in result.stdout
    assert f"{first.name}-backup" in result.stderr


# ------------------------------------------------- results, plot and bench: check first


@pytest.mark.parametrize("command", ["results", "plot"])
def test_results_and_plot_on_a_folder_they_cannot_write(tmp_path, command):
    experiment = _experiment(tmp_path)
    mount = tmp_path / "ro"
    with tmpfs(mount, "4m"):
        shutil.copytree(experiment, mount / "default")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        before = tree(mount)
        result = cli.invoke(app, [command, str(mount / "default")])
        assert_one_line_error(result, "Read-only file system")
        assert tree(mount) == before


def test_plot_where_plots_is_a_file(tmp_path):
    experiment = _experiment(tmp_path)
    shutil.rmtree(experiment / "plots")
    (experiment / "plots").write_text("not a folder")
    result = cli.invoke(app, ["plot", str(experiment)])
    assert_one_line_error(result, "plots: Not a directory")


@pytest.mark.parametrize("target", ["a folder", "/proc"])
def test_bench_out_is_checked_before_measuring(tmp_path, target, monkeypatch):
    import normbench.bench

    def never(*args, **kwargs):
        raise AssertionError("measured before checking --out")

    monkeypatch.setattr(normbench.bench, "run_bench", never)
    out = tmp_path if target == "a folder" else Path("/proc/normbench/bench.csv")
    result = cli.invoke(app, ["bench", "--out", str(out), "--repeats", "1"])
    assert_one_line_error(result, "is a folder" if target == "a folder" else "cannot write")


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("NORMBENCH_KERNEL_ISA", "avx1024", "NORMBENCH_KERNEL_ISA='avx1024': valid are native"),
        ("NORMBENCH_KERNEL_STREAM_BYTES", "8MB", "NORMBENCH_KERNEL_STREAM_BYTES='8MB': expected"),
        ("NORMBENCH_KERNEL_POOL_BYTES", "1GiB", "NORMBENCH_KERNEL_POOL_BYTES='1GiB': expected"),
        ("NORMBENCH_KERNEL_PLANE_ORDER", "rows", "NORMBENCH_KERNEL_PLANE_ORDER='rows': valid"),
    ],
)
@pytest.mark.parametrize("command", ["run", "sweep", "bench", "check-norm"])
def test_a_bad_kernel_setting_is_refused_before_any_work(
    tmp_path, monkeypatch, variable, value, expected, command
):
    monkeypatch.setenv(variable, value)
    monkeypatch.chdir(tmp_path)
    args = {
        "run": ["run", *TINY, f"out_dir={tmp_path / 'out'}"],
        "sweep": ["sweep", *TINY, f"out_dir={tmp_path / 'out'}"],
        "bench": ["bench", "--repeats", "1", "--out", str(tmp_path / "out" / "bench.csv")],
        "check-norm": ["check-norm", "custom_bn"],
    }[command]
    result = cli.invoke(app, args)
    assert_one_line_error(result, expected)
    assert tree(tmp_path) == {}
