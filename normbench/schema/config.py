"""The config schema: every key a user can set, as dataclasses, and what is derived from it.

The top-level run keys and one dataclass per group (schedule, eval, checkpoint, report, and
each option of dataset, model and optim). Each field carries its type, its rule (range or
allowed values, in the user's words: :mod:`normbench.schema.rule`), a one-line help text
and whether it is an execution key: one that says where or how a run executes, not what it
computes, and so is left out of the run id. The values themselves stay in the YAML files
of :data:`CONF_DIR`.

Hydra's ConfigStore holds these dataclasses (:func:`register`, called by Hydra's plugin
scan through ``hydra_plugins/normbench_schema``) as the base of ``conf/config.yaml``
(``base_config``) and of each group option's YAML (``/schema/<group>/<option>``), so that
OmegaConf refuses unknown keys and wrong types. :func:`declared_keys`, :func:`rules` (what
``normbench.validation`` checks) and :data:`EXECUTION_KEYS` are derived from here.

Normalization variants are open-ended (a user's own takes whatever its class takes): the
arguments several share have their rule here (:class:`NormArgs`), any other key takes the
type of its default in the variant's YAML.

Nothing here imports torch, Hydra or OmegaConf at import time: ``normbench --help`` reads
this module.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normbench.schema.rule import (
    BACKENDS,
    BUDGETS,
    DEVICES,
    LR_SCALINGS,
    MEMORY_FORMATS,
    PRECISIONS,
    SCHEDULES,
    Betas,
    Choice,
    Flag,
    Fractions,
    Keys,
    Number,
    Option,
    Rule,
    Split,
    Text,
    Whole,
    Wholes,
)

#: OmegaConf's mark for a value that a YAML file gives (``???``): the schema holds types,
#: rules and help, the YAML files hold the values.
MISSING = "???"

#: The folder of normbench's Hydra configs, ``normbench/conf/`` (package data).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def key(
    rule: Rule | None,
    help: str,  # noqa: A002 - the word the reference's column uses
    *,
    execution: bool = False,
    default: Any = MISSING,
    id_default: Any = MISSING,
) -> Any:
    """A schema field: its rule, its help line, whether it is an execution key (left out of
    the run id). Its value comes from the YAML files (``default`` stays ``???``).

    ``id_default``: for a key added after runs existed, its YAML default; at that value it
    is left out of the run id, so that every earlier run keeps its id (a run that sets
    another value gets a new one)."""
    metadata = {"rule": rule, "help": help, "execution": execution}
    if id_default is not MISSING:
        metadata["id_default"] = id_default
    return field(default=default, metadata=metadata)


def group(help: str, *, required: bool = True, execution: bool = False) -> Any:  # noqa: A002
    """A config group's field in the root config: its option's node (typed by the option's
    own schema, or open for norms); None when none is picked. ``required``: a run cannot do
    without one (``logger`` can). ``execution``: the group's keys say how a run executes
    (left out of the run id, the group's node itself too)."""
    metadata = {"group": True, "help": help, "execution": execution, "required": required}
    return field(default=None, metadata=metadata)


# Number fields are typed Any for OmegaConf: a float field would turn ``lr=1`` into 1.0,
# which json writes as "1.0", and so change the run id of every config written with an
# integer there. Their rule checks the type.


@dataclass
class Schedule:
    """The learning-rate schedule."""

    name: str = key(Choice(SCHEDULES), "the schedule's shape: constant, cosine or step")
    warmup_epochs: Any = key(
        Number(0, strict=False),
        "linear warm-up from 0 to the peak lr, in epochs (fractions allowed)",
    )
    milestones: list[float] = key(
        Fractions(), "step: fractions of training after which lr is multiplied by gamma"
    )
    gamma: Any = key(
        Number(0, strict=True), "step: the factor lr is multiplied by at each milestone"
    )


@dataclass
class Eval:
    """At the end of a run, for variants with running statistics (BatchNorm's family)."""

    precise_bn_images: int = key(
        Whole(1),
        "training images averaged to re-estimate the population statistics (PreciseBN), in "
        "batches of batch_size: ceil(images / batch_size) batches, at most one pass over the "
        "training set",
    )
    # The key it replaced, still read: the config that composes holds precise_bn_images =
    # precise_bn_batches x batch_size instead (normbench.validation.settle), never this one.
    precise_bn_batches: int | None = key(
        Whole(1, null=True),
        "replaced by precise_bn_images; still read, as precise_bn_batches x batch_size images",
        default=None,
    )
    bn_stats: bool = key(
        Flag(),
        "per-layer BatchNorm diagnostics at the end of every epoch, to <run_dir>/bn_stats.csv: "
        "running vs true statistics, batch spread, train/eval gap (false: none)",
        execution=True,
    )


@dataclass
class Checkpoint:
    """After every epoch the run's state goes to <run_dir>/checkpoint.pt, so that a run
    stopped (Ctrl-C, a time limit, a lost node) resumes after its last epoch."""

    save: str = key(
        Choice(("last", "none")),
        "last: keep the last epoch's state | none: a stopped run starts over",
        execution=True,
    )
    keep: bool = key(
        Flag(), "keep the checkpoint once the run completed (false: deleted then)", execution=True
    )


#: What the error figure can put on its x axis (``report.x``, ``normbench plot --x``): the
#: global batch, or the batch one BatchNorm normalizes over (the run record's field).
X_AXES: tuple[str, ...] = ("batch_size", "norm_batch_size")


@dataclass
class Report:
    """How a sweep's tables sum its runs up (`normbench results` takes the same as
    options); changing them reruns nothing."""

    select: list[str] | None = key(
        Keys(), "keys tuned on validation per group of the others, e.g. [lr]", execution=True
    )
    baseline: str | None = key(
        Option("norm"),
        "the variant differences are taken to; null: custom_bn when present",
        execution=True,
    )
    stale_threshold: Any = key(
        Number(0, strict=False, high=100),
        "flag stale_running_stats where running averages and PreciseBN differ by more "
        "than this on average (accuracy points)",
        execution=True,
    )
    undertrained_gap: Any = key(
        Number(0, strict=False, high=100),
        "flag under_trained where a group's mean training accuracy is more than this "
        "below the table's best (accuracy points)",
        execution=True,
    )
    x: str = key(
        Choice(X_AXES),
        "the error figure's x axis: batch_size (global) | norm_batch_size (what one "
        "BatchNorm normalizes over; the summary table grouped by it too)",
        execution=True,
    )


@dataclass
class Config:
    """One run: the top-level keys; the groups pick the parts."""

    name: str = key(
        Text(), "the experiment's name: results go to <out_dir>/<name>/", execution=True
    )
    out_dir: str = key(Text(), "where experiment folders are written", execution=True)
    batch_size: int = key(Whole(1), "training images per step")
    eval_batch_size: int = key(Whole(1), "images per step when evaluating")
    lr: Any = key(Number(0, strict=True), "peak learning rate at ref_batch_size (see lr_scaling)")
    lr_scaling: str = key(
        Choice(LR_SCALINGS), "scale lr by batch_size / ref_batch_size: none, linear or sqrt"
    )
    ref_batch_size: int = key(Whole(1), "the batch size at which lr applies unscaled")
    epochs: int = key(Whole(1), "passes over the training set")
    budget: str = key(
        Choice(BUDGETS),
        "epochs: the same epochs at every batch size | steps: the optimizer steps of "
        "`epochs` at ref_batch_size, at every batch size",
    )
    max_steps: int | None = key(
        Whole(1, null=True), "stop after this many optimizer steps (overrides epochs when set)"
    )
    # torch's generators take 64-bit seeds; numpy's and others' signed ones
    seed: int = key(Whole(0, 2**63 - 1), "model init, batch order and augmentation")
    device: str = key(Choice(DEVICES), "auto (CUDA when available), cpu or cuda", execution=True)
    threads: int | None = key(
        Whole(1, null=True), "CPU threads for torch; null = all cores", execution=True
    )
    memory_format: str = key(
        Choice(MEMORY_FORMATS),
        "the layout of images and activations (auto: channels_last on the CPU where it is faster)",
        execution=True,
    )
    # Not execution keys: the processes change what a local BatchNorm normalizes over, the
    # precision the numerics. Added after runs existed: at their defaults, out of the id.
    processes: int = key(
        Whole(1),
        "data-parallel processes per node (torch.distributed; each takes batch_size / "
        "(processes x nodes) of every batch)",
        id_default=1,
    )
    nodes: int = key(Whole(1), "nodes of a data-parallel run (SLURM)", id_default=1)
    precision: str = key(
        Choice(PRECISIONS, ints=True),
        "32: float32 | bf16: bfloat16 autocast (CPU and CUDA) | fp16: float16 autocast "
        "with a gradient scaler (CUDA only)",
        id_default="32",
    )
    dist_timeout_s: int = key(
        Whole(1),
        "seconds a process of a data-parallel run waits for the others in a collective: "
        "a process that died or hangs ends the run (interrupted) within this time",
        execution=True,
    )
    # in config.yaml's order, which the composed config (and so summary.json) keeps
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    eval: Eval = field(default_factory=Eval)
    report: Report = field(default_factory=Report)
    schedule: Schedule = field(default_factory=Schedule)
    model: Any = group("the network (conf/model/)")
    norm: Any = group("the normalization variant (conf/norm/)")
    dataset: Any = group("the data set (conf/dataset/)")
    optim: Any = group("the optimizer (conf/optim/)")
    logger: Any = group(
        "experiment trackers (conf/logger/): none, or one or a list, as "
        "logger=[tensorboard,mlflow]",
        required=False,
        execution=True,  # tracking a run changes nothing it computes
    )


# ------------------------------------------------------------------- the groups' options


@dataclass
class Dataset:
    """Every data set's keys (dataset=digits, mnist, fashion_mnist, cifar10, cifar100)."""

    name: str = key(None, "the data set (picked as dataset=NAME)")
    root: str = key(
        Text(), "folder holding the torchvision files (unused for digits)", execution=True
    )
    download: bool = key(Flag(), "true: let torchvision fetch missing files", execution=True)
    train_size: int | None = key(
        Whole(1, null=True), "use a fixed subset of this many training images; null = all"
    )
    test_size: int | None = key(Whole(1, null=True), "likewise for the test split")
    augment: bool | None = key(
        Flag(null=True),
        "random crop (pad 4) + flip; null = the data set's default (on for CIFAR)",
    )
    val_size: Any = key(
        Split(), "validation split carved from the training set (fraction or count; 0: none)"
    )


@dataclass
class SmallCNN:
    """model=small_cnn: three conv3x3-norm-ReLU layers, global average pooling, linear."""

    name: str = key(None, "the model (picked as model=NAME)")
    widths: list[int] = key(Wholes(1, empty=False), "the channels of the three conv layers")


@dataclass
class ResNet20:
    """model=resnet20: He et al.'s CIFAR ResNet-20, 3 stages x 3 basic blocks."""

    name: str = key(None, "the model (picked as model=NAME)")
    width: int = key(Whole(1), "channels of the first stage; later stages double it")


@dataclass
class MLP:
    """model=mlp: a multilayer perceptron on flattened images (1d norm layers)."""

    name: str = key(None, "the model (picked as model=NAME)")
    hidden: list[int] = key(Wholes(1, empty=True), "the hidden layers' widths")


@dataclass
class SGD:
    """optim=sgd: SGD with momentum (Nesterov optional) and weight decay."""

    name: str = key(None, "the optimizer (picked as optim=NAME)")
    momentum: Any = key(Number(0, strict=False), "momentum factor")
    nesterov: bool = key(Flag(), "Nesterov momentum")
    weight_decay: Any = key(Number(0, strict=False), "L2 penalty added to the gradient")


@dataclass
class Adam:
    """optim=adam: torch.optim.Adam; weight_decay is an L2 term added to the gradient."""

    name: str = key(None, "the optimizer (picked as optim=NAME)")
    betas: list[Any] = key(Betas(), "decay rates of the gradient's first and second moments")
    eps: Any = key(Number(0, strict=True), "added to the denominator")
    weight_decay: Any = key(Number(0, strict=False), "L2 term added to the gradient")


@dataclass
class TensorBoardLogger:
    """logger=tensorboard: event files through torch.utils.tensorboard, one folder per run
    (<dir>/<run_id>); needs normbench[tensorboard]."""

    dir: str = key(
        Text(), "the folder of the runs' event folders (tensorboard --logdir DIR)", execution=True
    )


@dataclass
class MLflowLogger:
    """logger=mlflow: one MLflow run per normbench run, in the experiment named after the
    sweep; needs normbench[mlflow]."""

    tracking_uri: str = key(
        Text(),
        "where runs are tracked: a database (sqlite:///PATH) or a server (http://HOST:PORT)",
        execution=True,
    )
    artifact_dir: str = key(
        Text(),
        "where a new experiment's artifacts go (when normbench creates it in a local store)",
        execution=True,
    )


@dataclass
class WandbLogger:
    """logger=wandb: one Weights & Biases run per normbench run, grouped by the sweep's
    name; needs normbench[wandb]."""

    mode: str = key(
        Choice(("offline", "online", "disabled")),
        "offline: files only, uploaded later with `wandb sync` | online: to the server "
        "(after `wandb login`) | disabled",
        execution=True,
    )
    project: str = key(Text(), "the W&B project the runs go to", execution=True)
    dir: str = key(
        Text(), "the folder wandb writes its run files into (<dir>/wandb/)", execution=True
    )


#: The trackers of the ``logger`` group, by option: each option's keys are under its own
#: name (``logger.mlflow.tracking_uri``), so that several can be picked at once.
LOGGER_SCHEMAS: dict[str, type] = {
    "tensorboard": TensorBoardLogger,
    "mlflow": MLflowLogger,
    "wandb": WandbLogger,
}


@dataclass
class NormArgs:
    """The arguments normalization variants share, each with one meaning wherever a variant
    takes it. Not a node type: a variant's YAML lists the ones it takes (and may add its
    own, checked against the type of their default)."""

    name: str = key(None, "the variant (picked as norm=NAME)")
    eps: Any = key(Number(0, strict=True), "added to the variance (or mean square)")
    momentum: Any = key(
        Number(0, strict=False, high=1, null=True),
        "running statistics' update rate; null = cumulative average",
    )
    groups: int = key(Whole(1), "at most this many groups (the largest divisor of C up to it)")
    r_max: Any = key(Number(1, strict=False), "clip of r = batch std / running std")
    d_max: Any = key(Number(0, strict=False), "clip of d = (batch - running mean) / running std")
    warmup_fraction: Any = key(
        Number(0, strict=False, high=1, null=True),
        "the share of the run's training steps spent as plain BatchNorm first",
    )
    ramp_fraction: Any = key(
        Number(0, strict=False, high=1, null=True),
        "the share of the run's training steps over which r_max and d_max then grow to "
        "their values",
    )
    warmup_steps: int | None = key(
        Whole(0, null=True), "warmup_fraction as a count of training steps; set, it wins"
    )
    ramp_steps: int | None = key(
        Whole(0, null=True), "ramp_fraction as a count of training steps; set, it wins"
    )
    virtual_batch_size: int = key(Whole(1), "samples per virtual batch")
    group_size: int | None = key(
        Whole(1, null=True),
        "processes whose batches one BatchNorm normalizes over together (consecutive ranks); "
        "null = all processes, 1 = each process alone",
    )
    backend: str = key(
        Choice(BACKENDS),
        "kernel: auto (by device), cpu (compiled C++), triton (CUDA) or reference",
    )


#: The phases of Batch Renorm's schedule (:class:`NormArgs`): each phase's share of the
#: run's training steps and its count of steps, of which a count given wins.
RENORM_PHASES: tuple[tuple[str, str], ...] = (
    ("warmup_fraction", "warmup_steps"),
    ("ramp_fraction", "ramp_steps"),
)


#: Each group option's schema, by group and option: the option's YAML names it in its
#: defaults list (``/schema/<group>/<option>@_here_``). ``dataset``'s options share one.
OPTION_SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"small_cnn": SmallCNN, "resnet20": ResNet20, "mlp": MLP},
    "optim": {"sgd": SGD, "adam": Adam},
    "dataset": {"images": Dataset},
}

#: The sections of the root config that are groups of keys, not config groups.
SECTIONS = ("checkpoint", "eval", "report", "schedule")


@dataclass(frozen=True)
class Key:
    """One key of the schema: its dotted name, where it is declared, its field."""

    name: str  # dotted, as in the config: "schedule.gamma"
    owner: type  # the dataclass declaring it
    field: dataclasses.Field

    @property
    def rule(self) -> Rule | None:
        return self.field.metadata.get("rule")

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def execution(self) -> bool:
        return bool(self.field.metadata.get("execution"))

    @property
    def id_default(self) -> Any:
        """The value at which the key is left out of the run id; MISSING: never left out."""
        return self.field.metadata.get("id_default", MISSING)


def _keys(cls: type, prefix: str = "") -> Iterator[Key]:
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            yield from _keys(hints[item.name], f"{prefix}{item.name}.")
        elif not item.metadata.get("group"):
            yield Key(f"{prefix}{item.name}", cls, item)


def root_keys() -> list[Key]:
    """The root config's keys, sections included (``schedule.gamma``)."""
    return list(_keys(Config))


def group_keys(group: str) -> dict[str, list[Key]]:
    """A group's keys per option schema (``norm``: the arguments variants share)."""
    if group == "logger":  # several at once: each tracker's keys under its name
        return {name: list(_keys(cls, f"logger.{name}.")) for name, cls in LOGGER_SCHEMAS.items()}
    schemas = {"": NormArgs} if group == "norm" else OPTION_SCHEMAS.get(group, {})
    return {name: list(_keys(cls, f"{group}.")) for name, cls in schemas.items()}


def config_groups() -> tuple[str, ...]:
    """The root config's group fields, in order (model, norm, dataset, optim, logger)."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("group"))


def required_groups() -> tuple[str, ...]:
    """The groups a run cannot do without (all but ``logger``)."""
    fields = dataclasses.fields(Config)
    return tuple(f.name for f in fields if f.metadata.get("group") and f.metadata["required"])


@functools.cache
def declared_keys() -> tuple[Key, ...]:
    """Every key the schema declares: the root's, then each group's options'."""
    every = root_keys()
    for grp in config_groups():
        every.extend(key for keys in group_keys(grp).values() for key in keys)
    return tuple(every)


def rules() -> dict[str, Rule]:
    """Every declared key's rule by its dotted name; a group's keys from all its options
    (one name, one rule: ``optim.weight_decay`` is the same for sgd and adam)."""
    return {k.name: k.rule for k in reversed(declared_keys()) if k.rule is not None}


#: Keys that say where or how a run executes, not what it computes: left out of the run id.
EXECUTION_KEYS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [key.name for key in declared_keys() if key.execution]
        # an execution group's node, when it holds no keys (logger=[]: null)
        + [
            f.name
            for f in dataclasses.fields(Config)
            if f.metadata.get("group") and f.metadata["execution"]
        ]
    )
)


#: Keys left out of the run id at one value (their default; added after runs existed), by name.
ID_DEFAULTS: dict[str, Any] = {
    key.name: key.id_default for key in declared_keys() if key.id_default is not MISSING
}


def register() -> None:
    """Store the schema in Hydra's ConfigStore: the root config's as ``base_config``, each
    group option's as ``schema/<group>/<option>``. Hydra's plugin scan calls it in every
    process that composes (``hydra_plugins/normbench_schema``); storing again replaces."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="base_config", node=Config, provider="normbench")
    for grp, schemas in OPTION_SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=f"schema/{grp}", name=name, node=node, provider="normbench")
    for name, node in LOGGER_SCHEMAS.items():
        store.store(group="schema/logger", name=name, node=node, provider="normbench")


def flat(node, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested mapping (a config; lists stay leaves)."""
    found: dict[str, Any] = {}
    for name, value in node.items():
        if hasattr(value, "items"):
            found.update(flat(value, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = value
    return found
