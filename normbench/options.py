"""Where the config groups' options are: normbench's own ``conf/`` (package data, in a
wheel as in a checkout) and the config folders a user adds (``--config-dir``).

Low in the house: the norm registry asks here for a user's norm's YAML file, and
:mod:`normbench.config` composes from these folders.
"""

from __future__ import annotations

from pathlib import Path

from normbench import schema
from normbench.errors import UserError

#: The config groups; their options are the YAML files in ``normbench/conf/<group>/``.
GROUPS: tuple[str, ...] = (*schema.config_groups(), "experiment")

#: Groups a run cannot do without (``experiment`` and ``logger`` are optional).
REQUIRED_GROUPS: tuple[str, ...] = schema.required_groups()

#: Groups of which a run may pick several options at once, as a list (Hydra merges them):
#: ``logger=[tensorboard,mlflow]``.
SEVERAL_GROUPS: tuple[str, ...] = ("logger",)


def conf_dir() -> Path:
    """The configs, ``normbench/conf/``: package data, in a wheel as in a checkout."""
    return schema.CONF_DIR


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
    """normbench's own config folder, then the user's."""
    return [conf_dir(), *_user_dirs]


def user_dirs() -> list[Path]:
    """The config folders the user added, in the order given."""
    return list(_user_dirs)


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


def adopt_config_dir(folder: Path) -> None:
    """Search ``folder`` too, quietly: a job's process takes the folders its driver was
    given (its warnings were the driver's to give)."""
    if folder not in _user_dirs:
        _user_dirs.append(folder)
