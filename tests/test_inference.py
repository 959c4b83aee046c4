"""Tests for normbench.inference: PreciseBN against a float64 computation of the true mean
and unbiased variance over the same batches; batch-statistics evaluation against a
``model.train()`` forward under ``torch.no_grad()`` with the running statistics restored."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normbench import inference
from normbench.norms import NormSpec


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def batches(count=5, n=6, c=3):
    return [torch.randn(n, c, 4, 4) * (k + 1) + k for k in range(count)]


@pytest.mark.parametrize("name", ["custom_bn", "torch_bn", "ghost_bn"])
def test_precise_statistics_are_the_true_average_of_the_batches(name):
    kwargs = {"virtual_batch_size": 3} if name == "ghost_bn" else {}
    layer = NormSpec(name, kwargs)(3)
    model = nn.Sequential(layer)
    with torch.no_grad():  # running statistics far from the truth, as after training
        layer.running_mean.fill_(7.0)
        layer.running_var.fill_(0.01)
    before = copy.deepcopy(model.state_dict())
    data = batches()
    estimate = inference.precise_statistics(model, data)

    # float64, by hand: each normalised (virtual) batch's mean and unbiased variance
    pieces = [b.double() for b in data]
    if name == "ghost_bn":
        pieces = [part for b in pieces for part in b.split(3)]
    means = torch.stack([p.mean(dim=(0, 2, 3)) for p in pieces])
    variances = torch.stack([p.var(dim=(0, 2, 3), unbiased=True) for p in pieces])
    got = estimate[0]
    torch.testing.assert_close(got.running_mean.double(), means.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.running_var.double(), variances.mean(0), rtol=1e-5, atol=1e-5)
    assert not got.training
    for key, value in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(value, before[key]), key


def test_precise_statistics_of_batch_renormalization():
    layer = NormSpec("batch_renorm", {})(3)
    model = nn.Sequential(layer)
    data = batches()
    estimate = inference.precise_statistics(model, data)[0]
    pieces = [b.double() for b in data]
    means = torch.stack([p.mean(dim=(0, 2, 3)) for p in pieces]).mean(0)
    # batch renormalization keeps the batches' standard deviations, eps inside
    stds = torch.stack(
        [(p.var(dim=(0, 2, 3), unbiased=False) + layer.eps).sqrt() for p in pieces]
    ).mean(0)
    torch.testing.assert_close(estimate.running_mean.double(), means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(estimate.running_std.double(), stds, rtol=1e-5, atol=1e-5)
    assert layer.momentum == 0.01  # the model's own layer keeps its settings


def test_batch_statistics_accuracy_is_a_training_mode_forward():
    from normbench.models import build_model

    model = build_model("small_cnn", NormSpec("custom_bn"), 1, 10, (8, 8)).eval()
    x, y = torch.randn(23, 1, 8, 8), torch.randint(0, 10, (23,))
    state = copy.deepcopy(model.state_dict())

    got = inference.accuracy(copy.deepcopy(model).train(), x, y, batch_size=11)

    # by hand: batches of 11, 11 and 1, the last single image joined to the one before
    model.train()
    correct = 0
    with torch.no_grad():
        for xb, yb in [(x[:11], y[:11]), (x[11:], y[11:])]:
            correct += int((model(xb).argmax(1) == yb).sum())
    model.load_state_dict(state)  # the running statistics restored
    assert got == correct / 23


def test_measure_leaves_the_model_and_skips_variants_without_running_statistics():
    from normbench.data import load_dataset
    from normbench.models import build_model

    data = load_dataset("digits", train_size=64, test_size=40, val_size=0)
    model = build_model("small_cnn", NormSpec("custom_bn"), 1, 10, (8, 8))
    state = copy.deepcopy(model.state_dict())
    measured = inference.measure(model, data, 16, 1000, precise_images=3200, seed=0)
    assert set(measured) == {"test_acc_precise_bn", "test_acc_batch_stats"}
    assert all(0 <= v <= 1 for v in measured.values())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # at most one pass over the training set: 64 // 16 batches
    assert len(list(inference.training_batches(data, 16, 200, seed=0))) == 4
    layer = build_model("small_cnn", NormSpec("layer"), 1, 10, (8, 8))
    assert inference.measure(layer, data, 16, 1000, 200, 0) == {}


@pytest.mark.parametrize(
    ("images", "num_train", "batch_size", "batches"),
    [
        (10000, 60000, 128, 79),  # ceil(10000 / 128): 10,112 images, the last batch whole
        (10000, 60000, 2, 5000),  # as many images at batch size 2 (not 400: issue 25)
        (10000, 8000, 128, 62),  # capped by the training set: its 62 full batches
        (7990, 8000, 128, 62),  # ceil(7990 / 128) = 63 > the 62 full batches of one pass
        (256, 8000, 128, 2),  # exactly two batches
        (1, 8000, 128, 1),  # at least one batch
        (200 * 8, 300, 8, 37),  # an old run's 200 batches at 8: one pass, 300 // 8
    ],
)
def test_precise_bn_is_sized_in_images(images, num_train, batch_size, batches):
    assert inference.precise_batches(images, num_train, batch_size) == batches


def test_measure_averages_the_batches_its_images_make(monkeypatch):
    """measure() hands PreciseBN ceil(images / batch_size) training batches of batch_size."""
    from normbench.data import load_dataset
    from normbench.models import build_model

    seen = []
    original = inference.precise_statistics

    def counting(model, batches):
        batches = list(batches)
        seen.append([len(b) for b in batches])
        return original(model, batches)

    monkeypatch.setattr(inference, "precise_statistics", counting)
    data = load_dataset("digits", train_size=100, test_size=20, val_size=0)
    model = build_model("small_cnn", NormSpec("custom_bn"), 1, 10, (8, 8))
    inference.measure(model, data, 8, 1000, precise_images=20, seed=0)
    inference.measure(model, data, 8, 1000, precise_images=10000, seed=0)
    assert seen == [[8] * 3, [8] * 12]  # ceil(20 / 8); capped at 100 // 8


def test_a_run_records_the_three_estimators(tiny):
    from normbench import runner

    summary = runner.run(tiny("norm=ghost_bn")).summary
    for key in ("final_test_acc", "test_acc_precise_bn", "test_acc_batch_stats"):
        assert 0 <= summary[key] <= 1, key
    assert summary["bn_eval_time_s"] > 0
    assert runner.run(tiny("norm=group")).summary["test_acc_precise_bn"] is None


def test_the_sweep_draws_the_three_estimators_for_variants_with_running_statistics(tmp_path):
    from typer.testing import CliRunner

    from normbench.cli import app

    args = ["sweep", f"out_dir={tmp_path}", "epochs=1", "dataset.train_size=128", "threads=1",
            "norm=custom_bn,batch_renorm,layer", "batch_size=16,32"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "default" / "plots" / "bn_inference.png").is_file()
    import pandas as pd

    summary = pd.read_csv(tmp_path / "default" / "summary.csv")
    bn = summary[summary["norm.name"] == "custom_bn"]
    assert bn["test_acc_precise_bn_mean"].notna().all()
    assert summary[summary["norm.name"] == "layer"]["test_acc_precise_bn_mean"].isna().all()
