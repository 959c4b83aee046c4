"""Tests for normbench.validation: each key's rule and the checks across keys (the learning
rate within float32, path lengths, the device), as a composed config meets them."""

import pytest

from normbench.config import compose
from normbench.errors import UserError


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


def test_jobs_that_run_elsewhere_check_their_device_there(monkeypatch):
    """A sweep's jobs for a cluster's GPU nodes, planned where there is none: device=cuda
    and fp16 pass; fp16 on the CPU, which no machine runs, does not; outside, as before."""
    import torch

    from normbench.validation import jobs_elsewhere

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with jobs_elsewhere():
        assert compose(["device=cuda", "precision=fp16"]).device == "cuda"
        assert compose(["precision=fp16"]).precision == "fp16"  # auto: CUDA there
        with pytest.raises(UserError, match="precision=fp16 needs CUDA"):
            compose(["device=cpu", "precision=fp16"])
    with jobs_elsewhere(False), pytest.raises(UserError, match="CUDA is not available"):
        compose(["device=cuda"])
    with pytest.raises(UserError, match="precision=fp16 needs CUDA"):
        compose(["precision=fp16"])


# ------------------------------------------------- values that overflowed after validation


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["lr=1e308"], "lr must be a number <= 3.403e+38"),
        (["schedule.gamma=1e308"], "schedule.gamma must be a number <= 3.403e+38"),
        (["schedule.warmup_epochs=1e308"], "schedule.warmup_epochs must be a number <= 3.403e"),
        (["optim.momentum=1e39"], "optim.momentum must be a number <= 3.403e+38"),
        (["optim.weight_decay=1e39"], "optim.weight_decay must be a number <= 3.403e+38"),
        # derived: each names the key that took the learning rate over float32's largest
        (
            ["lr=1e38", "lr_scaling=linear", "ref_batch_size=1", "batch_size=32"],
            "lr=1e+38 with lr_scaling=linear (batch_size=32, ref_batch_size=1) gives a peak "
            "learning rate of 3.2e+39",
        ),
        (
            ["schedule.name=step", "schedule.gamma=1e30"],
            "schedule.gamma=1e+30 multiplies the learning rate at each of the 2 milestones: "
            "0.1 would reach 1e+59",
        ),
        (
            ["optim=adam", "optim.betas=[0.9999999,0.5]", "lr=1e33"],
            "optim.betas=[0.9999999, 0.5]: Adam's first step is the learning rate over 1 - beta1",
        ),
    ],
)
def test_values_beyond_float32_are_refused_naming_the_key(overrides, expected):
    with pytest.raises(UserError) as caught:
        compose(overrides)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["norm.eps=1e-46"], "norm.eps"),  # 0 in float32
        (["norm.eps=1e-40"], "norm.eps"),  # a subnormal, flushed to 0 by GPU kernels
        (["optim=adam", "optim.eps=1e-46"], "optim.eps"),
        (["lr=1e-46"], "lr"),
        (["schedule.name=step", "schedule.gamma=1e-46"], "schedule.gamma"),
    ],
)
def test_positive_values_must_stay_positive_in_float32(overrides, key):
    """A value refused at 0 is refused where float32 makes it 0 (or a subnormal); float32's
    smallest normal itself is accepted."""
    import torch
    from omegaconf import OmegaConf

    tiny = torch.finfo(torch.float32).tiny
    with pytest.raises(UserError) as caught:
        compose(overrides)
    assert str(caught.value).startswith(f"{key} must be a number >= 1.175e-38 (float32's")
    assert OmegaConf.select(compose([*overrides[:-1], f"{key}={tiny!r}"]), key) == tiny


def test_the_largest_values_float32_holds_compose():
    import numpy as np

    largest = float(np.finfo(np.float32).max)
    cfg = compose([f"lr={largest!r}", "schedule.name=step", "schedule.gamma=1.0"])
    assert cfg.lr == largest
    # a gamma above 1 is fine while the learning rate it reaches fits
    assert compose(["schedule.name=step", "schedule.gamma=10"]).schedule.gamma == 10


def _path_of_length(base, length: int):
    """A path below ``base`` of ``length`` characters (or one more), in folder names of
    200 or less."""
    path = base
    while len(str(path)) < length:
        path = path / ("d" * (min(200, length - len(str(path)) - 1) or 1))
    return path


def test_a_long_out_dir_is_refused_against_the_file_systems_limits(tmp_path):
    import os

    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")
    with pytest.raises(UserError, match=f"out_dir: File name too long: .* is {name_max + 1} bytes"):
        compose([f"out_dir={tmp_path / ('a' * (name_max + 1))}"])
    with pytest.raises(UserError, match="name: File name too long"):
        compose([f"out_dir={tmp_path}", f"name={'n' * (name_max + 1)}"])
    # folder names that each fit, a path that does not once the run folders are below it
    deep = _path_of_length(tmp_path, path_max - 60)  # 60 bytes short of PATH_MAX
    with pytest.raises(UserError, match=f"more than the {path_max - 1} this file system allows"):
        compose([f"out_dir={deep}"])
    with pytest.raises(UserError, match="dataset.root="):
        compose([f"dataset.root={deep}"])
    assert not any(tmp_path.iterdir())
    compose([f"out_dir={tmp_path / ('a' * name_max)}"])  # the longest name that fits


# ---------------------------------------------------------- keys replaced, still read


def test_the_old_precise_bn_batches_is_read_as_images_with_a_notice():
    """eval.precise_bn_batches=200 (replaced by eval.precise_bn_images): 200 x batch_size
    images, said once; the composed config holds only the new key (so run ids too)."""
    from omegaconf import OmegaConf

    from normbench.errors import Notice

    with pytest.warns(Notice) as notices:
        cfg = compose(["eval.precise_bn_batches=200", "batch_size=8"])
    assert [str(n.message) for n in notices] == [
        "eval.precise_bn_batches=200 is replaced by eval.precise_bn_images: read as 1600 "
        "images (200 batches of batch_size=8)"
    ]
    assert OmegaConf.to_container(cfg.eval) == {"precise_bn_images": 1600, "bn_stats": True}
    assert compose(["eval.precise_bn_images=1600", "batch_size=8"]) == cfg
    assert OmegaConf.to_container(compose().eval) == {"precise_bn_images": 10000, "bn_stats": True}


def test_the_old_key_in_a_users_preset_is_read_too(tmp_path):
    from normbench import config
    from normbench.errors import Notice

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "old.yaml").write_text(
        "# @package _global_\nbatch_size: 16\neval:\n  precise_bn_batches: 10\n"
    )
    config.add_config_dir(tmp_path)
    with pytest.warns(Notice, match="read as 160 images"):
        assert compose(["experiment=old"]).eval.precise_bn_images == 160


def test_settling_a_settled_config_changes_nothing():
    """(the runner settles the configs Hydra composes for a sweep's jobs again)"""
    import copy

    from normbench.validation import settle

    cfg = compose(["norm=batch_renorm", "norm.ramp_steps=9"])
    again = copy.deepcopy(cfg)
    settle(again)
    assert again == cfg and cfg.norm.ramp_fraction is None


@pytest.mark.parametrize("value", ["0", "abc", "2.5"])
def test_a_bad_old_key_is_refused_naming_it(value):
    with pytest.raises(UserError, match="eval.precise_bn_batches must be .*, got"):
        compose([f"eval.precise_bn_batches={value}"])


@pytest.mark.parametrize("value", [True, "3", -2, 2.5])
def test_settling_leaves_a_bad_old_key_for_validate_to_name(value):
    """A sweep job settles its config before it validates it (so that a run stopped
    meanwhile is recorded under the plan's id): a value that is not a count of batches
    stays as it is (was: multiplied into precise_bn_images, True passing as 1 and "3" as
    "3333..."), and validate names the key the user set."""
    from omegaconf import OmegaConf

    from normbench.config import _plain_copy
    from normbench.validation import settle, validate

    cfg = _plain_copy(OmegaConf.to_container(compose([])))  # a job's, as plain containers
    cfg.eval.precise_bn_batches = value
    settle(cfg, notify=False)
    assert cfg.eval.precise_bn_batches is value and cfg.eval.precise_bn_images == 10000
    with pytest.raises(UserError, match="eval.precise_bn_batches must be"):
        validate(cfg)
