"""The run record: what a run writes to summary.json, declared once.

:class:`RunRecord` holds each field once with its type and what a reader may take from it.
The run store's field list and number checks, the statistics' metrics and the figures'
estimators are derived from it (:func:`record_fields`). A field that holds a config value
(``norm`` is ``norm.name``) is that value's one name in summary.json: the config rides
along under ``config.<key>`` for the other keys only.

Nothing here imports torch, Hydra or OmegaConf: the run store and the readers use it.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any

from normbench.schema.config import Config

#: A run's ``status``: ``interrupted`` runs (stopped from outside) are redone by the next
#: sweep; the others are results (failed and diverged ones unless ``--retry-failed``).
STATUSES: tuple[str, ...] = ("completed", "diverged", "failed", "interrupted")


def recorded(
    low: float | None = None,
    high: float | None = None,
    *,
    config: str | None = None,
    name: bool = False,
    stat: bool = False,
    estimator: tuple[str, str] | None = None,
) -> Any:
    """A run record field's metadata. ``low``/``high``: a number's range (a value outside
    it is damage). ``config``: the config key whose value the field is. ``name``: an
    option's or experiment's name (text of at most ``NAME_MAX`` characters). ``stat``: an
    accuracy the statistics summarise per group (mean, std, 95% CI). ``estimator``: one
    of BatchNorm's inference estimators in the figures, as (legend label, line style)."""
    metadata = {"low": low, "high": high, "config": config, "name": name, "stat": stat}
    return field(metadata={**metadata, "estimator": estimator})


_ACCURACY = {"low": 0, "high": 1}  # a share of the test (or training) set

# Nullable number fields may be null in a record however the run ended (a run that stopped
# before it was built has measured nothing); the readers accept null there.


@dataclass(frozen=True)
class RunRecord:
    """One run's summary.json, in this order (its ``config.<key>`` entries follow)."""

    run_id: str
    status: str  # one of STATUSES
    name: str = recorded(config="name", name=True)
    model: str = recorded(config="model.name", name=True)
    norm: str = recorded(config="norm.name", name=True)
    dataset: str = recorded(config="dataset.name", name=True)
    optim: str = recorded(config="optim.name", name=True)
    batch_size: int = recorded(1, config="batch_size")
    lr: float | None = recorded(0, config="lr")
    lr_effective: float | None = recorded(0)  # lr after lr_scaling
    epochs: int = recorded(1, config="epochs")
    max_steps: int | None = recorded(1, config="max_steps")
    seed: int = recorded(0, config="seed")
    # data parallelism and numerics (null in summaries written before they existed: one
    # process, float32); batch_size stays the global batch
    processes: int | None = recorded(1, config="processes")
    nodes: int | None = recorded(1, config="nodes")
    world_size: int | None = recorded(1)  # processes x nodes
    batch_size_per_process: int | None = recorded(1)
    # what one norm layer normalizes over in training: the per-process batch (local
    # BatchNorm), times the group for sync_bn, the ghost batch; null without batch statistics
    norm_batch_size: int | None = recorded(1)
    precision: str | None = recorded(config="precision")
    steps: int | None = recorded(0)
    # Batch Renorm's: the step from which r_max and d_max hold their values (warm-up plus
    # ramp, in steps, fractions resolved); a run whose steps stop short never used them.
    # Null for variants without that schedule (and a run that stopped before it was built).
    renorm_ramp_end_step: int | None = recorded(0)
    final_test_acc: float | None = recorded(
        **_ACCURACY, stat=True, estimator=("running averages", "-")
    )
    # chosen on the test set: kept in the runs, never summarised
    best_test_acc: float | None = recorded(**_ACCURACY)
    final_val_acc: float | None = recorded(**_ACCURACY)
    best_val_acc: float | None = recorded(**_ACCURACY)
    best_val_epoch: int | None = recorded(1)
    # the honest figure: test accuracy of the epoch chosen on validation
    test_acc_at_best_val: float | None = recorded(**_ACCURACY, stat=True)
    # BatchNorm's population statistics re-estimated, and batch statistics at test time
    test_acc_precise_bn: float | None = recorded(
        **_ACCURACY, stat=True, estimator=("PreciseBN", "--")
    )
    test_acc_batch_stats: float | None = recorded(
        **_ACCURACY, stat=True, estimator=("batch statistics", ":")
    )
    bn_eval_time_s: float | None = recorded(0)
    resumed_from_epoch: int | None = recorded(0)  # the checkpoint's epoch a session went on from
    final_test_loss: float | None = recorded(0)
    final_train_loss: float | None = recorded(0)
    final_train_acc: float | None = recorded(**_ACCURACY)
    train_time_s: float | None = recorded(0)
    wall_time_s: float | None = recorded(0)
    img_per_s: float | None = recorded(0)
    num_params: int | None = recorded(0)
    device: str | None = recorded()  # the device it ran on (config.device may say auto)
    threads: int | None = recorded(1)
    threads_from: str | None = recorded()
    memory_format: str | None = recorded()
    error: str | None = recorded()
    started_at: str | None = recorded()
    finished_at: str | None = recorded()
    torch_version: str | None = recorded()
    normbench_version: str | None = recorded()
    # this session's time in the per-layer BatchNorm diagnostics (null: none measured)
    bn_stats_time_s: float | None = recorded(0)


@dataclass(frozen=True)
class RecordField:
    """One field of :class:`RunRecord` as its readers use it."""

    name: str
    whole: bool  # an integer (int in its type)
    number: bool  # an integer or a float
    null: bool  # None allowed (``| None`` in its type)
    low: float | None
    high: float | None
    config: str | None
    names: bool  # an option's or experiment's name
    stat: bool
    estimator: tuple[str, str] | None


@functools.cache
def record_fields() -> tuple[RecordField, ...]:
    """:class:`RunRecord`'s fields in order, their types read from its annotations."""
    hints = typing.get_type_hints(RunRecord)
    found = []
    for item in dataclasses.fields(RunRecord):
        args = typing.get_args(hints[item.name]) or (hints[item.name],)
        meta = item.metadata
        found.append(
            RecordField(
                name=item.name,
                whole=int in args,
                number=int in args or float in args,
                null=type(None) in args,
                low=meta.get("low"),
                high=meta.get("high"),
                config=meta.get("config"),
                names=bool(meta.get("name")),
                stat=bool(meta.get("stat")),
                estimator=meta.get("estimator"),
            )
        )
    return tuple(found)


def config_slots() -> tuple[str, ...]:
    """The root config's top-level keys in the order a composed config holds them (a
    group's keys, ``norm.*``, where ``norm`` is): where a recorded config key belongs."""
    return tuple(f.name for f in dataclasses.fields(Config))
