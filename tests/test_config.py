"""Tests for normbench.config: composition, validation, descriptions."""

import pytest

from normbench.config import GROUPS, compose, describe_groups, flatten, group_options
from normbench.errors import UserError


def test_defaults_compose_to_the_embedded_default():
    cfg = compose()
    assert (cfg.model.name, cfg.norm.name, cfg.dataset.name, cfg.optim.name) == (
        "small_cnn",
        "custom_bn",
        "digits",
        "sgd",
    )
    assert cfg.out_dir == "results" and cfg.name == "default" and cfg.device == "auto"
    assert cfg.dataset.root == "data" and cfg.dataset.download is False


def test_the_issues_command_composes_exactly_as_written():
    cfg = compose(
        ["norm=batch_renorm", "batch_size=8", "lr=0.05", "epochs=3"]
        + ["model=resnet20", "dataset=cifar10", "seed=1"]
    )
    assert cfg.norm.name == "batch_renorm"
    assert cfg.model.name == "resnet20"
    assert cfg.dataset.name == "cifar10"
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.seed) == (8, 0.05, 3, 1)


def test_group_keys_can_be_overridden():
    cfg = compose(["norm=group", "norm.groups=4", "dataset.train_size=100"])
    assert cfg.norm.groups == 4 and cfg.dataset.train_size == 100


def test_design_groups_have_the_design_options():
    assert set(group_options("model")) == {"small_cnn", "resnet20", "mlp"}
    # A variant added later adds an option; DESIGN.md's are all there.
    assert set(group_options("norm")) >= {
        "custom_bn",
        "torch_bn",
        "layer",
        "instance",
        "group",
        "batch_renorm",
        "ghost_bn",
        "none",
    }
    assert set(group_options("dataset")) == {
        "digits",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
    }
    assert set(group_options("optim")) == {"sgd", "adam"}


def test_every_option_has_a_description():
    described = describe_groups()
    assert set(described) == set(GROUPS)
    for group, options in described.items():
        assert options, group
        for option, description in options:
            assert description, f"{group}/{option}.yaml has no description comment"


def test_every_option_of_every_group_composes():
    for group in GROUPS:
        for option in group_options(group):
            cfg = compose([f"{group}={option}"])
            if group != "experiment":
                assert cfg[group].name == option


@pytest.mark.parametrize(
    "override, expected",
    [
        ("norm=batchnorm", "unknown norm 'batchnorm'"),
        ("model=resnet50", "unknown model 'resnet50'"),
        ("dataset=imagenet", "unknown dataset 'imagenet'"),
        ("optim=lion", "unknown optim 'lion'"),
        ("experiment=nope", "unknown experiment 'nope'"),
    ],
)
def test_unknown_group_option_lists_the_valid_ones(override, expected):
    with pytest.raises(UserError) as info:
        compose([override])
    message = str(info.value)
    assert expected in message
    group = override.split("=")[0]
    for option in group_options(group):
        assert option in message


def test_unknown_option_inside_a_sweep_is_caught():
    with pytest.raises(UserError, match="unknown norm 'foo'"):
        compose(["norm=custom_bn,foo"])


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(UserError, match="unknown config key 'batchsize'.*batch_size"):
        compose(["batchsize=8"])


def test_unparsable_override():
    with pytest.raises(UserError, match="cannot parse"):
        compose(["batch_size=[1,"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("batch_size=0", "batch_size"),
        ("batch_size=abc", "batch_size"),
        ("batch_size=2.5", "batch_size"),
        ("lr=0", "lr"),
        ("lr=-0.1", "lr"),
        ("lr=abc", "lr"),
        ("epochs=0", "epochs"),
        ("max_steps=0", "max_steps"),
        ("seed=-1", "seed"),
        ("device=tpu", "device"),
        ("lr_scaling=cubic", "lr_scaling"),
        ("schedule.name=exp", "schedule.name"),
        ("threads=0", "threads"),
        ("dataset.train_size=0", "dataset.train_size"),
        ("optim.weight_decay=-1", "optim.weight_decay"),
        ("name=a/b", "name"),
    ],
)
def test_invalid_values_are_refused_with_the_key_named(override, key):
    with pytest.raises(UserError) as info:
        compose([override])
    assert str(info.value).startswith(key)


def test_cuda_without_cuda_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        compose(["device=cuda"])


def test_flatten_gives_dotted_keys():
    flat = flatten(compose(["norm=group"]))
    assert flat["norm.name"] == "group" and flat["batch_size"] == 128
    assert "schedule.milestones" in flat


def test_default_options_are_those_config_yaml_picks():
    from normbench.config import default_options

    assert default_options() == {
        "model": "small_cnn",
        "norm": "custom_bn",
        "dataset": "digits",
        "optim": "sgd",
    }


def test_an_experiment_preset_overrides_the_defaults_and_the_command_line_wins():
    cfg = compose(["experiment=smoke"])
    assert (cfg.name, cfg.epochs, cfg.batch_size, cfg.dataset.train_size) == ("smoke", 1, 32, 512)
    cfg = compose(["experiment=smoke", "epochs=2", "name=mine"])
    assert (cfg.name, cfg.epochs) == ("mine", 2)
