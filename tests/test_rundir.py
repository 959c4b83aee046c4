"""Tests for normbench.rundir: atomic writes of run files and tables, the umask, leftovers
of killed writers."""

from pathlib import Path

import pytest

from normbench import rundir


def test_a_failed_write_leaves_no_file(tmp_path):
    class Broken:
        """A figure that dies half-way through saving."""

        def savefig(self, handle, **kwargs):
            handle.write(b"\x89PNG half")
            raise RuntimeError("killed")

    path = tmp_path / "plots" / "broken.png"
    with pytest.raises(RuntimeError, match="killed"):
        rundir.write_figure(path, Broken())
    assert list(path.parent.iterdir()) == []


def test_write_figure_saves_a_png_atomically(tmp_path):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2, 2))
    figure.add_subplot().plot([1, 2], [3, 4])
    path = tmp_path / "plots" / "curve.png"
    rundir.write_figure(path, figure, dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["curve.png"]


def test_every_file_written_follows_the_umask(tmp_path):
    """Run files, tables and figures are 0o666 less the umask (not mkstemp's 0600), so
    collaborators on a shared file system can read results."""
    import stat
    import subprocess
    import sys

    for umask in (0o022, 0o007):
        out = tmp_path / f"umask{umask:03o}"
        script = (
            f"import os; os.umask({umask}); "
            "from normbench.cli import app; "
            f"app(['sweep', 'out_dir={out}', 'epochs=1', 'dataset.train_size=128', "
            "'threads=1', 'norm=layer'])"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        files = [p for p in out.rglob("*") if p.is_file()]
        assert {p.suffix for p in files} >= {".json", ".csv", ".yaml", ".parquet", ".png"}
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_leftovers_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    from normbench.rundir import write_json

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    killed = tmp_path / f".summary.json.{host}.{dead.pid}.a1b2c3d4.tmp"
    alive = tmp_path / f".summary.json.{host}.{os.getpid()}.e5f6a7b8.tmp"  # being written
    foreign_old = tmp_path / ".summary.json.node7.123.c0ffee00.tmp"
    foreign_new = tmp_path / ".summary.json.node7.124.c0ffee01.tmp"
    other_file = tmp_path / f".metrics.csv.{host}.{dead.pid}.a1b2c3d4.tmp"
    for path in (killed, alive, foreign_old, foreign_new, other_file):
        path.write_text("{")
    day_ago = time.time() - 2 * 86400
    os.utime(foreign_old, (day_ago, day_ago))
    write_json(tmp_path / "summary.json", {"status": "completed"})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["summary.json", alive.name, foreign_new.name, other_file.name])


def test_bn_stats_log_keeps_the_resumed_epochs_rows_only(tmp_path):
    path = tmp_path / rundir.BN_STATS_FILE
    row = dict.fromkeys(rundir.BN_STATS_MEASURES, 0.5)
    log = rundir.BnStatsLog(path, "abc")
    assert rundir.read_bn_stats(path).empty  # the header from the start
    for epoch in (1, 2, 3):  # epoch 3 written, the run killed before its checkpoint
        log.add([{"epoch": epoch, "layer": name, "channels": 4, "batches": 2, **row}
                 for name in ("a", "b")])  # fmt: skip
    table = rundir.read_bn_stats(path)
    assert list(table.columns) == list(rundir.BN_STATS_COLUMNS) and len(table) == 6
    resumed = rundir.BnStatsLog(path, "abc", through=2)  # its checkpoint's epoch
    assert [r["epoch"] for r in resumed.rows] == [1, 1, 2, 2]
    assert list(rundir.read_bn_stats(path).epoch) == [1, 1, 2, 2]
    path.write_text("garbage\n")  # a damaged file: the earlier rows are lost, not the run
    assert rundir.BnStatsLog(path, "abc", through=2).rows == []
    with pytest.raises(ValueError):
        path.write_text("garbage\n")
        rundir.read_bn_stats(path)


def _probe_many(args) -> str | None:
    """One of several processes checking sibling run folders under an experiment folder
    that none of them has made yet, as a sweep's parallel jobs start."""
    root, index, rounds = args
    from normbench.rundir import check_writable

    for _ in range(rounds):
        try:
            check_writable(Path(root) / "exp" / "runs" / f"run{index}")
        except Exception as err:  # the failure itself is the finding
            return f"{type(err).__name__}: {err}"
    return None


def test_parallel_jobs_checking_sibling_folders_never_fail_each_other(tmp_path):
    """Each check makes the folders it needs and removes them again; jobs that start
    together make and remove the same parents: neither one's mkdir nor its removal may
    fail the other's check (a sweep under joblib lost a run to "File exists")."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        failures = pool.map(_probe_many, [(str(tmp_path), i, 80) for i in range(4)])
    assert failures == [None] * 4
    # No probe is left behind; a parent that one job made while another was using it
    # stays (empty): the one using it did not make it, and the one that made it could not
    # remove it then.
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []
