"""The checks a composed config passes before anything runs, beyond each key's own rule.

Every key gets a type and a range check, in the user's words, before anything is built: a
value that passes here does not crash a model, a norm or an optimizer later. A key the
schema declares is checked by its rule (:mod:`normbench.schema`); any other key of a group
option (a new variant's own argument) must have the type of its default in its YAML. Then
the checks that span keys: the learning rate a run reaches (after batch-size scaling, the
step schedule and Adam's first step) within float32, the experiment's and data set's paths
within the file system's limits, and the device.

What the checks compare against is here too: each config group's options (normbench's,
the user's folders', installed variants') and an option's keys and defaults.
:mod:`normbench.config` composes and calls :func:`validate`; this module does not import
it.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

from normbench import schema
from normbench.errors import UserError
from normbench.options import REQUIRED_GROUPS, config_dirs, option_file, user_dirs
from normbench.schema import DEVICES, FLOAT32_MAX, FLOAT32_TINY

#: Every declared key's rule (``normbench.schema``), by its dotted name.
_RULES = schema.rules()


def group_options(group: str) -> list[str]:
    """The options of one config group, sorted by name: normbench's, the user's folders'
    and, for ``norm``, the variants installed packages declare (entry points)."""
    names = {p.stem for folder in config_dirs() for p in (folder / group).glob("*.yaml")}
    if group == "norm":
        from normbench.norms.registry import entry_point_norms

        names |= set(entry_point_norms())
    return sorted(names)


def first_line(err: BaseException) -> str:
    """An exception's message, its first line only (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def unreadable_config(err: BaseException) -> str:
    """A config file Hydra could not read (a user's config folder's: PyYAML's error, an
    OSError, bytes that are not UTF-8) as one line naming the file, where and what."""
    import yaml

    if isinstance(err, OSError):
        return f"cannot read the config file {err.filename}: {err.strerror or err}"
    if isinstance(err, UnicodeDecodeError):  # which file, Python's error does not say
        undecodable = []
        for path in sorted(p for d in user_dirs() for p in d.glob("*/*.yaml")):
            try:
                path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                undecodable.append(str(path))
        where = ", ".join(undecodable) or "a file of " + ", ".join(map(str, user_dirs()))
        return f"{where}: not UTF-8 text: {first_line(err)}"
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if isinstance(err, yaml.MarkedYAMLError) and mark is not None:
        what = "; ".join(str(part) for part in (err.context, err.problem) if part)
        return (
            f"{mark.name}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: "
            f"{what or first_line(err)}"
        )
    if isinstance(err, yaml.reader.ReaderError):
        return f"{err.name}: invalid YAML at character {err.position}: {first_line(err)}"
    return f"a config file is not valid YAML: {first_line(err)}"


_is_int = schema.is_int
_is_number = schema.is_number


def _by_default(default: Any):
    """The type check of a key with no rule: the type of its default value."""
    if isinstance(default, bool):
        return schema.Flag().check
    if _is_int(default):
        return lambda value: None if _is_int(value) else "an integer"
    if isinstance(default, float):
        return lambda value: None if _is_number(value) else "a number"
    if isinstance(default, str):
        return lambda value: None if isinstance(value, str) else "a string"
    if isinstance(default, list | tuple):
        return lambda value: None if isinstance(value, list | tuple) else "a list"
    return lambda value: None  # null default: any value


def option_defaults(group: str, option: str, load: bool = True) -> dict[str, Any]:
    """An option's keys and their defaults, flat (an installed variant's: its constructor's;
    ``load``: import it to find them); a :class:`UserError` when its file does not load."""
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
    if not isinstance(loaded, dict):
        return {}
    return schema.flat({k: v for k, v in loaded.items() if k != "defaults"})  # its schema's name


def option_keys(group: str, option: str, load: bool = True) -> dict[str, Any]:
    """An option's keys and defaults (:func:`option_defaults`); {} for one whose file
    does not load (that is said when it is picked)."""
    try:
        return option_defaults(group, option, load=load)
    except UserError:
        return {}


def _flatten(cfg) -> dict[str, Any]:
    """A composed config's keys and resolved values (``normbench.config.flatten``, which
    callers use; validation stays below config). ``cfg``: a DictConfig, or plain
    containers (``normbench.config.compose_plain``'s)."""
    from omegaconf import OmegaConf

    return schema.flat(cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True))


@functools.cache
def _root_key_names() -> tuple[str, ...]:
    return tuple(item.name for item in schema.root_keys())


def validate(cfg) -> None:
    """Check every value a user can set; raise :class:`UserError` on the first bad one.
    The replaced keys are translated in place (:func:`settle`).

    Limits that depend on the data (batch size vs training set) and on the norm's
    own arguments are checked where those are known: in the runner, before it writes.
    """
    for group in REQUIRED_GROUPS:
        node = cfg.get(group)
        if not hasattr(node, "get") or not isinstance(node.get("name"), str):
            valid = ", ".join(group_options(group))
            raise UserError(f"{group} is missing ({group}=null or ~{group}); pick one of: {valid}")
    flat = _flatten(cfg)
    for key, value in flat.items():
        problem = check_value(key, value, cfg)
        if problem is not None:
            raise UserError(problem)
    settle(cfg)
    flat = _flatten(cfg)
    for name in _root_key_names():
        if name not in flat and name not in REPLACED:
            # ~key: normbench reads every key it declares
            raise UserError(f"{name} is missing (~{name}): normbench reads it; set a value instead")
    _require(
        os.sep not in cfg.name and cfg.name not in (".", ".."),
        "name",
        "a folder name (no path separators)",
        cfg.name,
    )
    _check_learning_rate(cfg)
    _check_renorm_schedule(cfg)
    _check_path_lengths(cfg)
    if cfg.device == "cuda" and not _elsewhere:
        resolve_device("cuda")
    from normbench.distributed import check_parallel  # (imports no torch)

    # the device only where it matters: resolving auto imports torch
    check_parallel(cfg, _device_of(cfg) if cfg.precision == "fp16" else cfg.device)


#: Set by :class:`jobs_elsewhere`: the configs checked are jobs that run on other
#: machines, whose devices are not this one's.
_elsewhere = False


class jobs_elsewhere:  # noqa: N801 - a context, used as ``with validation.jobs_elsewhere():``
    """Inside it, :func:`validate` checks configs of jobs that run on other machines (a
    sweep planned on a cluster's login node for its GPU nodes): ``device=cuda`` needs no
    CUDA here, and ``precision=fp16`` is refused only with ``device=cpu``. Each job checks
    its device where it runs (its run, if it has none, records the same one line)."""

    def __init__(self, on: bool = True) -> None:
        self.on = on

    def __enter__(self) -> None:
        global _elsewhere
        self.before, _elsewhere = _elsewhere, self.on or _elsewhere

    def __exit__(self, *exc) -> None:
        global _elsewhere
        _elsewhere = self.before


def _device_of(cfg) -> str:
    """The device a run of ``cfg`` resolves to: here, or, for a job that runs elsewhere,
    CUDA unless it asks for the CPU (``auto`` finds the GPU there)."""
    if _elsewhere:
        return "cpu" if cfg.device == "cpu" else "cuda"
    return resolve_device(cfg.device)


#: Keys the schema replaced, still read: each with the key that holds its value now. A
#: composed config never holds them (:func:`settle`), so no run id depends on them.
REPLACED = {"eval.precise_bn_batches": "eval.precise_bn_images"}


def settle(cfg, notify: bool = True) -> None:
    """Put ``cfg`` (checked) in the one form a run's id is taken from, in place:

    - ``eval.precise_bn_batches`` (the key ``eval.precise_bn_images`` replaced), when
      given, sets ``precise_bn_images`` to ``precise_bn_batches x batch_size`` (the
      images PreciseBN averaged with it), with a :class:`~normbench.errors.Notice` when
      ``notify``; the key is dropped either way.
    - Of a Batch Renorm phase given as a count of steps (``norm.warmup_steps``), the share
      (``norm.warmup_fraction``) is set to null: the count wins, and a share that changes
      nothing changes no run id.

    Settling a settled config changes nothing (the runner settles the configs Hydra
    composes for a sweep's jobs)."""
    _settle_precise_bn(cfg, notify)
    norm = cfg.get("norm")
    if hasattr(norm, "items"):
        for share, count in schema.RENORM_PHASES:
            if norm.get(count) is not None and norm.get(share) is not None:
                norm[share] = None


def _settle_precise_bn(cfg, notify: bool) -> None:
    import contextlib
    import warnings

    from omegaconf import OmegaConf, open_dict

    from normbench.errors import Notice

    section = cfg.get("eval")
    if hasattr(section, "items") and "precise_bn_batches" in section:
        batches = section.precise_bn_batches
        if batches is not None:
            if not all(schema.is_int(n) and n >= 1 for n in (batches, cfg.get("batch_size"))):
                return  # not a count of batches: left for validate to name, in its words
            images = batches * cfg.batch_size
            section.precise_bn_images = images
            if notify:
                warnings.warn(
                    f"eval.precise_bn_batches={batches} is replaced by eval.precise_bn_images: "
                    f"read as {images} images ({batches} batches of batch_size="
                    f"{cfg.batch_size})",
                    Notice,
                    stacklevel=3,  # settle's caller
                )
        # (plain containers, compose_plain's, take any key: nothing to open)
        with open_dict(section) if OmegaConf.is_config(section) else contextlib.nullcontext():
            del section["precise_bn_batches"]


def _check_renorm_schedule(cfg) -> None:
    """Batch Renorm's phases: each given as a share or a count (:func:`settle` nulled the
    share of a count), and the shares together at most the whole run."""
    norm = cfg.norm
    shares = []
    for share, count in schema.RENORM_PHASES:
        if share in norm or count in norm:
            if norm.get(share) is None and norm.get(count) is None:
                raise UserError(
                    f"norm.{share} and norm.{count} are both null: set one of them "
                    f"(norm.{share}: a share of the run's training steps)"
                )
            if norm.get(share) is not None:
                shares.append((share, norm.get(share)))
    # (a float's rounding tolerated: 0.7 + 0.3 is whole)
    if len(shares) > 1 and math.fsum(value for _, value in shares) > 1 + 1e-12:
        given = " + ".join(f"norm.{name}={value!r}" for name, value in shares)
        raise UserError(f"{given} must be at most 1: the phases' shares of the run's steps")


def check_value(key: str, value: Any, cfg=None) -> str | None:
    """What is wrong with ``key=value`` (the message), or None: the schema's rule for a
    key it declares; for another key of a group option, the type of its default there
    (``cfg``: the config, to know which option)."""
    rule = _RULES.get(key)
    if rule is not None:
        problem = rule.check(value, group_options)
    else:
        group, _, rest = key.partition(".")
        if cfg is None or group not in REQUIRED_GROUPS or not rest or rest == "name":
            return None
        default = option_defaults(group, cfg[group].name).get(rest)
        problem = _by_default(default)(value)
    return None if problem is None else f"{key} must be {problem}, got {value!r}"


def resolve_device(name: str, spelled: str = "device=") -> str:
    """``auto`` as the device it picks; a :class:`UserError` for an unknown device or for
    cuda where CUDA is not available (``spelled``: how the user set it, ``--device ``)."""
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")
    import torch

    available = torch.cuda.is_available()
    if name == "cuda" and not available:
        raise UserError(f"{spelled}cuda but CUDA is not available here; use {spelled}auto or cpu")
    return ("cuda" if available else "cpu") if name == "auto" else name


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
