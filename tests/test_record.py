"""Tests for the run record (normbench.schema.RunRecord): what each reader derives from it,
summary.json holding each value once, and run folders written before (two names for one
value) reading the same."""

import dataclasses
import json

import pandas as pd
import pytest

from normbench import rundir, runner, schema
from normbench.analysis.collect import collect
from normbench.analysis.stats import STAT_METRICS
from normbench.config import flatten
from normbench.rundir import CONFIG_PREFIX, SUMMARY_FIELDS, split_summary
from normbench.views.figures import ESTIMATORS

#: The config keys a record field holds, and so written once in summary.json.
HELD = {
    "name": "name",
    "model": "model.name",
    "norm": "norm.name",
    "dataset": "dataset.name",
    "optim": "optim.name",
    "batch_size": "batch_size",
    "lr": "lr",
    "epochs": "epochs",
    "max_steps": "max_steps",
    "seed": "seed",
    "processes": "processes",
    "nodes": "nodes",
    "precision": "precision",
}


# ------------------------------------------------------------------- what is derived


def test_summary_fields_are_the_records_fields_in_order():
    assert tuple(f.name for f in dataclasses.fields(schema.RunRecord)) == SUMMARY_FIELDS
    assert SUMMARY_FIELDS[:2] == ("run_id", "status")
    assert len(SUMMARY_FIELDS) == len(set(SUMMARY_FIELDS)) == 48


def test_statistics_and_figures_take_their_fields_from_the_record():
    assert STAT_METRICS == (
        "final_test_acc",
        "test_acc_at_best_val",
        "test_acc_precise_bn",
        "test_acc_batch_stats",
    )
    assert ESTIMATORS == (
        ("final_test_acc", "running averages", "-"),
        ("test_acc_precise_bn", "PreciseBN", "--"),
        ("test_acc_batch_stats", "batch statistics", ":"),
    )
    assert {f.config: f.name for f in schema.record_fields() if f.config} == {
        v: k for k, v in HELD.items()
    }


def test_number_rules_follow_the_records_types_and_ranges():
    rules = rundir._NUMBER_RULES
    whole = {
        "batch_size": (1, False), "epochs": (1, False), "seed": (0, False),
        "max_steps": (1, True), "steps": (0, True), "renorm_ramp_end_step": (0, True),
        "best_val_epoch": (1, True),
        "resumed_from_epoch": (0, True), "num_params": (0, True), "threads": (1, True),
        "processes": (1, True), "nodes": (1, True), "world_size": (1, True),
        "batch_size_per_process": (1, True), "norm_batch_size": (1, True),
    }  # fmt: skip
    accuracies = [f for f in SUMMARY_FIELDS if f.endswith("_acc") or "_acc_" in f]
    amounts = ["lr", "lr_effective", "final_test_loss", "final_train_loss", "bn_eval_time_s",
               "train_time_s", "wall_time_s", "img_per_s", "bn_stats_time_s"]  # fmt: skip
    assert set(rules) == {*whole, *accuracies, *amounts}
    for key, (low, null) in whole.items():
        assert rules[key] == (True, low, None, null), key
    for key in accuracies:
        assert rules[key] == (False, 0, 1, True), key
    for key in amounts:
        assert rules[key] == (False, 0, None, True), key
    # text: the names, and the option names that summaries written before carry twice
    assert rundir._TEXT_FIELDS == (
        "name", "model", "norm", "dataset", "optim",
        "config.model.name", "config.norm.name", "config.dataset.name", "config.optim.name",
    )  # fmt: skip


def test_a_field_the_builder_leaves_out_or_misspells_fails():
    values = dict.fromkeys(SUMMARY_FIELDS)
    schema.RunRecord(**values)
    with pytest.raises(TypeError, match="norm"):
        schema.RunRecord(**{k: v for k, v in values.items() if k != "norm"})
    with pytest.raises(TypeError, match="nrom"):
        schema.RunRecord(**values, nrom="layer")


# ------------------------------------------------------------- summary.json, written


@pytest.mark.parametrize("option", ["norm=custom_bn", "norm=group", "norm=none", "optim=adam"])
def test_summary_holds_each_value_once_and_gives_the_whole_config_back(tiny, option):
    cfg = tiny(option, "max_steps=3", "seed=7")
    summary = runner._lost_summary(cfg, "failed", "lost")
    assert list(summary)[: len(SUMMARY_FIELDS)] == list(SUMMARY_FIELDS)
    config = flatten(cfg)
    for field, key in HELD.items():
        assert f"{CONFIG_PREFIX}{key}" not in summary, key
        assert summary[field] == config[key] and type(summary[field]) is type(config[key])
    assert [k for k in summary if k not in SUMMARY_FIELDS] == [
        f"{CONFIG_PREFIX}{k}" for k in config if k not in HELD.values()
    ]
    own, whole = split_summary(json.loads(json.dumps(summary)))
    assert list(own) == list(SUMMARY_FIELDS)
    assert list(whole.items()) == list(json.loads(json.dumps(config)).items())  # in order


def test_run_ids_hash_the_config_not_the_record(tiny):
    # a run of the baseline sweep before the record held its config values (issue 24); its
    # id was 2aa4efb44efb until eval.precise_bn_images replaced eval.precise_bn_batches
    # (issue 25), which changed every run's config and so every run id
    cfg = tiny("norm=custom_bn", "batch_size=8", "lr=0.1", "seed=1", "epochs=2", "name=cmp",
               "dataset.train_size=300", "threads=null")  # fmt: skip
    assert runner.run_id(cfg) == "90925413f0d3"


def test_split_summary_without_a_config_reads_config_yaml():
    own, config = split_summary({"run_id": "a", "status": "completed", "norm": "layer"})
    assert config is None and own["norm"] == "layer"


def test_unknown_config_keys_keep_their_place():
    summary = {"norm": "layer", "batch_size": 8, "config.zzz": 1, "config.eval_batch_size": 9,
               "config.norm.eps": 0.1, "config.later": 2}  # fmt: skip
    _, config = split_summary(summary)
    assert list(config) == ["zzz", "batch_size", "eval_batch_size", "norm.name", "norm.eps",
                            "later"]  # fmt: skip


# ------------------------------------------------------- folders written before, read


def _old_style(summary: dict, config: dict) -> dict:
    """A summary as normbench wrote it before the record held config values: the whole
    config under ``config.`` too."""
    own = {k: v for k, v in summary.items() if not k.startswith(CONFIG_PREFIX)}
    return {**own, **{f"{CONFIG_PREFIX}{k}": v for k, v in config.items()}}


def _experiment(root, summaries):
    for summary in summaries:
        folder = root / "runs" / summary["run_id"]
        folder.mkdir(parents=True)
        rundir.write_json(folder / "summary.json", summary)
        metrics = rundir.metrics_frame(summary["run_id"], [{"epoch": 1, "test_acc": 0.5}])
        rundir.write_csv(folder / "metrics.csv", metrics)
    return collect(root)


def test_old_folders_with_both_names_aggregate_as_new_ones(tiny, tmp_path):
    new, old = [], []
    for option in ("norm=custom_bn", "norm=layer", "norm=group"):
        for seed in (0, 1):
            for bs in (8, 16):
                cfg = tiny(option, f"seed={seed}", f"batch_size={bs}")
                summary = runner._lost_summary(cfg, "completed", None)
                summary["final_test_acc"] = summary["test_acc_at_best_val"] = 0.25 + seed / 10
                new.append(summary)
                old.append(_old_style(summary, flatten(cfg)))
    before = _experiment(tmp_path / "before", old)
    after = _experiment(tmp_path / "after", new)
    pd.testing.assert_frame_equal(before.runs, after.runs)
    assert before.runs.attrs == after.runs.attrs
    pd.testing.assert_frame_equal(before.metrics, after.metrics)
    assert before.metrics_csv == after.metrics_csv and not before.defaulted
    # one column per value where both names agree; the record's names and the config's
    # option names (what the tables group by) both stay
    columns = list(after.runs.columns)
    for key in ("batch_size", "lr", "seed", "epochs", "max_steps", "name"):
        assert columns.count(key) == 1 and f"config.{key}" not in columns
    assert {"norm", "norm.name", "model", "model.name", "dataset", "dataset.name"} <= {*columns}


def test_old_folders_damaged_in_a_name_they_carry_twice_are_unreadable(tiny, tmp_path):
    cfg = tiny()
    summary = _old_style(runner._lost_summary(cfg, "completed", None), flatten(cfg))
    summary["config.norm.name"] = 3
    found = _experiment(tmp_path / "exp", [summary])
    assert found.runs.empty and len(found.unreadable) == 1
    assert "config.norm.name 3 is not text" in next(iter(found.problems.values()))


def test_new_summaries_are_checked_under_the_records_names(tiny, tmp_path):
    cfg = tiny()
    summary = runner._lost_summary(cfg, "completed", None)
    summary["batch_size"] = 1.5
    found = _experiment(tmp_path / "exp", [summary])
    assert "batch_size 1.5 is not a whole number" in next(iter(found.problems.values()))


def test_renorm_ramp_end_step_is_a_nullable_count_a_run_fills_in(tiny):
    """Filled by a built run (tests/test_batchrenorm.py); null where nothing was built, as
    whatever it would have measured."""
    field = {f.name: f for f in schema.record_fields()}["renorm_ramp_end_step"]
    assert (field.whole, field.null, field.low, field.config) == (True, True, 0, None)
    lost = runner._lost_summary(tiny("norm=batch_renorm"), "failed", "lost")
    assert lost["renorm_ramp_end_step"] is None
    assert rundir.summary_problem({**lost, "renorm_ramp_end_step": -1})
