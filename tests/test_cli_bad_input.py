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
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml
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
    "overrides",
    [
        ["model=mlp", "batch_size=2", "processes=2"],  # BatchNorm over 1 sample a process
        ["model=mlp", "batch_size=2", "processes=2", "norm=sync_bn", "norm.group_size=1"],
    ],
)
def test_a_batch_one_process_cannot_train_on_is_refused_before_anything_starts(tmp_path, overrides):
    for command in ("run", "sweep"):
        result = cli.invoke(app, [command, f"out_dir={tmp_path / 'out'}", *TINY, *overrides])
        assert_one_line_error(
            result, "cannot train at batch_size=2 split over 2 processes: Expected more than 1"
        )
    assert not (tmp_path / "out").exists()


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
        (["norm=batch_renorm", "norm.ramp_fraction=2"], "norm.ramp_fraction must be a number"),
        (
            ["norm=batch_renorm", "norm.warmup_fraction=0.5", "norm.ramp_fraction=0.75"],
            "norm.warmup_fraction=0.5 + norm.ramp_fraction=0.75 must be at most 1",
        ),
        (["eval.precise_bn_images=0"], "eval.precise_bn_images must be an integer >= 1"),
        (["eval.precise_bn_batches=-2"], "eval.precise_bn_batches must be an integer >= 1"),
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


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """A real 3-run sweep, trained once for the module (the tests damage copies of it)."""
    out = tmp_path_factory.mktemp("swept")
    args = ["sweep", f"out_dir={out}", *TINY, "norm=layer,group,instance"]
    assert cli.invoke(app, args).exit_code == 0
    return out / "default"


@pytest.fixture
def experiment(swept, tmp_path) -> Path:
    """A copy of the module's sweep, as ``<tmp_path>/default``: a sweep with
    ``out_dir=<tmp_path>`` finds its runs done."""
    return Path(shutil.copytree(swept, tmp_path / "default"))


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
def test_a_damaged_run_file_is_skipped_with_a_warning(experiment, tmp_path, damage):
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


def test_the_same_run_copied_into_a_second_folder_is_counted_once(experiment, tmp_path):
    first = sorted((experiment / "runs").iterdir())[0]
    shutil.copytree(first, experiment / "runs" / f"{first.name}-backup")
    result = cli.invoke(app, ["results", str(experiment)])
    assert result.exit_code == 0, result.output
    assert "3 runs" in result.stdout and "1 copy of other runs counted once" in result.stdout
    assert f"{first.name}-backup" in result.stderr


# ------------------------------------------------- results, plot and bench: check first


@pytest.mark.parametrize("command", ["results", "plot"])
def test_results_and_plot_on_a_folder_they_cannot_write(experiment, tmp_path, command):
    mount = tmp_path / "ro"
    with tmpfs(mount, "4m"):
        shutil.copytree(experiment, mount / "default")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        before = tree(mount)
        result = cli.invoke(app, [command, str(mount / "default")])
        assert_one_line_error(result, "Read-only file system")
        assert tree(mount) == before


def test_plot_where_plots_is_a_file(experiment, tmp_path):
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
        ("NORMBENCH_KERNEL_DEBUG", "on", "NORMBENCH_KERNEL_DEBUG='on': valid are '0' and '1'"),
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


# ------------------------------------------- user text is shown as text, never as markup

# rich reads "[/x]" as a closing tag (MarkupError), "[old]" as a style (the text vanished).
MARKUP = "[/x]"


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory) -> Path:
    """One real tiny run's experiment folder (copied by the tests that write into it)."""
    out = tmp_path_factory.mktemp("text") / "results"
    assert cli.invoke(app, ["run", f"out_dir={out}", *TINY]).exit_code == 0
    return out / "default"


@pytest.mark.parametrize(
    "args",
    [
        ["run", f"norm='{MARKUP}'"],
        ["run", f"name='{MARKUP}'"],
        ["run", f"lr='{MARKUP}'"],
        ["run", "out_dir='taken[/x]'"],  # "taken[" is a file: the folder cannot be made
        ["sweep", f"norm='{MARKUP}',layer"],
        ["config", f"norm='{MARKUP}'"],
        ["check-norm", MARKUP],
        ["--config-dir", MARKUP, "list"],
        ["results", "EXPERIMENT", "--select", MARKUP],
        ["results", "EXPERIMENT", "--group-by", MARKUP],
        ["results", "EXPERIMENT", "--baseline", MARKUP],
        ["results", MARKUP],
    ],
    ids=lambda args: " ".join(args),
)
def test_markup_in_user_text_is_one_line_shown_literally(
    tmp_path, monkeypatch, tiny_experiment, args
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken[").write_text("")
    experiment = shutil.copytree(tiny_experiment, tmp_path / "exp")
    before = tree(tmp_path)
    args = [str(experiment) if a == "EXPERIMENT" else a for a in args]
    result = cli.invoke(app, [*args, *(TINY if args[0] in ("run", "sweep") else [])])
    assert_one_line_error(result, "[/x]")
    assert tree(tmp_path) == before


def test_a_missing_folder_is_named_with_its_brackets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(app, ["results", "results/exp[old]/x"])
    assert_one_line_error(result, "results/exp[old]/x: no such folder")


def test_an_out_dir_with_brackets_is_printed_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(app, ["run", f"out_dir='{MARKUP}'", "name='exp[old]'", *TINY])
    assert result.exit_code == 0, result.output
    assert " · [/x]/exp[old]/runs/" in result.stdout


# ------------------------------------ a received folder's text is shown, escapes escaped

# Set the window title, clear the screen, recolour what follows, reverse the text's
# direction, and CSI in its one-byte C1 form; and how normbench shows it.
HOSTILE = "\x1b]0;PWNED\x07\x1b[2J\x1b[31m\u202e\x9b"
SHOWN = r"\x1b]0;PWNED\x07\x1b[2J\x1b[31m\u202e\x9b"
SGR = re.compile(rb"\x1b\[[0-9;]*m")  # rich's own colours, where it writes as a terminal


def assert_inert(raw: bytes) -> None:
    """No control byte, C1 control or invisible formatting character in what was
    written, outside rich's colour sequences."""
    rest = SGR.sub(b"", raw).decode()
    hidden = [c for c in rest if unicodedata.category(c) in {"Cc", "Cf", "Cs"} and c != "\n"]
    assert not hidden, hidden


RECEIVED_SWEEP = [*TINY, "norm=custom_bn,layer"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Path:
    """A real experiment of two tiny runs (custom_bn and layer)."""
    out = tmp_path_factory.mktemp("received")
    assert cli.invoke(app, ["sweep", f"out_dir={out}", *RECEIVED_SWEEP]).exit_code == 0
    return out / "default"


def _received(two_runs: Path, tmp_path: Path) -> Path:
    """The two runs as a folder someone sent: hostile text in the norm's name, a config
    value and a key's name (in one run's summary.json, in the other's config.yaml),
    metrics.csv, and an unreadable run folder's name and status."""
    experiment = shutil.copytree(two_runs, tmp_path / "default")
    by_norm = {
        json.loads((run / "summary.json").read_text())["norm"]: run
        for run in (experiment / "runs").iterdir()
    }
    custom, layer = by_norm["custom_bn"], by_norm["layer"]
    _edit(custom, **{"config.schedule.name": f"cos{HOSTILE}", f"config.key{HOSTILE}": 1})
    with open(custom / "metrics.csv", "a") as metrics:
        metrics.write(f"{custom.name},1,{HOSTILE},{HOSTILE},0.5\n")
    # the layer run's config read from its config.yaml (a summary without config keys)
    record = json.loads((layer / "summary.json").read_text())
    record = {k: v for k, v in record.items() if not k.startswith("config.")}
    (layer / "summary.json").write_text(json.dumps({**record, "norm": f"evil{HOSTILE}"}))
    config = yaml.safe_load((layer / "config.yaml").read_text())
    config["norm"]["name"] = f"evil{HOSTILE}"
    config[f"key{HOSTILE}"] = 0
    (layer / "config.yaml").write_text(yaml.safe_dump(config))
    bad = experiment / "runs" / f"bad{HOSTILE}"
    bad.mkdir()
    (bad / "summary.json").write_text(json.dumps({"status": HOSTILE}))
    return experiment


@pytest.mark.parametrize("command", ["results", "plot", "sweep"])
def test_a_received_folders_text_is_shown_escaped(two_runs, tmp_path, command):
    experiment = _received(two_runs, tmp_path)
    args = {
        "results": ["results", str(experiment)],
        "plot": ["plot", str(experiment)],
        "sweep": ["sweep", f"out_dir={tmp_path}", *RECEIVED_SWEEP],  # done: its tables
    }[command]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert_inert(result.stdout_bytes)
    assert_inert(result.stderr_bytes)
    assert f"skipped {experiment}/runs/bad{SHOWN}:" in result.stderr  # the warning
    if command != "plot":  # the tables
        for shown in (f"evil{SHOWN}", f"cos{SHOWN}", f"key{SHOWN}"):
            assert shown in result.stdout


def test_a_received_folder_on_a_terminal_gets_only_richs_colours(two_runs, tmp_path):
    experiment = _received(two_runs, tmp_path)
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "300"}
    result = subprocess.run(
        [sys.executable, "-m", "normbench.cli", "results", str(experiment)],
        capture_output=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert SGR.search(result.stdout)  # it wrote as to a terminal
    assert_inert(result.stdout)
    assert_inert(result.stderr)
    assert f"evil{SHOWN}".encode() in result.stdout


def test_a_users_norm_failing_with_escapes_is_shown_escaped_by_check_norm(tmp_path):
    (tmp_path / "hostile_norm.py").write_text(
        "import torch\n\n\n"
        "class Hostile(torch.nn.Module):\n"
        "    def __init__(self, num_channels):\n"
        "        super().__init__()\n"
        "        self.scale = torch.nn.Parameter(torch.ones(num_channels))\n\n"
        "    def forward(self, x):\n"
        f"        raise ValueError({HOSTILE!r} + '[/x]')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-m", "normbench.cli", "check-norm", "hostile_norm.Hostile"],
        capture_output=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert b"Traceback" not in result.stderr
    assert_inert(result.stdout)
    assert_inert(result.stderr)
    assert f"ValueError: {SHOWN}[/x]".encode() in result.stderr


@pytest.mark.parametrize(
    "args, quoted",
    [
        ([f"results{HOSTILE}"], f"No such command 'results{SHOWN}'"),
        (["results", f"--x{HOSTILE}"], f"No such option: --x{SHOWN}"),
        (["list", HOSTILE], f"Got unexpected extra argument(s) ({SHOWN})"),
        (["bench", "--repeats", HOSTILE], "Invalid value for '--repeats'"),
    ],
    ids=["command", "option", "argument", "value"],
)
def test_what_the_command_line_parser_quotes_is_escaped(args, quoted):
    result = cli.invoke(app, args)
    assert result.exit_code == 2
    assert_inert(result.stdout_bytes + result.stderr_bytes)
    assert quoted in result.output


def test_an_environment_variables_value_is_escaped_in_its_error(monkeypatch):
    monkeypatch.setenv("NORMBENCH_KERNEL_ISA", HOSTILE)
    result = cli.invoke(app, ["check-norm", "custom_bn"])
    assert_one_line_error(result, "NORMBENCH_KERNEL_ISA=")
    assert_inert(result.stderr_bytes)


# ------------------------------------------------------- errors off a terminal, logs, tracebacks


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", *TINY, "batch_size=5000"], "batch_size=5000 is larger than the training set"),
        (["bench", "--impl", "bogus", "--out", "b.csv"], "unknown impl 'bogus'"),
    ],
    ids=["run", "bench"],
)
def test_an_error_after_the_progress_display_is_entered_is_exactly_one_line(
    tmp_path, monkeypatch, args, expected
):
    """Off a terminal (here, as in a pipe or a log file), rich's display stopping wrote a
    line break of its own before the error: two lines, the first blank."""
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr and result.stdout == ""


@pytest.fixture
def logging_restored():
    """The process's logging as it was: Hydra configures it when a sweep asks it to log."""
    import logging

    every = [logging.getLogger(), *logging.root.manager.loggerDict.values()]
    saved = {
        log: (log.handlers[:], log.level, log.propagate, log.disabled)
        for log in every
        if isinstance(log, logging.Logger)
    }
    factory = logging.getLogRecordFactory()
    yield
    for log in [logging.getLogger(), *logging.root.manager.loggerDict.values()]:
        if isinstance(log, logging.Logger):
            log.handlers[:], log.level, log.propagate, log.disabled = saved.get(
                log, ([], logging.NOTSET, True, False)
            )
    logging.setLogRecordFactory(factory)


def test_hydras_log_of_a_sweep_shows_the_overrides_escaped(tmp_path, logging_restored):
    """Hydra's logging, turned on by the user, echoes every job's overrides as typed."""
    out = tmp_path / f"out{HOSTILE}[/x]"
    result = cli.invoke(
        app,
        ["sweep", f"out_dir='{out}'", *TINY, "norm=custom_bn",
         "hydra/hydra_logging=default", "hydra/job_logging=default"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert_inert(result.stdout_bytes)
    assert_inert(result.stderr_bytes)
    assert "[HYDRA] Launching 1 jobs locally" in result.stdout
    assert f"#0 : out_dir='{tmp_path}/out{SHOWN}[/x]'" in result.stdout


def test_a_failing_norms_traceback_in_a_sweep_is_shown_escaped(tmp_path, monkeypatch):
    """A user's norm that fails in training: the run is recorded failed, and its traceback
    goes to the job's log, which under the basic launcher is the terminal."""
    (tmp_path / "late_norm.py").write_text(
        "import torch\n\n\n"
        "class Late(torch.nn.BatchNorm2d):\n"
        "    def forward(self, x):\n"
        "        if torch.is_grad_enabled():  # in training, after normbench's check (no_grad)\n"
        f"            raise ValueError({HOSTILE!r} + '[/x]')\n"
        "        return super().forward(x)\n"
    )
    (tmp_path / "conf" / "norm").mkdir(parents=True)
    (tmp_path / "conf" / "norm" / "late.yaml").write_text("name: late\n_target_: late_norm.Late\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["--config-dir", str(tmp_path / "conf"), "sweep", f"out_dir={tmp_path}", *TINY]
    result = cli.invoke(app, [*args, "norm=late"])
    assert result.exit_code == 1, result.output
    assert_inert(result.stderr_bytes)
    assert f"ValueError: {SHOWN}[/x]" in result.stderr
    assert "0 completed, 1 failed" in result.stdout


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "inf"])
def test_a_bad_result_wait_is_refused_before_the_sweep_plans(tmp_path, monkeypatch, value):
    monkeypatch.setenv("NORMBENCH_RESULT_WAIT_S", value)
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(app, ["sweep", *TINY, f"out_dir={tmp_path / 'out'}"])
    assert_one_line_error(
        result, f"NORMBENCH_RESULT_WAIT_S={value!r}: expected a number of seconds, 0 or more"
    )
    assert not (tmp_path / "out").exists()
