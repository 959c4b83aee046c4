"""Tests for normbench.analysis.collect: run folders read into frames, experiments found,
damaged and unfinished runs skipped, defaults of keys older runs lack."""

import json
import math
import os
import shutil

import pandas as pd
import pytest
from omegaconf import OmegaConf
from run_folders import edit_summary, invoke, runs_of, skipped_lines

from normbench import rundir
from normbench.analysis.collect import collect, find_experiments, read_config
from normbench.analysis.keys import swept_keys
from normbench.config import compose, flatten
from normbench.errors import UserError
from normbench.reports import aggregate
from normbench.rundir import METRIC_COLUMNS, SUMMARY_FIELDS


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

    first = runs_of(real_copy)[0]
    edit_summary(first, **damage)
    for command in ("results", "plot"):
        result = invoke(command, real_copy)
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        (line,) = skipped_lines(result)
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

    first = runs_of(real_copy)[0]
    with open(first / "metrics.csv", "a") as handle:
        handle.write(",".join((first.name, *line)) + "\n")
    for command in ("results", "plot"):
        result = invoke(command, real_copy)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        (skipped,) = skipped_lines(result)
        assert skipped.startswith(f"warning: skipped {first}: metrics.csv: line ")
        assert why in skipped
    assert len(pd.read_csv(real_copy / "runs.csv")) == 3
    assert read_summary(first) is None


def test_a_diverged_loss_is_no_damage(real_copy):
    """A loss of NaN or inf is what a diverged epoch records: kept."""
    first = runs_of(real_copy)[0]
    with open(first / "metrics.csv", "a") as handle:
        handle.write(f"{first.name},2,train,loss,nan\n{first.name},2,train,loss,inf\n")
    result = invoke("results", real_copy)
    assert result.exit_code == 0 and not skipped_lines(result), result.output
    assert len(pd.read_csv(real_copy / "runs.csv")) == 4


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
    folder = rng.choice(runs_of(exp))
    if rng.random() < 0.5:
        what = _damage_summary(rng, folder / "summary.json")
    else:
        what = _damage_metrics(rng, folder / "metrics.csv")
    return folder, what


@pytest.mark.parametrize("command, examples", [("results", 24), ("plot", 6)])
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
        skipped = skipped_lines(result)
        assert len(skipped) == 1 and skipped[0].startswith(f"warning: skipped {folder}:"), (
            f"{context}: {result.stderr}"
        )
        assert read_summary(folder) is None, context
        if command == "results":
            runs = pd.read_csv(exp / "runs.csv")
            assert len(runs) == 3 and folder.name not in set(runs.run_id.astype(str)), context
        else:
            assert (exp / "plots" / "error_vs_batch_size.png").is_file(), context


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
    """Seed 0's runs written by an older normbench, without eval.precise_bn_images (a
    root key) and norm.eps (an option's key): before, every group split in two on the
    null; now those runs take the defaults (10000, and each norm's own eps), the groups
    stay whole, and the warning, the table's caption, runs.csv and summary.csv say which
    keys were filled in for how many runs."""
    from normbench.config import compose

    runs = runs_of(real_copy)
    seeds = {p: json.loads((p / "summary.json").read_text())["seed"] for p in runs}
    older = [p for p in runs if seeds[p] == 0]
    assert len(older) == 2
    for folder in older:
        _as_older_version(folder, "eval.precise_bn_images", "norm.eps")

    result = invoke("results", real_copy)
    assert result.exit_code == 0, result.output
    assert (
        "warning: 2 runs of 4 lack eval.precise_bn_images (written by an older normbench): "
        "grouped with its default, 10000"
    ) in result.stderr
    assert "warning: 2 runs of 4 lack norm.eps" in result.stderr
    assert "defaults filled in where older runs lack a key" in " ".join(result.stdout.split())

    summary = pd.read_csv(real_copy / "summary.csv")
    assert list(summary["norm.name"]) == ["custom_bn", "layer"] and list(summary.n) == [2, 2]
    assert "eval.precise_bn_images" in summary.columns  # a group key, not a split
    assert set(summary["eval.precise_bn_images"]) == {10000}
    assert list(summary.defaulted) == ["eval.precise_bn_images: 1 run; norm.eps: 1 run"] * 2
    table = pd.read_csv(real_copy / "runs.csv")
    by_seed = dict(zip(table.seed, table.defaulted.fillna(""), strict=False))
    assert by_seed == {0: "eval.precise_bn_images,norm.eps", 1: ""}
    for norm in ("custom_bn", "layer"):
        eps = compose([f"norm={norm}"]).norm.eps
        assert set(table.loc[table["norm.name"] == norm, "norm.eps"]) == {eps}
    assert swept_keys(collect(real_copy).runs) == ["norm.name"]


def test_fields_every_older_summary_lacks_read_as_null(real_copy):
    """Runs written before the data-parallel fields existed (none of them in summary.json,
    nor processes, nodes and precision in config.yaml): the fields are null columns, so
    tables group by them (one group) rather than call them unknown keys."""
    fields = ("processes", "nodes", "world_size", "batch_size_per_process", "norm_batch_size",
              "precision")  # fmt: skip
    for folder in runs_of(real_copy):
        record = json.loads((folder / "summary.json").read_text())
        for field in fields:
            del record[field]
        record.pop("config.dist_timeout_s", None)
        (folder / "summary.json").write_text(json.dumps(record))
        cfg = OmegaConf.load(folder / "config.yaml")
        for key in ("processes", "nodes", "precision", "dist_timeout_s"):
            del cfg[key]
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

    runs = collect(real_copy).runs
    assert all(runs[field].isna().all() for field in fields)
    result = invoke("results", real_copy, "--group-by", "norm,norm_batch_size")
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(real_copy / "summary.csv")
    assert list(summary["norm.name"]) == ["custom_bn", "layer"] and list(summary.n) == [2, 2]
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in
            (["custom_bn"], ["layer"])]  # fmt: skip
    assert "by norm, norm_batch_size" in result.stdout
    assert [row[:3] for row in rows[:2]] == [["custom_bn", "null", "2"], ["layer", "null", "2"]]


def test_older_runs_precise_bn_batches_read_as_the_images_they_averaged(tmp_path, make_run):
    """A run written before eval.precise_bn_images replaced eval.precise_bn_batches: its
    batches x batch_size images (4 x 32), the same batches PreciseBN takes now; no column,
    no group, no default of the old key."""
    exp = tmp_path / "exp"
    make_run(exp, seed=0, batch_size=32, eval={"precise_bn_batches": 4})
    make_run(exp, seed=1, batch_size=32, eval__precise_bn_images=128)
    collected = collect(exp)
    assert "eval.precise_bn_batches" not in collected.runs
    assert list(collected.runs["eval.precise_bn_images"]) == [128, 128]
    assert swept_keys(collected.runs) == [] and collected.defaulted == {}
    # all runs older: the same
    older = collect_only(tmp_path / "old", make_run, eval={"precise_bn_batches": 3})
    assert "eval.precise_bn_batches" not in older.runs
    assert list(older.runs["eval.precise_bn_images"]) == [3 * 128, 3 * 128]


def collect_only(exp, make_run, **overrides):
    for seed in (0, 1):
        make_run(exp, seed=seed, **overrides)
    return collect(exp)


def test_older_batch_renorm_runs_keep_their_counts_and_take_no_share(tmp_path, make_run):
    """batch_renorm written when its schedule was in steps: the shares it lacks are null
    (its counts ruled), not the YAML's shares; they differ from a run of the shares."""
    exp = tmp_path / "exp"
    now = OmegaConf.to_container(compose(["norm=batch_renorm"]).norm)
    before = {k: v for k, v in now.items() if not k.endswith("_fraction")}
    before.update(warmup_steps=500, ramp_steps=2000)
    make_run(exp, seed=0, norm=before)
    make_run(exp, seed=1, norm=now)
    runs = collect(exp).runs.set_index("seed")
    assert pd.isna(runs.loc[0, "norm.warmup_fraction"]) and runs.loc[0, "norm.warmup_steps"] == 500
    assert runs.loc[1, "norm.warmup_fraction"] == 0.04 and pd.isna(runs.loc[1, "norm.warmup_steps"])
    assert "defaulted" not in runs


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


def test_text_that_is_not_unicode_is_kept_escaped(real_copy):
    """A lone surrogate in a summary's value or key (JSON's "\\ud800"), and a run folder
    named with an undecodable byte whose summary has no run_id: before, pyarrow and the
    CSV writer raised UnicodeEncodeError and no table was written. Now every run is
    aggregated, its text escaped as the terminal shows it, and the tables read back."""
    first, second, third, _ = runs_of(real_copy)
    edit_summary(first, error="bad \ud800 text")
    edit_summary(second, **{"config.\ud800": "x"})
    record = json.loads((third / "summary.json").read_text())
    del record["run_id"]
    (third / "summary.json").write_text(json.dumps(record))
    renamed = third.with_name(third.name + "\udcfe")  # the byte 0xfe, as os names it
    third.rename(renamed)

    for command in ("results", "plot"):
        result = invoke(command, real_copy)
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output
        assert not skipped_lines(result), result.stderr
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
    first = runs_of(real_copy)[0]
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
            (skipped,) = skipped_lines(result)
            assert skipped.startswith(f"warning: skipped {first}: {why}"), skipped
        assert len(pd.read_csv(real_copy / "runs.csv")) == 3
        # not done for the planner either (config.yaml is the tables' only: not read there)
        assert (read_summary(first) is None) == (name != "config.yaml")


def test_a_yaml_alias_bomb_in_config_yaml_skips_its_run(real_copy):
    """391 bytes of aliases nested in aliases (a "billion laughs"): before, 37 s, 4.9 GB
    and 650 MB printed (one level more: MemoryError). normbench never writes anchors:
    such a config.yaml is damage, one warning."""
    import time

    first = runs_of(real_copy)[0]
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
    (skipped,) = skipped_lines(result)
    assert f"{first}: config.yaml uses YAML anchors or aliases" in skipped
    assert len(result.stdout) < 10_000
    # what normbench writes has none: a real run's config.yaml reads back
    second = runs_of(real_copy)[1]
    assert read_config((second / "config.yaml").read_text())["norm.name"]


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
