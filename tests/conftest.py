"""Shared test setup: Triton's interpreter where there is no GPU; no user config folder
carried from one test to the next; config composition; a fake sysfs listing of the CPU's
caches; pip's build flags; the longest test file first."""

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

from normbench.config import compose

# Triton reads this when it is imported: without CUDA its kernels run on the CPU only as
# the interpreter, which is how tests/test_kernels_triton.py checks them here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def no_user_config_dirs(monkeypatch):
    """Each test starts with no user config folder: the CLI's ``--config-dir`` adds to a
    process-wide list, which would otherwise carry a test's folder (its norms) into the
    next tests of the same worker."""
    from normbench import config

    monkeypatch.setattr(config, "_user_dirs", [])


@pytest.fixture
def tiny(tmp_path):
    """Compose a seconds-long config writing under ``tmp_path``."""

    def make(*overrides):
        base = [
            f"out_dir={tmp_path / 'results'}",
            "epochs=1",
            "batch_size=64",
            "dataset.train_size=256",
            "threads=1",
        ]
        return compose([*base, *overrides])

    return make


@pytest.fixture
def fake_cpu_caches(tmp_path, monkeypatch):
    """List caches as Linux's sysfs does (``index*/level``, ``type``, ``size``) in a
    folder that ``normbench.bench`` reads instead of cpu0's: call with (level, type, size)
    triples, e.g. ``("2", "Unified", "2048K")``."""
    from normbench import bench

    def make(listed):
        for index, (level, kind, size) in enumerate(listed):
            folder = tmp_path / "caches" / f"index{index}"
            folder.mkdir(parents=True)
            for name, text in (("level", level), ("type", kind), ("size", size)):
                (folder / name).write_text(text + "\n")
        monkeypatch.setattr(bench, "CPU_CACHES", tmp_path / "caches")

    return make


@pytest.fixture(scope="session")
def pip_build_flags():
    """pip's flags for building a package from source (normbench, or a test's own): this
    environment's build backend, with no download, where it meets pyproject.toml's
    ``build-system.requires`` (setuptools 77 for the SPDX ``license``, which also has
    ``bdist_wheel`` built in), else pip's isolated build, which fetches one that does."""
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ImportError:  # Python 3.10 reads no TOML: pip's isolated build
        return []
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    for requirement in map(Requirement, pyproject["build-system"]["requires"]):
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return []
        if not requirement.specifier.contains(installed, prereleases=True):
            return []
    return ["--no-build-isolation"]


# The longest file (the sweeps on real SLURM, Ray, submitit and joblib engines, about 5
# minutes on 2 cores) goes first: with a file per worker at a time (pyproject's
# --dist loadfile) it then starts at once while the other workers share the rest, instead
# of starting halfway and running alone at the end. A stable sort: the rest keep their order.
LONGEST_FIRST = "test_launchers.py"


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name != LONGEST_FIRST)
