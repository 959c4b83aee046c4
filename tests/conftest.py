"""Shared test setup: Triton's interpreter where there is no GPU; no wait for SLURM
jobs' result files on the one-node cluster; no user config folder
carried from one test to the next; config composition; run folders, real and synthetic;
a fake sysfs listing of the CPU's caches; pip's build flags; the longest test file first."""

import copy
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from normbench import rundir
from normbench.config import compose
from normbench.rundir import METRIC_COLUMNS, SUMMARY_FIELDS, metrics_frame

# A suite started where SIGINT is ignored (a background job of a non-interactive shell,
# `(bash .ci/run &)`, inherits SIG_IGN, and Python then leaves it so) would hand that on to
# every process it starts, and the tests of Ctrl-C would find nothing to stop: Python's
# own handler, as under a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Likewise SIGHUP under `nohup pytest`: the tests of a closed terminal need the default.
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

# The test cluster has one node, whose submitit folders are on this disk: a job's result
# file is there when the job ends, and submitit's 15 s wait for a shared file system to
# show it (a cancelled or killed job's, which never comes) is not the tests' to pay.
os.environ.setdefault("NORMBENCH_RESULT_WAIT_S", "0")

# Triton reads this when it is imported: without CUDA its kernels run on the CPU only as
# the interpreter, which is how tests/test_kernels_triton.py checks them here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def no_user_config_dirs(monkeypatch):
    """Each test starts with no user config folder: the CLI's ``--config-dir`` adds to a
    process-wide list, which would otherwise carry a test's folder (its norms) into the
    next tests of the same worker."""
    from normbench import options

    monkeypatch.setattr(options, "_user_dirs", [])


@pytest.fixture(autouse=True)
def stop_signals_as_they_were():
    """Each test leaves the stop signals' handlers as it found them: a CLI command run in
    this process that was stopped ignores further stop signals as it ends
    (``interrupts.ignore_further_stops``), which the worker's next tests, and every process
    they start, inherited (the tests of Ctrl-C and SIGHUP then found nothing to stop)."""
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {signum: signal.getsignal(signum) for signum in stops}
    yield
    for signum, handler in before.items():
        if signal.getsignal(signum) is not handler and handler is not None:
            signal.signal(signum, handler)


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


# The longest files (the sweeps on real SLURM, and on submitit, joblib and Ray engines,
# each about 2.5 minutes on 2 cores) go first: with a file per worker at a time
# (pyproject's --dist loadfile) they then start at once, side by side, while the other
# workers share the rest, instead of starting halfway and running alone at the end. A
# stable sort: the rest keep their order.
LONGEST_FIRST = ("test_launchers_slurm.py", "test_launchers.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)


# ------------------------------------------- run folders (analysis, reports, views tests)


@pytest.fixture(scope="session")
def real_experiment(tmp_path_factory):
    """Four real tiny runs (custom_bn and layer x seeds 0, 1) and one interrupted run,
    trained once per session (worker): tests only read it, or copy it (``real_copy``)."""
    from normbench import runner

    out = tmp_path_factory.mktemp("real") / "results"
    for norm in ("custom_bn", "layer"):
        for seed in (0, 1):
            cfg = compose(
                [
                    f"norm={norm}",
                    f"seed={seed}",
                    "dataset.train_size=128",
                    "epochs=1",
                    "batch_size=32",
                    f"out_dir={out}",
                    "threads=1",
                ]
            )
            runner.run(cfg)
    exp = out / "default"
    # Killed during its first epoch: a config, the header-only metrics, stray temp files.
    first = sorted((exp / "runs").iterdir())[0]
    killed = exp / "runs" / "0000killed00"
    killed.mkdir()
    shutil.copy(first / "config.yaml", killed / "config.yaml")
    (killed / "metrics.csv").write_text(",".join(METRIC_COLUMNS) + "\n")
    (killed / ".summary.json.k3j4h5.tmp").write_text('{"run_id": "0000k')
    (killed / ".metrics.csv.x8y9z0.tmp").write_text("run_id,epo")
    return exp


@pytest.fixture
def real_copy(real_experiment, tmp_path):
    """A copy of the real experiment that a test may write into."""
    return shutil.copytree(real_experiment, tmp_path / "results" / "default")


@pytest.fixture(scope="module")
def base_config():
    return OmegaConf.to_container(compose(["epochs=3", "dataset.train_size=128"]), resolve=True)


@pytest.fixture
def make_run(base_config):
    """Write a synthetic run folder as the runner does, with exact accuracies."""

    def make(exp, status="completed", final=0.9, best=None, at_best_val=None, **overrides):
        cfg = copy.deepcopy(base_config)
        for dotted, value in overrides.items():
            node = cfg
            *parents, last = dotted.split("__")
            for part in parents:
                node = node[part]
            node[last] = value
        rid = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
        folder = exp / "runs" / rid
        acc = final if status == "completed" else None
        records = [
            {"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5, "test_loss": 0.5, "lr": 0.1}
            | ({"test_acc": acc} if acc is not None else {})
            for e in range(1, cfg["epochs"] + 1)
        ]
        summary = dict.fromkeys(SUMMARY_FIELDS)
        summary.update(
            run_id=rid,
            status=status,
            name=cfg["name"],
            model=cfg["model"]["name"],
            norm=cfg["norm"]["name"],
            dataset=cfg["dataset"]["name"],
            optim=cfg["optim"]["name"],
            batch_size=cfg["batch_size"],
            lr=cfg["lr"],
            epochs=cfg["epochs"],
            seed=cfg["seed"],
            threads=cfg["threads"],
            device="cpu",
            final_test_acc=acc,
            best_test_acc=(best if best is not None else acc) if acc is not None else None,
            test_acc_at_best_val=(at_best_val if at_best_val is not None else acc)
            if acc is not None
            else None,
            error={"failed": "RuntimeError: boom", "diverged": "loss is nan"}.get(status),
        )
        rundir.write_text(folder / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)))
        rundir.write_csv(folder / "metrics.csv", metrics_frame(rid, records))
        rundir.write_json(folder / "summary.json", summary)
        return folder

    return make


@pytest.fixture
def grid(tmp_path, make_run):
    """custom_bn and layer x batch sizes 8, 32, 128 x seeds 0, 1 (accuracies known)."""
    exp = tmp_path / "results" / "grid"
    for n, norm in enumerate(("custom_bn", "layer")):
        for b, bs in enumerate((8, 32, 128)):
            for seed in (0, 1):
                make_run(
                    exp,
                    final=0.5 + 0.1 * n + 0.01 * b + 0.001 * seed,
                    norm__name=norm,
                    batch_size=bs,
                    seed=seed,
                )
    return exp
