"""The configuration reference, in Markdown, made from the schema.

:func:`reference_markdown` gives one table per group of keys, with each key's type,
default (read from normbench's YAML files), allowed values (its rule's words), whether it
is an execution key and its help. The manual's configuration page is this text
(``docs/hooks.py``), so it cannot drift from what the checks use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from normbench.schema.config import (
    CONF_DIR,
    SECTIONS,
    Config,
    Key,
    config_groups,
    flat,
    group_keys,
    root_keys,
)


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
