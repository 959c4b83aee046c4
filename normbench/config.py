"""Compose, validate and describe normbench's config (Hydra's compose API).

Every way into normbench (``run``, ``config``, the sweeps) gets its config from
:func:`compose`, which turns Hydra's and OmegaConf's exceptions into one
:class:`~normbench.errors.UserError` naming what was wrong and what is valid,
and checks every value before anything runs.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from normbench.errors import UserError

#: The config groups; their options are the YAML files in ``normbench/conf/<group>/``.
GROUPS: tuple[str, ...] = ("model", "norm", "dataset", "optim", "experiment")

#: Keys that say where or how a run executes, not what it computes: left out of the run id.
EXECUTION_KEYS: tuple[str, ...] = (
    "name",
    "out_dir",
    "device",
    "threads",
    "memory_format",
    "dataset.root",
    "dataset.download",
    "report.select",
    "report.baseline",
    "checkpoint.save",
    "checkpoint.keep",
)

LR_SCALINGS = ("none", "linear", "sqrt")
BUDGETS = ("epochs", "steps")
SCHEDULES = ("constant", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
#: The memory layouts a run (``memory_format``) and ``normbench bench`` can use; their torch
#: formats are ``models.torch_memory_format``'s.
LAYOUTS = ("contiguous", "channels_last")
#: ``memory_format``: auto picks one of LAYOUTS per run (models.choose_memory_format)
MEMORY_FORMATS = ("auto", *LAYOUTS)


def conf_dir() -> Path:
    """The configs, ``normbench/conf/``: package data, in a wheel as in a checkout."""
    return Path(__file__).resolve().parent / "conf"


#: Config folders a user adds (``normbench --config-dir DIR``, or ``hydra.searchpath`` with
#: ``file://`` entries): their ``<group>/<option>.yaml`` files are options too, a norm's
#: with a ``_target_`` naming its class.
_user_dirs: list[Path] = []


def add_config_dir(path: str | Path) -> None:
    """Search ``path`` for config options as well (after normbench's own). An option of
    normbench's own that the folder has too (``norm/custom_bn.yaml``) keeps normbench's,
    as Hydra's search path does: a :class:`~normbench.errors.Notice` says so."""
    import warnings

    from normbench.errors import Notice

    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise UserError(f"--config-dir {path}: {what}")
    if "${" in str(folder):
        raise UserError(
            f"--config-dir {path}: Hydra reads ${{...}} in its search path as an "
            "interpolation, where a job resolves it: give the folder (or a link to it) a "
            "name without ${"
        )
    if folder in _user_dirs:
        return
    _user_dirs.append(folder)
    if (folder / "config.yaml").is_file():
        warnings.warn(
            f"{folder / 'config.yaml'} is ignored: normbench's own config.yaml is the root "
            "config; a folder of yours adds options to the groups (norm/NAME.yaml, ...)",
            Notice,
            stacklevel=2,
        )
    for group in GROUPS:
        for own in sorted((folder / group).glob("*.yaml")):
            if (conf_dir() / group / own.name).is_file():
                warnings.warn(
                    f"{own} is ignored: normbench's own {group}={own.stem} comes first "
                    f"(Hydra's search path); give yours another name, as {group}/my_{own.name}",
                    Notice,
                    stacklevel=2,
                )


def config_dirs() -> list[Path]:
    return [conf_dir(), *_user_dirs]


def searchpath_overrides() -> list[str]:
    """The Hydra override that makes Hydra search the user's folders too (or nothing)."""
    from hydra.core.override_parser.types import Quote, QuotedString

    if not _user_dirs:
        return []
    # quoted as Hydra's grammar reads a string (a folder may be named "a[b]" or "it's,x")
    entries = (
        QuotedString(text=f"file://{d}", quote=Quote.single).with_quotes() for d in _user_dirs
    )
    return [f"hydra.searchpath=[{','.join(entries)}]"]


def option_file(group: str, option: str) -> Path | None:
    """The YAML file of a group's option: normbench's own first, then the user's folders."""
    for folder in config_dirs():
        path = folder / group / f"{option}.yaml"
        if path.is_file():
            return path
    return None


def group_options(group: str) -> list[str]:
    """The options of one config group, sorted by name: normbench's, the user's folders'
    and, for ``norm``, the variants installed packages declare (entry points)."""
    names = {p.stem for folder in config_dirs() for p in (folder / group).glob("*.yaml")}
    if group == "norm":
        from normbench.norms.registry import entry_point_norms

        names |= set(entry_point_norms())
    return sorted(names)


def describe_groups() -> dict[str, list[tuple[str, str]]]:
    """Each group's options with the one-line description on their YAML's first comment
    (an installed variant's: its class's docstring)."""
    from normbench.norms.registry import entry_point_norms

    described: dict[str, list[tuple[str, str]]] = {}
    for group in GROUPS:
        rows = []
        for option in group_options(group):
            path = option_file(group, option)
            if path is not None:
                text = _description(path)
            else:
                text = entry_point_norms()[option].describe()
            rows.append((option, text))
        described[group] = rows
    return described


def default_options() -> dict[str, str]:
    """The option each group takes when no override picks one (from config.yaml's defaults)."""
    from omegaconf import DictConfig, OmegaConf

    defaults = OmegaConf.load(conf_dir() / "config.yaml").defaults
    picks = (item for entry in defaults if isinstance(entry, DictConfig) for item in entry.items())
    return {group: option for group, option in picks if group in GROUPS and option}


def _description(path: Path) -> str:
    for line in path.read_text(errors="replace").splitlines():  # shown only: never fails
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith("@package"):
            return text
    return ""


def _closest(word: str, choices: Iterable[str]) -> str:
    matches = difflib.get_close_matches(word, [c for c in choices if c != word], n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


#: Parsed overrides by their text: a sweep's jobs repeat the same few (``norm=layer``),
#: and Hydra's parser takes about 0.1 ms for each. At most _PARSED_MAX of them are kept
#: (a long-lived process parsing ever new values, a grid of many seeds).
_parsed: dict[str, Any] = {}
_PARSED_MAX = 10_000


def parse_overrides(overrides: Sequence[str]) -> list:
    """Hydra's ``Override`` objects for ``overrides`` (a :class:`UserError` if one does not
    parse). Shared between calls: treat them as read-only."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    # this call's answers are held here: emptying the shared cache cannot lose them
    found = {text: _parsed[text] for text in overrides if text in _parsed}
    new = [text for text in dict.fromkeys(overrides) if text not in found]
    if new:
        try:
            parsed = OverridesParser.create().parse_overrides(new)
        except OverrideParseException as err:
            raise UserError(f"cannot parse overrides: {_first_line(err)}") from None
        found.update(zip(new, parsed, strict=True))
        if len(_parsed) + len(new) > _PARSED_MAX:
            _parsed.clear()
        _parsed.update(zip(new, parsed, strict=True))
    return [found[text] for text in overrides]


def check_group_overrides(overrides: Sequence[str]) -> list:
    """Fail on any unknown group option in the overrides, sweeps included, before composing;
    the overrides, parsed (Hydra's ``Override`` objects)."""
    parsed = parse_overrides(overrides)
    for override in parsed:
        if override.key_or_group == "hydra.searchpath" and not override.is_sweep_override():
            # the user's own folders, named to Hydra directly: their options are valid too
            for entry in override.value() or []:
                if isinstance(entry, str) and entry.startswith("file://"):
                    add_config_dir(entry.removeprefix("file://"))
    for override in parsed:
        group = override.key_or_group
        if group not in GROUPS or override.is_delete():
            continue
        valid = group_options(group)
        if _is_glob(override):
            values = _glob_options(override)
        elif override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            value = override.value()
            if value is None and group in REQUIRED_GROUPS:
                raise UserError(f"{group} cannot be null; pick one of: {', '.join(valid)}")
            values = [] if value is None else [str(value)]
        for value in values:
            if value not in valid:
                raise UserError(
                    f"unknown {group} {value!r}{_closest(value, valid)}; valid: {', '.join(valid)}"
                )
    return parsed


def _is_glob(override) -> bool:
    from hydra.core.override_parser.types import ValueType

    return override.value_type == ValueType.GLOB_CHOICE_SWEEP


def _glob_options(override) -> list[str]:
    """The options of a config group ``glob(...)`` picks, in Hydra's order (sorted), from
    the same options Hydra sees: normbench's, the user's folders' and installed ones."""
    key = override.key_or_group
    if key not in GROUPS:
        raise UserError(
            f"{override.input_line}: glob() picks among a config group's options "
            f"({', '.join(GROUPS)}); {key} is not a group: list its values, as {key}=a,b"
        )
    valid = group_options(key)
    picked = override.value().filter(valid)
    if not picked:
        raise UserError(f"{override.input_line} matches no {key} option; valid: {', '.join(valid)}")
    return picked


def expand_globs(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with every ``group=glob(...)`` written out as the choice sweep Hydra's
    basic sweeper makes of it (``norm=glob(*_bn)``: ``norm=custom_bn,ghost_bn,torch_bn``)."""
    parsed = parse_overrides(overrides)
    result = []
    for text, override in zip(overrides, parsed, strict=True):
        if _is_glob(override):
            text = f"{text.split('=', 1)[0]}={','.join(_glob_options(override))}"
        result.append(text)
    return result


def named_options(overrides: Sequence[str], group: str) -> list[str]:
    """The options of ``group`` the overrides pick by name (sweeps and globs included)."""
    names: list[str] = []
    for override in parse_overrides(expand_globs(overrides)):
        if override.key_or_group != group or override.is_delete():
            continue
        if override.is_sweep_override():
            names.extend(override.sweep_string_iterator())
        elif override.value() is not None:
            names.append(str(override.value()))
    return names


#: Configs composed by Hydra for a set of structural overrides (groups, ``hydra.*``,
#: sweeps), reused by :func:`compose` for every job that shares them: a sweep of a
#: thousand runs composes a handful of times, not a thousand (about 40 ms each).
_composed: dict[tuple[str, ...], Any] = {}
_COMPOSED_MAX = 64


def _is_value_override(override) -> bool:
    """``key=value`` (or ``+key``, ``~key``) on normbench's own config, below any group."""
    key = override.key_or_group
    return (
        not override.is_sweep_override()
        and override.package is None
        and "/" not in key
        and key not in GROUPS
        and key.split(".")[0] != "hydra"
    )


def with_searchpath(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with the user's config folders added to Hydra's search path (unless
    the overrides set the search path themselves), and installed variants' configs stored
    where Hydra finds them."""
    from normbench.norms.registry import store_entry_point_configs

    store_entry_point_configs(named_options(overrides, "norm"))
    if any(o.split("=", 1)[0].lstrip("+") == "hydra.searchpath" for o in overrides):
        return list(overrides)
    return [*searchpath_overrides(), *overrides]


def compose(overrides: Sequence[str] = ()):
    """The resolved, validated config for one run, from Hydra overrides (``key=value``).

    Hydra composes the config groups (and checks ``hydra.*`` keys); the value overrides
    are then applied on top as Hydra itself applies them after composition, so the jobs
    of a sweep that share their groups share one composition. A ``+key`` that the config
    does not have is refused: normbench reads no key it does not define.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = with_searchpath(overrides)
    parsed = check_group_overrides(overrides)
    for override in parsed:
        if override.is_sweep_override() and not override.key_or_group.startswith("hydra"):
            raise UserError(
                f"{override.input_line} gives several values: that is a sweep, which "
                "`normbench sweep` runs one job per value; here give one value"
            )
    structural = tuple(o.input_line for o in parsed if not _is_value_override(o))
    values = [o for o in parsed if _is_value_override(o)]
    base = _compose_groups(structural, overrides)
    for override in values:
        if override.is_add() or override.is_force_add():
            _check_added_key(base, override)
    cfg = copy.deepcopy(base)
    try:
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_composition_message(err, overrides)) from None
    validate(cfg)
    return cfg


def _compose_groups(structural: tuple[str, ...], overrides: Sequence[str]):
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if structural not in _composed:
        try:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                cfg = hydra_compose(config_name="config", overrides=list(structural))
        except (HydraException, OmegaConfBaseException) as err:
            raise UserError(_composition_message(err, overrides)) from None
        except AssertionError:  # OmegaConf's, for a key set below a null value
            below = _below_null(structural)
            if below is None:
                raise
            raise UserError(below) from None
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:  # a config folder's file
            raise UserError(unreadable_config(err)) from None
        if len(_composed) >= _COMPOSED_MAX:
            _composed.pop(next(iter(_composed)))
        _composed[structural] = cfg
    return _composed[structural]


def unreadable_config(err: BaseException) -> str:
    """A config file Hydra could not read (a user's config folder's: PyYAML's error, an
    OSError, bytes that are not UTF-8) as one line naming the file, where and what."""
    import yaml

    if isinstance(err, OSError):
        return f"cannot read the config file {err.filename}: {err.strerror or err}"
    if isinstance(err, UnicodeDecodeError):  # which file, Python's error does not say
        undecodable = []
        for path in sorted(p for d in _user_dirs for p in d.glob("*/*.yaml")):
            try:
                path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                undecodable.append(str(path))
        where = ", ".join(undecodable) or "a file of " + ", ".join(map(str, _user_dirs))
        return f"{where}: not UTF-8 text: {_first_line(err)}"
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if isinstance(err, yaml.MarkedYAMLError) and mark is not None:
        what = "; ".join(str(part) for part in (err.context, err.problem) if part)
        return (
            f"{mark.name}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: "
            f"{what or _first_line(err)}"
        )
    if isinstance(err, yaml.reader.ReaderError):
        return f"{err.name}: invalid YAML at character {err.position}: {_first_line(err)}"
    return f"a config file is not valid YAML: {_first_line(err)}"


def _below_null(structural: Sequence[str]) -> str | None:
    """For an override that sets a key below a null value (``hydra.sweeper.params.norm=x``
    when no experiment preset sets ``hydra.sweeper.params``), which Hydra meets with an
    AssertionError: what was wrong, in words; None when no override does so."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    parsed = parse_overrides(structural)
    dotted = [o for o in parsed if "." in o.key_or_group and not o.is_delete()]
    groups = [o.input_line for o in parsed if o not in dotted]
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose("config", overrides=groups, return_hydra_config=True)
    except Exception:  # the first error stands: this was to say it better
        return None
    missing = object()
    for override in dotted:
        parts = override.key_or_group.split(".")
        for depth in range(1, len(parts)):
            parent = ".".join(parts[:depth])
            value = OmegaConf.select(cfg, parent, default=missing, throw_on_missing=False)
            if value is missing:
                break
            if value is None:
                rest = ".".join(parts[depth:])
                hint = ""
                if parent == "hydra.sweeper.params":
                    values = override.input_line.split("=", 1)[1]
                    hint = (
                        " (an experiment preset that sweeps sets it); give the sweep on the "
                        f"command line instead: {rest}={values}"
                    )
                return f"{override.input_line}: {parent} is null here, so it has no {rest}{hint}"
    return None


def _check_added_key(base, override) -> None:
    from omegaconf import OmegaConf

    key = override.key_or_group
    missing = object()
    if OmegaConf.select(base, key, default=missing, throw_on_missing=False) is missing:
        chosen = OmegaConf.select(base, f"{key.partition('.')[0]}.name", default=None)
        other = _other_options_key(key, (), chosen if isinstance(chosen, str) else None)
        if other:  # another option of the group has it (optim=sgd +optim.eps=1e-8)
            raise UserError(f"{override.input_line}: {other}; a + cannot add a key to it")
        raise UserError(
            f"unknown config key {key!r}{_closest(key, _known_keys())}; normbench reads "
            "only the keys it defines, so a + cannot add one (`normbench config` shows every key)"
        )
    if override.is_add():
        raise UserError(
            f"{key} is already in the config: set it without the +, as {override.input_line[1:]}"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


#: The extra that installs each of Hydra's launcher plugins.
LAUNCHER_EXTRAS = {
    "joblib": "parallel",
    "submitit_slurm": "slurm",
    "submitit_local": "slurm",
    "ray": "ray",
    "ray_aws": "ray",
}


def _composition_message(err: BaseException, overrides: Sequence[str]) -> str:
    """Hydra's messages are long and mention its internals; say what the user got wrong."""
    text = str(err)
    missing = re.search(r"Could not find 'hydra/launcher/([\w-]+)'", text)
    if missing:
        name = missing.group(1)
        extra = LAUNCHER_EXTRAS.get(name)
        if extra:
            return (
                f"hydra/launcher={name} is not installed; it comes with normbench's {extra!r} "
                f'extra: pip install "normbench[{extra}]" (in a clone: pip install -e ".[{extra}]")'
            )
        options = re.search(r"Available options in '[^']*':\n((?:\t[^\n]*\n?)*)", text)
        listed = options.group(1).split() if options else ["basic"]
        return f"unknown hydra/launcher={name}; available: {', '.join(listed)}"
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if f"Could not override '{key}'" in text or f"Key '{key}'" in text:
            if key.startswith("hydra."):
                # Launchers take settings their config does not list (ray.init's num_cpus).
                launcher = next(
                    (o.split("=", 1)[1] for o in overrides if o.startswith("hydra/launcher=")),
                    "basic",
                )
                return (
                    f"{key} is not in Hydra's config (with hydra/launcher={launcher}); "
                    f"to add a setting it leaves out, prefix a +: +{override.lstrip('+~')}"
                )
            other = _other_options_key(key, overrides)
            if other:
                return other
            known = _known_keys()
            return (
                f"unknown config key {key!r}{_closest(key, known)}; "
                "`normbench config` shows every key"
            )
    return f"invalid config: {_first_line(err)}"


def _other_options_key(key: str, overrides: Sequence[str], chosen: str | None = None) -> str | None:
    """For ``optim=adam optim.momentum=0.9``: the option chosen (``chosen``, or the one the
    overrides pick) has no such key, but another option of its group has; say which, and
    what the chosen one takes."""
    group, _, rest = key.partition(".")
    if group not in GROUPS or not rest:
        return None
    if chosen is None:
        chosen = default_options().get(group)
        for override in overrides:
            name, _, value = override.partition("=")
            if name.lstrip("+") == group and value:
                chosen = value
    if chosen is None:
        return None
    # installed variants other than the chosen one are not imported to find out
    having = [o for o in group_options(group) if rest in option_keys(group, o, load=o == chosen)]
    if not having:
        return None
    own = sorted(k for k in _option_defaults(group, chosen) if k != "name")
    verb = "has" if len(having) == 1 else "have"
    return (
        f"{group}={chosen} has no {rest} ({', '.join(having)} {verb} it); "
        f"{group}={chosen} takes: {', '.join(own) or 'nothing'}"
    )


def _known_keys() -> list[str]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config")
    return list(_flatten(cfg))


def _flatten(node, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested config (lists stay leaves)."""
    from omegaconf import DictConfig

    flat: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig | dict):
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def flatten(cfg) -> dict[str, Any]:
    """The config as one flat record of plain values: ``{"norm.name": "custom_bn", ...}``."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    return _flatten(container)


# ----------------------------------------------------------------------------- validation
#
# Every key gets a type and a range check, in the user's words, before anything is built:
# a value that passes here does not crash a model, a norm or an optimizer later. Keys
# with a rule below are checked by it; any other key of a group option (a new variant's
# own argument) must have the type of its default in the option's YAML.


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


#: The largest float32. Runs compute in float32, and torch converts every setting that
#: enters a tensor operation (a learning rate, momentum, weight decay, an epsilon) to the
#: parameters' dtype: a larger value stops the first optimizer step with an overflow.
FLOAT32_MAX = 3.4028234663852886e38

_TOO_LARGE = f"a number <= {FLOAT32_MAX:.4g} (float32's largest: runs compute in float32)"

#: The smallest positive normal float32 (``torch.finfo(torch.float32).tiny``). A value that
#: must be above 0 must be at least this: a smaller one is 0 in float32 (1e-46), or a
#: subnormal that a GPU's kernels flush to 0, which an epsilon under a square root cannot be.
FLOAT32_TINY = 1.1754943508222875e-38

_TOO_SMALL = (
    f"a number >= {FLOAT32_TINY:.4g} (float32's smallest normal: runs compute in float32, "
    "where a smaller one is 0 or flushed to 0)"
)


def _int(low: int, high: int | None = None, null: bool = False):
    if high is not None and high > 10**6 and (high + 1) & high == 0:  # 2**63 - 1, readably
        top = f" and <= 2**{high.bit_length()} - 1"
    else:
        top = f" and <= {high}" if high is not None else ""
    rule = f"an integer >= {low}{top}" + (" or null" if null else "")

    def check(value: Any) -> str | None:
        if null and value is None:
            return None
        ok = _is_int(value) and value >= low and (high is None or value <= high)
        return None if ok else rule

    return check


def _number(low: float, strict: bool, high: float | None = None, null: bool = False):
    rule = f"a number {'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high else "")
    rule += " or null" if null else ""

    def check(value: Any) -> str | None:
        if null and value is None:
            return None
        ok = _is_number(value) and (value > low if strict else value >= low)
        if ok and high is None and value > FLOAT32_MAX:
            return _TOO_LARGE
        if ok and strict and low == 0 and value < FLOAT32_TINY:
            return _TOO_SMALL
        return None if ok and (high is None or value <= high) else rule

    return check


def _one_of(*choices: str):
    def check(value: Any) -> str | None:
        if value in choices:
            return None
        return f"one of {', '.join(choices)}" + (_closest(str(value), choices) if value else "")

    return check


def _boolean(null: bool = False):
    rule = "true or false" + (" or null" if null else "")
    return lambda value: None if isinstance(value, bool) or (null and value is None) else rule


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def _ints(low: int, empty: bool):
    rule = f"a list of integers >= {low}" + ("" if empty else " (at least one)")

    def check(value: Any) -> str | None:
        items = list(value) if isinstance(value, list | tuple) else None
        ok = items is not None and (empty or items) and all(_is_int(v) and v >= low for v in items)
        return None if ok else rule

    return check


def _val_size(value: Any) -> str | None:
    fraction = isinstance(value, float) and 0 <= value < 1
    return (
        None
        if fraction or (_is_int(value) and value >= 0)
        else ("a fraction in [0, 1) of the training images or a count of them (0: none)")
    )


def _key_list(value: Any) -> str | None:
    ok = value is None or (
        isinstance(value, list) and value and all(isinstance(k, str) and k for k in value)
    )
    return None if ok else "a list of config keys, as [lr], or null"


def _baseline(value: Any) -> str | None:
    if value is None or value in group_options("norm"):
        return None
    return f"a norm ({', '.join(group_options('norm'))}) or null"


def _betas(value: Any) -> str | None:
    items = list(value) if isinstance(value, list | tuple) else []
    ok = len(items) == 2 and all(_is_number(b) and 0 <= b < 1 for b in items)
    return None if ok else "two numbers in [0, 1), as [0.9, 0.999]"


def _fractions(value: Any) -> str | None:
    items = list(value) if isinstance(value, list | tuple) else None
    ok = items is not None and all(_is_number(m) and 0 < m < 1 for m in items)
    return None if ok else "a list of fractions of training between 0 and 1"


#: The rule of every key normbench defines (dotted names).
RULES: dict[str, Any] = {
    "name": _text,
    "out_dir": _text,
    "batch_size": _int(1),
    "eval_batch_size": _int(1),
    "lr": _number(0, strict=True),
    "lr_scaling": _one_of(*LR_SCALINGS),
    "ref_batch_size": _int(1),
    "epochs": _int(1),
    "budget": _one_of(*BUDGETS),
    "max_steps": _int(1, null=True),
    # torch's generators take 64-bit seeds; numpy's and others' signed ones
    "seed": _int(0, 2**63 - 1),
    "device": _one_of(*DEVICES),
    "threads": _int(1, null=True),
    "memory_format": _one_of(*MEMORY_FORMATS),
    "schedule.name": _one_of(*SCHEDULES),
    "schedule.warmup_epochs": _number(0, strict=False),
    "schedule.milestones": _fractions,
    "schedule.gamma": _number(0, strict=True),
    "model.widths": _ints(1, empty=False),
    "model.width": _int(1),
    "model.hidden": _ints(1, empty=True),
    "norm.eps": _number(0, strict=True),
    "norm.momentum": _number(0, strict=False, high=1, null=True),
    "norm.groups": _int(1),
    "norm.r_max": _number(1, strict=False),
    "norm.d_max": _number(0, strict=False),
    "norm.warmup_steps": _int(0),
    "norm.ramp_steps": _int(0),
    "norm.virtual_batch_size": _int(1),
    "norm.backend": _one_of("auto", "cpu", "triton", "reference"),
    "dataset.root": _text,
    "dataset.download": _boolean(),
    "dataset.train_size": _int(1, null=True),
    "dataset.test_size": _int(1, null=True),
    "dataset.val_size": _val_size,
    "dataset.augment": _boolean(null=True),
    "optim.momentum": _number(0, strict=False),
    "optim.weight_decay": _number(0, strict=False),
    "optim.nesterov": _boolean(),
    "optim.betas": _betas,
    "optim.eps": _number(0, strict=True),
    "eval.precise_bn_batches": _int(1),
    "checkpoint.save": _one_of("last", "none"),
    "checkpoint.keep": _boolean(),
    "report.select": _key_list,
    "report.baseline": _baseline,
}

#: Groups a run cannot do without (``experiment`` is optional).
REQUIRED_GROUPS = ("model", "norm", "dataset", "optim")


def _by_default(default: Any):
    """The type check of a key with no rule: the type of its default value."""
    if isinstance(default, bool):
        return _boolean()
    if _is_int(default):
        return lambda value: None if _is_int(value) else "an integer"
    if isinstance(default, float):
        return lambda value: None if _is_number(value) else "a number"
    if isinstance(default, str):
        return lambda value: None if isinstance(value, str) else "a string"
    if isinstance(default, list | tuple):
        return lambda value: None if isinstance(value, list | tuple) else "a list"
    return lambda value: None  # null default: any value


def _option_defaults(group: str, option: str, load: bool = True) -> dict[str, Any]:
    import yaml
    from omegaconf import OmegaConf

    path = option_file(group, option)
    if path is None:
        if group == "norm":  # an installed package's variant: its constructor's defaults
            from normbench.norms.registry import entry_point_norms

            installed = entry_point_norms().get(option)
            return installed.config(load=load) if installed is not None else {}
        return {}
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:  # a config folder's file
        raise UserError(unreadable_config(err)) from None
    return _flatten(loaded) if isinstance(loaded, dict) else {}


def option_keys(group: str, option: str, load: bool = True) -> dict[str, Any]:
    """An option's keys and defaults (:func:`_option_defaults`); {} for one whose file
    does not load (that is said when it is picked)."""
    try:
        return _option_defaults(group, option, load=load)
    except UserError:
        return {}


def validate(cfg) -> None:
    """Check every value a user can set; raise :class:`UserError` on the first bad one.

    Limits that depend on the data (batch size vs training set) and on the norm's
    own arguments are checked where those are known: in the runner, before it writes.
    """
    for group in REQUIRED_GROUPS:
        node = cfg.get(group)
        if not hasattr(node, "get") or not isinstance(node.get("name"), str):
            valid = ", ".join(group_options(group))
            raise UserError(f"{group} is missing ({group}=null or ~{group}); pick one of: {valid}")
    for key, value in flatten(cfg).items():
        check = RULES.get(key)
        group = key.split(".", 1)[0]
        if check is None and group in REQUIRED_GROUPS and key != f"{group}.name":
            default = _option_defaults(group, cfg[group].name).get(key.split(".", 1)[1])
            check = _by_default(default)
        rule = check(value) if check is not None else None
        if rule is not None:
            raise UserError(f"{key} must be {rule}, got {value!r}")
    _require(
        os.sep not in cfg.name and cfg.name not in (".", ".."),
        "name",
        "a folder name (no path separators)",
        cfg.name,
    )
    _check_learning_rate(cfg)
    _check_path_lengths(cfg)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("device=cuda but CUDA is not available here; use device=auto or cpu")


def _require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise UserError(f"{key} must be {rule}, got {value!r}")


def scaled_lr(lr: float, batch_size: int, ref_batch_size: int, scaling: str) -> float:
    """The learning rate for ``batch_size`` under linear or square-root scaling rules."""
    ratio = batch_size / ref_batch_size
    return {"none": lr, "linear": lr * ratio, "sqrt": lr * math.sqrt(ratio)}[scaling]


def _check_learning_rate(cfg) -> None:
    """The largest learning rate a run reaches, and the largest step Adam takes with it,
    must fit in float32 (:data:`FLOAT32_MAX`): the peak after batch-size scaling, raised
    by the step schedule's gamma at each milestone, and divided by Adam's first bias
    correction, 1 - beta1. Each is checked in logarithms, so nothing overflows here; the
    message names the key that took it over."""
    limit = math.log(FLOAT32_MAX)
    peak = scaled_lr(cfg.lr, cfg.batch_size, cfg.ref_batch_size, cfg.lr_scaling)
    if not FLOAT32_TINY <= peak <= FLOAT32_MAX:
        scaling = (
            ""
            if cfg.lr_scaling == "none"
            else f" with lr_scaling={cfg.lr_scaling} (batch_size={cfg.batch_size}, "
            f"ref_batch_size={cfg.ref_batch_size})"
        )
        raise UserError(
            f"lr={cfg.lr!r}{scaling} gives a peak learning rate of {peak:.4g}: it must be "
            f"at least {FLOAT32_TINY:.4g} and at most {FLOAT32_MAX:.4g} (float32's smallest "
            "normal and largest: runs compute in float32)"
        )
    top = math.log(peak)
    schedule = cfg.schedule
    milestones = len(schedule.milestones or ())
    if schedule.name == "step" and schedule.gamma > 1 and milestones:
        top += milestones * math.log(schedule.gamma)
        if top > limit:
            raise UserError(
                f"schedule.gamma={schedule.gamma!r} multiplies the learning rate at each of "
                f"the {milestones} milestones: {peak:.4g} would reach {_exp(top)}, more than "
                f"{FLOAT32_MAX:.4g} (float32's largest: runs compute in float32)"
            )
    betas = cfg.optim.get("betas") if cfg.optim.name == "adam" else None
    if betas:
        first = top - math.log1p(-betas[0])  # Adam's first step: lr / (1 - beta1)
        if first > limit:
            raise UserError(
                f"optim.betas={list(betas)}: Adam's first step is the learning rate over "
                f"1 - beta1, {_exp(first)}, more than {FLOAT32_MAX:.4g} (float32's largest: "
                "runs compute in float32)"
            )


def _exp(log: float) -> str:
    return f"{math.exp(log):.4g}" if log < 709 else f"about 1e{log / math.log(10):.0f}"


#: Room below an experiment folder (and a data set's root) for the deepest path normbench
#: writes there: ``runs/<run id, 12>/`` and the longest file name in it, the temporary
#: name of checkpoint.pt (``.checkpoint.pt.<host>.<pid>.<8 hex>.tmp``: 100 bytes with a
#: 64-byte host name and a 7-digit pid). Hydra's sweep folders, submitit's logs and the
#: data sets' files lie less deep.
ROOM_BELOW = 128


def _path_limits(path: str) -> tuple[int, int]:
    """The file system's longest file name and path (in bytes, NUL excluded) where
    ``path`` is or would be created: asked of its nearest existing folder."""
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    limits = []
    for name, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            value = os.pathconf(probe or os.sep, name)
        except (OSError, ValueError, AttributeError):
            value = -1
        limits.append(value if value > 0 else default)
    return limits[0], limits[1] - 1


def _shown(text: str, width: int = 48) -> str:
    return text if len(text) <= width else f"{text[: width // 2]}...{text[-width // 2 :]}"


def _check_path_lengths(cfg) -> None:
    """``out_dir`` (with ``name``) and ``dataset.root`` within the file system's limits:
    every folder name at most NAME_MAX bytes, and every path normbench writes below them
    at most PATH_MAX, so that no run stops at its first checkpoint with 'File name too
    long'. Paths are counted absolute, as a sweep's jobs receive them."""
    experiment = os.path.join(os.path.abspath(cfg.out_dir), cfg.name)
    places = [("out_dir", cfg.out_dir, experiment)]
    root = cfg.dataset.get("root")
    if isinstance(root, str):
        places.append(("dataset.root", root, os.path.abspath(root)))
    for key, value, path in places:
        name_max, path_max = _path_limits(path)
        for part in path.split(os.sep):
            size = len(os.fsencode(part))
            if size > name_max:
                owner = "name" if key == "out_dir" and part == cfg.name else key
                raise UserError(
                    f"{owner}: File name too long: the folder name {_shown(part)!r} is "
                    f"{size} bytes, more than the {name_max} this file system allows"
                )
        size = len(os.fsencode(path)) + 1 + ROOM_BELOW
        if size > path_max:
            raise UserError(
                f"{key}={_shown(value)!r}: File name too long: with the files normbench "
                f"writes below it, paths would reach {size} bytes, more than the {path_max} "
                "this file system allows; pick a shorter path"
            )
