"""normbench's config schema and its run record, each declared once.

The config schema: every key a user can set, as dataclasses (the top-level run keys, and
one per group: schedule, eval, checkpoint, report, and each option of dataset, model and
optim). Each field carries its type, its rule (range or allowed values, in the user's
words), a one-line help text and whether it is an execution key: one that says where or
how a run executes, not what it computes, and so is left out of the run id.

Hydra's ConfigStore holds these dataclasses (:func:`register`, called by Hydra's plugin
scan through ``hydra_plugins/normbench_schema``) as the base of ``conf/config.yaml``
(``base_config``) and of each group option's YAML (``/schema/<group>/<option>``), so that
OmegaConf refuses unknown keys and wrong types. The values themselves stay in the YAML
files. :data:`EXECUTION_KEYS`, :func:`rules` (what ``config.validate`` checks) and
:func:`reference_markdown` (the manual's configuration reference) are derived from here.

Normalization variants are open-ended (a user's own takes whatever its class takes): the
arguments several share have their rule here (:class:`NormArgs`), any other key takes the
type of its default in the variant's YAML.

Nothing here imports torch, Hydra or OmegaConf at import time: ``normbench --help`` reads
this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: OmegaConf's mark for a value that a YAML file gives (``???``): the schema holds types,
#: rules and help, the YAML files hold the values.
MISSING = "???"

#: The folder of normbench's Hydra configs, ``normbench/conf/`` (package data).
CONF_DIR = Path(__file__).resolve().parent / "conf"

LR_SCALINGS = ("none", "linear", "sqrt")
BUDGETS = ("epochs", "steps")
SCHEDULES = ("constant", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
#: The memory layouts a run (``memory_format``) and ``normbench bench`` can use; their torch
#: formats are ``models.torch_memory_format``'s.
LAYOUTS = ("contiguous", "channels_last")
#: ``memory_format``: auto picks one of LAYOUTS per run (models.choose_memory_format)
MEMORY_FORMATS = ("auto", *LAYOUTS)
BACKENDS = ("auto", "cpu", "triton", "reference")

#: The largest float32. Runs compute in float32, and torch converts every setting that
#: enters a tensor operation (a learning rate, momentum, weight decay, an epsilon) to the
#: parameters' dtype: a larger value stops the first optimizer step with an overflow.
FLOAT32_MAX = 3.4028234663852886e38

#: The smallest positive normal float32 (``torch.finfo(torch.float32).tiny``). A value that
#: must be above 0 must be at least this: a smaller one is 0 in float32 (1e-46), or a
#: subnormal that a GPU's kernels flush to 0, which an epsilon under a square root cannot be.
FLOAT32_TINY = 1.1754943508222875e-38

_TOO_LARGE = f"a number <= {FLOAT32_MAX:.4g} (float32's largest: runs compute in float32)"
_TOO_SMALL = (
    f"a number >= {FLOAT32_TINY:.4g} (float32's smallest normal: runs compute in float32, "
    "where a smaller one is 0 or flushed to 0)"
)


def closest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice nearest ``word``, or nothing."""
    matches = difflib.get_close_matches(word, [c for c in choices if c != word], n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


# ----------------------------------------------------------------------------- the rules
#
# A rule checks one value and says, in the user's words, what the value must be: its
# ``text`` ("an integer >= 1") follows "<key> must be" in the message, and fills the
# reference's "allowed" column; ``kind`` fills its "type" column.


class Rule:
    """What a key's value must be. :meth:`check`: None when ``value`` passes, else what
    it must be. ``options(group)`` gives a group's options, for a rule naming one."""

    kind = "any"
    text = "anything"

    def check(self, value: Any, options: Callable[[str], list[str]] | None = None) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Whole(Rule):
    """An integer in ``[low, high]`` (``null``: or None)."""

    low: int
    high: int | None = None
    null: bool = False

    @property
    def kind(self) -> str:
        return "integer" + (" or null" if self.null else "")

    @property
    def text(self) -> str:
        high = self.high
        if high is not None and high > 10**6 and (high + 1) & high == 0:  # 2**63 - 1, readably
            top = f" and <= 2**{high.bit_length()} - 1"
        else:
            top = f" and <= {high}" if high is not None else ""
        return f"an integer >= {self.low}{top}" + (" or null" if self.null else "")

    def check(self, value, options=None):
        if self.null and value is None:
            return None
        ok = is_int(value) and value >= self.low and (self.high is None or value <= self.high)
        return None if ok else self.text


@dataclass(frozen=True)
class Number(Rule):
    """A finite number above ``low`` (``strict``) or from it, at most ``high``; without a
    ``high``, at most float32's largest, and a positive one at least float32's smallest."""

    low: float
    strict: bool
    high: float | None = None
    null: bool = False

    @property
    def kind(self) -> str:
        return "number" + (" or null" if self.null else "")

    @property
    def text(self) -> str:
        rule = f"a number {'>' if self.strict else '>='} {self.low:g}"
        rule += f" and <= {self.high:g}" if self.high else ""
        return rule + (" or null" if self.null else "")

    def check(self, value, options=None):
        if self.null and value is None:
            return None
        low = self.low
        ok = is_number(value) and (value > low if self.strict else value >= low)
        if ok and self.high is None and value > FLOAT32_MAX:
            return _TOO_LARGE
        if ok and self.strict and low == 0 and value < FLOAT32_TINY:
            return _TOO_SMALL
        return None if ok and (self.high is None or value <= self.high) else self.text


@dataclass(frozen=True)
class Choice(Rule):
    """One of ``choices``."""

    choices: tuple[str, ...]
    kind = "string"

    @property
    def text(self) -> str:
        return f"one of {', '.join(self.choices)}"

    def check(self, value, options=None):
        if value in self.choices:
            return None
        return self.text + (closest(str(value), self.choices) if value else "")


@dataclass(frozen=True)
class Flag(Rule):
    """true or false (``null``: or None)."""

    null: bool = False

    @property
    def kind(self) -> str:
        return "boolean" + (" or null" if self.null else "")

    @property
    def text(self) -> str:
        return "true or false" + (" or null" if self.null else "")

    def check(self, value, options=None):
        return None if isinstance(value, bool) or (self.null and value is None) else self.text


@dataclass(frozen=True)
class Text(Rule):
    kind = "string"
    text = "a non-empty string"

    def check(self, value, options=None):
        return None if isinstance(value, str) and value.strip() else self.text


@dataclass(frozen=True)
class Wholes(Rule):
    """A list of integers >= ``low``; ``empty``: the list may be empty."""

    low: int
    empty: bool
    kind = "list of integers"

    @property
    def text(self) -> str:
        return f"a list of integers >= {self.low}" + ("" if self.empty else " (at least one)")

    def check(self, value, options=None):
        items = list(value) if isinstance(value, list | tuple) else None
        ok = (
            items is not None
            and (self.empty or items)
            and all(is_int(v) and v >= self.low for v in items)
        )
        return None if ok else self.text


@dataclass(frozen=True)
class Fractions(Rule):
    kind = "list of numbers"
    text = "a list of fractions of training between 0 and 1"

    def check(self, value, options=None):
        items = list(value) if isinstance(value, list | tuple) else None
        ok = items is not None and all(is_number(m) and 0 < m < 1 for m in items)
        return None if ok else self.text


@dataclass(frozen=True)
class Betas(Rule):
    kind = "list of two numbers"
    text = "two numbers in [0, 1), as [0.9, 0.999]"

    def check(self, value, options=None):
        items = list(value) if isinstance(value, list | tuple) else []
        ok = len(items) == 2 and all(is_number(b) and 0 <= b < 1 for b in items)
        return None if ok else self.text


@dataclass(frozen=True)
class Split(Rule):
    """A validation split: a fraction of the training images or a count of them."""

    kind = "number or integer"
    text = "a fraction in [0, 1) of the training images or a count of them (0: none)"

    def check(self, value, options=None):
        fraction = isinstance(value, float) and 0 <= value < 1
        return None if fraction or (is_int(value) and value >= 0) else self.text


@dataclass(frozen=True)
class Keys(Rule):
    kind = "list of strings or null"
    text = "a list of config keys, as [lr], or null"

    def check(self, value, options=None):
        ok = value is None or (
            isinstance(value, list | tuple)
            and value
            and all(isinstance(k, str) and k for k in value)
        )
        return None if ok else self.text


@dataclass(frozen=True)
class Option(Rule):
    """One of a config group's options, or null."""

    group: str
    kind = "string or null"

    @property
    def text(self) -> str:
        return f"a {self.group} option or null"

    def check(self, value, options=None):
        valid = options(self.group) if options is not None else None
        if value is None or (valid is not None and value in valid):
            return None
        if valid is None:
            return None if isinstance(value, str) else self.text
        return f"a {self.group} ({', '.join(valid)}) or null"


# ------------------------------------------------------------------------------ the fields


def key(
    rule: Rule | None,
    help: str,  # noqa: A002 - the word the reference's column uses
    *,
    execution: bool = False,
    default: Any = MISSING,
) -> Any:
    """A schema field: its rule, its help line, whether it is an execution key (left out of
    the run id). Its value comes from the YAML files (``default`` stays ``???``)."""
    metadata = {"rule": rule, "help": help, "execution": execution}
    return field(default=default, metadata=metadata)


def group(help: str) -> Any:  # noqa: A002
    """A config group's field in the root config: its option's node (typed by the option's
    own schema, or open for norms); None when none is picked."""
    return field(default=None, metadata={"group": True, "help": help, "execution": False})


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

    precise_bn_batches: int = key(
        Whole(1),
        "training batches averaged to re-estimate the population statistics (PreciseBN; "
        "at most one pass over the training set)",
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
    # in config.yaml's order, which the composed config (and so summary.json) keeps
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    eval: Eval = field(default_factory=Eval)
    report: Report = field(default_factory=Report)
    schedule: Schedule = field(default_factory=Schedule)
    model: Any = group("the network (conf/model/)")
    norm: Any = group("the normalization variant (conf/norm/)")
    dataset: Any = group("the data set (conf/dataset/)")
    optim: Any = group("the optimizer (conf/optim/)")


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
    warmup_steps: int = key(Whole(0), "training steps of plain BatchNorm first")
    ramp_steps: int = key(Whole(0), "steps over which r_max and d_max grow to their values")
    virtual_batch_size: int = key(Whole(1), "samples per virtual batch")
    backend: str = key(
        Choice(BACKENDS),
        "kernel: auto (by device), cpu (compiled C++), triton (CUDA) or reference",
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
    schemas = {"": NormArgs} if group == "norm" else OPTION_SCHEMAS.get(group, {})
    return {name: list(_keys(cls, f"{group}.")) for name, cls in schemas.items()}


def config_groups() -> tuple[str, ...]:
    """The root config's group fields, in order (model, norm, dataset, optim)."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("group"))


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
    dict.fromkeys(key.name for key in declared_keys() if key.execution)
)


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


# ------------------------------------------------------------------ the reference, in Markdown


def reference_markdown() -> str:
    """The configuration reference: one Markdown table per group of keys (the run's keys,
    each section, each option's schema, the norm arguments variants share), with each
    key's type, default (from normbench's YAML files), allowed values, whether it is an
    execution key and its help."""
    root = _load(CONF_DIR / "config.yaml")
    root = flat({k: v for k, v in root.items() if k not in ("defaults", "hydra")})
    parts = [
        "Every key, its type, its default and what it may be. Execution keys say where or "
        "how a run executes, not what it computes: they are left out of the run id, so "
        "changing one reruns nothing.\n"
    ]
    keys = root_keys()
    parts.append(_table("run", Config.__doc__, [k for k in keys if "." not in k.name], root.get))
    for section in SECTIONS:
        members = [k for k in keys if k.name.startswith(f"{section}.")]
        parts.append(_table(section, members[0].owner.__doc__, members, root.get))
    picks = [
        e for e in _load(CONF_DIR / "config.yaml", keep=True)["defaults"] if isinstance(e, dict)
    ]
    picks = {grp: option for entry in picks for grp, option in entry.items()}
    for grp in config_groups():
        files = sorted((CONF_DIR / grp).glob("*.yaml"))
        values = {path.stem: flat(_load(path)) for path in files}
        values[""] = {"name": picks.get(grp)}  # the name: the option picked by default
        for schema, members in group_keys(grp).items():
            # norm's and dataset's: one table for every option; a model's or optimizer's own
            picked = sorted(values) if grp in ("norm", "dataset") else [schema]
            title = grp if grp in ("norm", "dataset") else f"{grp}={schema}"
            doc = members[0].owner.__doc__ or f"The keys of {grp}={schema}."

            def default(name: str, picked=picked, values=values) -> str:
                rest = name.split(".", 1)[1]
                if rest == "name" and len(picked) > 1:
                    picked = [""]
                return _varying({o: values[o][rest] for o in picked if rest in values[o]})

            names = ", ".join(o for o in sorted(values) if o) if len(picked) > 1 else schema
            parts.append(_table(title, doc, members, default, shown=False, names=names))
    return "\n".join(parts)


def _load(path: Path, keep: bool = False) -> dict:
    """A YAML file's values (``keep``: its defaults list too)."""
    from omegaconf import OmegaConf

    loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(loaded, dict):
        return {}
    return {k: v for k, v in loaded.items() if keep or k != "defaults"}


def flat(node, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested mapping (a config; lists stay leaves)."""
    found: dict[str, Any] = {}
    for name, value in node.items():
        if hasattr(value, "items"):
            found.update(flat(value, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = value
    return found


def _shown(value: Any) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _varying(found: dict[str, Any]) -> str:
    """One default, or each option's where they differ (``1e-05; frn, rms: 1e-06``)."""
    by_value: dict[str, list[str]] = {}
    for option, value in found.items():
        by_value.setdefault(_shown(value), []).append(option)
    if len(by_value) <= 1:
        return next(iter(by_value), "")
    return "; ".join(f"{', '.join(options)}: {value}" for value, options in by_value.items())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(
    title: str,
    doc: str | None,
    keys: list[Key],
    default: Callable,
    shown: bool = True,
    names: str = "",
) -> str:
    """One group's table; ``names``: the options a ``name`` key picks among."""
    lines = [f"## {title}\n"]
    if doc:
        lines.append(" ".join(doc.split()) + "\n")
    lines.append("| key | type | default | allowed | execution key | help |")
    lines.append("|---|---|---|---|---|---|")
    for item in keys:
        rule = item.rule
        value = default(item.name)
        value = _shown(value) if shown else value
        cells = [
            f"`{item.name}`",
            rule.kind if rule is not None else "string",
            f"`{value}`" if value else "",
            rule.text if rule is not None else (f"one of {names}" if "," in names else names),
            "yes" if item.execution else "no",
            item.help,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the run record
#
# What a run writes to summary.json: :class:`RunRecord`, each field once with its type and
# what a reader may take from it. The run store's field list and number checks, the
# statistics' metrics and the figures' estimators are derived from it (:func:`record_fields`).
# A field that holds a config value (``norm`` is ``norm.name``) is that value's one name in
# summary.json: the config rides along under ``config.<key>`` for the other keys only.

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
    steps: int | None = recorded(0)
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
