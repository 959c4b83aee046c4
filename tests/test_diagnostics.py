"""Tests for normbench.diagnostics: each measure against a float64 computation by hand on a
layer whose running statistics are set to known values; the probe gap zero when the
running statistics equal the probe batch's; the model left untouched; rows in the model's
order, one per layer with running statistics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from normbench import diagnostics
from normbench.norms import NormSpec
from normbench.rundir import BN_STATS_MEASURES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def batches(count=4, n=6, c=3):
    return [torch.randn(n, c, 4, 4) * (k + 1) + k for k in range(count)]


def reference(layer, data, running_var):
    """The module docstring's measures in float64, written out per channel."""
    eps = layer.eps
    x = [b.double() for b in data]
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in x])
    variances = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in x])
    mu, var = means.mean(0), variances.mean(0)
    std = (var + eps).sqrt()
    return {
        "mean_shift": ((layer.running_mean.double() - mu).abs() / std).mean().item(),
        "var_log_ratio": (running_var / (var + eps)).log().abs().mean().item(),
        "batch_mean_spread": (means.std(0, unbiased=True) / std).mean().item(),
        "batch_var_spread": (variances.std(0, unbiased=True) / (var + eps)).mean().item(),
    }


@pytest.mark.parametrize("name", ["custom_bn", "torch_bn"])
def test_the_measures_against_float64_by_hand(name):
    layer = NormSpec(name, {})(3)
    model = nn.Sequential(layer)
    with torch.no_grad():  # known running statistics, far from the data's
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 3.0]))
        layer.running_var.copy_(torch.tensor([4.0, 0.25, 9.0]))
    data = batches()
    state = copy.deepcopy(model.state_dict())
    (row,) = diagnostics.measure(model, data)
    expected = reference(layer, data, layer.running_var.double() + layer.eps)
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-5), key
    assert (row["layer"], row["channels"], row["batches"]) == ("0", 3, 4)
    assert set(row) == {"layer", "channels", "batches", *BN_STATS_MEASURES}
    for key, value in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(value, state[key]), key
    assert model.training


def test_batch_renormalization_divides_by_its_running_std_squared():
    layer = NormSpec("batch_renorm", {})(3)
    model = nn.Sequential(layer)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 3.0]))
        layer.running_std.copy_(torch.tensor([2.0, 0.5, 3.0]))
        layer.num_batches_tracked.fill_(10_000)  # its corrections at full strength
    data = batches()
    (row,) = diagnostics.measure(model, data)
    expected = reference(layer, data, layer.running_std.double().square())
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-5), key
    assert int(layer.num_batches_tracked) == 10_000  # its schedule as training left it


def test_running_statistics_equal_to_the_truth_measure_zero():
    layer = NormSpec("custom_bn", {})(3)
    data = batches(count=3)
    x = [b.double() for b in data]
    with torch.no_grad():
        layer.running_mean.copy_(torch.stack([b.mean(dim=(0, 2, 3)) for b in x]).mean(0))
        layer.running_var.copy_(torch.stack([b.var(dim=(0, 2, 3)) for b in x]).mean(0))
    (row,) = diagnostics.measure(nn.Sequential(layer), data)
    assert row["mean_shift"] == pytest.approx(0, abs=1e-6)
    assert row["var_log_ratio"] == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("name", ["custom_bn", "torch_bn"])
def test_the_probe_gap_is_zero_when_the_running_statistics_are_the_batchs(name):
    layer = NormSpec(name, {})(3)
    probe = batches(count=1)[0]
    with torch.no_grad():
        nn.init.uniform_(layer.weight, 0.5, 2.0)
        nn.init.uniform_(layer.bias, -1.0, 1.0)
        # eval mode divides by sqrt(running_var + eps); training by the biased variance's
        layer.running_mean.copy_(probe.double().mean(dim=(0, 2, 3)))
        layer.running_var.copy_(probe.double().var(dim=(0, 2, 3), unbiased=False))
    (row,) = diagnostics.measure(nn.Sequential(layer), [probe, *batches(count=2)])
    assert row["train_eval_gap"] == pytest.approx(0, abs=1e-5)


def test_the_output_gap_against_float64_by_hand():
    train = torch.randn(5, 3, 4, 4)
    train[:, 2] = 7.0  # a channel whose training-mode output does not vary: left out
    evaluated = train * 1.5 + 0.25
    got = diagnostics.output_gap(train, evaluated)
    t, e = train.double(), evaluated.double()
    rms = (t - e).square().mean(dim=(0, 2, 3)).sqrt()
    scale = t.std(dim=(0, 2, 3), unbiased=False)
    assert got == pytest.approx((rms[:2] / scale[:2]).mean().item(), rel=1e-6)
    assert math.isnan(diagnostics.output_gap(torch.ones(2, 1, 3), torch.zeros(2, 1, 3)))


def test_one_row_per_layer_in_the_models_order_and_none_without_running_statistics():
    from normbench.models import build_model

    model = build_model("small_cnn", NormSpec("custom_bn"), 1, 10, (8, 8))
    names = [n for n, m in model.named_modules() if hasattr(m, "running_var")]
    rows = diagnostics.measure(model, [torch.randn(4, 1, 8, 8) for _ in range(2)])
    assert [r["layer"] for r in rows] == names and len(names) == 3
    assert all(math.isfinite(r[k]) for r in rows for k in BN_STATS_MEASURES)
    single = diagnostics.measure(model, [torch.randn(4, 1, 8, 8)])
    assert math.isnan(single[0]["batch_mean_spread"])  # one batch: no spread
    group = build_model("small_cnn", NormSpec("group"), 1, 10, (8, 8))
    assert diagnostics.measure(group, [torch.randn(4, 1, 8, 8)]) == []


def test_the_batches_are_fixed_per_run_and_sized_in_images():
    from normbench.data import DataSplits

    n = 1000
    empty = torch.zeros(0, 1, 1, 1)
    x, y = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1), torch.zeros(n).long()
    data = DataSplits("t", x, y, empty, y[:0], 10, (0.0,), (1.0,), False)
    first = diagnostics.fixed_batches(data, 8, seed=3)
    again = diagnostics.fixed_batches(data, 8, seed=3)
    assert len(first) == diagnostics.IMAGES // 8
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    images = torch.cat(first).flatten()
    assert len(images.unique()) == len(images)  # no image twice
    assert diagnostics.batch_count(n, 512) == 1  # at most one pass over the training set
    assert diagnostics.batch_count(n, 256) == diagnostics.MIN_BATCHES
    assert diagnostics.batch_count(n, 2) == diagnostics.IMAGES // 2
