"""Tests for normbench.train: schedules, the loop's records, divergence, determinism."""

import math

import pytest
import torch

from normbench.data import load_dataset
from normbench.models import build_model
from normbench.norms import NormSpec
from normbench.train import TrainSettings, lr_factor, make_optimizer, train
from normbench.validation import scaled_lr

TIMING = {"epoch_time_s", "img_per_s"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", train_size=512)


def _train(data, seed=0, lr=0.05, norm="torch_bn", **settings):
    torch.manual_seed(seed)
    model = build_model(
        "small_cnn", NormSpec(norm), data.in_channels, data.num_classes, data.image_size
    )
    optimizer = make_optimizer(model.parameters(), lr, "sgd", momentum=0.9, nesterov=True)
    settings = TrainSettings(**{"epochs": 2, "batch_size": 32, "lr": lr, **settings})
    return train(model, data, optimizer, settings, torch.Generator().manual_seed(seed))


def test_constant_and_warmup():
    assert lr_factor(0, 100, 0, "constant", (), 0.1) == 1.0
    # Linear warm-up over 4 steps: 1/4, 2/4, 3/4, then the schedule.
    assert [lr_factor(s, 100, 4, "constant", (), 0.1) for s in range(5)] == [0.25, 0.5, 0.75, 1, 1]


def test_cosine_goes_from_one_to_zero():
    assert lr_factor(0, 100, 0, "cosine", (), 0.1) == 1.0
    assert lr_factor(50, 100, 0, "cosine", (), 0.1) == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "cosine", (), 0.1) == pytest.approx(0.0)
    # After a warm-up, the cosine spans the remaining steps.
    assert lr_factor(10, 110, 10, "cosine", (), 0.1) == 1.0
    assert lr_factor(60, 110, 10, "cosine", (), 0.1) == pytest.approx(0.5)


def test_step_schedule_decays_at_milestones():
    factors = [lr_factor(s, 100, 0, "step", (0.5, 0.75), 0.1) for s in (0, 49, 50, 74, 75, 99)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_lr_scaling_rules():
    assert scaled_lr(0.1, 32, 128, "none") == 0.1
    assert scaled_lr(0.1, 32, 128, "linear") == pytest.approx(0.025)
    assert scaled_lr(0.1, 32, 128, "sqrt") == pytest.approx(0.05)


def test_optimizers():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(params, 0.1, "sgd", momentum=0.9, nesterov=True, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    adam = make_optimizer(params, 0.1, "adam", betas=[0.8, 0.9], eps=1e-8, weight_decay=0.0)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.8, 0.9)


@pytest.mark.parametrize("betas", [[0, 0], [0, 0.5], [0.9, 1 - 2**-20]])
def test_adam_takes_betas_written_as_integers_and_steps_as_torchs(betas):
    """``optim.betas=[0,0]`` parses as integers, which torch's Adam refuses beside a float:
    the same steps as torch's Adam with the floats."""
    torch.manual_seed(0)
    start = torch.randn(5, 3)
    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    optimizer = make_optimizer([ours], 0.01, "adam", betas=betas)
    reference = torch.optim.Adam([theirs], lr=0.01, betas=tuple(float(b) for b in betas))
    assert optimizer.param_groups[0]["betas"] == reference.param_groups[0]["betas"]
    for _ in range(3):
        grad = torch.randn(5, 3)
        for parameter, step in ((ours, optimizer), (theirs, reference)):
            parameter.grad = grad.clone()
            step.step()
    assert torch.isfinite(ours).all() and torch.equal(ours, theirs)


def test_records_every_epoch_and_learns(digits):
    result = _train(digits, epochs=3, schedule="constant")
    assert result.status == "completed" and result.message is None
    assert [r["epoch"] for r in result.records] == [1, 2, 3]
    assert result.steps == 3 * (512 // 32)
    for record in result.records:
        assert set(record) == {
            "epoch",
            "train_loss",
            "train_acc",
            "test_loss",
            "test_acc",
            "lr",
            "epoch_time_s",
            "img_per_s",
        }
        assert record["lr"] == pytest.approx(0.05)
    # Ten classes: chance is 10%; a few epochs on digits get far beyond it.
    assert result.records[-1]["test_acc"] > 0.5
    assert result.records[-1]["train_loss"] < result.records[0]["train_loss"]


def test_lr_follows_the_schedule_per_step(digits):
    result = _train(digits, epochs=2, schedule="step", milestones=(0.5,), gamma=0.1)
    assert [r["lr"] for r in result.records] == pytest.approx([0.05, 0.005])


def test_max_steps_overrides_epochs(digits):
    result = _train(digits, epochs=50, max_steps=20)
    assert result.steps == 20
    assert len(result.records) == math.ceil(20 / (512 // 32))


def test_nan_loss_stops_at_once_as_diverged(digits):
    result = _train(digits, lr=1e12, epochs=5, schedule="constant")
    assert result.status == "diverged"
    assert "training loss became" in result.message
    assert result.steps < 5 * (512 // 32)
    assert not math.isfinite(result.records[-1]["train_loss"])


def test_same_seed_gives_identical_metrics(digits):
    def untimed(result):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in result.records]

    assert untimed(_train(digits, seed=3)) == untimed(_train(digits, seed=3))
    assert untimed(_train(digits, seed=3)) != untimed(_train(digits, seed=4))


def test_callbacks_see_every_step_and_epoch(digits):
    seen = {"start": None, "steps": [], "epochs": []}

    class Spy:
        def on_start(self, total, epochs):
            seen["start"] = (total, epochs)

        def on_step(self, step, epoch, loss, img_per_s):
            seen["steps"].append((step, epoch))
            assert math.isfinite(loss) and img_per_s > 0

        def on_epoch(self, record):
            seen["epochs"].append(record["epoch"])

    torch.manual_seed(0)
    model = build_model("mlp", NormSpec("custom_bn"), 1, 10, (8, 8))
    optimizer = make_optimizer(model.parameters(), 0.01, "adam")
    train(
        model,
        digits,
        optimizer,
        TrainSettings(epochs=2, batch_size=64, lr=0.01),
        torch.Generator().manual_seed(0),
        Spy(),
    )
    assert seen["start"] == (16, 2)
    assert [s for s, _ in seen["steps"]] == list(range(1, 17))
    assert seen["epochs"] == [1, 2]


def test_a_step_budget_gives_every_batch_size_the_steps_of_the_reference():
    n = 1000
    for batch_size in (8, 32, 128):
        epochs = TrainSettings(epochs=3, batch_size=batch_size, lr=0.1)
        steps = TrainSettings(
            epochs=3, batch_size=batch_size, lr=0.1, budget="steps", ref_batch_size=32
        )
        assert epochs.total_steps(n) == 3 * (n // batch_size)
        assert steps.total_steps(n) == 3 * (n // 32)  # whatever the batch size
    capped = TrainSettings(epochs=3, batch_size=8, lr=0.1, budget="steps", max_steps=7)
    assert capped.total_steps(n) == 7  # max_steps, when set, decides


class _Checkpoints:
    """Callbacks keeping what the loop hands its checkpoint after each epoch, with the
    model's and optimizer's states at that moment (as the run's checkpoint holds them)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.saved = model, optimizer, {}

    def on_start(self, total, epochs):
        pass

    def on_step(self, step, epoch, loss, img_per_s):
        pass

    def on_epoch(self, record):
        pass

    def checkpoint(self, loop):
        import copy

        states = (self.model.state_dict(), self.optimizer.state_dict(), torch.get_rng_state())
        self.saved[loop["epoch"]] = copy.deepcopy((loop, *states))


def test_fp16_keeps_its_loss_scale_in_the_checkpoint_and_a_resume_goes_on_with_it(digits):
    """fp16's gradient scaler state goes into the checkpoint, and a resumed run takes it
    back: resumed with it, the run is the uninterrupted one; resumed with another loss
    scale, it is not (torch's CPU autocast takes float16 too: no GPU needed here)."""

    def build():
        torch.manual_seed(0)
        model = build_model(
            "small_cnn", NormSpec("custom_bn"), digits.in_channels, digits.num_classes,
            digits.image_size,
        )  # fmt: skip
        return model, make_optimizer(model.parameters(), 0.05, "sgd", momentum=0.9)

    settings = TrainSettings(epochs=2, batch_size=64, lr=0.05, precision="fp16")
    model, optimizer = build()
    kept = _Checkpoints(model, optimizer)
    straight = train(model, digits, optimizer, settings, torch.Generator().manual_seed(0), kept)
    loop, model_state, optimizer_state, rng = kept.saved[1]
    assert loop["scaler"]["scale"] > 0

    def resumed(scale):
        import copy

        model, optimizer = build()
        model.load_state_dict(model_state)
        # (a copy: the optimizer takes the momentum tensors as they are, and steps them)
        optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        torch.set_rng_state(rng)
        state = {**loop, "scaler": {**loop["scaler"], "scale": scale}}
        generator = torch.Generator()
        result = train(model, digits, optimizer, settings, generator, resume=state)
        return [{k: v for k, v in r.items() if k not in TIMING} for r in result.records]

    expected = [{k: v for k, v in r.items() if k not in TIMING} for r in straight.records]
    assert resumed(loop["scaler"]["scale"]) == expected
    assert resumed(2.0**-24) != expected  # the scale taken back is the one used
