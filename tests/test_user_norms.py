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
    """A module of the user's on their path, and a config folder naming its class."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "mynorms.py").write_text(MODULE)
    conf = tmp_path / "myconf" / "norm"
    conf.mkdir(parents=True)
    (conf / "scale.yaml").write_text(
        "# ScaleNorm: each sample over its L2 norm, one learned scale\n"
        "name: scale\n_target_: mynorms.ScaleNorm\neps: 1.0e-5\n"
    )
    return code, tmp_path / "myconf"


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
        "run", f"hydra.searchpath=[file://{conf}]", "norm=scale", "epochs=2",
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
