"""Tests for normbench.reports: the tables written, ``normbench results`` and its
comparisons, links replaced, damaged experiments."""

import io
import math
import shutil

import pandas as pd
import pytest
from run_folders import edit_summary, invoke, runs_of

from normbench import reports
from normbench.analysis.collect import collect
from normbench.analysis.stats import SUMMARY_STAT_COLUMNS
from normbench.reports import TABLE_FILES, aggregate
from normbench.rundir import SUMMARY_FIELDS


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


def test_an_experiment_with_only_unfinished_runs_writes_empty_tables(tmp_path, make_run):
    exp = tmp_path / "exp"
    (make_run(exp) / "summary.json").unlink()
    collected, summary = aggregate(exp)
    assert collected.runs.empty and summary.empty and len(collected.incomplete) == 1
    assert list(pd.read_csv(exp / "runs.csv").columns) == list(SUMMARY_FIELDS)


def test_results_command_prints_the_summary_table(real_copy):
    result = invoke("results", real_copy)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "4 runs (4 completed, 0 diverged, 0 failed)" in out
    assert "1 incomplete" in out and str(real_copy) in out
    # 80 columns: with the comparison's columns, a header or a cell may wrap between words
    assert "final" in out and "acc" in out and "95% CI" in out
    collected = collect(real_copy)
    for norm, rows in collected.runs.groupby("norm.name"):
        mean, std = rows.final_test_acc.mean(), rows.final_test_acc.std()
        assert f"{norm}" in out and f"{100 * mean:.2f} ±" in out and f"{100 * std:.2f}" in out
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


def test_an_experiment_whose_runs_are_all_damaged_is_a_user_error(
    real_experiment, real_copy, tmp_path
):
    """Every run unreadable: one line naming the folder, the first run and why; exit
    status 2 and nothing written, for `results` and `plot` (before: exit 0 and empty
    tables). Given with a good experiment, the bad one is a warning and has no tables."""
    for folder in runs_of(real_copy):
        (folder / "summary.json").write_text('{"status": "completed", "batch_si')
    first = runs_of(real_copy)[0]
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


# ------------------------------------------------------------ formats and report.md


@pytest.mark.parametrize("fmt", ["markdown", "latex", "csv"])
def test_results_prints_tables_to_paste_and_nothing_else_on_stdout(real_copy, fmt):
    import io

    result = invoke("results", real_copy, "--format", fmt, "--select", "norm")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "4 runs (4 completed" in result.stderr and "wrote " in result.stderr
    assert "4 runs" not in out
    if fmt == "csv":
        first, second = out.strip("\n").split("\n\n")
        printed = list(pd.read_csv(io.StringIO(first)).columns)
        assert printed == ["norm.name", *SUMMARY_STAT_COLUMNS]  # the table's keys, the CSV's
        assert "tuned" in pd.read_csv(io.StringIO(second)).columns
    elif fmt == "markdown":
        tables = [line for line in out.splitlines() if line.startswith("| norm")]
        assert len(tables) == 2
        header = [cell.strip() for cell in tables[0].strip("|").split("|")]
        assert header == ["norm.name", *SUMMARY_STAT_COLUMNS]
    else:
        assert out.count("\\begin{tabular}") == 2 and out.count("\\end{tabular}") == 2
        assert "final\\_test\\_acc\\_mean" in out


def test_a_bad_format_or_threshold_is_a_user_error(real_copy):
    for args, message in (
        (["--format", "html"], "--format must be one of table, markdown, latex, csv"),
        (["--stale-threshold", "-1"], "--stale-threshold: report.stale_threshold must be"),
        (["--undertrained-gap", "101"], "--undertrained-gap: report.undertrained_gap must be"),
    ):
        result = invoke("results", real_copy, *args)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"error: {message}"), result.stderr
        assert result.stderr.strip().count("\n") == 0
        assert not (real_copy / "summary.csv").exists() and not (real_copy / "report.md").exists()


def test_report_md_gathers_tables_warnings_and_figures(real_copy):
    """report.md after `results`: the counts, the summary table in Markdown with its
    caption and warning lines; after `plot` and `results` again, the figures too."""
    result = invoke("results", real_copy, "--select", "norm")
    assert result.exit_code == 0, result.output
    text = (real_copy / "report.md").read_text()
    assert text.startswith(f"# {real_copy.name}\n\n{real_copy}: 4 runs (4 completed")
    summary = pd.read_csv(real_copy / "summary.csv")
    headers = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| norm.name")
    ]
    assert headers[0] == ["norm.name", *SUMMARY_STAT_COLUMNS] and "tuned" in headers[1]
    assert set(headers[0]) <= set(summary.columns)
    assert "test accuracy over seeds" in text and "chosen on validation" in text
    assert "- budget: 1 epochs at every batch size" in text
    # two seeds per norm: the few_seeds warning, under the table and in the terminal
    assert "- few_seeds (few), 2 of 2 rows: fewer than 3 seeds on a side" in text
    assert "warning: few_seeds (few), 2 of 2 rows" in result.stdout
    assert "## Figures" not in text

    assert invoke("plot", real_copy).exit_code == 0
    assert invoke("results", real_copy).exit_code == 0
    text = (real_copy / "report.md").read_text()
    assert "## Figures" in text
    assert "![error_vs_batch_size.png](plots/error_vs_batch_size.png)" in text
    for line in text.splitlines():
        if line.startswith("!["):
            assert (real_copy / line.split("](")[1].rstrip(")")).is_file()


def test_aggregate_gathers_every_runs_bn_stats_and_plot_draws_them(real_copy):
    from normbench.rundir import BN_STATS_COLUMNS

    collected, _ = aggregate(real_copy)
    table = pd.read_csv(real_copy / "bn_stats.csv", dtype={"run_id": str, "layer": str})
    assert list(table.columns) == list(BN_STATS_COLUMNS)
    runs = collected.runs.set_index("run_id")
    bn_runs = [r for r in runs.index if runs.loc[r, "norm"] == "custom_bn"]
    assert sorted(set(table.run_id)) == sorted(bn_runs) and len(bn_runs) == 2
    for rid in bn_runs:  # each run's own file, as it is
        own = pd.read_csv(
            real_copy / "runs" / rid / "bn_stats.csv", dtype={"run_id": str, "layer": str}
        )
        got = table[table.run_id == rid].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, own, check_dtype=False)
    written = {p.name for p in reports.plot_experiment(real_copy)}
    assert {"bn_layers_mean_shift.png", "bn_layers_train_eval_gap.png"} <= written


def test_aggregate_skips_a_damaged_bn_stats_and_writes_none_without_any(tmp_path, make_run):
    exp = tmp_path / "exp"
    make_run(exp, seed=0)
    aggregate(exp)
    assert not (exp / "bn_stats.csv").exists()  # no run measured any
    (folder,) = (exp / "runs").iterdir()
    (folder / "bn_stats.csv").write_text("not,a\ntable\n")
    assert reports.bn_stats_table(exp, collect(exp).runs).empty


def _sync_study(exp, make_run):
    """sync_bn over groups of 1 and 2 of 2 processes, custom_bn local, layer: 2 seeds, the
    norm batch recorded as a 2-process run records it."""
    for seed in (0, 1):
        for norm, group, nbs, final in [
            ("sync_bn", 1, 32, 0.80),
            ("sync_bn", 2, 64, 0.84),
            ("custom_bn", None, 32, 0.82),
            ("layer", None, None, 0.70),
        ]:
            more = {"norm__group_size": group} if group else {}
            folder = make_run(
                exp, final=final + 0.01 * seed, seed=seed, norm__name=norm, batch_size=64,
                processes=2, **more,
            )  # fmt: skip
            edit_summary(folder, processes=2, world_size=2, norm_batch_size=nbs)


def test_results_group_by_the_norm_batch(tmp_path, make_run):
    exp = tmp_path / "results" / "sync"
    _sync_study(exp, make_run)
    result = invoke("results", exp, "--group-by", "norm,norm_batch_size", "--format", "csv")
    assert result.exit_code == 0, result.output
    shown = pd.read_csv(io.StringIO(result.stdout))
    assert list(shown.columns[:2]) == ["norm.name", "norm_batch_size"]
    means = {
        (norm, None if pd.isna(nbs) else int(nbs)): mean
        for norm, nbs, mean in shown[["norm.name", "norm_batch_size", "final_test_acc_mean"]].values
    }
    assert means == pytest.approx(
        {("custom_bn", 32): 0.825, ("layer", None): 0.705, ("sync_bn", 32): 0.805,
         ("sync_bn", 64): 0.845}
    )  # fmt: skip
    # sync_bn is compared with custom_bn where both normalize over 32 images
    assert "diff_to_baseline" in shown and shown["diff_to_baseline"].notna().sum() == 1


def test_a_sweeps_report_against_the_norm_batch(tmp_path, make_run):
    from types import SimpleNamespace

    exp = tmp_path / "results" / "sync"
    _sync_study(exp, make_run)
    settings = SimpleNamespace(
        select=None, baseline=None, stale_threshold=2.0, undertrained_gap=10.0,
        x="norm_batch_size",
    )  # fmt: skip
    warned: list[str] = []
    printed = list(reports.sweep_reports([exp], settings, warned.append, lambda line: None))
    assert not warned
    assert (exp / "plots" / "error_vs_norm_batch_size.png").is_file()
    assert any("by norm, norm_batch_size" in str(getattr(p, "title", "")) for p in printed)
    # the same sweep again, no run changed: the table shown by the norm batch again (its
    # keys are not summary.csv's: made again, not read back)
    again = list(reports.sweep_reports([exp], settings, warned.append, lambda line: None))
    assert not warned
    assert any("by norm, norm_batch_size" in str(getattr(p, "title", "")) for p in again)

    # runs recorded before the norm batch: tables and figures by the global batch, told why
    for folder in runs_of(exp):
        edit_summary(folder, norm_batch_size=None, world_size=None)
    printed = list(reports.sweep_reports([exp], settings, warned.append, lambda line: None))
    (line,) = warned
    assert "x axis norm_batch_size: 8 of 8 runs were recorded before" in line
    assert line.endswith("tables and figures without it")
    assert (exp / "plots" / "error_vs_batch_size.png").is_file()
