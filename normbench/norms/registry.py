"""The single registry of normalization variants.

A variant is a ``torch.nn.Module`` class registered under a config name; every
class takes ``(num_channels, **kwargs)`` and normalises channels-first input
``(N, C, *)``. Models ask this registry for their layers, so registering a class
(plus one YAML file in ``normbench/conf/norm/``) is all it takes to add a variant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from normbench.errors import UserError

_REGISTRY: dict[str, type] = {}

#: The entry-point group through which an installed package adds variants:
#: ``[project.entry-points."normbench.norms"] mynorm = "mypkg.norms:MyNorm"``.
ENTRY_POINT_GROUP = "normbench.norms"


def register_norm(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` available as ``norm=<name>``."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"norm {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorate


def norm_names() -> list[str]:
    """Registered variant names, in registration order (normbench's own only; installed
    packages' are :func:`entry_point_norms`)."""
    return list(_REGISTRY)


def get_norm(name: str) -> type:
    """The class of variant ``name``: normbench's own, or an installed package's."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    installed = entry_point_norms()
    if name in installed:
        return installed[name].load()
    valid = [*norm_names(), *installed]
    raise UserError(f"unknown norm {name!r}; valid: {', '.join(valid)}")


def load_class(target: str) -> type:
    """The class a dotted path (``mypkg.norms.MyNorm``, or ``mypkg.norms:MyNorm``) names;
    a :class:`UserError` saying why when it cannot be imported."""
    from hydra.utils import get_class

    try:
        return get_class(target.replace(":", "."))
    except Exception as err:  # ImportError, AttributeError, Hydra's wrapper of them
        reason = " ".join(str(err).split())[:300]
        raise UserError(f"cannot import the norm class {target!r}: {reason}") from None


@dataclass(frozen=True)
class InstalledNorm:
    """A variant an installed package declares (entry point group ``normbench.norms``)."""

    name: str
    target: str  # module:Class, as the entry point gives it

    def load(self) -> type:
        return load_class(self.target)

    def describe(self) -> str:
        try:
            doc = (self.load().__doc__ or "").strip()
        except UserError as err:
            return f"(from {self.target}; {err})"
        return (doc.splitlines()[0] if doc else "") + f" (installed: {self.target})"

    def config(self) -> dict[str, Any]:
        """Its config: the name, the class, and the constructor's plain defaults."""
        import inspect

        node: dict[str, Any] = {"name": self.name, "_target_": self.target.replace(":", ".")}
        try:
            parameters = list(inspect.signature(self.load()).parameters.values())[1:]
        except (UserError, TypeError, ValueError):
            return node  # the error is told when the norm is built
        for parameter in parameters:
            value = parameter.default
            if value is not inspect.Parameter.empty and (
                value is None or isinstance(value, bool | int | float | str)
            ):
                node[parameter.name] = value
        return node


def entry_point_norms() -> dict[str, InstalledNorm]:
    """The variants installed packages declare, by name (normbench's own names win)."""
    from importlib.metadata import entry_points

    found = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name not in _REGISTRY:
            found[point.name] = InstalledNorm(point.name, point.value)
    return found


_stored: set[str] = set()


def store_entry_point_configs() -> None:
    """Make ``norm=<name>`` compose for every installed variant: its config goes to
    Hydra's ConfigStore (which a sweep's jobs receive with Hydra's state)."""
    from hydra.core.config_store import ConfigStore

    for name, installed in entry_point_norms().items():
        if name not in _stored:
            ConfigStore.instance().store(group="norm", name=name, node=installed.config())
            _stored.add(name)


@dataclass(frozen=True)
class NormSpec:
    """A variant plus its keyword arguments: call it with a channel count to get a layer.

    Models receive a ``NormSpec`` and never see the variant's name or options.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: the class's dotted path for a variant from the user's config folder (``_target_``)
    target: str | None = None

    @property
    def cls(self) -> type:
        return load_class(self.target) if self.target else get_norm(self.name)

    @property
    def centers(self) -> bool:
        """Whether the layer subtracts a mean, which makes a preceding bias redundant."""
        return getattr(self.cls, "centers", True)

    @property
    def needs_spatial(self) -> bool:
        """Whether the layer needs spatial dimensions (instance norm on (N, C) is meaningless)."""
        return getattr(self.cls, "needs_spatial", False)

    @property
    def carries_activation(self) -> bool:
        """Whether the layer ends in its own nonlinearity (FRN's TLU, EvoNorm's gate)."""
        return getattr(self.cls, "carries_activation", False)

    @property
    def prefers_channels_last(self) -> bool:
        """Whether the layer is at least as fast on channels_last activations, so that
        ``memory_format=auto`` picks that layout for it on the CPU; False for a variant
        that does not say (it may ``view`` its input as contiguous)."""
        return getattr(self.cls, "prefers_channels_last", False)

    @property
    def fuses_relu(self) -> bool:
        """Whether the layer takes ``relu=True`` to apply the ReLU after it in its own
        passes (normbench's BatchNorm on its kernel, and its subclasses whose constructor
        still takes it)."""
        import inspect

        cls = self.cls
        if not getattr(cls, "fuses_relu", False):
            return False
        parameters = inspect.signature(cls).parameters.values()
        return any(p.name == "relu" or p.kind is p.VAR_KEYWORD for p in parameters)

    def __call__(self, num_channels: int):
        return self.cls(num_channels, **self.kwargs)

    def with_activation(self, num_channels: int):
        """``(layer, activation)`` where a model applies the norm and then a ReLU: the
        layer with the ReLU fused in and ``nn.Identity`` after it where the variant fuses
        it, else the layer and :meth:`activation`. Two modules either way, neither of the
        second with parameters, so a model's state_dict keys are the same for all."""
        from torch import nn

        if self.fuses_relu:
            return self.cls(num_channels, relu=True, **self.kwargs), nn.Identity()
        return self(num_channels), self.activation()

    def activation(self):
        """What a model puts after the layer where it would put a ReLU: a ReLU, or nothing
        (``nn.Identity``) when the layer carries its own activation. A module without
        parameters, so state_dict keys are the same either way."""
        from torch import nn

        return nn.Identity() if self.carries_activation else nn.ReLU(inplace=True)
