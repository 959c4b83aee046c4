"""Compose and describe normbench's config (Hydra's compose API).

Every way into normbench (``run``, ``config``, the sweeps) gets its config from
:func:`compose`, which turns Hydra's and OmegaConf's exceptions into one
:class:`~normbench.errors.UserError` naming what was wrong and what is valid,
and checks every value before anything runs (:mod:`normbench.validation`).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normbench import schema
from normbench.errors import UserError
from normbench.options import (
    GROUPS,
    REQUIRED_GROUPS,
    SEVERAL_GROUPS,
    add_config_dir,
    conf_dir,
    option_file,
    searchpath_overrides,
)
from normbench.schema import EXECUTION_KEYS, LAYOUTS  # noqa: F401 - the names callers know config by
from normbench.schema.rule import closest_key
from normbench.validation import (
    check_value,
    first_line,
    group_options,
    option_defaults,
    option_keys,
    unreadable_config,
    validate,
)

#: Every declared key's rule (``normbench.schema``), by its dotted name.
_RULES = schema.rules()


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


_closest = schema.closest

#: What a user may call a norm by (the name in a paper, torch's class) and the options
#: that are it, with a word on each where there are several. Only the suggestion of an
#: unknown option reads it: ``norm=BN`` stays an error, as Hydra's options are file names
#: (a ``BN.yaml`` of the user's own is another option). Keys are lowercase, without
#: ``_``, ``-``, spaces and a ``1d``/``2d``/``3d`` ending (:func:`_alias_key`).
NORM_ALIASES: dict[str, tuple[tuple[str, str], ...]] = {
    **dict.fromkeys(
        ("batchnorm", "bn", "batchnormalization"),
        (("custom_bn", "normbench's BatchNorm"), ("torch_bn", "torch.nn.BatchNorm2d")),
    ),
    **dict.fromkeys(("layernorm", "ln", "layernormalization"), (("layer", ""),)),
    **dict.fromkeys(("groupnorm", "gn", "groupnormalization"), (("group", ""),)),
    **dict.fromkeys(("instancenorm", "in", "instancenormalization"), (("instance", ""),)),
    **dict.fromkeys(("batchrenorm", "brn", "batchrenormalization"), (("batch_renorm", ""),)),
    **dict.fromkeys(("ghostbatchnorm", "ghostbn", "gbn"), (("ghost_bn", ""),)),
    **dict.fromkeys(("filterresponsenorm", "filterresponsenormalization"), (("frn", ""),)),
    **dict.fromkeys(("rmsnorm",), (("rms", ""),)),
    **dict.fromkeys(("evonorm", "evonorms0"), (("evonorm_s0", ""),)),
    **dict.fromkeys(("identity", "nonorm"), (("none", ""),)),
}


def _alias_key(value: str) -> str:
    folded = "".join(char for char in value.lower() if char not in "_- ")
    folded = folded.removeprefix("nn.").removeprefix("torch.nn.")
    return folded[:-2] if folded[-2:] in ("1d", "2d", "3d") else folded


def suggestion(group: str, value: str, valid: Sequence[str]) -> str:
    """`` (did you mean ...?)`` for an unknown option of ``group``: the options its common
    name stands for (``norm=BatchNorm``: custom_bn or torch_bn), else the closest by
    spelling, else nothing."""
    if group == "norm":
        meant = [(o, word) for o, word in NORM_ALIASES.get(_alias_key(value), ()) if o in valid]
        if meant:
            shown = [f"{o!r} ({word})" if word else repr(o) for o, word in meant]
            return f" (did you mean {' or '.join(shown)}?)"
    return _closest(value, valid)


#: Parsed overrides by their text: a sweep's jobs repeat the same few (``norm=layer``),
#: and Hydra's parser is slow enough per override to matter there. At most _PARSED_MAX
#: of them are kept (a long-lived process parsing ever new values, a grid of many seeds).
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
            raise UserError(f"cannot parse overrides: {first_line(err)}") from None
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
            if value is None and group in (*REQUIRED_GROUPS, *SEVERAL_GROUPS):
                raise UserError(f"{group} cannot be null; pick one of: {', '.join(valid)}")
            if isinstance(value, list) and group not in SEVERAL_GROUPS:
                raise UserError(
                    f"{override.input_line}: {group} takes one option; to run each, "
                    f"sweep them as {group}={','.join(map(str, value)) or 'a,b'}"
                )
            values = [] if value is None else [str(v) for v in _as_list(value)]
        for value in values:
            if value not in valid:
                raise UserError(
                    f"unknown {group} {value!r}{suggestion(group, value, valid)}; "
                    f"valid: {', '.join(valid)}"
                )
    return parsed


def _as_list(value) -> list:
    return list(value) if isinstance(value, list) else [value]


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
#: thousand runs composes a handful of times, not a thousand (Hydra's composition is
#: the slow part of planning).
_composed: dict[tuple[str, ...], _Composition] = {}
_COMPOSED_MAX = 64


class Plain(dict):
    """A composed config as plain nested dicts and lists, read as a DictConfig is read
    (``cfg.norm.name``, ``cfg.get("eval")``): what :func:`compose_plain` gives."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def _plain_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return Plain({key: _plain_copy(value) for key, value in node.items()})
    if isinstance(node, list):
        return [_plain_copy(value) for value in node]
    return node


class _Composition:
    """Hydra's composition for one set of structural overrides and, for
    :func:`compose_plain`, what its jobs share: the config as plain containers and the
    value each ``key=value`` override leaves in it (converted by OmegaConf to the key's
    type) or the message it fails with."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._plain: Any = _ABSENT
        self._scratch = None  # a copy of cfg that value overrides are applied to, one by one
        self._applied: dict[str, tuple[Any, str | None]] = {}

    def plain(self) -> tuple[Plain, dict[str, Any]] | None:
        """The config as :class:`Plain` containers, and flattened; None where a value
        override could change more than its own key (an interpolation, a missing value)."""
        from omegaconf import OmegaConf

        if self._plain is _ABSENT:
            tree = OmegaConf.to_container(self.cfg, resolve=False)
            flat = _flatten(tree)
            leaves = [v for v in flat.values() for v in (v if isinstance(v, list) else [v])]
            if any(isinstance(v, str) and ("${" in v or v == "???") for v in leaves):
                self._plain = None
            else:
                self._plain = (_plain_copy(tree), flat)
        return self._plain

    def applied(self, override, overrides: Sequence[str]) -> tuple[Any, str | None]:
        """What :func:`_apply` makes of ``override`` here: (the value, None), (None, its
        message) or (_ABSENT, None) where the value is not a plain one."""
        from omegaconf import Container, OmegaConf

        text = override.input_line
        if text not in self._applied:
            if self._scratch is None:
                self._scratch = copy.deepcopy(self.cfg)
            try:
                _apply(self._scratch, override, overrides)
            except UserError as err:
                self._applied[text] = (None, str(err))
            else:
                value = OmegaConf.select(self._scratch, override.key_or_group)
                plain = not isinstance(value, Container | dict | list)
                self._applied[text] = (value if plain else _ABSENT, None)
        return self._applied[text]


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
    are then checked against the schema and applied on top, as Hydra itself applies them
    after composition, so the jobs of a sweep that share their groups share one
    composition. A ``+key`` that the config does not have is refused: normbench reads no
    key it does not define.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides, structural, values = _split(overrides)
    base = _compose_groups(structural, overrides).cfg
    for override in values:
        if override.is_add() or override.is_force_add():
            _check_added_key(base, override)
    cfg = copy.deepcopy(base)
    for override in values:
        _apply(cfg, override, overrides)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise UserError(_schema_problem(err) or f"invalid config: {first_line(err)}") from None
    validate(cfg)
    return cfg


def _split(overrides: Sequence[str]) -> tuple[list[str], tuple[str, ...], list]:
    """:func:`compose`'s first checks: the overrides (with the user's config folders),
    the structural ones' texts and the value overrides (parsed)."""
    overrides = with_searchpath(overrides)
    parsed = check_group_overrides(overrides)
    for override in parsed:
        if override.is_sweep_override() and not override.key_or_group.startswith("hydra"):
            raise UserError(
                f"{override.input_line} gives several values: that is a sweep, which "
                "`normbench sweep` runs one job per value; here give one value"
            )
    structural = tuple(o.input_line for o in parsed if not _is_value_override(o))
    return overrides, structural, [o for o in parsed if _is_value_override(o)]


def compose_plain(overrides: Sequence[str] = ()):
    """The config :func:`compose` gives, with its values and its errors, as :class:`Plain`
    containers: what a sweep's plan reads of a job (its run id, its folder) without an
    OmegaConf copy per job, the slow part of composing.

    The jobs that share their structural overrides share Hydra's composition, as for
    :func:`compose`; each value override is applied once per composition by
    :func:`_apply` (its conversion to the key's type, or its message) and its value set
    in a plain copy, which :func:`~normbench.validation.validate` then checks whole, as
    it checks a composed config. Where a value override could change more than its own
    key's value (``+key``, ``~key``, a group's option name, a mapping or a list, an
    interpolation in the config or the value), the config is :func:`compose`'s own."""
    overrides, structural, values = _split(overrides)
    composition = _compose_groups(structural, overrides)
    plain = composition.plain()
    if plain is None:
        return compose(overrides)
    tree, flat = plain
    settings = []
    for override in values:
        key = override.key_or_group
        value = override.value()
        if (
            override.is_add()
            or override.is_force_add()
            or override.is_delete()
            or key not in flat
            or isinstance(flat[key], list)
            or (key.partition(".")[0] in GROUPS and key.partition(".")[2] == "name")
            or not isinstance(value, str | int | float | bool | type(None))
            or (isinstance(value, str) and "${" in value)
        ):
            return compose(overrides)
        value, problem = composition.applied(override, overrides)
        if problem is not None:
            raise UserError(problem)
        if value is _ABSENT:
            return compose(overrides)
        settings.append((key, value))
    cfg = _plain_copy(tree)
    for key, value in settings:
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = value
    validate(cfg)
    return cfg


_ABSENT = object()


def _apply(cfg, override, overrides: Sequence[str]) -> None:
    """One value override (``key=value``, ``++key=value``, ``~key``) applied to ``cfg``
    as Hydra applies it, once the schema has checked the value."""
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    key = override.key_or_group
    value = override.value()
    found = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    if found is _ABSENT:
        if override.is_delete():
            raise UserError(f"invalid config: cannot delete {key!r}: it is not in the config")
        raise UserError(_unknown_key(key, overrides, _flatten(cfg)))
    try:
        if override.is_delete():
            if value is not None and value != found:
                raise UserError(
                    f"invalid config: cannot delete {key!r}: its value is {found!r}, not {value!r}"
                )
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            with open_dict(node):
                del node[leaf]
        else:
            if hasattr(found, "items") and not isinstance(value, dict):
                keys = ", ".join(found)
                raise UserError(f"{key} holds keys ({keys}): set one of them, as {key}.KEY=VALUE")
            # an interpolation (${...}) is checked once resolved, by validate()
            if not (isinstance(value, str) and "${" in value):
                problem = check_value(key, value, cfg)
                if problem is not None:
                    raise UserError(problem)
            OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as err:
        raise UserError(_schema_problem(err) or f"invalid config: {first_line(err)}") from None


def _schema_problem(err: BaseException) -> str | None:
    """For OmegaConf refusing a value of a key the schema declares (in a YAML file Hydra
    merged, or once resolved): the schema's message, from the key and value OmegaConf
    names; None for anything else."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        key = getattr(err, "full_key", None)
        if isinstance(key, str) and key in _RULES:
            value = getattr(err, "value", None)
            return check_value(key, value) or f"{key} must be {_RULES[key].text}, got {value!r}"
        err = err.__cause__ or err.__context__
    return None


def _initialized():
    """Hydra initialized on normbench's configs (a context manager)."""
    from hydra import initialize_config_dir

    return initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3")


def _compose_groups(structural: tuple[str, ...], overrides: Sequence[str]) -> _Composition:
    import yaml
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if structural not in _composed:
        try:
            with _initialized():
                cfg = hydra_compose(config_name="config", overrides=list(structural))
        except (HydraException, OmegaConfBaseException) as err:
            raise UserError(_composition_message(err, overrides)) from None
        except AssertionError as err:  # OmegaConf's, for a key set below a null value
            found = _hydra_override_problem(parse_overrides(structural))
            if found is None:
                raise
            raise UserError(found) from err
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:  # a config folder's file
            raise UserError(unreadable_config(err)) from None
        if len(_composed) >= _COMPOSED_MAX:
            _composed.pop(next(iter(_composed)))
        _composed[structural] = _Composition(cfg)
    return _composed[structural]


def _hydra_override_problem(parsed: Sequence) -> str | None:
    """What is wrong with the overrides of Hydra's own config, found by checking them
    against it: a ``hydra/<group>`` option it does not have (a launcher whose plugin is
    not installed), a ``hydra.*`` key it does not have (which needs a +), or a key set
    below a null value (``hydra.sweeper.params.norm=x`` when no experiment preset sets
    ``hydra.sweeper.params``); None when none is wrong."""
    from hydra import compose as hydra_compose
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    picked = [o for o in parsed if "/" in o.key_or_group and not o.is_delete()]
    groups = [
        o.input_line
        for o in parsed
        if o.key_or_group in GROUPS or "/" in o.key_or_group or o.key_or_group == "hydra.searchpath"
    ]
    dotted = [o for o in parsed if "." in o.key_or_group and not o.is_delete()]
    try:
        with _initialized():
            loader = GlobalHydra.instance().config_loader()
            for override in picked:
                value = override.value()
                options = loader.get_group_options(override.key_or_group)
                if not options or not isinstance(value, str) or value in options:
                    continue
                return _unknown_hydra_option(override.key_or_group, value, options)
            cfg = hydra_compose("config", overrides=groups, return_hydra_config=True)
    except Exception:  # the first error stands: this was to say it better
        return None
    launcher = next((o.value() for o in parsed if o.key_or_group == "hydra/launcher"), "basic")
    for override in dotted:
        parts = override.key_or_group.split(".")
        for depth in range(1, len(parts) + 1):
            parent = ".".join(parts[:depth])
            value = OmegaConf.select(cfg, parent, default=_ABSENT, throw_on_missing=False)
            if value is _ABSENT:
                if parts[0] != "hydra" or override.is_add() or override.is_force_add():
                    break
                # Launchers take settings their config does not list (ray.init's num_cpus);
                # a key spelled like one it lists is likely that one misspelled (n_jobz)
                above = OmegaConf.select(cfg, ".".join(parts[: depth - 1]), default=None)
                keys = list(above.keys()) if OmegaConf.is_dict(above) else []
                near = difflib.get_close_matches(parts[depth - 1], [str(k) for k in keys], n=1)
                meant = ".".join([*parts[: depth - 1], near[0]]) if near else ""
                return (
                    f"{override.key_or_group} is not in Hydra's config (with hydra/launcher="
                    f"{launcher}{f'; did you mean {meant}?' if meant else ''}); to add a "
                    f"setting it leaves out, prefix a +: +{override.input_line.lstrip('+~')}"
                )
            if value is None and depth < len(parts):
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


def _unknown_hydra_option(group: str, value: str, options: Sequence[str]) -> str:
    extra = LAUNCHER_EXTRAS.get(value) if group == "hydra/launcher" else None
    if extra:
        return (
            f"{group}={value} is not installed; it comes with normbench's {extra!r} "
            f'extra: pip install "normbench[{extra}]" (in a clone: pip install -e ".[{extra}]")'
        )
    return f"unknown {group}={value}; available: {', '.join(options)}"


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
            f"unknown config key {key!r}{closest_key(key, _flatten(base))}; normbench reads "
            "only the keys it defines, so a + cannot add one (`normbench config` shows every key)"
        )
    if override.is_add():
        raise UserError(
            f"{key} is already in the config: set it without the +, as {override.input_line[1:]}"
        )


#: The extra that installs each of Hydra's launcher plugins.
LAUNCHER_EXTRAS = {
    "joblib": "parallel",
    "submitit_slurm": "slurm",
    "submitit_local": "slurm",
    "ray": "ray",
    "ray_aws": "ray",
}


def _composition_message(err: BaseException, overrides: Sequence[str]) -> str:
    """What the user got wrong when Hydra could not compose, found by checking the
    overrides (against the schema, Hydra's options and Hydra's config), not by reading
    Hydra's message, which is long and names its internals."""
    found = _schema_problem(err) or _hydra_override_problem(parse_overrides(overrides))
    return found or f"invalid config: {first_line(err)}"


def _unknown_key(key: str, overrides: Sequence[str], keys: Sequence[str]) -> str:
    """For ``key=value`` where the config (whose keys are ``keys``, as composed with the
    options the overrides pick) has no ``key``: another option of its group that has it,
    or the closest key, among its neighbours' first (:func:`~normbench.schema.rule.closest_key`)."""
    other = _other_options_key(key, overrides)
    if other:
        return other
    hint = closest_key(key, keys) or _other_options_closest(key)
    return f"unknown config key {key!r}{hint}; `normbench config` shows every key"


def _other_options_closest(key: str) -> str:
    """`` (did you mean 'norm.groups'? norm=group has it)`` for ``norm.grups`` where the
    chosen option has no key near it: the nearest key of the group's other options (those
    of normbench and the user's folders: installed variants are not imported for this)."""
    group, _, rest = key.partition(".")
    if group not in GROUPS or not rest:
        return ""
    having: dict[str, list[str]] = {}
    for option in group_options(group):
        for name in option_keys(group, option, load=False):
            if name not in ("name", "_target_"):
                having.setdefault(name, []).append(option)
    matches = difflib.get_close_matches(rest, list(having), n=1)
    if not matches:
        return ""
    options = having[matches[0]]
    which = " or ".join(f"{group}={o}" for o in options[:3]) + (" ..." if len(options) > 3 else "")
    verb = "has" if len(options) == 1 else "have"
    return f" (did you mean '{group}.{matches[0]}'? {which} {verb} it)"


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
    own = sorted(k for k in option_defaults(group, chosen) if k != "name")
    verb = "has" if len(having) == 1 else "have"
    return (
        f"{group}={chosen} has no {rest} ({', '.join(having)} {verb} it); "
        f"{group}={chosen} takes: {', '.join(own) or 'nothing'}"
    )


_flatten = schema.flat


def flatten(cfg) -> dict[str, Any]:
    """The config as one flat record of plain values: ``{"norm.name": "custom_bn", ...}``."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    return _flatten(container)
