"""The training loop: cross-entropy, an optimizer, a per-step learning-rate schedule.

It returns one record per epoch and knows nothing of normalization variants or
files: the runner builds the model and optimizer and writes what comes back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from normbench import ddp, distributed, interrupts
from normbench.data import (
    DataSplits,
    eval_batches,
    eval_step_size,
    steps_per_epoch,
    train_batches,
)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float  # peak learning rate, after batch-size scaling
    schedule: str = "cosine"  # constant | cosine | step
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training (step schedule)
    gamma: float = 0.1
    max_steps: int | None = None
    eval_batch_size: int = 1000
    # epochs: every batch size sees the data `epochs` times; steps: every batch size takes
    # the optimizer steps `epochs` take at ref_batch_size (small batches see less data)
    budget: str = "epochs"
    ref_batch_size: int = 128
    precision: str = "32"  # 32 | bf16 | fp16: autocast's dtype around forward and loss

    def total_steps(self, num_train: int) -> int:
        """The run's optimizer steps: ``max_steps`` when set, else what the budget gives."""
        if self.max_steps is not None:
            return self.max_steps
        per_epoch = steps_per_epoch(
            num_train, self.ref_batch_size if self.budget == "steps" else self.batch_size
        )
        return self.epochs * per_epoch


@dataclass
class TrainResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    status: str = "completed"  # completed | diverged
    steps: int = 0
    message: str | None = None


class Callbacks(Protocol):
    """What the loop reports as it goes; the runner shows and saves it."""

    def on_start(self, total_steps: int, epochs: int) -> None: ...
    def on_step(self, step: int, epoch: int, loss: float, img_per_s: float) -> None: ...
    def on_epoch(self, record: dict[str, Any]) -> None: ...


def lr_factor(step: int, total: int, warmup: int, schedule: str, milestones, gamma: float) -> float:
    """Multiplier of the peak learning rate at 0-based optimizer step ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return gamma ** sum(step >= m * total for m in milestones)
    raise ValueError(f"unknown schedule {schedule!r}")


def make_optimizer(params, lr: float, name: str, **kwargs) -> torch.optim.Optimizer:
    """``sgd`` or ``adam`` with the keyword arguments of the optim config."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, **kwargs)
    if name == "adam":
        if "betas" in kwargs:  # floats: torch refuses ints, or an int beside a float
            kwargs["betas"] = tuple(float(b) for b in kwargs["betas"])
        return torch.optim.Adam(params, lr=lr, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}")


#: autocast's dtype for each ``precision`` (32: none).
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """The context the forward pass and loss run in: autocast to bfloat16 or float16
    (normbench's norms compute their statistics in float32 and return the input's
    dtype), or nothing at 32."""
    dtype = AUTOCAST.get(str(precision))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    precision: str = "32",
    rank: distributed.Rank | None = None,
):
    """Mean cross-entropy and accuracy over ``(x, y)`` in eval mode. Of a data-parallel
    run (``rank``) each process takes its share of ``(x, y)``, and the sums are added
    over the processes (one ``all_reduce``): every rank gets the whole set's figures."""
    model.eval()
    if rank is not None:
        part = rank.share(len(y))
        x, y = x[part], y[part]
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for xb, yb in eval_batches(x, y, eval_step_size(batch_size, x)):
        with autocast(precision, x.device):
            out = model(xb)
            loss += F.cross_entropy(out.float(), yb, reduction="sum")
        correct += (out.argmax(1) == yb).sum()
    sums = [loss.item(), correct.item(), len(y)]
    total, hits, count = ddp.all_sum(sums, x.device) if rank is not None else sums
    return total / count, hits / count


def train(
    model: nn.Module,
    data: DataSplits,
    optimizer: torch.optim.Optimizer,
    settings: TrainSettings,
    generator: torch.Generator,
    callbacks: Callbacks | None = None,
    resume: dict[str, Any] | None = None,
    rank: distributed.Rank | None = None,
) -> TrainResult:
    """Train ``model`` on ``data``; evaluate on the test split (and the validation
    split, when there is one) after every epoch.

    Stops at once, with status ``diverged``, when a training loss is NaN or inf.

    After every epoch, a ``callbacks.checkpoint(state)`` (when the callbacks have one)
    receives what the loop needs to go on later: ``epoch``, ``steps``, ``records``, the
    ``scheduler``'s and the ``generator``'s states. ``resume``, such a state (with the
    model's and optimizer's restored by the caller), continues after its epoch exactly
    as the loop would have gone on.
    """
    per_epoch = steps_per_epoch(data.num_train, settings.batch_size)
    total = settings.total_steps(data.num_train)
    epochs = math.ceil(total / per_epoch)
    warmup = round(settings.warmup_epochs * per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, total, warmup, settings.schedule, settings.milestones, settings.gamma
        ),
    )
    result = TrainResult()
    net, reduction = model, None
    if rank is not None:
        net, reduction = ddp.wrap(model, data.train_x.device.type)
    part = rank.share(settings.batch_size) if rank is not None else slice(None)
    device = data.train_x.device
    # float16's small range: the loss scaled up before backward, the gradients down after
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    first = 1
    if resume is not None:
        scheduler.load_state_dict(resume["scheduler"])
        # the new scheduler set the first step's rate as it was built: put back the last
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        generator.set_state(resume["generator"])
        if resume.get("scaler"):  # fp16: the loss scale it had grown or backed off to
            scaler.load_state_dict(resume["scaler"])
        result.records, result.steps = list(resume["records"]), resume["steps"]
        first = resume["epoch"] + 1
    if callbacks is not None:
        callbacks.on_start(total, epochs)
    for epoch in range(first, epochs + 1):
        model.train()
        seen = 0
        loss_sum = 0.0
        correct = torch.zeros((), dtype=torch.long, device=data.train_x.device)
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        for xb, yb in train_batches(data, settings.batch_size, generator):
            xb, yb = xb[part], yb[part]  # the same draws for every process: its slice
            with autocast(settings.precision, device):
                out = net(xb)
                loss = F.cross_entropy(out.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            if reduction is not None:  # the loss travels with the gradients' all_reduce
                reduction.loss = loss.detach() * len(yb)
            scaler.scale(loss).backward()
            # The global batch's mean loss, the same on every rank, so that all stop at
            # the same step; checked before the optimizer takes the step
            value = loss.item() if reduction is None else reduction.finish() / settings.batch_size
            if not math.isfinite(value):
                result.status = "diverged"
                result.message = (
                    f"training loss became {value} at step {result.steps + 1} (epoch {epoch})"
                )
                result.records.append({"epoch": epoch, "train_loss": value, "lr": lr})
                return result
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            result.steps += 1
            seen += settings.batch_size
            loss_sum += value * settings.batch_size
            correct += (out.argmax(1) == yb).sum()
            if callbacks is not None:
                callbacks.on_step(result.steps, epoch, value, seen / (time.perf_counter() - start))
            if result.steps >= total:
                break
        elapsed = time.perf_counter() - start
        hits = ddp.all_sum([correct.item()], device)[0] if rank is not None else correct.item()
        evaluation = (settings.eval_batch_size, settings.precision, rank)
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, *evaluation)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_acc": hits / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": lr,
            "epoch_time_s": elapsed,
            "img_per_s": seen / elapsed,
        }
        if data.num_val:  # the split every choice is made on; the test split is never used
            record["val_loss"], record["val_acc"] = evaluate(
                model, data.val_x, data.val_y, *evaluation
            )
        result.records.append(record)
        if callbacks is not None:
            # The epoch's metrics and its checkpoint, both or neither: a stop signal here
            # waits for the checkpoint (a run stopped between them recorded an epoch that
            # its resume then trained again)
            with interrupts.recording():
                callbacks.on_epoch(record)
                if hasattr(callbacks, "checkpoint") and math.isfinite(test_loss):
                    callbacks.checkpoint(
                        {
                            "epoch": epoch,
                            "steps": result.steps,
                            "records": result.records,
                            "scheduler": scheduler.state_dict(),
                            "generator": generator.get_state(),
                            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                        }
                    )
        if not math.isfinite(test_loss):
            # Training went on but the running statistics or weights broke evaluation.
            result.status = "diverged"
            result.message = f"test loss became {test_loss} after epoch {epoch}"
            return result
    return result
