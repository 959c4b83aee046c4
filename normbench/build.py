"""One run's pieces built from its config and checked before anything is written: its
data set in memory, the model with its norm layers, the optimizer, the training settings,
the device and threads; a first training step proves the norm trains (a user's class
fails here, in one line, rather than after the run folder exists).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from normbench import allocator, cores
from normbench.config import flatten
from normbench.errors import UserError
from normbench.validation import resolve_device, scaled_lr


def _kwargs(node) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}


@dataclass
class Prepared:
    """Everything a run needs, built and checked before any file is written."""

    data: Any
    model: Any
    optimizer: Any
    settings: Any
    device: str
    threads: cores.Threads
    memory_format: str  # the layout memory_format chose: contiguous or channels_last
    norm: Any = None  # the NormSpec: whether a failure in training is a user's class's
    bn_stats: Any = None  # diagnostics.EpochDiagnostics, when the run measures them


#: The last data set loaded, reused by the next run in this process (a sweep's jobs
#: under the basic launcher): the tensors are never modified, only indexed.
_data_cache: dict[str, Any] = {}


def load_data(cfg):
    """The run's data set in memory (a :class:`UserError` when it is missing)."""
    from normbench.data import load_dataset

    key = json.dumps(flatten(cfg.dataset), sort_keys=True, default=str)
    if key not in _data_cache:
        _data_cache.clear()  # one data set at a time: CIFAR is 600 MB as float32
        _data_cache[key] = load_dataset(**_kwargs(cfg.dataset), name=cfg.dataset.name)
    return _data_cache[key]


def prepare(
    cfg, data=None, threads: cores.Threads | None = None, device: str | None = None
) -> Prepared:
    """Load the data (unless given), check what depends on it, build model and optimizer;
    write nothing. ``cfg`` is validated already (``config.compose``, or the sweep's job).
    ``threads``: set torch's thread count first (a run's; a sweep's check leaves it).
    ``device``: where to build it, for a sweep's check of a job that runs on a GPU
    elsewhere (the CPU); the run's own device where not given."""
    import torch

    from normbench.models import build_model, choose_memory_format, set_memory_format
    from normbench.norms import NormSpec
    from normbench.norms.batchrenorm import schedule_steps
    from normbench.train import make_optimizer

    device = resolve_device(cfg.device) if device is None else device
    if threads is not None:
        torch.set_num_threads(threads.count)
    # Freed activations stay in the heap for the next step, not page-faulted in again.
    allocator.keep_freed_memory()

    data = load_data(cfg) if data is None else data
    if cfg.batch_size > data.num_train:
        raise UserError(
            f"batch_size={cfg.batch_size} is larger than the training set "
            f"({data.num_train} images of {cfg.dataset.name})"
        )
    if cfg.budget == "steps" and cfg.max_steps is None and cfg.ref_batch_size > data.num_train:
        raise UserError(
            f"ref_batch_size={cfg.ref_batch_size} is larger than the training set "
            f"({data.num_train} images of {cfg.dataset.name}): budget=steps gives every run "
            "the optimizer steps `epochs` epochs take at ref_batch_size, which would be none; "
            f"use a ref_batch_size of at most {data.num_train}"
        )
    torch.manual_seed(cfg.seed)
    lr = scaled_lr(cfg.lr, cfg.batch_size, cfg.ref_batch_size, cfg.lr_scaling)
    settings = train_settings(cfg, lr)
    # Batch Renorm's schedule, given as shares of the run, in the steps the layer counts
    kwargs = schedule_steps(_kwargs(cfg.norm), settings.total_steps(data.num_train))
    norm = NormSpec(cfg.norm.name, kwargs, target=kwargs.pop("_target_", None))
    try:
        model = build_model(
            cfg.model.name,
            norm,
            data.in_channels,
            data.num_classes,
            data.image_size,
            **_kwargs(cfg.model),
        )
    except (TypeError, ValueError) as err:
        raise UserError(
            f"cannot build model={cfg.model.name} with norm={norm.name}: {err}"
        ) from None
    except (RuntimeError, MemoryError) as err:
        _raise_out_of_memory(err, cfg, "its parameters")
    model = model.to(device)
    memory_format = choose_memory_format(cfg.memory_format, device, model, norm)
    set_memory_format(model, memory_format)
    try:
        _check_trains(model, data.train_x[: local_batch(cfg, norm)].to(device), cfg, norm)
    except (RuntimeError, MemoryError) as err:
        _raise_out_of_memory(err, cfg, f"a step at batch_size={cfg.batch_size}")
    try:
        optimizer = make_optimizer(model.parameters(), lr, cfg.optim.name, **_kwargs(cfg.optim))
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid optim={cfg.optim.name} settings: {err}") from None
    used = threads or cores.Threads(torch.get_num_threads(), "torch")
    return Prepared(data.to(device), model, optimizer, settings, device, used, memory_format, norm)


def local_batch(cfg, norm) -> int:
    """The batch one copy of the model takes alone (no collective: the probe here, and a
    data-parallel run's rank 0 in :func:`normbench.distributed.local` for PreciseBN, the
    batch-statistics accuracy and the per-layer diagnostics): what one process's layers
    normalize over in training (``NormSpec.local_batch``: a process's batch, a sync_bn
    group's together); the global batch in a run of one process."""
    world = cfg.processes * cfg.nodes
    return norm.local_batch(cfg.batch_size // world, world)


def train_settings(cfg, lr: float):
    """The training loop's settings: each field of ``TrainSettings`` is the config key of
    its name, at the top or in ``schedule``; ``lr`` is the peak after batch-size scaling."""
    import dataclasses

    from normbench.train import TrainSettings

    schedule = cfg.schedule
    values = {
        f.name: cfg[f.name] if f.name in cfg else schedule[f.name]
        for f in dataclasses.fields(TrainSettings)
    }
    values.update(lr=lr, schedule=schedule.name, milestones=tuple(schedule.milestones or ()))
    return TrainSettings(**values)


def _raise_out_of_memory(err: BaseException, cfg, what: str) -> None:
    """An allocation the machine refused (model widths or a batch far too large) as one
    :class:`UserError` naming the model's settings; any other error is raised again."""
    text = str(err)
    if not (
        isinstance(err, MemoryError)
        or "can't allocate memory" in text
        or "out of memory" in text.lower()
    ):
        raise err
    settings = " ".join(f"model.{k}={v}" for k, v in _kwargs(cfg.model).items())
    # torch's own words, less its "[enforce fail at alloc_cpu.cpp:127] err == 0." prefix
    reason = text.rsplit("DefaultCPUAllocator: ", 1)[-1]
    raise UserError(
        f"model={cfg.model.name} {settings}: {what} need more memory than this machine "
        f"gives: {' '.join(reason.split())[:200]}"
    ) from None


def _check_trains(model, batch, cfg, norm) -> None:
    """One training-mode forward pass on a copy of the model, so that a combination the
    norm cannot train (BatchNorm on one value per channel, instance norm without space)
    fails here, as a user error, and not half-way through a written run. A user's norm
    (``norm.from_user``) is checked in eval mode too, and each of its layers must return
    a tensor of its input's shape and dtype; whatever its code raises is one line naming
    it (:func:`normbench.norms.registry.user_code`)."""
    import copy

    import torch

    from normbench.norms.registry import user_code

    with user_code(f"{norm.label()}: copying the model"):
        probe = copy.deepcopy(model).train()
    modes = [True]
    if norm.from_user:
        cls = norm.cls
        for module in probe.modules():
            if isinstance(module, cls):
                _watch_forward(module, norm)
        modes.append(False)
    try:
        with torch.no_grad():
            for training in modes:
                probe.train(training)(batch)
    except ValueError as err:
        world = cfg.processes * cfg.nodes
        split = f" split over {world} processes" if world > 1 else ""
        raise UserError(
            f"model={cfg.model.name} with norm={cfg.norm.name} cannot train at "
            f"batch_size={cfg.batch_size}{split}: {err}"
        ) from None


def _watch_forward(module, norm) -> None:
    """Make ``module.forward`` (a user's norm layer, in the probe's copy) check what it
    returns and name the norm for anything it raises (its ValueError passes: the probe
    reports that as a combination that cannot train)."""
    from normbench.checknorm import output_problem
    from normbench.norms.registry import user_code

    forward = module.forward
    what = f"{norm.label()}: {type(module).__name__}.forward"

    def checked(x, *args, **kwargs):
        with user_code(what, (ValueError,)):
            y = forward(x, *args, **kwargs)
        with user_code(f"{what}: checking its output"):  # a tensor subclass's own code
            problem = output_problem(x, y)
        if problem is not None:
            mode = "training" if module.training else "eval"
            raise UserError(f"{what} in {mode} mode: {problem}")
        return y

    module.forward = checked
