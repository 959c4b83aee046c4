"""A run's checkpoint: everything needed to go on after an epoch as if never stopped.

After every epoch the runner writes ``<run_dir>/checkpoint.pt`` (atomically): the
model's and optimizer's state, the training loop's (epoch, steps, the records so far,
the learning-rate schedule, the generator that orders batches and draws augmentation)
and torch's global random states. A run started again with the same config resumes
after that epoch, and its metrics are those of a run that was never interrupted (bit
for bit on the CPU at the same thread count). This module packs, unpacks and checks;
the runner decides when, and writes.

A checkpoint the running code cannot go on from is :class:`Unusable`: cut short (a full
disk), another format's, another run's, or whole but not this code's (the model changed
since: a key missing or resized; an optimizer, random-generator or loop state of the
wrong kind). :func:`restore` checks everything it can before it changes anything, so
such a file is refused, not half-restored; the runner then discards it and starts over.
The random generators' and the schedule's states are checked by setting them on scratch
objects first (a fresh generator, a schedule of a throw-away optimizer), so that what
torch alone can tell (an mt19937 state that is not one) is found here, not after the
first epoch trained on the live ones; every epoch's record must hold exactly the fields
the training loop writes, each a number of its range.
"""

from __future__ import annotations

import io
import math
import reprlib
from typing import Any

import torch
from torch import nn

from normbench.rundir import CHECKPOINT_FILE

FILE = CHECKPOINT_FILE
VERSION = 1


class Unusable(Exception):
    """A checkpoint this run cannot go on from; the message says why, in a few words."""


def pack(
    run_id: str, model: nn.Module, optimizer: torch.optim.Optimizer, loop: dict[str, Any]
) -> bytes:
    """The checkpoint's bytes after an epoch (``loop``: what ``train`` hands its callbacks)."""
    state = {
        "version": VERSION,
        "run_id": run_id,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loop": loop,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load(data: bytes, run_id: str) -> dict[str, Any]:
    """The checkpoint in ``data``; :class:`Unusable` when it is not this run's or not whole
    (another version's, another config's, cut short by a full disk)."""
    try:
        # weights_only: tensors and plain containers only, never code from the file
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # anything torch cannot read back is no checkpoint of ours
        raise Unusable("not a checkpoint torch can read (cut short or damaged)") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        found = state.get("version") if isinstance(state, dict) else None
        raise Unusable(f"format version {reprlib.repr(found)}, this normbench reads {VERSION}")
    if state.get("run_id") != run_id:
        raise Unusable(f"it is run {reprlib.repr(state.get('run_id'))}'s, not this run's")
    return state


def max_bytes(model: nn.Module) -> int:
    """The most bytes a checkpoint of ``model`` may take: its state four times (the model,
    an optimizer's two tensors per parameter at most, a margin) and 64 MiB for the rest
    (the records, the random states, pickling). A larger file is not read into memory."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 4 * state + (64 << 20)


def unpack(data: bytes, run_id: str) -> dict[str, Any] | None:
    """:func:`load`, or None when the checkpoint is unusable."""
    try:
        return load(data, run_id)
    except Unusable:
        return None


def restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epochs: int | None = None,
    validation: bool | None = None,
) -> dict[str, Any]:
    """Put the checkpoint's states back into ``model``, ``optimizer`` and torch's random
    generators; the loop's state, for ``train(resume=...)``. ``epochs``: the run's, which
    the checkpoint's epoch may not pass; ``validation``: whether the run has a validation
    split, so that its records hold ``val_loss`` and ``val_acc`` (None: either).

    Raises :class:`Unusable` when a state does not fit the running code. What can be
    checked on its own is checked before anything is set (the random and schedule states
    on scratch objects); should a load fail after that, ``model`` and ``optimizer`` may
    hold part of the state and must be built anew.
    """
    loop = _check_loop(state.get("loop"), len(optimizer.param_groups), epochs, validation)
    rng = _rng_state(state.get("torch_rng"), torch.get_rng_state(), "torch")
    cuda = state.get("cuda_rng")
    if cuda is not None and torch.cuda.is_available():
        current = torch.cuda.get_rng_state_all()
        if not isinstance(cuda, list | tuple) or len(cuda) != len(current):
            raise Unusable(f"its CUDA random states are not one per device ({len(current)})")
        cuda = [
            _rng_state(s, c, "CUDA", torch.device("cuda", index))
            for index, (s, c) in enumerate(zip(cuda, current, strict=True))
        ]
    else:
        cuda = None
    _check_model(state.get("model"), model)
    saved = state.get("optimizer")
    before = [_group_settings(group) for group in optimizer.param_groups]
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(saved)
    except Exception as err:  # the checks above miss it: torch's own words, shortened
        raise Unusable(f"torch cannot load it: {_short(err)}") from None
    _check_optimizer(optimizer, before)
    torch.set_rng_state(rng)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    return loop


def _short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shape(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, tensor.shape)) + "]"


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_model(saved: Any, model: nn.Module) -> None:
    """The saved model state has exactly the model's keys, each a tensor of its shape."""
    if not isinstance(saved, dict):
        raise Unusable("its model state is not a state_dict")
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    if missing:
        raise Unusable(f"its model state lacks {_some(missing)} (the model changed since?)")
    unexpected = [reprlib.repr(k) for k in saved if k not in expected]
    if unexpected:
        raise Unusable(f"its model state has keys the model lacks: {_some(unexpected)}")
    for key, tensor in expected.items():
        value = saved[key]
        if not isinstance(value, torch.Tensor):
            raise Unusable(f"its model state's {key} is not a tensor")
        if value.shape != tensor.shape:
            raise Unusable(
                f"its model state's {key} has shape {_shape(value)}, "
                f"the model's has {_shape(tensor)}"
            )
        if value.is_floating_point() != tensor.is_floating_point():
            raise Unusable(f"its model state's {key} is {value.dtype}, the model's {tensor.dtype}")


def _group_settings(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key not in ("params", "param_names")}


def _check_optimizer(optimizer: torch.optim.Optimizer, before: list[dict[str, Any]]) -> None:
    """After loading: every group has the settings it had, each of the same kind, and
    every state tensor of a parameter (a momentum, Adam's moments) has its shape.
    ``Optimizer.load_state_dict`` checks only the groups' sizes; a wrong state would
    fail at the first step, an hour later, or train wrongly."""
    for index, (group, reference) in enumerate(zip(optimizer.param_groups, before, strict=True)):
        # Only the settings this optimizer has: one a newer torch added is never read.
        # (initial_lr is the schedule's, added when it was built: a rate too.)
        for key, expected in {**reference, "initial_lr": 0.0}.items():
            if key not in group:
                if key == "initial_lr":
                    continue
                raise Unusable(f"its optimizer settings lack {key}")
            if not _same_kind(group[key], expected):
                raise Unusable(
                    f"its optimizer's {key} in group {index} is {reprlib.repr(group[key])}"
                )
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor):
                    if value is not None and not _number(value):
                        raise Unusable(f"its optimizer state's {name} is {reprlib.repr(value)}")
                elif value.dim() and value.shape != param.shape:
                    raise Unusable(
                        f"its optimizer state's {name} has shape {_shape(value)}, "
                        f"its parameter {_shape(param)}"
                    )


def _same_kind(value: Any, reference: Any) -> bool:
    """Whether an optimizer setting from the file is of the kind the optimizer built."""
    if reference is None or isinstance(reference, bool):
        return value is None or isinstance(value, bool)
    if isinstance(reference, int | float):
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if isinstance(reference, tuple | list):
        return (
            isinstance(value, tuple | list)
            and len(value) == len(reference)
            and all(_same_kind(v, r) for v, r in zip(value, reference, strict=True))
        )
    if isinstance(reference, torch.Tensor):
        return isinstance(value, torch.Tensor) and value.shape == reference.shape
    return type(value) is type(reference)


def _rng_state(
    saved: Any, current: torch.Tensor, which: str, device: torch.device | None = None
) -> torch.Tensor:
    """A random generator's saved state, when it is one of this torch's: of the current
    state's dtype and shape, and accepted by a scratch generator (on ``device``; the CPU's
    by default), so that setting it on the live one cannot fail."""
    if (
        not isinstance(saved, torch.Tensor)
        or saved.dtype != current.dtype
        or saved.shape != current.shape
    ):
        raise Unusable(f"its {which} random state is not one of this torch's")
    try:
        torch.Generator(device=device or "cpu").set_state(saved)
    except Exception as err:  # "Invalid mt19937 state", and whatever a later torch says
        raise Unusable(f"its {which} random state is not valid: {_short(err)}") from None
    return saved


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any, low: int, high: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )


#: The fields of every epoch's record the training loop checkpoints, and those it adds
#: when the run has a validation split. (A diverged epoch's partial record and the last
#: epoch's inference measurements never enter a checkpoint.)
RECORD_FIELDS = (
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s",
    "img_per_s",
)  # fmt: skip
VALIDATION_FIELDS = ("val_loss", "val_acc")


def _check_record(number: int, record: Any, validation: bool | None) -> None:
    """One epoch's record: exactly the loop's fields, each a finite number of its range
    (an accuracy in [0, 1], the others at least 0), the epoch its number."""
    if not isinstance(record, dict) or record.get("epoch") != number:
        raise Unusable(f"its record of epoch {number} is not one")
    expected = set(RECORD_FIELDS)
    if validation or (validation is None and "val_acc" in record):
        expected |= set(VALIDATION_FIELDS)
    if set(record) != expected:
        lacking = sorted(expected - set(record))
        extra = [reprlib.repr(key) for key in record if key not in expected]
        what = f"lacks {_some(lacking)}" if lacking else f"has {_some(extra)}, not the loop's"
        raise Unusable(f"its record of epoch {number} {what}")
    for key, value in record.items():
        if key == "epoch":
            continue
        if not _number(value) or not 0 <= value <= (1 if key.endswith("_acc") else math.inf):
            raise Unusable(f"its record of epoch {number} has {key} {reprlib.repr(value)}")


def _check_loop(
    loop: Any, groups: int, epochs: int | None, validation: bool | None = None
) -> dict[str, Any]:
    """The training loop's state: an epoch within the run, a step count, one record per
    epoch so far (:func:`_check_record`), the schedule's and the batch generator's
    states (each set on a scratch object first)."""
    if not isinstance(loop, dict):
        raise Unusable("its loop state is not a record")
    epoch, steps, records = loop.get("epoch"), loop.get("steps"), loop.get("records")
    if not _whole(epoch, 1, epochs):
        raise Unusable(
            f"its epoch {reprlib.repr(epoch)} is not one of the run's epochs (1 to {epochs})"
        )
    if not _whole(steps, epoch):
        raise Unusable(
            f"its step count {reprlib.repr(steps)} is not a whole number of at least {epoch}"
        )
    if not isinstance(records, list) or len(records) != epoch:
        raise Unusable(f"its records are not one per epoch up to {epoch}")
    for number, record in enumerate(records, start=1):
        _check_record(number, record, validation)
    _check_schedule(loop.get("scheduler"), groups, steps)
    _rng_state(loop.get("generator"), torch.Generator().get_state(), "batch order's")
    _check_scaler(loop.get("scaler"))
    return loop


def _check_scaler(state: Any) -> None:
    """fp16's gradient scaler state (None: none): GradScaler's keys, each a finite
    positive number (the growth tracker a whole one, from 0)."""
    if state is None:
        return
    keys = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
    if not isinstance(state, dict) or set(state) != set(keys):
        raise Unusable("its gradient scaler state is not GradScaler's")
    for key in keys:
        value = state[key]
        low = 0 if key == "_growth_tracker" else 1 if key == "growth_interval" else None
        ok = _whole(value, low) if low is not None else _number(value) and 0 < value < math.inf
        if not ok:
            raise Unusable(f"its gradient scaler's {key} is {reprlib.repr(value)}")


#: Schedule state keys the training loop's LambdaLR needs restored.
_SCHEDULE_NEEDS = ("base_lrs", "last_epoch", "_step_count", "_last_lr", "lr_lambdas")


def _scratch_schedule(groups: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR of ``groups`` parameter groups, as the training loop builds one, on a
    throw-away optimizer."""
    params = [{"params": [torch.zeros(1, requires_grad=True)]} for _ in range(groups)]
    optimizer = torch.optim.SGD(params, lr=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step: 1.0] * groups)


def _check_schedule(schedule: Any, groups: int, steps: int) -> None:
    """The learning-rate schedule's state: the keys of this torch's LambdaLR (none
    other: ``load_state_dict`` sets every key as an attribute, so an ``optimizer`` key
    would replace the schedule's optimizer), each of its kind, the step count the loop's,
    the rates one finite number per group; and a scratch schedule loads it and steps."""
    import copy

    if not isinstance(schedule, dict) or schedule.get("last_epoch") != steps:
        raise Unusable("its learning-rate schedule's state does not match its step count")
    scratch = _scratch_schedule(groups)
    reference = scratch.state_dict()
    extra = [reprlib.repr(key) for key in schedule if key not in reference]
    lacking = [key for key in _SCHEDULE_NEEDS if key not in schedule]
    if extra or lacking:
        what = f"has {_some(extra)}" if extra else f"lacks {_some(lacking)}"
        raise Unusable(f"its learning-rate schedule's state {what}, not this torch's LambdaLR")
    for key in ("base_lrs", "_last_lr"):
        rates = schedule.get(key)
        if not isinstance(rates, list) or len(rates) != groups or not all(map(_number, rates)):
            raise Unusable(f"its learning-rate schedule's {key} is not {groups} rates")
    lambdas = schedule.get("lr_lambdas")
    # LambdaLR copies a dict here into its functions' attributes: only None, as saved
    if (
        not isinstance(lambdas, list)
        or len(lambdas) != groups
        or any(f is not None for f in lambdas)
    ):
        raise Unusable("its learning-rate schedule's lr_lambdas are not the saved ones")
    for key, value in schedule.items():
        expected = reference[key]
        whole = type(expected) is int
        if (whole and not _whole(value, 0)) or not _same_kind(value, expected):
            raise Unusable(f"its learning-rate schedule's {key} is {reprlib.repr(value)}")
    try:  # as train() will: load (a copy: loading pops lr_lambdas), read the rate, step
        scratch.load_state_dict(copy.deepcopy(schedule))
        scratch.get_last_lr()
        scratch.optimizer.step()
        scratch.step()
    except Exception as err:
        raise Unusable(f"its learning-rate schedule's state does not load: {_short(err)}") from None
