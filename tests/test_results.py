"""Tests of aggregation (normbench.analysis, normbench.reports, normbench.rundir):
collecting run folders, statistics, keys, the four tables, skipped folders, and
``normbench results``."""

import copy
import hashlib
import json
import math
import os
import re
import shutil
import statistics

import pandas as pd
import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from normbench import reports, rundir
from normbench.analysis import stats
from normbench.analysis.collect import collect, find_experiments, read_config
from normbench.analysis.keys import resolve_key, swept_keys
from normbench.analysis.stats import SUMMARY_STAT_COLUMNS, group_stats
from normbench.cli import app
from normbench.config import compose, flatten
from normbench.errors import UserError
from normbench.reports import TABLE_FILES, aggregate
from normbench.rundir import METRIC_COLUMNS, SUMMARY_FIELDS, metrics_frame
from normbench.views import text

cli = CliRunner()

# Student's t 97.5% quantile with 2 degrees of freedom, as in any table.
T975_DF2 = 4.302652729911275


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def real_experiment(tmp_path_factory):
    """Four real tiny runs (custom_bn and layer x seeds 0, 1) and one interrupted run."""
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


def invoke(*args):
    return cli.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------- collect


def test_collect_reads_real_runs_into_summary_and_config_columns(real_experiment):
    collected = collect(real_experiment)
    runs = collected.runs
    assert len(runs) == 4 and set(runs.status) == {"completed"}
    assert list(runs.columns[: len(SUMMARY_FIELDS)]) == list(SUMMARY_FIELDS)
    config_cols = list(runs.columns[len(SUMMARY_FIELDS) :])
    for key in ("norm.name", "optim.momentum", "dataset.train_size", "model.widths"):
        assert key in config_cols
    # Config keys that repeat a summary field with the same values appear once.
    assert list(runs.columns).count("batch_size") == 1 and "config.batch_size" not in runs
    assert "config.seed" not in runs and "config.lr" not in runs
    assert (runs["norm.name"] == runs["norm"]).all()
    assert (runs["dataset.train_size"] == 128).all()
    assert (runs["schedule.milestones"] == "[0.5, 0.75]").all()  # lists as their string form
    assert sorted(runs["norm.name"]) == ["custom_bn", "custom_bn", "layer", "layer"]

    for rid in runs.run_id:
        assert (real_experiment / "runs" / rid / "summary.json").exists()
        own = pd.read_csv(real_experiment / "runs" / rid / "metrics.csv", dtype={"run_id": str})
        got = collected.metrics[collected.metrics.run_id == rid].reset_index(drop=True)
        pd.testing.assert_frame_equal(got[list(METRIC_COLUMNS)], own, check_dtype=False)
        # and the keys that tell the runs apart, for plotting without a join
        row = runs[runs.run_id == rid].iloc[0]
        assert (got["norm.name"] == row["norm.name"]).all() and (got["seed"] == row["seed"]).all()
    # 1 epoch x 9 metrics (7 + val loss, acc) per run, and custom_bn's two runs measure
    # BatchNorm's other inference estimators too
    assert len(collected.metrics) == 4 * 9 + 2 * 2
    assert list(collected.metrics.columns) == [*METRIC_COLUMNS, "norm.name", "seed"]
    assert collected.incomplete == [real_experiment / "runs" / "0000killed00"]
    assert collected.unreadable == []


def test_collect_sorts_runs_by_swept_keys_then_seed(grid):
    runs = collect(grid).runs
    order = list(zip(runs["norm.name"], runs["batch_size"], runs["seed"], strict=True))
    assert order == sorted(order)  # batch sizes 8 < 32 < 128 numerically
    ranks = {rid: i for i, rid in enumerate(runs.run_id)}
    metric_ranks = collect(grid).metrics.run_id.map(ranks)
    assert metric_ranks.is_monotonic_increasing


# ---------------------------------------------------------------------------- aggregate


def test_aggregate_writes_the_four_tables_atomically(real_copy):
    collected, summary = aggregate(real_copy)
    for name in TABLE_FILES:
        assert (real_copy / name).is_file()
    assert not [p.name for p in real_copy.iterdir() if p.name.endswith(".tmp")]

    runs_csv = pd.read_csv(real_copy / "runs.csv", dtype={"run_id": str})
    runs_parquet = pd.read_parquet(real_copy / "runs.parquet")
    assert list(runs_csv.columns) == list(runs_parquet.columns) == list(collected.runs.columns)
    assert list(runs_csv.run_id) == list(runs_parquet.run_id) == list(collected.runs.run_id)
    pd.testing.assert_frame_equal(runs_parquet, collected.runs, check_dtype=False)
    pd.testing.assert_series_equal(runs_csv.final_test_acc, runs_parquet.final_test_acc)
    assert list(runs_csv["norm.name"]) == list(runs_parquet["norm.name"])

    metrics = pd.read_csv(real_copy / "metrics.csv", dtype={"run_id": str})
    pd.testing.assert_frame_equal(metrics, collected.metrics, check_dtype=False)

    written = pd.read_csv(real_copy / "summary.csv")
    assert list(written.columns[:2]) == ["norm.name", "batch_size"]
    assert list(written.columns[-len(SUMMARY_STAT_COLUMNS) :]) == list(SUMMARY_STAT_COLUMNS)
    assert list(written["norm.name"]) == ["custom_bn", "layer"] and list(written.n) == [2, 2]
    assert len(summary) == 2


def test_failed_and_diverged_runs_are_rows_of_runs_csv(tmp_path, make_run):
    exp = tmp_path / "exp"
    make_run(exp, seed=0)
    make_run(exp, status="diverged", seed=1)
    make_run(exp, status="failed", seed=2)
    aggregate(exp)
    runs = pd.read_csv(exp / "runs.csv")
    assert sorted(runs.status) == ["completed", "diverged", "failed"]
    assert runs.set_index("status").loc["failed", "error"] == "RuntimeError: boom"
    assert math.isnan(runs.set_index("status").loc["diverged", "final_test_acc"])


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


# --------------------------------------------------------------------------- statistics


def test_summary_statistics_match_hand_computed_values(tmp_path, make_run):
    exp = tmp_path / "exp"
    finals, bests = [0.90, 0.92, 0.97], [0.91, 0.95, 0.98]
    for seed, (final, best) in enumerate(zip(finals, bests, strict=True)):
        make_run(exp, final=final, at_best_val=best, seed=seed)
    make_run(exp, status="diverged", seed=3)
    make_run(exp, status="failed", seed=4)
    make_run(exp, final=0.99, status="interrupted", seed=5)  # partial: not a result
    make_run(exp, final=0.8, norm__name="layer", seed=0)
    make_run(exp, status="diverged", norm__name="group", seed=0)

    summary = group_stats(collect(exp).runs).set_index("norm.name")
    assert list(summary.columns[-len(SUMMARY_STAT_COLUMNS) :]) == list(SUMMARY_STAT_COLUMNS)
    bn = summary.loc["custom_bn"]
    assert (bn.n, bn.n_diverged, bn.n_failed, bn.n_interrupted) == (3, 1, 1, 1)
    std = math.sqrt(((0.90 - 0.93) ** 2 + (0.92 - 0.93) ** 2 + (0.97 - 0.93) ** 2) / 2)
    assert bn.final_test_acc_mean == pytest.approx(0.93)
    assert bn.final_test_acc_std == pytest.approx(std)
    assert bn.final_test_acc_ci95 == pytest.approx(T975_DF2 * std / math.sqrt(3))
    assert bn.test_acc_at_best_val_mean == pytest.approx(statistics.mean(bests))
    assert bn.test_acc_at_best_val_std == pytest.approx(statistics.stdev(bests))
    ci = T975_DF2 * statistics.stdev(bests) / math.sqrt(3)
    assert bn.test_acc_at_best_val_ci95 == pytest.approx(ci)

    layer = summary.loc["layer"]  # one run: a mean, no spread
    assert (layer.n, layer.final_test_acc_mean) == (1, pytest.approx(0.8))
    assert math.isnan(layer.final_test_acc_std) and math.isnan(layer.final_test_acc_ci95)

    group = summary.loc["group"]  # diverged only: counted, no statistics
    assert (group.n, group.n_diverged) == (0, 1)
    stats = [c for c in SUMMARY_STAT_COLUMNS if c.startswith(("final_test_acc", "test_acc_at"))]
    assert len(stats) == 6 and all(math.isnan(group[c]) for c in stats)

    # Against the baseline (custom_bn, there): layer's one run gives a difference but no
    # interval or p-value; group has no completed run, so no difference at all.
    assert set(summary["baseline"]) == {"custom_bn"}
    assert math.isnan(bn.diff_to_baseline)
    assert layer.diff_to_baseline == pytest.approx(0.8 - 0.93)
    assert math.isnan(layer.diff_ci95) and math.isnan(layer.p_value)
    assert math.isnan(group.diff_to_baseline) and math.isnan(group.p_value)


def test_t_quantile_is_scipy_stats(tmp_path):
    from scipy.stats import t

    assert stats.t975(2.0) == pytest.approx(T975_DF2)
    assert stats.t975(9.0) == pytest.approx(t.ppf(0.975, 9))


def test_default_groups_differ_only_in_seed(tmp_path, make_run):
    exp = tmp_path / "exp"
    for momentum in (0.9, 0.8):
        for seed in (0, 1):
            # Execution keys (device, threads) differ between seeds: not a different group.
            make_run(
                exp,
                final=momentum,
                seed=seed,
                optim__momentum=momentum,
                threads=seed + 1,
                device=["auto", "cpu"][seed],
            )
    summary = group_stats(collect(exp).runs)
    assert len(summary) == 2 and list(summary.n) == [2, 2]
    assert list(summary["optim.momentum"]) == [0.8, 0.9]
    for key in ("seed", "threads", "device", "config.device", "name", "out_dir"):
        assert key not in summary.columns
    assert "dataset.train_size" in summary.columns and "norm.eps" in summary.columns


def test_group_by_pools_coarser_groups(grid):
    runs = collect(grid).runs
    by_norm = group_stats(runs, ["norm"])
    assert list(by_norm.columns) == ["norm.name", *SUMMARY_STAT_COLUMNS]
    assert list(by_norm["norm.name"]) == ["custom_bn", "layer"] and list(by_norm.n) == [6, 6]
    custom = runs[runs["norm.name"] == "custom_bn"].final_test_acc
    assert by_norm.final_test_acc_mean[0] == pytest.approx(custom.mean())
    assert by_norm.final_test_acc_std[0] == pytest.approx(custom.std())

    by_bs = group_stats(runs, ["batch_size"])
    assert list(by_bs.batch_size) == [8, 32, 128] and list(by_bs.n) == [4, 4, 4]
    both = group_stats(runs, ["norm", "batch_size"])
    assert len(both) == 6 and list(both.n) == [2] * 6
    assert list(zip(both["norm.name"], both.batch_size, strict=True))[:3] == [
        ("custom_bn", 8),
        ("custom_bn", 32),
        ("custom_bn", 128),
    ]
    overall = group_stats(runs, [])
    assert list(overall.columns) == list(SUMMARY_STAT_COLUMNS) and overall.n[0] == 12


# ------------------------------------------------------------------------------- keys


def test_swept_keys_vary_in_order_seed_excluded(tmp_path, make_run):
    exp = tmp_path / "exp"
    for norm in ("group", "custom_bn"):  # group has its own keys (norm.groups)
        for bs in (128, 8):
            for seed in (0, 1):
                overrides = {"norm__groups": 4} if norm == "group" else {}
                make_run(exp, norm__name=norm, batch_size=bs, seed=seed, **overrides)
    runs = collect(exp).runs
    # norm.groups varies too, but norm.name already tells it.
    assert swept_keys(runs) == ["norm.name", "batch_size"]

    make_run(exp, norm__name="group", norm__groups=2, batch_size=8)  # now it does not
    assert swept_keys(collect(exp).runs) == ["norm.name", "batch_size", "norm.groups"]
    make_run(exp, norm__name="custom_bn", batch_size=8, lr=0.05)
    assert swept_keys(collect(exp).runs) == ["norm.name", "batch_size", "lr", "norm.groups"]

    single = tmp_path / "single"
    for seed in range(3):
        make_run(single, seed=seed, threads=seed + 1)
    assert swept_keys(collect(single).runs) == []


def test_resolve_key_maps_short_names(grid):
    runs = collect(grid).runs
    assert resolve_key(runs, "norm") == "norm.name"
    assert resolve_key(runs, "model") == "model.name"
    assert resolve_key(runs, "dataset") == "dataset.name"
    assert resolve_key(runs, "batch_size") == "batch_size"
    assert resolve_key(runs, "train_size") == "dataset.train_size"
    assert resolve_key(runs, "optim.momentum") == "optim.momentum"
    assert resolve_key(runs, "status") == "status"
    with pytest.raises(UserError, match="ambiguous.*optim.momentum"):
        resolve_key(runs, "momentum")
    with pytest.raises(UserError, match="did you mean 'norm'"):
        resolve_key(runs, "nrom")

    aggregate(grid)  # a frame read back from runs.csv has no attrs; the names still resolve
    from_csv = pd.read_csv(grid / "runs.csv")
    assert resolve_key(from_csv, "norm") == "norm.name"
    assert swept_keys(from_csv) == ["norm.name", "batch_size"]


# ---------------------------------------------------------------------- skipped folders


def test_incomplete_and_unreadable_folders_are_skipped_and_counted(tmp_path, make_run):
    exp = tmp_path / "results" / "exp"
    make_run(exp, seed=0)
    make_run(exp, seed=1)
    config_only = make_run(exp, seed=2)
    (config_only / "summary.json").unlink()
    (config_only / "metrics.csv").unlink()
    partial = make_run(exp, seed=3)
    (partial / "summary.json").unlink()
    (partial / ".summary.json.abc123.tmp").write_text("{")
    (partial / ".metrics.csv.def456.tmp").write_text("run_id,ep")
    corrupt = make_run(exp, seed=4)
    (corrupt / "summary.json").write_text('{"run_id": "trunc')
    bad_config = make_run(exp, seed=5)
    (bad_config / "config.yaml").write_text("name: [unclosed\n")
    (exp / "runs" / "notes.txt").write_text("not a run folder")

    collected, summary = aggregate(exp)
    assert len(collected.runs) == 2 and list(summary.n) == [2]
    assert sorted(collected.incomplete) == sorted([config_only, partial])
    assert sorted(collected.unreadable) == sorted([corrupt, bad_config])
    counts = collected.counts()
    assert (counts["completed"], counts["incomplete"], counts["unreadable"]) == (2, 2, 2)
    assert len(pd.read_csv(exp / "runs.csv")) == 2

    result = invoke("results", exp)
    assert result.exit_code == 0, result.output
    assert "2 incomplete" in result.stdout and "2 unreadable" in result.stdout


def test_an_experiment_with_only_unfinished_runs_writes_empty_tables(tmp_path, make_run):
    exp = tmp_path / "exp"
    (make_run(exp) / "summary.json").unlink()
    collected, summary = aggregate(exp)
    assert collected.runs.empty and summary.empty and len(collected.incomplete) == 1
    assert list(pd.read_csv(exp / "runs.csv").columns) == list(SUMMARY_FIELDS)


# ---------------------------------------------------------------------- config reading


def test_config_comes_from_the_summary_or_else_config_yaml(tmp_path):
    """Summaries carry the flattened config (config.<key>); one without it is read
    from config.yaml, with the same result."""
    cfg = compose(
        [
            f"out_dir={tmp_path}",
            "norm=group",
            "epochs=1",
            "dataset.train_size=64",
            "threads=1",
            "batch_size=32",
        ]
    )
    from normbench.runner import run

    outcome = run(cfg)
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    own, config = rundir.split_summary(summary)
    assert config == flatten(cfg) and "config.norm.groups" not in own
    text = (outcome.run_dir / "config.yaml").read_text()
    assert read_config(text) == config
    # An older summary without the config keys: the aggregation falls back to config.yaml.
    (outcome.run_dir / "summary.json").write_text(json.dumps(own))
    runs = collect(tmp_path / "default").runs
    assert runs.loc[0, "norm.groups"] == 8 and runs.loc[0, "norm.name"] == "group"


# ------------------------------------------------------------------- find_experiments


def test_find_experiments_expands_folders_and_rejects_empty_ones(tmp_path, make_run, monkeypatch):
    root = tmp_path / "results"
    a, b = root / "a", root / "nested" / "b"
    make_run(a)
    make_run(b)
    (root / "empty" / "runs").mkdir(parents=True)
    (root / ".hidden" / "runs" / "x").mkdir(parents=True)

    assert find_experiments([root]) == [a, b]
    assert find_experiments([a]) == [a]
    assert find_experiments([a / "runs"]) == [a]
    assert find_experiments([a, root]) == [a, b]  # no duplicates
    monkeypatch.chdir(tmp_path)
    assert [p.resolve() for p in find_experiments(None)] == [a, b]
    with pytest.raises(UserError, match="no such folder"):
        find_experiments([tmp_path / "missing"])
    with pytest.raises(UserError, match="holds no runs"):
        find_experiments([root / "empty"])
    monkeypatch.chdir(root / "empty")
    with pytest.raises(UserError, match="no results/ folder"):
        find_experiments([])


# -------------------------------------------------------------------------------- CLI


def test_results_command_prints_the_summary_table(real_copy):
    result = invoke("results", real_copy)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "4 runs (4 completed, 0 diverged, 0 failed)" in out
    assert "1 incomplete" in out and str(real_copy) in out
    assert "final acc %" in out and "95% CI" in out
    collected = collect(real_copy)
    for norm, rows in collected.runs.groupby("norm.name"):
        mean, std = rows.final_test_acc.mean(), rows.final_test_acc.std()
        assert f"{norm}" in out and f"{100 * mean:.2f} ± {100 * std:.2f}" in out
    for name in TABLE_FILES:
        assert (real_copy / name).is_file()

    coarse = invoke("results", real_copy.parent, "--group-by", "batch_size")
    assert coarse.exit_code == 0, coarse.output
    assert "by batch_size" in coarse.stdout and " 4 " in coarse.stdout


def test_results_command_defaults_to_results_folder(real_copy, monkeypatch):
    monkeypatch.chdir(real_copy.parent.parent)
    result = invoke("results")
    assert result.exit_code == 0, result.output
    assert "custom_bn" in result.stdout


def test_results_compare_puts_experiments_side_by_side_in_one_table(tmp_path, make_run):
    """Two experiments (one of them on mlp): one table, an experiment column first, every
    key that differs between them a column too, the baseline compared within each."""
    for name, model, shift in (("first", "small_cnn", 0.0), ("second", "mlp", 0.1)):
        for norm, acc in (("custom_bn", 0.8), ("layer", 0.6)):
            for seed in (0, 1):
                make_run(
                    tmp_path / "results" / name,
                    final=acc + shift + 0.01 * seed,
                    name=name,
                    norm__name=norm,
                    model__name=model,
                    seed=seed,
                )
    result = invoke("results", tmp_path / "results", "--compare")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("test accuracy over seeds") == 1
    assert "first vs second: test accuracy over seeds, by experiment, norm, model" in out
    rows = [
        line.split()
        for line in out.splitlines()
        if line.strip().startswith(("first ", "second ")) and "vs" not in line
    ]
    assert [row[:3] for row in rows] == [
        ["first", "custom_bn", "small_cnn"],
        ["first", "layer", "small_cnn"],
        ["second", "custom_bn", "mlp"],
        ["second", "layer", "mlp"],
    ]
    assert [row[4] for row in rows] == ["80.50", "60.50", "90.50", "70.50"]
    assert out.count("baseline") == 2  # custom_bn of each experiment
    assert out.count("-20.0") == 2
    for name in ("first", "second"):  # each experiment's own tables are written still
        assert (tmp_path / "results" / name / "summary.csv").is_file()

    one = invoke("results", tmp_path / "results" / "first", "--compare")
    assert one.exit_code == 2 and "--compare needs two experiments or more" in one.stderr


def test_experiment_labels_are_names_or_paths_where_names_repeat(tmp_path):
    a, b = tmp_path / "x" / "study", tmp_path / "y" / "study"
    assert reports.experiment_labels([a, tmp_path / "z"]) == {a: "study", tmp_path / "z": "z"}
    assert reports.experiment_labels([a, b]) == {a: "x/study", b: "y/study"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/missing"], "no such folder"),
        (["{tmp}"], "holds no runs"),
        (["{exp}", "--group-by", "nrom"], "unknown key 'nrom'"),
    ],
)
def test_results_command_user_errors_exit_2_in_one_line(real_copy, tmp_path, args, message):
    empty = tmp_path / "nothing"
    empty.mkdir()
    args = [a.format(tmp=empty, exp=real_copy) for a in args]
    result = invoke("results", *args)
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.startswith("error:")
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "Traceback" not in result.output
    assert not any((real_copy / name).exists() for name in TABLE_FILES)  # nothing written


# ------------------------------------------------------------------------ file modes


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
            "'threads=1', 'norm=layer,group'])"
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


def test_runs_that_differ_in_an_unswept_key_are_never_credited_to_the_norm(tmp_path):
    """Two `normbench run`s into one experiment, the second with another model and
    optimizer: the table has two groups told apart by all three keys, and the figures
    never draw the two in one plot."""
    from typer.testing import CliRunner

    from normbench.cli import app
    from normbench.views.figures import error_vs_batch_size

    common = [f"out_dir={tmp_path}", "epochs=1", "dataset.train_size=128", "threads=1"]
    runner = CliRunner()
    assert runner.invoke(app, ["run", *common]).exit_code == 0
    other = ["model=mlp", "optim=adam", "lr=0.001", "norm=layer"]
    assert runner.invoke(app, ["run", *common, *other]).exit_code == 0
    runs = collect(tmp_path / "default").runs
    keys = swept_keys(runs)
    assert {"norm.name", "model.name", "optim.name", "lr"} <= set(keys)
    summary = group_stats(runs, keys)
    assert len(summary) == 2
    assert set(zip(summary["norm.name"], summary["model.name"], strict=True)) == {
        ("custom_bn", "small_cnn"),
        ("layer", "mlp"),
    }
    figures = error_vs_batch_size(runs)
    assert len(figures) == 2  # one per model (and optimizer), each with one norm
    for _, figure in figures:
        (ax,) = [a for a in figure.axes if a.get_visible()]
        title = ax.get_title()
        assert "mlp, small_cnn" not in title and len(ax.get_legend().get_texts()) == 1


def test_tables_whose_names_are_links_are_replaced_not_followed(real_copy, tmp_path):
    """A received experiment whose runs.csv, runs.parquet, metrics.csv, summary.csv or
    selected.csv is a symbolic link (to a file or a folder elsewhere): each table replaces
    its link, since the rename that puts it in place never follows one, and what the
    links pointed to is untouched."""
    victims = tmp_path / "victims"
    victims.mkdir()
    names = [*TABLE_FILES, "selected.csv"]
    for name in names:
        if name == "summary.csv":  # a link to a folder
            (victims / name).mkdir()
        else:
            (victims / name).write_text("mine")
        (real_copy / name).symlink_to(victims / name)
    result = invoke("results", real_copy, "--select", "norm")
    assert result.exit_code == 0, result.output
    for name in names:
        assert not (real_copy / name).is_symlink() and (real_copy / name).is_file(), name
    assert len(pd.read_csv(real_copy / "runs.csv")) == 4
    assert sorted(p.name for p in victims.iterdir()) == sorted(names)
    assert all((victims / n).read_text() == "mine" for n in names if n != "summary.csv")
    assert list((victims / "summary.csv").iterdir()) == []


# --------------------------------------------------------- numbers a damaged run may hold


def _runs_of(exp):
    return sorted(p for p in (exp / "runs").iterdir() if (p / "summary.json").exists())


def _edit_summary(folder, **fields):
    record = json.loads((folder / "summary.json").read_text())
    record.update(fields)
    (folder / "summary.json").write_text(json.dumps(record))


def _skipped(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]


@pytest.mark.parametrize(
    "damage, why",
    [
        ({"num_params": 2**63}, "num_params 9223372036854775808 is not a whole number from 0"),
        ({"config.seed": 2**64}, "config.seed 18446744073709551616 does not fit a 64-bit"),
        ({"final_test_acc": 5.0}, "final_test_acc 5.0 is not a number in [0, 1]"),
        ({"test_acc_at_best_val": -0.25}, "test_acc_at_best_val -0.25 is not a number in [0, 1]"),
        ({"train_time_s": float("inf")}, "train_time_s inf is not a finite number >= 0"),
        ({"final_train_loss": float("nan")}, "final_train_loss nan is not a finite number >= 0"),
        ({"batch_size": -8}, "batch_size -8 is not a whole number from 1"),
        ({"best_val_epoch": 0}, "best_val_epoch 0 is not a whole number from 1"),
        ({"config.norm.name": 7}, "config.norm.name 7 is not text"),
    ],
)
def test_a_summary_number_out_of_range_skips_its_run(real_copy, damage, why):
    """An integer beyond 64 bits (before: OverflowError, nothing aggregated), an accuracy
    outside [0, 1], a time that is not finite (before: accepted silently): the run is
    skipped with one warning naming it and the field; `results` and `plot` go on."""
    from normbench.rundir import read_summary

    first = _runs_of(real_copy)[0]
    _edit_summary(first, **damage)
    for command in ("results", "plot"):
        result = invoke(command, real_copy)
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        (line,) = _skipped(result)
        assert line.startswith(f"warning: skipped {first}: summary.json: ") and why in line
    runs = pd.read_csv(real_copy / "runs.csv")
    assert len(runs) == 3 and first.name not in set(runs.run_id)
    assert read_summary(first) is None  # not done either: the next sweep redoes it


@pytest.mark.parametrize(
    "line, why",
    [
        (("9223372036854775808", "test", "acc", "0.5"), "epoch 9223372036854775808 is not from 1"),
        (("0", "test", "acc", "0.5"), "epoch 0 is not from 1"),
        (("1", "test", "acc", "5.0"), "'test' 'acc' 5.0 is not in [0, 1]"),
        (("1", "val", "acc", "nan"), "'val' 'acc' nan is not in [0, 1]"),
        (("1", "train", "loss", "-1"), "'train' 'loss' -1.0 is negative"),
        (("1", "train", "lr", "inf"), "'train' 'lr' inf is not finite and >= 0"),
    ],
)
def test_a_metrics_value_out_of_range_skips_its_run(real_copy, line, why):
    from normbench.rundir import read_summary

    first = _runs_of(real_copy)[0]
    with open(first / "metrics.csv", "a") as handle:
        handle.write(",".join((first.name, *line)) + "\n")
    for command in ("results", "plot"):
        result = invoke(command, real_copy)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        (skipped,) = _skipped(result)
        assert skipped.startswith(f"warning: skipped {first}: metrics.csv: line ")
        assert why in skipped
    assert len(pd.read_csv(real_copy / "runs.csv")) == 3
    assert read_summary(first) is None


def test_a_diverged_loss_is_no_damage(real_copy):
    """A loss of NaN or inf is what a diverged epoch records: kept."""
    first = _runs_of(real_copy)[0]
    with open(first / "metrics.csv", "a") as handle:
        handle.write(f"{first.name},2,train,loss,nan\n{first.name},2,train,loss,inf\n")
    result = invoke("results", real_copy)
    assert result.exit_code == 0 and not _skipped(result), result.output
    assert len(pd.read_csv(real_copy / "runs.csv")) == 4


def test_an_experiment_whose_runs_are_all_damaged_is_a_user_error(
    real_experiment, real_copy, tmp_path
):
    """Every run unreadable: one line naming the folder, the first run and why; exit
    status 2 and nothing written, for `results` and `plot` (before: exit 0 and empty
    tables). Given with a good experiment, the bad one is a warning and has no tables."""
    for folder in _runs_of(real_copy):
        (folder / "summary.json").write_text('{"status": "completed", "batch_si')
    first = _runs_of(real_copy)[0]
    for command in ("results", "plot"):
        result = invoke(command, real_copy)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
        assert lines[0].startswith(f"error: {real_copy}: none of its runs can be read ({first}: ")
        assert "and 3 more), 1 not finished" in lines[0]
        assert not any((real_copy / name).exists() for name in [*TABLE_FILES, "plots"])

    good = shutil.copytree(real_experiment, tmp_path / "both" / "good")
    bad = shutil.copytree(real_copy, tmp_path / "both" / "bad")
    result = invoke("results", tmp_path / "both")
    assert result.exit_code == 0, result.output
    assert f"warning: {bad}: none of its runs can be read" in result.stderr
    assert (good / "runs.csv").exists() and not (bad / "runs.csv").exists()


# ------------------------------------------------------------ random damage to one run

#: Values no number field of a summary may hold: beyond 64 bits, not finite, of another
#: JSON type. (Range damage per field is added by _bad_number.)
_BAD_ANY = [2**63, 2**64 + 7, -(2**63) - 1, 10**30, math.nan, math.inf, -math.inf, "0.5", [1],
            {"v": 1}, True]  # fmt: skip


def _bad_number(rng, key):
    whole, low, high, null = rundir._NUMBER_RULES[key]
    choices = list(_BAD_ANY)
    choices += [low - 1, -1.5] if whole else [low - 0.5]
    if whole:
        choices.append(1.5)
    if high is not None:
        choices += [high + 0.5, 5.0]
    if not null:
        choices.append(None)
    return rng.choice(choices)


def _damage_summary(rng, path) -> str:
    data = path.read_bytes()
    record = json.loads(data)
    kind = rng.choice(["number", "number", "config", "status", "text", "cut", "garbage", "type"])
    if kind == "number":
        key = rng.choice(sorted(rundir._NUMBER_RULES))
        record[key] = _bad_number(rng, key)
    elif kind == "config":
        key = rng.choice([k for k, v in record.items() if k.startswith("config.")])
        record[key] = rng.choice([2**63, -(2**63) - 1, 3 * 10**40])
    elif kind == "status":
        record["status"] = rng.choice(["done", None, 3, ["completed"], "COMPLETED"])
    elif kind == "text":
        key = rng.choice(["norm", "model", "config.norm.name", "config.dataset.name", "run_id"])
        record[key] = rng.choice([3, ["layer"], {"a": 1}, 1.5, True])
    if kind in ("number", "config", "status", "text"):
        path.write_text(json.dumps(record))  # NaN and Infinity as JSON's lenient tokens
        return f"summary.json {kind}: {key if kind != 'status' else 'status'}"
    if kind == "cut":  # at least the closing brace goes
        path.write_bytes(data[: rng.randrange(0, len(data) - 2)])
    elif kind == "garbage":
        path.write_bytes(rng.randbytes(rng.randrange(1, 400)))
    else:
        path.write_text(json.dumps(rng.choice([[record], 3, "completed", None, True])))
    return f"summary.json {kind}"


def _damage_metrics(rng, path) -> str:
    lines = path.read_text().splitlines()
    kind = rng.choice(["epoch", "value", "range", "fields", "cut", "garbage"])
    index = rng.randrange(1, len(lines))
    run_id, epoch, split, metric, value = lines[index].split(",")
    if kind == "epoch":
        epoch = rng.choice(["9223372036854775808", "-3", "0", "1.5", "x", "", "1e400"])
    elif kind == "value":
        value = rng.choice(["abc", "", "0x1p", "1,2"])
    elif kind == "range":
        metric, value = rng.choice(
            [("acc", "5.0"), ("acc", "-0.1"), ("acc", "nan"), ("acc", "inf"), ("loss", "-2"),
             ("lr", "-1"), ("lr", "inf"), ("img_per_s", "nan"), ("epoch_time_s", "-inf")]
        )  # fmt: skip
    if kind in ("epoch", "value", "range"):
        lines[index] = ",".join((run_id, epoch, split, metric, value))
        path.write_text("\n".join(lines) + "\n")
    elif kind == "fields":
        lines[index] = ",".join((run_id, epoch, metric, value))
        path.write_text("\n".join(lines) + "\n")
    elif kind == "cut":  # within a line, never at a line's end: the cut line is short
        data = path.read_bytes()
        cuts = [i for i in range(len(data) // 2, len(data) - 1) if data[i - 1 : i + 1] != b"\n"]
        cuts = [i for i in cuts if data[i] != ord("\n") and data[i - 1] != ord("\n")]
        path.write_bytes(data[: rng.choice(cuts)])
    else:
        path.write_bytes(b"\xff\xfe" + rng.randbytes(rng.randrange(1, 400)))
    return f"metrics.csv {kind}"


def _damage_one_run(rng, exp):
    folder = rng.choice(_runs_of(exp))
    if rng.random() < 0.5:
        what = _damage_summary(rng, folder / "summary.json")
    else:
        what = _damage_metrics(rng, folder / "metrics.csv")
    return folder, what


@pytest.mark.parametrize("command, examples", [("results", 40), ("plot", 6)])
def test_random_damage_to_one_run_skips_exactly_that_run(
    real_experiment, tmp_path, command, examples
):
    """Property: whatever damage one run's files take (integers beyond 64 bits, NaN and
    inf, numbers out of range, text or lists where numbers belong, other JSON types, a
    file cut short, binary garbage), `results` and `plot` exit 0 without a traceback,
    skip that run alone with one warning naming it, and aggregate the other three; the
    planner counts it as not done. Seeded: a failure names its example."""
    import random

    from normbench.rundir import read_summary

    for example in range(examples):
        rng = random.Random(f"{command}-{example}")
        exp = shutil.copytree(real_experiment, tmp_path / str(example) / "default")
        folder, what = _damage_one_run(rng, exp)
        context = f"example {example} ({what})"
        result = invoke(command, exp)
        assert result.exit_code == 0, f"{context}: {result.output}"
        assert "Traceback" not in result.output, context
        skipped = _skipped(result)
        assert len(skipped) == 1 and skipped[0].startswith(f"warning: skipped {folder}:"), (
            f"{context}: {result.stderr}"
        )
        assert read_summary(folder) is None, context
        if command == "results":
            runs = pd.read_csv(exp / "runs.csv")
            assert len(runs) == 3 and folder.name not in set(runs.run_id.astype(str)), context
        else:
            assert (exp / "plots" / "error_vs_batch_size.png").is_file(), context


# ------------------------------------------------------- runs of older normbench versions


def _as_older_version(folder, *keys):
    """Rewrite a real run's files as a normbench without ``keys`` would have written them:
    not in summary.json's config fields, nor in config.yaml."""
    record = json.loads((folder / "summary.json").read_text())
    for key in keys:
        del record[f"config.{key}"]
    (folder / "summary.json").write_text(json.dumps(record))
    cfg = OmegaConf.load(folder / "config.yaml")
    for key in keys:
        parent, _, last = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        del node[last]
        if parent and not node:
            del cfg[parent]
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))


def test_a_key_older_runs_lack_takes_its_default_and_the_tables_say_so(real_copy):
    """Seed 0's runs written by an older normbench, without eval.precise_bn_batches (a
    root key) and norm.eps (an option's key): before, every group split in two on the
    null; now those runs take the defaults (200, and each norm's own eps), the groups
    stay whole, and the warning, the table's caption, runs.csv and summary.csv say which
    keys were filled in for how many runs."""
    from normbench.config import compose

    runs = _runs_of(real_copy)
    seeds = {p: json.loads((p / "summary.json").read_text())["seed"] for p in runs}
    older = [p for p in runs if seeds[p] == 0]
    assert len(older) == 2
    for folder in older:
        _as_older_version(folder, "eval.precise_bn_batches", "norm.eps")

    result = invoke("results", real_copy)
    assert result.exit_code == 0, result.output
    assert (
        "warning: 2 runs of 4 lack eval.precise_bn_batches (written by an older normbench): "
        "grouped with its default, 200"
    ) in result.stderr
    assert "warning: 2 runs of 4 lack norm.eps" in result.stderr
    assert "defaults filled in where older runs lack a key" in " ".join(result.stdout.split())

    summary = pd.read_csv(real_copy / "summary.csv")
    assert list(summary["norm.name"]) == ["custom_bn", "layer"] and list(summary.n) == [2, 2]
    assert "eval.precise_bn_batches" in summary.columns  # a group key, not a split
    assert set(summary["eval.precise_bn_batches"]) == {200}
    assert list(summary.defaulted) == ["eval.precise_bn_batches: 1 run; norm.eps: 1 run"] * 2
    table = pd.read_csv(real_copy / "runs.csv")
    by_seed = dict(zip(table.seed, table.defaulted.fillna(""), strict=False))
    assert by_seed == {0: "eval.precise_bn_batches,norm.eps", 1: ""}
    for norm in ("custom_bn", "layer"):
        eps = compose([f"norm={norm}"]).norm.eps
        assert set(table.loc[table["norm.name"] == norm, "norm.eps"]) == {eps}
    assert swept_keys(collect(real_copy).runs) == ["norm.name"]


def test_a_key_the_runs_option_lacks_is_not_filled(tmp_path, make_run):
    """norm.groups belongs to norm=group: custom_bn runs lack it by design, and stay
    without it (no default of another option is invented for them)."""
    exp = tmp_path / "exp"
    make_run(exp, norm__name="group", norm__groups=4)
    make_run(exp, seed=1)
    collected = collect(exp)
    assert collected.defaulted == {}
    runs = collected.runs.set_index("norm.name")
    assert runs.loc["group", "norm.groups"] == 4 and pd.isna(runs.loc["custom_bn", "norm.groups"])
    assert "defaulted" not in collected.runs


# ------------------------------------------------------------------------------- cells


def test_values_that_differ_show_differently_and_empty_names_show(tmp_path, make_run):
    """lr 0.1 and 0.1000000001 are two rows that read apart (``%g`` showed both as 0.1);
    an empty or blank norm name is quoted, not an empty cell."""
    exp = tmp_path / "results" / "cells"
    for norm in ("custom_bn", "", "  "):
        for lr in (0.1, 0.1000000001):
            make_run(exp, norm__name=norm, lr=lr)
    result = invoke("results", exp)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for norm in ("custom_bn", "''", "'  '"):
        for lr in ("0.1", "0.1000000001"):
            row = re.compile(rf"\s*{re.escape(norm)}\s+{re.escape(lr)}\s+1\s+90\.00\s")
            assert sum(bool(row.match(line)) for line in lines) == 1, (norm, lr, result.stdout)


@pytest.mark.parametrize(
    "value, shown",
    [
        (0.1, "0.1"),
        (0.1000000001, "0.1000000001"),
        (1e-05, "1e-05"),
        (2.5e-05, "2.5e-05"),
        (128.0, "128"),
        (1e20, "1e+20"),
        (float("nan"), "null"),
        (None, "null"),
        (True, "true"),
        ("custom_bn", "custom_bn"),
        ("", "''"),
        ("  ", "'  '"),
        (" a", "' a'"),
        ("null", "'null'"),
        ("true", "'true'"),
        ("0.1", "'0.1'"),
        ("[1, 2]", "'[1, 2]'"),
        ("''", "\"''\""),
    ],
)
def test_a_cell_shows_a_value_as_typed_and_apart_from_every_other(value, shown):
    assert text.format_value(value) == shown


# --------------------------------------------------------- what a received folder holds


def test_text_that_is_not_unicode_is_kept_escaped(real_copy):
    """A lone surrogate in a summary's value or key (JSON's "\\ud800"), and a run folder
    named with an undecodable byte whose summary has no run_id: before, pyarrow and the
    CSV writer raised UnicodeEncodeError and no table was written. Now every run is
    aggregated, its text escaped as the terminal shows it, and the tables read back."""
    first, second, third, _ = _runs_of(real_copy)
    _edit_summary(first, error="bad \ud800 text")
    _edit_summary(second, **{"config.\ud800": "x"})
    record = json.loads((third / "summary.json").read_text())
    del record["run_id"]
    (third / "summary.json").write_text(json.dumps(record))
    renamed = third.with_name(third.name + "\udcfe")  # the byte 0xfe, as os names it
    third.rename(renamed)

    for command in ("results", "plot"):
        result = invoke(command, real_copy)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        assert not _skipped(result), result.stderr
    runs = pd.read_parquet(real_copy / "runs.parquet")
    assert len(runs) == 4 and "bad \\ud800 text" in set(runs.error)
    assert "\\ud800" in runs.columns and f"{third.name}\\xfe" in set(runs.run_id)
    assert pd.read_csv(real_copy / "runs.csv").shape == runs.shape


_NOT_A_FILE = {
    "summary.json a pipe": ("summary.json", "pipe", "summary.json: a named pipe, not a file"),
    "metrics.csv a pipe": ("metrics.csv", "pipe", "metrics.csv: a named pipe, not a file"),
    "config.yaml a pipe": ("config.yaml", "pipe", "config.yaml: a named pipe, not a file"),
    "summary.json to /dev/zero": ("summary.json", "zero", "summary.json: a device, not a file"),
    "metrics.csv to /dev/zero": ("metrics.csv", "zero", "metrics.csv: a device, not a file"),
    "summary.json of 2 MiB": ("summary.json", "large", "summary.json: 2 MiB, more than the 1"),
}


@pytest.mark.parametrize("case", list(_NOT_A_FILE))
def test_a_run_file_that_is_no_regular_file_or_too_large_skips_its_run(real_copy, case):
    """Before: a pipe hung `results` (and `plot`, `run`, `sweep`) with no output; a link to
    /dev/zero read until memory ran out. Now the run is skipped with one warning naming
    the file and why; the planner counts it as not done (config.yaml: never read there)."""
    from hostile import deadline

    from normbench.rundir import read_summary

    name, kind, why = _NOT_A_FILE[case]
    first = _runs_of(real_copy)[0]
    if name == "config.yaml":  # read only for a summary without the config's keys
        record = json.loads((first / "summary.json").read_text())
        own = {k: v for k, v in record.items() if not k.startswith("config.")}
        (first / "summary.json").write_text(json.dumps(own))
    path = first / name
    path.unlink()
    if kind == "pipe":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    else:
        with open(path, "wb") as handle:
            handle.truncate(2 << 20)
    with deadline():
        commands = ["results", "plot"] if case == "summary.json a pipe" else ["results"]
        for command in commands:
            result = invoke(command, real_copy)
            assert result.exit_code == 0 and "Traceback" not in result.output, result.output
            (skipped,) = _skipped(result)
            assert skipped.startswith(f"warning: skipped {first}: {why}"), skipped
        assert len(pd.read_csv(real_copy / "runs.csv")) == 3
        # not done for the planner either (config.yaml is the tables' only: not read there)
        assert (read_summary(first) is None) == (name != "config.yaml")


def test_a_yaml_alias_bomb_in_config_yaml_skips_its_run(real_copy):
    """391 bytes of aliases nested in aliases (a "billion laughs"): before, 37 s, 4.9 GB
    and 650 MB printed (one level more: MemoryError). normbench never writes anchors:
    such a config.yaml is damage, one warning."""
    import time

    first = _runs_of(real_copy)[0]
    record = json.loads((first / "summary.json").read_text())
    (first / "summary.json").write_text(
        json.dumps({k: v for k, v in record.items() if not k.startswith("config.")})
    )
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * 10) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    (first / "config.yaml").write_text("\n".join([*lines, "model: {widths: *a6}"]) + "\n")
    start = time.perf_counter()
    result = invoke("results", real_copy)
    assert time.perf_counter() - start < 20 and result.exit_code == 0, result.output
    (skipped,) = _skipped(result)
    assert f"{first}: config.yaml uses YAML anchors or aliases" in skipped
    assert len(result.stdout) < 10_000
    # what normbench writes has none: a real run's config.yaml reads back
    second = _runs_of(real_copy)[1]
    assert read_config((second / "config.yaml").read_text())["norm.name"]


def test_a_long_value_is_cut_on_the_terminal_and_kept_in_the_files(real_copy):
    """A swept config value of 200,000 characters (a summary may hold up to 1 MiB):
    before, the table printed it whole (a 100 MB summary: 450 MB printed) and a figure
    drew it (minutes). Shown cut to SHOWN_MAX characters with an ellipsis, drawn cut;
    runs.csv keeps it. A name that long is no name: its run is damaged."""
    from hostile import deadline

    first, second = _runs_of(real_copy)[:2]
    long_value = "w" * 200_000
    _edit_summary(first, **{"config.model.widths": long_value})
    _edit_summary(second, norm="n" * 256)
    with deadline(60):
        result = invoke("results", real_copy)
        assert result.exit_code == 0, result.output
        assert "w" * (text.SHOWN_MAX - 1) + "…" in result.stdout
        assert "w" * (text.SHOWN_MAX + 1) not in result.stdout
        (skipped,) = _skipped(result)
        assert skipped.endswith(": norm is 256 characters long: no name is longer than 255")
        assert long_value in set(pd.read_csv(real_copy / "runs.csv")["model.widths"])
        assert invoke("plot", real_copy).exit_code == 0


def test_folders_that_cannot_be_read_are_skipped_or_one_line(real_experiment, tmp_path):
    """Searched: a folder that cannot be read is skipped with a warning (before: a
    PermissionError traceback), a pipe or a link to a device is never opened. Named: one
    `error:` line, exit 2 (before: click's boxed usage error, or a traceback)."""
    import stat

    from hostile import as_user

    root = tmp_path / "p"
    good = shutil.copytree(real_experiment, root / "ok" / "base")
    (root / "locked").mkdir()
    (root / "a" / "b").mkdir(parents=True)
    os.mkfifo(root / "a" / "b" / "pipe")
    (root / "a" / "dev").symlink_to("/dev/zero")
    named = shutil.copytree(real_experiment, tmp_path / "named")
    runs_locked = shutil.copytree(real_experiment, tmp_path / "runs_locked")
    for folder in (root / "locked", named, runs_locked / "runs"):
        folder.chmod(0)
    try:
        searched, whole, runs, plot = as_user(
            [["results", "p"], ["results", "named"], ["results", "runs_locked"], ["plot", "named"]],
            tmp_path,
        )
    finally:
        for folder in (root / "locked", named, runs_locked / "runs"):
            folder.chmod(stat.S_IRWXU)
    status, out, err = searched
    assert status == 0 and "Traceback" not in err, err
    assert err.splitlines() == ["warning: skipped p/locked: cannot read it (Permission denied)"]
    assert "p/ok/base: 4 runs" in out and (good / "runs.csv").is_file()
    named_ones = ((whole, "named"), (runs, "runs_locked/runs"), (plot, "named"))
    for (status, _, err), where in named_ones:
        assert status == 2 and "Traceback" not in err, err
        assert err.splitlines() == [f"error: cannot read {where}: Permission denied"]
