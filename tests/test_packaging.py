"""normbench as a package from an index: a wheel built from this tree, installed into a
fresh virtual environment, works with no source tree in sight.

The wheel is built (``pip wheel``) and installed with ``--no-deps`` into a new venv whose
site-packages is then made read-only; its dependencies (torch and the rest, 6 GB) come
from the environment running the tests, appended to the new venv's path by a ``.pth``
line, so the new venv's own normbench, the wheel's, is the one imported. Then, from an
empty folder elsewhere, ``normbench run experiment=smoke`` composes the packaged configs
and compiles the CPU kernel into an empty cache.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _read_only(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory, pip_build_flags):
    work = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            *pip_build_flags,
            "-w",
            str(work / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("normbench-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-compile",
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    # The test environment's packages after the venv's own: a plain path line, so the
    # editable install's finder there is not loaded and the wheel's normbench wins.
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _read_only(site)
    yield venv, site
    for path in [site, *site.rglob("*")]:  # let pytest clean up
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_the_wheel_holds_the_configs_and_the_kernel_source(wheel_venv):
    venv, site = wheel_venv
    assert (site / "normbench" / "conf" / "config.yaml").is_file()
    for group in ("model", "norm", "dataset", "optim", "experiment"):
        assert list((site / "normbench" / "conf" / group).glob("*.yaml")), group
    assert (site / "normbench" / "kernels" / "batchnorm_cpu.cpp").is_file()
    assert (site / "hydra_plugins" / "normbench_sweeper" / "__init__.py").is_file()


def test_a_wheel_install_runs_from_anywhere_and_compiles_its_kernel(wheel_venv, tmp_path):
    venv, site = wheel_venv
    elsewhere = tmp_path / "anywhere"
    elsewhere.mkdir()
    env = {
        **os.environ,
        "NORMBENCH_KERNEL_CACHE": str(tmp_path / "kernel-cache"),  # empty: compiles
        # the -O0 build: what is tested is that the wheel's source is found, compiled and
        # loaded, and it compiles in a third of the optimized build's time
        "NORMBENCH_KERNEL_DEBUG": "1",
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("PYTHONPATH", None)
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import normbench, sys; print(normbench.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(site)), where

    def normbench(*args: str) -> subprocess.CompletedProcess:
        """The installed command, from the folder outside the repository."""
        return subprocess.run(
            [venv / "bin" / "normbench", *args],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    done = normbench("run", "experiment=smoke", "threads=1")
    assert done.returncode == 0, done.stderr
    assert "test acc" in done.stdout
    assert list((elsewhere / "results" / "smoke" / "runs").glob("*/summary.json"))
    (library,) = (tmp_path / "kernel-cache").glob("normbench_bn_cpu_*/*.so")
    assert " -O0" in (library.parent / "build.ninja").read_text()
    # and the sweep, through Hydra and normbench's sweeper from site-packages
    swept = normbench("sweep", "experiment=smoke", "threads=1", "seed=0,1")
    assert swept.returncode == 0, swept.stderr
    assert "1 completed, 1 skipped" in swept.stdout
