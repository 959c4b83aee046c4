"""The test clusters' scripts (``tests/cluster/``): each is there, executable and valid
bash, and bringing up the SLURM cluster when it is already up returns at once and
changes nothing (the other tests' jobs run on it meanwhile). Bringing the clusters up
from nothing is the fixtures' of tests/test_launchers_slurm.py (``slurm``) and
tests/test_launchers.py (``ray_cluster``)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parent / "cluster"
SCRIPTS = ["slurm_up.sh", "slurm_down.sh", "ray_up.sh", "ray_down.sh"]
STATE = Path(os.environ.get("NORMBENCH_SLURM_DIR", "/var/lib/normbench-slurm"))
DAEMONS = {"slurmd": "run", "slurmctld": "run", "slurmdbd": "run", "mariadbd": "mysql"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_cluster_script_is_executable_bash(name):
    script = CLUSTER / name
    assert script.is_file()
    assert os.access(script, os.X_OK), f"{script} is not executable (chmod +x)"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def _ours_running() -> bool:
    """Every daemon of slurm_up.sh's cluster runs (by its PID file and name)."""
    for daemon, folder in DAEMONS.items():
        try:
            pid = (STATE / folder / f"{daemon}.pid").read_text().strip()
            if Path(f"/proc/{pid}/comm").read_text().strip() != daemon:
                return False
        except OSError:
            return False
    return True


def test_slurm_up_on_a_running_cluster_returns_at_once_and_changes_nothing():
    """Only on a cluster that slurm_up.sh brought up: then it is a no-op (it reads, never
    restarts), so it is safe beside the SLURM tests running on the same cluster."""
    if os.geteuid() != 0 or not _ours_running():
        pytest.skip("no SLURM cluster of tests/cluster/slurm_up.sh up here (it needs root)")
    conf = Path("/etc/slurm/slurm.conf").read_text()
    pids = {d: (STATE / f / f"{d}.pid").read_text() for d, f in DAEMONS.items()}
    start = time.monotonic()
    up = subprocess.run(
        ["bash", str(CLUSTER / "slurm_up.sh")], capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - start
    assert up.returncode == 0, up.stdout + up.stderr
    assert "already up" in up.stdout
    assert took < 5, f"slurm_up.sh took {took:.1f} s on a running cluster"
    assert Path("/etc/slurm/slurm.conf").read_text() == conf
    assert {d: (STATE / f / f"{d}.pid").read_text() for d, f in DAEMONS.items()} == pids
