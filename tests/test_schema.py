"""Tests for normbench.schema: the config schema, what is derived from it, its reference."""

import dataclasses
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from normbench import options, schema
from normbench.config import EXECUTION_KEYS, GROUPS, compose, flatten, group_options


def _every_option():
    for group in GROUPS:
        for option in group_options(group):
            yield f"{group}={option}"


def test_execution_keys_are_the_schemas_execution_fields():
    keys = schema.root_keys()
    for group in GROUPS:
        keys.extend(key for option in schema.group_keys(group).values() for key in option)
    declared = {key.name for key in keys if key.execution}
    assert set(EXECUTION_KEYS) == declared | {"logger"}  # (logger=[]: the group's node, null)
    # the run ids of every run written so far rest on exactly these, and the trackers'
    # keys, which no run held before them (logger=none holds none)
    trackers = {k for k in EXECUTION_KEYS if k == "logger" or k.startswith("logger.")}
    assert trackers == {
        "logger",
        "logger.tensorboard.dir",
        "logger.mlflow.tracking_uri",
        "logger.mlflow.artifact_dir",
        "logger.wandb.mode",
        "logger.wandb.project",
        "logger.wandb.dir",
    }
    assert set(EXECUTION_KEYS) - trackers == {
        "name",
        "out_dir",
        "device",
        "threads",
        "memory_format",
        "dist_timeout_s",
        "dataset.root",
        "dataset.download",
        "report.select",
        "report.baseline",
        "report.stale_threshold",
        "report.undertrained_gap",
        "report.x",
        "checkpoint.save",
        "checkpoint.keep",
        "eval.bn_stats",
    }


def test_the_reference_lists_every_key_of_every_option():
    reference = schema.reference_markdown()
    for override in ["", *_every_option()]:
        for key in flatten(compose([override] if override else [])):
            assert f"`{key}`" in reference, f"{key} ({override or 'defaults'})"


def test_the_reference_is_one_table_per_group_with_defaults_and_rules():
    reference = schema.reference_markdown()
    for title in ("run", "checkpoint", "eval", "report", "schedule", "dataset", "norm"):
        assert f"## {title}\n" in reference
    for title in ("model=small_cnn", "model=resnet20", "model=mlp", "optim=sgd", "optim=adam"):
        assert f"## {title}\n" in reference
    lines = {line.split(" | ")[0]: line for line in reference.splitlines() if line.startswith("|")}
    assert lines["| `batch_size`"] == (
        "| `batch_size` | integer | `128` | an integer >= 1 | no | training images per step |"
    )
    assert (
        "| `threads` | integer or null | `null` | an integer >= 1 or null | yes |"
        in (lines["| `threads`"])
    )
    # a default that differs between a group's options says whose is which
    assert "; frn, rms: 1e-06` |" in lines["| `norm.eps`"]
    assert "| `norm.name` | string | `custom_bn` | one of batch_renorm, custom_bn," in reference


def test_every_declared_key_has_help_and_every_root_key_a_value():
    """(a replaced key, still read, is never in a composed config: validation.REPLACED)"""
    from normbench.validation import REPLACED

    cfg = compose()
    for item in schema.root_keys():
        assert item.help, item.name
        present = OmegaConf.select(cfg, item.name, default="absent") != "absent"
        assert present != (item.name in REPLACED), item.name
    assert not OmegaConf.missing_keys(cfg)
    for group in schema.config_groups():
        for keys in schema.group_keys(group).values():
            assert all(item.help for item in keys)


@pytest.mark.parametrize("override", list(_every_option()))
def test_every_option_is_typed_by_its_schema(override):
    """model, optim and dataset options name their schema: OmegaConf holds their node as it."""
    group, option = override.split("=")
    if group not in schema.OPTION_SCHEMAS:
        return
    cfg = compose([override])
    schemas = schema.OPTION_SCHEMAS[group]
    expected = schemas.get(option) or next(iter(schemas.values()))
    assert OmegaConf.get_type(cfg, group) is expected
    assert OmegaConf.get_type(cfg) is schema.Config


def test_omegaconf_refuses_a_wrong_type_in_a_file_with_the_schemas_message(tmp_path, monkeypatch):
    """A preset of the user's setting an integer key to text: the schema's message."""
    from normbench import config
    from normbench.errors import UserError

    monkeypatch.setattr(options, "_user_dirs", [])
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\nepochs: many\n")
    config.add_config_dir(tmp_path)
    with pytest.raises(UserError) as caught:
        compose(["experiment=mine"])
    assert str(caught.value) == "epochs must be an integer >= 1, got 'many'"


@pytest.mark.parametrize(
    "rule, good, bad, text",
    [
        (schema.Whole(1), [1, 10**30], [0, 2.0, True, "1", None], "an integer >= 1"),
        (schema.Whole(0, 2**63 - 1), [0], [2**63], "an integer >= 0 and <= 2**63 - 1"),
        (schema.Whole(1, null=True), [None, 3], [0], "an integer >= 1 or null"),
        (schema.Number(0, strict=True), [1e-3, 2], [0, -1, "x", float("nan")], "a number > 0"),
        (schema.Number(0, strict=False, high=1, null=True), [None, 0, 1], [1.5], "a number >= 0"),
        (schema.Flag(), [True], [1, "true"], "true or false"),
        (schema.Choice(("a", "b")), ["a"], ["c"], "one of a, b"),
        (schema.Wholes(1, empty=True), [[], [2]], [[0], 3], "a list of integers >= 1"),
        (schema.Betas(), [[0, 0.5]], [[0.9], [0.9, 1]], "two numbers in [0, 1)"),
        (schema.Split(), [0, 0.5, 100], [1.0, -1], "a fraction in [0, 1)"),
        (schema.Keys(), [None, ["lr"]], [[], [""], "lr"], "a list of config keys"),
    ],
)
def test_rules(rule, good, bad, text):
    for value in good:
        assert rule.check(value) is None, value
    for value in bad:
        assert rule.check(value).startswith(text), value


def test_float32_bounds():
    rule = schema.Number(0, strict=True)
    assert rule.check(3.5e38).startswith("a number <= 3.403e+38")
    assert rule.check(1e-40).startswith("a number >= 1.175e-38")
    assert rule.check(schema.FLOAT32_TINY) is None and rule.check(schema.FLOAT32_MAX) is None


def test_number_fields_keep_the_type_written():
    """lr=1 stays the integer 1 (a float field would make it 1.0 and change the run id)."""
    cfg = compose(["lr=1", "schedule.warmup_epochs=1"])
    assert type(cfg.lr) is int and type(cfg.schedule.warmup_epochs) is int


def test_a_typed_key_refuses_what_omegaconf_would_convert():
    """OmegaConf would read true for dataset.augment=3 and 8 for batch_size='8': the
    schema's rule refuses the value first."""
    from normbench.errors import UserError

    with pytest.raises(UserError, match="dataset.augment must be true or false or null, got 3"):
        compose(["dataset.augment=3"])
    with pytest.raises(UserError, match="batch_size must be an integer >= 1, got '8'"):
        compose(["batch_size='8'"])
    assert compose(["eval_batch_size=${batch_size}"]).eval_batch_size == 128  # interpolation


def test_a_deleted_schema_key_is_refused():
    from normbench.errors import UserError

    with pytest.raises(UserError, match="epochs is missing"):
        compose(["~epochs"])


def test_the_schema_holds_every_option_schemas_keys_in_its_yaml():
    """Each built-in option's YAML gives a value to every key its schema declares."""
    for group, schemas in schema.OPTION_SCHEMAS.items():
        for option in group_options(group):
            cls = schemas.get(option) or next(iter(schemas.values()))
            cfg = compose([f"{group}={option}"])
            assert set(cfg[group]) == {f.name for f in dataclasses.fields(cls)}


def test_the_schema_imports_neither_torch_nor_hydra():
    code = (
        "import sys, normbench.schema, normbench.cli; "
        "print(sorted(m for m in ('torch', 'hydra', 'omegaconf') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_value_for_a_section_of_keys_is_one_line():
    from normbench.errors import UserError

    with pytest.raises(UserError, match=r"schedule holds keys \(name, warmup_epochs, milestones"):
        compose(["schedule=3"])


@pytest.mark.parametrize(
    "key, meant",
    [
        ("norm.grups", " (did you mean 'norm.groups'?)"),  # beside it, by the part after norm.
        ("nrom.groups", " (did you mean 'norm.groups'?)"),  # the whole key
        ("norm.lrr", " (did you mean 'lr'?)"),  # the last part, among the others
        ("norm.xyzzy", ""),
    ],
)
def test_closest_key_looks_beside_the_key_first(key, meant):
    from normbench.schema.rule import closest_key

    keys = ["norm.name", "norm.eps", "norm.groups", "lr", "batch_size"]
    assert closest_key(key, keys) == meant
