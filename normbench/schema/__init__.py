"""normbench's config schema and its run record, each declared once.

- :mod:`~normbench.schema.rule`: what a value must be (the rules, in the user's words)
  and the allowed values and float32 limits they name.
- :mod:`~normbench.schema.config`: the config as dataclasses, one per group, each field
  with its type, rule, help and whether it is an execution key (left out of the run id);
  the declared keys, :data:`EXECUTION_KEYS`, and :func:`register`, which stores them in
  Hydra's ConfigStore as the base of ``conf/config.yaml``.
- :mod:`~normbench.schema.reference`: the configuration reference in Markdown, made from
  the schema (the manual's configuration page).
- :mod:`~normbench.schema.record`: :class:`RunRecord`, what a run writes to summary.json,
  and what its readers derive from it (:func:`record_fields`).

The names other modules use are re-exported here: ``from normbench.schema import X``.
Nothing here imports torch, Hydra or OmegaConf at import time: ``normbench --help`` reads
this package.
"""

from __future__ import annotations

from normbench.schema.config import (
    CONF_DIR,
    EXECUTION_KEYS,
    MISSING,
    MLP,
    OPTION_SCHEMAS,
    RENORM_PHASES,
    SECTIONS,
    SGD,
    Adam,
    Checkpoint,
    Config,
    Dataset,
    Eval,
    Key,
    NormArgs,
    Report,
    ResNet20,
    Schedule,
    SmallCNN,
    config_groups,
    declared_keys,
    flat,
    group,
    group_keys,
    key,
    register,
    required_groups,
    root_keys,
    rules,
)
from normbench.schema.record import (
    STATUSES,
    RecordField,
    RunRecord,
    config_slots,
    record_fields,
    recorded,
)
from normbench.schema.reference import reference_markdown
from normbench.schema.rule import (
    BACKENDS,
    BUDGETS,
    DEVICES,
    FLOAT32_MAX,
    FLOAT32_TINY,
    LAYOUTS,
    LR_SCALINGS,
    MEMORY_FORMATS,
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
    closest,
    is_int,
    is_number,
)

__all__ = [
    "BACKENDS",
    "BUDGETS",
    "CONF_DIR",
    "DEVICES",
    "EXECUTION_KEYS",
    "FLOAT32_MAX",
    "FLOAT32_TINY",
    "LAYOUTS",
    "LR_SCALINGS",
    "MEMORY_FORMATS",
    "MISSING",
    "MLP",
    "OPTION_SCHEMAS",
    "RENORM_PHASES",
    "SCHEDULES",
    "SECTIONS",
    "SGD",
    "STATUSES",
    "Adam",
    "Betas",
    "Checkpoint",
    "Choice",
    "Config",
    "Dataset",
    "Eval",
    "Flag",
    "Fractions",
    "Key",
    "Keys",
    "NormArgs",
    "Number",
    "Option",
    "RecordField",
    "Report",
    "ResNet20",
    "Rule",
    "RunRecord",
    "Schedule",
    "SmallCNN",
    "Split",
    "Text",
    "Whole",
    "Wholes",
    "closest",
    "config_groups",
    "required_groups",
    "config_slots",
    "declared_keys",
    "flat",
    "group",
    "group_keys",
    "is_int",
    "is_number",
    "key",
    "record_fields",
    "recorded",
    "reference_markdown",
    "register",
    "root_keys",
    "rules",
]
