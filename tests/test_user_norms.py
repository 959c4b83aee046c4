"""A user's own normalization, with no edit to normbench: from a config folder of theirs
(``--config-dir``, or Hydra's search path) with a ``_target_``, and from an installed
package's entry point; ``normbench check-norm`` on a good class and on a broken one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MODULE = '''
"""A user's own norm: ScaleNorm (Nguyen & Salazar 2019)."""
import math

import torch
from torch import nn


class ScaleNorm(nn.Module):
    """ScaleNorm: each sample divided by its L2 norm, times one learned scale."""

    centers = False

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.tensor(math.sqrt(num_channels)))

    def forward(self, x):
        norm = x.flatten(1).norm(dim=1).clamp_min(self.eps)
        return self.g * x / norm.view(-1, *[1] * (x.dim() - 1))


class Broken(nn.Module):
    """Drops the channel dimension and ignores a parameter."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_channels))

    def forward(self, x):
        return x.mean(1)


class ViewsContiguous(ScaleNorm):
    """Says it prefers channels_last, but views its input as contiguous."""

    prefers_channels_last = True

    def forward(self, x):
        flat = x.view(x.shape[0], -1)
        return self.g * x / flat.norm(dim=1).clamp_min(self.eps).view(-1, *[1] * (x.dim() - 1))
'''


def normbench(*args: str, cwd: Path, path: Path | None = None, timeout: float = 300):
    env = {**os.environ}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "normbench.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture
def user_files(tmp_path):
    """A module of the user's on their path, and a config folder naming its class (in a
    folder whose name Hydra's override grammar would read: quoted in its search path)."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "mynorms.py").write_text(MODULE)
    conf = tmp_path / "my [conf],x" / "norm"
    conf.mkdir(parents=True)
    (conf / "scale.yaml").write_text(
        "# ScaleNorm: each sample over its L2 norm, one learned scale\n"
        "name: scale\n_target_: mynorms.ScaleNorm\neps: 1.0e-5\n"
    )
    return code, tmp_path / "my [conf],x"


def test_a_norm_from_the_users_config_folder_sweeps_and_is_listed(tmp_path, user_files):
    code, conf = user_files
    listed = normbench("--config-dir", str(conf), "list", cwd=tmp_path, path=code)
    assert listed.returncode == 0 and "scale" in listed.stdout and "ScaleNorm" in listed.stdout
    swept = normbench(
        "--config-dir", str(conf), "sweep", "norm=scale,layer", "epochs=1",
        "dataset.train_size=128", "threads=1", f"out_dir={tmp_path / 'out'}",
        cwd=tmp_path, path=code,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    assert "2 completed" in swept.stdout
    norms = {json.loads(p.read_text())["norm"] for p in tmp_path.glob("out/*/runs/*/summary.json")}
    assert norms == {"scale", "layer"}
    # Hydra's own search path works the same
    again = normbench(
        "run", f"hydra.searchpath=['file://{conf}']", "norm=scale", "epochs=2",
        "dataset.train_size=128", "threads=1", f"out_dir={tmp_path / 'out'}",
        cwd=tmp_path, path=code,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    # without the code on the path: one line naming the class, nothing written
    missing = normbench(
        "--config-dir", str(conf), "run", "norm=scale", "epochs=3",
        f"out_dir={tmp_path / 'none'}", cwd=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 2 and "cannot import the norm class 'mynorms.ScaleNorm'" in (
        missing.stderr
    )
    assert not (tmp_path / "none").exists()


def test_a_norm_from_an_installed_packages_entry_point(tmp_path, pip_build_flags):
    """A package declaring ``[project.entry-points."normbench.norms"]``, installed by pip
    (into a folder of its own, put on the path), appears in list and trains."""
    package = tmp_path / "pkg"
    (package / "mynorm_pkg").mkdir(parents=True)
    (package / "mynorm_pkg" / "__init__.py").write_text(MODULE)
    (package / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "mynorm-pkg"
            version = "0.1"

            [project.entry-points."normbench.norms"]
            scale = "mynorm_pkg:ScaleNorm"
            """
        )
    )
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", *pip_build_flags,
         "--target", str(target), str(package)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    listed = normbench("list", cwd=tmp_path, path=target)
    assert listed.returncode == 0, listed.stderr
    assert "│ scale" in listed.stdout and "mynorm_pkg:ScaleNorm" in listed.stdout
    swept = normbench(
        "sweep", "norm=scale,layer", "epochs=1", "dataset.train_size=128", "threads=1",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"out_dir={tmp_path / 'out'}",
        cwd=tmp_path, path=target,
    )  # fmt: skip
    assert swept.returncode == 0, swept.stderr
    assert "2 completed" in swept.stdout
    config = normbench("config", "norm=scale", cwd=tmp_path, path=target)
    assert "_target_: mynorm_pkg.ScaleNorm" in config.stdout and "eps: 1.0e-05" in config.stdout


def test_check_norm_passes_a_good_class_and_names_a_broken_ones_failures(tmp_path, user_files):
    code, _ = user_files
    good = normbench("check-norm", "mynorms.ScaleNorm", cwd=tmp_path, path=code)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "all 8 checks passed" in good.stdout
    assert "not declared (prefers_channels_last)" in good.stdout
    broken = normbench("check-norm", "mynorms.Broken", cwd=tmp_path, path=code)
    assert broken.returncode == 1
    failures = broken.stderr.splitlines()
    assert (
        "FAILED images (N, C, H, W): AssertionError: in training mode (6, 12, 5, 5) became "
        "(6, 5, 5)" in failures
    )
    assert any(line.startswith("FAILED gradients: ") for line in failures)
    assert failures[-1] == "6 of 8 checks failed"
    views = normbench("check-norm", "mynorms.ViewsContiguous", cwd=tmp_path, path=code)
    assert views.returncode == 1
    assert views.stderr.splitlines()[-1] == "1 of 8 checks failed"
    assert "FAILED channels_last: RuntimeError: view size is not compatible" in views.stderr
    unknown = normbench("check-norm", "mynorms.Nope", cwd=tmp_path, path=code)
    assert unknown.returncode == 2 and "cannot import the norm class" in unknown.stderr
    assert "Traceback" not in unknown.stderr


# ------------------------------------------- a user's code that fails: one line naming it

FAULTY = '''
"""Norm classes that fail in every way a user's code can."""
import sys

import torch
from torch import nn


class _Keeps(nn.Module):
    def __init__(self, num_channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_channels))


class RaisesInInit(nn.Module):
    def __init__(self, num_channels: int):
        raise RuntimeError("needs a GPU\\nand a second line")


class ExitsInInit(nn.Module):
    def __init__(self, num_channels: int):
        sys.exit()


class ExitsInForward(_Keeps):
    def forward(self, x):
        sys.exit(4)


class RaisesInForward(_Keeps):
    def forward(self, x):
        raise RuntimeError("CUDA kernel missing")


class OneChannel(_Keeps):
    def forward(self, x):
        return x[:, :1]


class Integers(_Keeps):
    def forward(self, x):
        return x.long()


class Doubles(_Keeps):
    def forward(self, x):
        return x.double()


class Pair(_Keeps):
    def forward(self, x):
        return x, x


class EvalOnlyWrong(_Keeps):
    def forward(self, x):
        return x if self.training else x[:, :1]


class OnMeta(_Keeps):
    def forward(self, x):
        return torch.empty_like(x, device="meta")


class _Unprintable(Exception):
    def __str__(self):
        raise ValueError("str fails")


class Unprintable(_Keeps):
    def forward(self, x):
        raise _Unprintable("out of luck")


class FailsInTraining(_Keeps):
    def forward(self, x):
        if torch.is_grad_enabled():  # the checks before a run probe without gradients
            raise RuntimeError("late failure \\x1b]0;PWN\\x07\\nand a second line")
        return x * self.scale.view(1, -1, 1, 1)


class _Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward boom")


class FailsInBackward(_Keeps):
    def forward(self, x):
        return _Boom.apply(x * self.scale.view(1, -1, 1, 1))


class InterruptsInInit(nn.Module):
    def __init__(self, num_channels: int):
        raise KeyboardInterrupt
'''

FAULTS = {
    "RaisesInInit": "building RaisesInInit(32) raised RuntimeError: needs a GPU",
    "ExitsInInit": "building ExitsInInit(32) raised SystemExit",
    "ExitsInForward": "ExitsInForward.forward raised SystemExit: 4",
    "RaisesInForward": "RaisesInForward.forward raised RuntimeError: CUDA kernel missing",
    "OneChannel": "OneChannel.forward in training mode: (128, 32, 8, 8) became (128, 1, 8, 8)",
    "Integers": "Integers.forward in training mode: float32 input gave int64",
    "Doubles": "Doubles.forward in training mode: float32 input gave float64",
    "Pair": "Pair.forward in training mode: (128, 32, 8, 8) became a tuple, not a tensor",
    "EvalOnlyWrong": "EvalOnlyWrong.forward in eval mode: (128, 32, 8, 8) became (128, 1, 8, 8)",
    "OnMeta": "OnMeta.forward in training mode: input on cpu gave an output on meta",
    # its __str__ raises: its repr stands in
    "Unprintable": "Unprintable.forward raised _Unprintable: _Unprintable('out of luck')",
}

#: Classes that pass the checks before a run and fail in it, or stop it.
LATER = ("FailsInTraining", "FailsInBackward", "InterruptsInInit")


@pytest.fixture
def faulty(tmp_path, monkeypatch):
    """The faulty classes importable here, and a config folder naming each; in-process, as
    a user's code that fails must not end or hang normbench's process either."""
    from normbench import options

    code = tmp_path / "code"
    code.mkdir()
    (code / "faulty_norms.py").write_text(FAULTY)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setattr(options, "_user_dirs", [])  # the CLI's --config-dir adds to it
    conf = tmp_path / "conf" / "norm"
    conf.mkdir(parents=True)
    for name in (*FAULTS, *LATER):
        (conf / f"{name}.yaml").write_text(f"name: {name}\n_target_: faulty_norms.{name}\n")
    return tmp_path / "conf"


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_user_norm_that_fails_is_one_line_naming_it(tmp_path, faulty, name):
    from typer.testing import CliRunner

    from normbench.cli import app

    runner = CliRunner()
    out = tmp_path / "out"
    for command in ("run", "sweep"):
        norms = [f"norm={name}"] if command == "run" else [f"norm=layer,{name}"]
        result = runner.invoke(
            app,
            ["--config-dir", str(faulty), command, *norms, "epochs=1", "threads=1",
             "dataset.train_size=128", f"out_dir={out}"],
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        plugin = f"norm={name} (_target_ faulty_norms.{name} in {faulty / 'norm' / name}.yaml)"
        assert f"{plugin}: {FAULTS[name]}" in lines[0]
        assert not out.exists()


def test_check_norm_reports_exits_and_wrong_outputs_as_failed_checks(tmp_path, faulty):
    from typer.testing import CliRunner

    from normbench.cli import app

    runner = CliRunner()
    for name, expected in [
        ("ExitsInInit", "FAILED builds from (num_channels): SystemExit (at faulty_norms.py:"),
        ("Pair", "FAILED images (N, C, H, W): AssertionError: in training mode (6, 12, 5, 5) "
         "became a tuple, not a tensor"),
        ("Doubles", "FAILED images (N, C, H, W): AssertionError: in training mode float32 input "
         "gave float64"),
        ("OnMeta", "FAILED images (N, C, H, W): AssertionError: in training mode input on cpu "
         "gave an output on meta"),
        ("Unprintable", "FAILED images (N, C, H, W): _Unprintable: _Unprintable('out of luck') "
         "(at faulty_norms.py:"),
    ]:  # fmt: skip
        result = runner.invoke(app, ["check-norm", f"faulty_norms.{name}"])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert any(line.startswith(expected) for line in result.stderr.splitlines()), result.stderr


def _plugin(conf: Path, name: str) -> str:
    return f"norm={name} (_target_ faulty_norms.{name} in {conf / 'norm' / name}.yaml)"


@pytest.mark.parametrize(
    "name, shown, recorded",
    [
        ("FailsInTraining", "RuntimeError: late failure \\x1b]0;PWN\\x07",
         "RuntimeError: late failure \x1b]0;PWN\x07"),
        ("FailsInBackward", "RuntimeError: backward boom", "RuntimeError: backward boom"),
    ],
    ids=["forward", "backward"],
)  # fmt: skip
def test_a_user_norm_that_fails_in_training_is_one_line_and_its_traceback_a_file(
    tmp_path, faulty, name, shown, recorded
):
    """Past the checks before a run, the user's forward (or backward) raises in training:
    the run is recorded as failed with the error, the traceback goes to its error.log,
    and the terminal gets one escaped line naming the class and that file; exit 1."""
    from typer.testing import CliRunner

    from normbench.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["--config-dir", str(faulty), "run", f"norm={name}", "epochs=1", "threads=1",
         "dataset.train_size=128", f"out_dir={out}"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "\x1b" not in result.output
    (folder,) = (out / "default" / "runs").iterdir()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {_plugin(faulty, name)} failed in training: {shown}; the run is recorded as "
        f"failed, its traceback is in {folder / 'error.log'}"
    ]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == f"{_plugin(faulty, name)}: {recorded}"
    log = (folder / "error.log").read_text()
    assert log.startswith("Traceback (most recent call last):")
    assert "faulty_norms.py" in log and recorded in log  # the exact text, in a file


def test_a_sweep_tells_a_user_norm_failing_in_training_in_one_line(tmp_path, faulty):
    """The basic launcher runs the jobs in this process: the failed job is one escaped
    line, the sweep goes on and counts it."""
    from typer.testing import CliRunner

    from normbench.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["--config-dir", str(faulty), "sweep", "norm=layer,FailsInTraining", "epochs=1",
         "threads=1", "dataset.train_size=128", f"out_dir={out}"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "\x1b" not in result.output
    assert "1 completed, 1 failed" in result.stdout
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and failed[0].startswith(
        f"failed: {_plugin(faulty, 'FailsInTraining')} failed in training: RuntimeError: "
        "late failure \\x1b]0;PWN\\x07; the run is recorded as failed, its traceback is in "
    )
    assert len(list(out.glob("default/runs/*/error.log"))) == 1


def test_only_an_exception_through_the_users_code_is_theirs(faulty):
    """A failure whose traceback passes through the user's class is theirs (one line); any
    other (normbench's or torch's alone) is not, and keeps its traceback as a bug."""
    import torch

    from normbench.norms.registry import NormSpec

    spec = NormSpec("RaisesInForward", target="faulty_norms.RaisesInForward")
    with pytest.raises(RuntimeError) as theirs:
        spec(4)(torch.zeros(2, 4, 3, 3))
    with pytest.raises(RuntimeError) as ours:
        torch.zeros(2) + torch.zeros(3)
    assert spec.raised(theirs.value) and not spec.raised(ours.value)
    try:  # raised from theirs (a wrapper that re-raises): still theirs
        raise ValueError("wrapped") from theirs.value
    except ValueError as wrapped:
        assert spec.raised(wrapped)
    assert not NormSpec("layer").raised(theirs.value)  # normbench's own class: never


def test_an_interruption_in_a_users_constructor_says_what_is_true(tmp_path, faulty):
    """A KeyboardInterrupt from the class's own code (or Ctrl-C) while the run is built:
    nothing was recorded, and each command says so in one line, exit 130."""
    from typer.testing import CliRunner

    from normbench.cli import app

    runner, out = CliRunner(), tmp_path / "out"
    tiny = ["epochs=1", "threads=1", "dataset.train_size=128", f"out_dir={out}"]
    expected = {
        "run": "stopped before the run trained; nothing of it is recorded, the same command "
        "again runs it",
        "sweep": "the sweep stopped while planning; nothing ran",
    }
    for command, said in expected.items():
        args = ["--config-dir", str(faulty), command, "norm=InterruptsInInit", *tiny]
        result = runner.invoke(app, args)
        assert result.exit_code == 130, result.output
        assert result.stderr.strip().splitlines() == [f"interrupted by SIGINT (Ctrl-C): {said}"]
    assert not out.exists()
    checked = runner.invoke(app, ["check-norm", "faulty_norms.InterruptsInInit"])
    assert checked.exit_code == 130
    assert checked.stderr.strip().splitlines() == [
        "interrupted by SIGINT (Ctrl-C): the checks stopped, none is reported"
    ]


def test_broken_entry_points_trouble_only_the_commands_that_name_them(tmp_path, pip_build_flags):
    """A package whose entry points fail on import (an ImportError, ``sys.exit(3)``, an
    import that never returns) beside a good one: ``list`` and a run of another norm work
    and print nothing of them; naming a broken one is one line naming the entry point."""
    package = tmp_path / "pkg"
    (package / "plugged").mkdir(parents=True)
    (package / "plugged" / "__init__.py").write_text("")
    (package / "plugged" / "good.py").write_text(MODULE)
    (package / "plugged" / "broken.py").write_text('raise ImportError("needs cupy")\n')
    (package / "plugged" / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (package / "plugged" / "hangs.py").write_text("import time\ntime.sleep(3600)\n")
    (package / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "plugged"
            version = "0.1"

            [project.entry-points."normbench.norms"]
            scale = "plugged.good:ScaleNorm"
            broken = "plugged.broken:Broken"
            exits = "plugged.exits:Exits"
            hangs = "plugged.hangs:Hangs"
            """
        )
    )
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", *pip_build_flags,
         "--target", str(target), str(package)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr

    listed = normbench("list", cwd=tmp_path, path=target, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert listed.stderr == ""
    for name in ("scale", "broken", "exits", "hangs"):
        assert f"│ {name} " in listed.stdout
    # the docstring read from the source, not imported
    assert "ScaleNorm: each sample divided" in listed.stdout

    tiny = ["epochs=1", "dataset.train_size=128", "threads=1", f"out_dir={tmp_path / 'out'}"]
    ran = normbench("run", "norm=scale", *tiny, cwd=tmp_path, path=target, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert "Error getting class" not in ran.stderr and "Traceback" not in ran.stderr

    for name, expected in [
        ("exits", "cannot import the norm class 'plugged.exits.Exits' (entry point exits = "
         "plugged.exits:Exits of package plugged): importing it raised SystemExit: 3"),
        ("broken", "cannot import the norm class 'plugged.broken.Broken' (entry point broken = "
         "plugged.broken:Broken of package plugged): ImportError: needs cupy"),
    ]:  # fmt: skip
        failed = normbench(
            "run", f"norm={name}", *tiny[:-1], f"out_dir={tmp_path / name}",
            cwd=tmp_path, path=target, timeout=120,
        )  # fmt: skip
        assert failed.returncode == 2, failed.stderr
        assert failed.stderr.strip().splitlines() == [f"error: {expected}"]
        assert not (tmp_path / name).exists()


def test_a_users_config_shadowing_a_builtin_is_ignored_with_one_warning(tmp_path):
    """Hydra's search path puts normbench's own folder first: its custom_bn wins, and the
    command says the user's file is ignored."""
    conf = tmp_path / "myconf" / "norm"
    conf.mkdir(parents=True)
    (conf / "custom_bn.yaml").write_text("name: custom_bn\neps: 0.001\nmomentum: 0.5\n")
    shown = normbench("--config-dir", str(tmp_path / "myconf"), "config", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr.splitlines() == [
        f"warning: {conf / 'custom_bn.yaml'} is ignored: normbench's own norm=custom_bn comes "
        "first (Hydra's search path); give yours another name, as norm/my_custom_bn.yaml"
    ]
    assert "  momentum: 0.1\n" in shown.stdout and "momentum: 0.5" not in shown.stdout
