"""The single registry of normalization variants.

A variant is a ``torch.nn.Module`` class registered under a config name; every
class takes ``(num_channels, **kwargs)`` and normalises channels-first input
``(N, C, *)``. Models ask this registry for their layers, so registering a class
(plus one YAML file in ``normbench/conf/norm/``) is all it takes to add a variant.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from normbench.errors import UserError
from normbench.interrupts import Interrupted

_REGISTRY: dict[str, type] = {}

#: The entry-point group through which an installed package adds variants:
#: ``[project.entry-points."normbench.norms"] mynorm = "mypkg.norms:MyNorm"``.
ENTRY_POINT_GROUP = "normbench.norms"


def register_norm(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` available as ``norm=<name>``."""

    def decorate(cls: type) -> type:
        if not _builtin(cls):  # a name normbench's own variants take is refused
            _load()
        if name in _REGISTRY:
            raise ValueError(f"norm {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorate


#: normbench's own variants: each module of this package and the names it gives the package
#: (``normbench.norms.BatchNorm2d``), in the order ``norm_names()`` lists their variants.
VARIANTS: dict[str, tuple[str, ...]] = {
    "batchnorm": ("BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "TorchBatchNorm"),
    "groupnorm": ("GroupNorm", "InstanceNorm", "LayerNorm", "group_count"),
    "batchrenorm": ("BatchRenorm", "BatchRenorm2d"),
    "ghostbn": ("GhostBatchNorm",),
    "identity": ("NoNorm",),
    "frn": ("FilterResponseNorm",),
    "rmsnorm": ("RMSNorm",),
    "evonorm": ("EvoNormS0",),
    "syncbn": ("SyncBatchNorm",),
}


def load_variants() -> None:
    """Import every variant's module (registering its variants); at once after the first.
    They import torch: a command that only composes configs never calls this."""
    from importlib import import_module

    for module in VARIANTS:
        import_module(f"{__package__}.{module}")


def _builtin(cls: type) -> bool:
    package, _, module = cls.__module__.rpartition(".")
    return package == __package__ and module in VARIANTS


def _load() -> dict[str, type]:
    """The registry, with every one of normbench's own variants in it (their modules
    import torch, so they are imported when first asked for, not with the package)."""
    load_variants()
    return _REGISTRY


def norm_names() -> list[str]:
    """Registered variant names, normbench's own in ``normbench.norms.VARIANTS``' order
    (whichever module was imported first), then any registered since (normbench's own
    only; installed packages' are :func:`entry_point_norms`)."""
    order = list(VARIANTS)

    def rank(name: str) -> int:
        cls = _load()[name]
        module = cls.__module__.rpartition(".")[2]
        return order.index(module) if _builtin(cls) else len(order)

    return sorted(_load(), key=rank)  # stable: a module's variants in their own order


def get_norm(name: str) -> type:
    """The class of variant ``name``: normbench's own, or an installed package's (only
    that package's entry point is imported)."""
    if name in _load():
        return _REGISTRY[name]
    installed = entry_point_norms()
    if name in installed:
        return installed[name].load()
    valid = [*norm_names(), *installed]
    raise UserError(f"unknown norm {name!r}; valid: {', '.join(valid)}")


def norm_class(target: str) -> type:
    """The class ``normbench check-norm TARGET`` names: a dotted path (``mypkg.MyNorm``,
    ``mypkg:MyNorm``) or a variant's name."""
    if "." in target or ":" in target:
        return load_class(target)
    if target in _load() or target in entry_point_norms():
        return get_norm(target)
    raise UserError(f"{target!r} is neither a dotted class path nor a norm's name")


def error_text(err: BaseException) -> str:
    """``str(err)``, whatever the exception's class (a user's) does: its ``__str__`` may
    raise, so its ``repr`` then, and ``<unprintable ...>`` when that raises too."""
    try:
        return str(err.code if isinstance(err, SystemExit) and err.code is not None else err)
    except Exception:
        try:
            return repr(err)
        except Exception:
            return f"<unprintable {type(err).__name__} object>"


def describe_error(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (made
    safely: :func:`error_text`)."""
    text = "" if isinstance(err, SystemExit) and err.code is None else error_text(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first[:300]}" if first else type(err).__name__


def user_files(cls: type) -> set[str]:
    """The source files of a user's class and of its bases that are neither normbench's
    nor torch's nor Python's: the code whose exceptions are the user's to fix."""
    import sys

    files = set()
    for klass in getattr(cls, "__mro__", ()):
        module = sys.modules.get(getattr(klass, "__module__", None) or "")
        top = (module.__name__ if module else "").split(".")[0]
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and top not in ("normbench", "torch", "builtins"):
            files.add(path)
    return files


def raised_in(err: BaseException, files: set[str]) -> bool:
    """Whether ``err``'s traceback (or that of an exception it was raised from) passes
    through one of ``files``: whether the code there raised it or called what did."""
    import traceback

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for frame, _ in traceback.walk_tb(err.__traceback__):
            if frame.f_code.co_filename in files:
                return True
        err = err.__cause__
    return False


@contextlib.contextmanager
def user_code(what: str, passing: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Around a user's code (an import, a constructor, a forward pass): whatever it raises,
    ``SystemExit`` included, becomes one :class:`UserError` line naming ``what`` and the
    exception. Ctrl-C, normbench's own interruptions (SIGTERM, a time limit), its
    ``UserError`` and the types in ``passing`` go through as they are."""
    try:
        yield
    except (KeyboardInterrupt, Interrupted, UserError, *passing):
        raise
    except BaseException as err:
        raise UserError(f"{what} raised {describe_error(err)}") from None


def _locate(target: str) -> Any:
    """The object ``module:Qual.Name`` or ``dotted.module.Name`` names, importing only
    the modules on its path (Hydra's ``_locate``, without its logging)."""
    from importlib import import_module
    from types import ModuleType

    module, colon, qualname = target.partition(":")
    if colon:
        obj = import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    parts = target.split(".")
    obj = import_module(parts[0])
    for depth, part in enumerate(parts[1:], start=2):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if not isinstance(obj, ModuleType):
                raise
            obj = import_module(".".join(parts[:depth]))
    return obj


def load_class(target: str, plugin: str | None = None) -> type:
    """The class a dotted path (``mypkg.norms.MyNorm``, or ``mypkg.norms:MyNorm``) names;
    a :class:`UserError` saying why when it cannot be had, whatever its import raised
    (``SystemExit`` too). ``plugin`` names where the path came from (an entry point)."""
    where = f" ({plugin})" if plugin else ""
    parts = target.replace(":", ".").split(".")
    if not all(part.isidentifier() for part in parts):
        raise UserError(
            f"cannot import the norm class {target!r}{where}: not a dotted path of Python "
            "names, as mypkg.norms.MyNorm"
        )
    try:
        with user_code("importing it", (ImportError, AttributeError)):
            found = _locate(target)
    except (ImportError, AttributeError) as err:  # not there: say what is missing
        raise UserError(
            f"cannot import the norm class {target!r}{where}: {describe_error(err)}"
        ) from None
    except UserError as err:
        raise UserError(f"cannot import the norm class {target!r}{where}: {err}") from None
    if not isinstance(found, type):
        raise UserError(
            f"cannot import the norm class {target!r}{where}: it is a "
            f"{type(found).__name__}, not a class"
        )
    return found


@dataclass(frozen=True)
class InstalledNorm:
    """A variant an installed package declares (entry point group ``normbench.norms``).

    Nothing of it is imported until it is named (``norm=NAME``): listing it reads the
    package's metadata (and the class's docstring from its source file, unexecuted)."""

    name: str
    target: str  # module:Class, as the entry point gives it
    package: str = ""  # the distribution that declares it

    @property
    def plugin(self) -> str:
        return f"entry point {self.name} = {self.target} of package {self.package or '?'}"

    def load(self) -> type:
        return load_class(self.target, self.plugin)

    def describe(self) -> str:
        doc = _static_docstring(self.package, self.target)
        first = doc.strip().splitlines()[0] if doc and doc.strip() else ""
        return (first + " " if first else "") + f"(installed: {self.target})"

    def config(self, load: bool = True) -> dict[str, Any]:
        """Its config: the name, the class, and (``load``: importing it) the constructor's
        plain defaults."""
        import inspect

        node: dict[str, Any] = {"name": self.name, "_target_": self.target.replace(":", ".")}
        if not load:
            return node
        try:
            cls = self.load()
            with user_code("reading its signature"):
                parameters = list(inspect.signature(cls).parameters.values())[1:]
        except (UserError, TypeError, ValueError):
            return node  # the error is told when the norm is built
        for parameter in parameters:
            value = parameter.default
            if value is not inspect.Parameter.empty and (
                value is None or isinstance(value, bool | int | float | str)
            ):
                node[parameter.name] = value
        return node


def _static_docstring(package: str, target: str) -> str | None:
    """The docstring of the class ``target`` names, read from its source file in the
    installed ``package`` without importing anything; None where that file is not among
    the package's files (an editable install) or does not parse."""
    import ast
    from importlib.metadata import PackageNotFoundError, distribution

    module, _, qualname = target.partition(":")
    stem = module.replace(".", "/")
    wanted = {f"{stem}.py", f"{stem}/__init__.py"}
    try:
        files = distribution(package).files or []
    except (PackageNotFoundError, ValueError):
        return None
    for file in files:
        if str(file).replace("\\", "/") not in wanted:
            continue
        try:
            node: Any = ast.parse(file.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
            return None
        for part in qualname.split("."):
            node = next(
                (n for n in node.body if isinstance(n, ast.ClassDef) and n.name == part), None
            )
            if node is None:
                return None
        return ast.get_docstring(node)
    return None


#: entry_point_norms' answer for the import path it was read with: every config
#: composition asks (a sweep's plan, once per job), and reading every installed
#: package's metadata takes milliseconds.
_found: dict[tuple[str, ...], dict[str, InstalledNorm]] = {}


def entry_point_norms() -> dict[str, InstalledNorm]:
    """The variants installed packages declare, by name (normbench's own names win).
    Read from the packages' metadata (once per import path): nothing is imported."""
    import sys

    key = tuple(sys.path)
    if key not in _found:
        _found.clear()
        _found[key] = _read_entry_points()
    return dict(_found[key])


def _read_entry_points() -> dict[str, InstalledNorm]:
    from importlib.metadata import entry_points

    found = {}
    points = entry_points(group=ENTRY_POINT_GROUP)
    if not points:  # (the usual case: normbench's own names not needed, torch not imported)
        return found
    for point in points:
        if point.name not in _load():
            package = getattr(getattr(point, "dist", None), "name", None) or ""
            found[point.name] = InstalledNorm(point.name, point.value, package)
    return found


#: Installed variants stored in Hydra's ConfigStore: True for a full config (with the
#: constructor's defaults, which took importing it), False for its name and class alone.
_stored: dict[str, bool] = {}


def store_entry_point_configs(named: Iterable[str] = ()) -> None:
    """Make ``norm=<name>`` compose for every installed variant: its config goes to
    Hydra's ConfigStore (which a sweep's jobs receive with Hydra's state). Only the
    ``named`` ones are imported, for their constructor's defaults; the others are stored
    with their name and class alone, unimported, so that a package that fails (or exits,
    or hangs) on import troubles only the commands that name it."""
    from hydra.core.config_store import ConfigStore

    named = set(named)
    for name, installed in entry_point_norms().items():
        full = name in named
        if name in _stored and (_stored[name] or not full):
            continue
        ConfigStore.instance().store(group="norm", name=name, node=installed.config(load=full))
        _stored[name] = full


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
        return load_class(self.target, self.plugin) if self.target else get_norm(self.name)

    @property
    def from_user(self) -> bool:
        """Whether the class is a user's (a config folder's ``_target_``, an installed
        package's entry point): its exceptions are the user's to fix, not normbench's bugs."""
        return self.target is not None or self.name not in _load()

    @functools.cached_property
    def plugin(self) -> str | None:
        """Where a user's class comes from, in words (None for normbench's own)."""
        if not self.from_user:
            return None
        installed = entry_point_norms().get(self.name)
        if installed is not None and installed.target.replace(":", ".") == self.target:
            return installed.plugin
        if not self.target:
            return None
        from normbench.options import option_file

        path = option_file("norm", self.name)
        return f"_target_ {self.target}" + (f" in {path}" if path else "")

    def raised(self, err: BaseException) -> bool:
        """Whether ``err`` is this user's class's doing: its traceback passes through the
        class's own code (:func:`user_files`). Never for normbench's own variants."""
        return self.from_user and raised_in(err, user_files(self.cls))

    def label(self) -> str:
        """``norm=NAME`` and, for a user's class, where it comes from."""
        plugin = self.plugin
        return f"norm={self.name}" + (f" ({plugin})" if plugin else "")

    def build(self, num_channels: int, **extra: Any):
        """``cls(num_channels, **extra, **kwargs)``; a user's class that raises anything but
        the TypeError or ValueError of bad arguments (which the model's builder reports
        with the model) is one :class:`UserError` naming it."""
        cls = self.cls
        if not self.from_user:
            return cls(num_channels, **extra, **self.kwargs)
        with user_code(
            f"{self.label()}: building {cls.__name__}({num_channels})", (TypeError, ValueError)
        ):
            return cls(num_channels, **extra, **self.kwargs)

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

    @property
    def fuses_pool(self) -> bool:
        """Whether the layer takes ``pool=True`` (with ``relu=True``) to apply the ReLU and
        the 2x2 max-pooling after it in its own passes: a class that declares
        ``fuses_pool = True`` itself (normbench's BatchNorm), not one that inherits it,
        since a subclass's own forward may not pool."""
        return bool(vars(self.cls).get("fuses_pool", False)) and self.fuses_relu

    def norm_batch_size(self, per_process: int, world: int) -> int | None:
        """The batch one layer normalizes over in training, of a run whose processes take
        ``per_process`` images each out of ``world``: the class's own
        ``norm_batch_size(per_process, world, kwargs)`` where it declares one (ghost
        batches, synchronized groups); else the process's batch for BatchNorm's family
        (a subclass of torch's ``_BatchNorm``); None for variants without batch statistics."""
        from torch.nn.modules.batchnorm import _BatchNorm

        cls = self.cls
        declared = getattr(cls, "norm_batch_size", None)
        if declared is not None:
            return declared(per_process, world, self.kwargs)
        return per_process if isinstance(cls, type) and issubclass(cls, _BatchNorm) else None

    def local_batch(self, per_process: int, world: int) -> int:
        """The batch to give one copy of the model in one process (the run's probe, and
        rank 0's measures in :func:`normbench.distributed.local`), synchronizing with
        nobody, so that each layer normalizes over what it did in training on ``world``
        processes of ``per_process`` images: the class's own ``local_batch(per_process,
        world, kwargs)`` where it declares one (a synchronized group's batches together),
        else the process's batch (ghost batches split it as in training)."""
        declared = getattr(self.cls, "local_batch", None)
        if declared is not None:
            return declared(per_process, world, self.kwargs)
        return per_process

    def __call__(self, num_channels: int):
        return self.build(num_channels)

    def with_activation(self, num_channels: int):
        """``(layer, activation)`` where a model applies the norm and then a ReLU: the
        layer with the ReLU fused in and ``nn.Identity`` after it where the variant fuses
        it, else the layer and :meth:`activation`. Two modules either way, neither of the
        second with parameters, so a model's state_dict keys are the same for all."""
        from torch import nn

        if self.fuses_relu:
            return self.build(num_channels, relu=True), nn.Identity()
        return self(num_channels), self.activation()

    def with_activation_pool(self, num_channels: int):
        """``(layer, activation, pooling)`` where a model applies the norm, a ReLU and a
        2x2 max-pooling of stride 2: the layer with both fused in and two ``nn.Identity``
        after it where the variant fuses them (:attr:`fuses_pool`), else
        :meth:`with_activation` and ``nn.MaxPool2d(2)``. Three modules without parameters
        but the first either way: a model's state_dict keys are the same for all."""
        from torch import nn

        if self.fuses_pool:
            return self.build(num_channels, relu=True, pool=True), nn.Identity(), nn.Identity()
        return *self.with_activation(num_channels), nn.MaxPool2d(2)

    def activation(self):
        """What a model puts after the layer where it would put a ReLU: a ReLU, or nothing
        (``nn.Identity``) when the layer carries its own activation. A module without
        parameters, so state_dict keys are the same either way."""
        from torch import nn

        return nn.Identity() if self.carries_activation else nn.ReLU(inplace=True)
