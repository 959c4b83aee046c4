"""Data sets into memory tensors; batching and augmentation on tensors.

Every data set is loaded whole into float32 NCHW tensors, normalised per
channel with statistics of its training split, and batches are cut by indexing
those tensors (airbench-style): no ``DataLoader``, no worker processes, no
per-sample Python. Augmentation (random crop with zero padding, horizontal
flip) is one vectorised gather per batch, so it runs wherever the data lives.

``digits`` is scikit-learn's bundled copy of the UCI handwritten digits, so a
machine without network can always run (its split is cached by
:mod:`normbench.digits`). The other data sets are read by torchvision's own dataset
classes from their usual layout under ``root``:
normbench never parses the files itself, and keeps torchvision's integrity
checks.

torch, torchvision and scikit-learn are imported inside the functions, so that
importing this module (for :data:`DATASETS`) keeps the CLI's start fast.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normbench.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: Every data set ``load_dataset`` knows, in the order ``normbench list`` shows them.
DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")

PAD = 4  # pixels of zero padding around an image before its random crop (max shift)

# Seeds of the fixed permutations that pick train_size / test_size subsets. They
# are part of the data set's definition, not of a run: every seed of a study
# trains on the same images. numpy's RandomState is used because its stream is
# frozen across numpy versions.
_VAL_SPLIT_SEED = 20240611  # the validation split: fixed, whatever the run's seed
_TRAIN_SUBSET_SEED = 0
_TEST_SUBSET_SEED = 1


@dataclass(frozen=True)
class _Spec:
    torchvision_class: str | None  # None: embedded (digits)
    num_classes: int
    augment: bool  # default for augment=None


_SPECS: dict[str, _Spec] = {
    "digits": _Spec(None, 10, augment=False),
    "mnist": _Spec("MNIST", 10, augment=False),
    "fashion_mnist": _Spec("FashionMNIST", 10, augment=False),
    "cifar10": _Spec("CIFAR10", 10, augment=True),
    "cifar100": _Spec("CIFAR100", 100, augment=True),
}


# eq=False: tensors have no single truth value, so dataclass equality would raise.
@dataclass(frozen=True, eq=False)
class DataSplits:
    """A data set in memory: normalised float32 NCHW images and int64 labels."""

    name: str
    train_x: Tensor  # float32 (N, C, H, W), normalised per channel
    train_y: Tensor  # int64 (N,)
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, of the raw [0, 1] training pixels
    std: tuple[float, ...]
    augment: bool  # random crop (pad 4) + horizontal flip at training time
    # The validation split, carved from the training set (empty when dataset.val_size=0);
    # after the fields above so that positional construction stays as it was.
    val_x: Tensor | None = None
    val_y: Tensor | None = None

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_x.shape[0])

    @property
    def num_val(self) -> int:
        return 0 if self.val_x is None else int(self.val_x.shape[0])

    def to(self, device: Any) -> DataSplits:
        """The same splits with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
            val_x=None if self.val_x is None else self.val_x.to(device),
            val_y=None if self.val_y is None else self.val_y.to(device),
        )


# --------------------------------------------------------------------------- loading


def load_dataset(
    name: str,
    root: str | Path = "data",
    download: bool = False,
    train_size: int | None = None,
    test_size: int | None = None,
    augment: bool | None = None,
    val_size: float | int = 0,
) -> DataSplits:
    """Load data set ``name`` into memory.

    ``root`` holds the torchvision data sets in their usual layout (unused for
    ``digits``); ``download`` lets torchvision fetch missing files (files that are
    present are never fetched again). ``train_size``/``test_size`` keep a fixed,
    seed-independent subset of that many images. ``augment=None`` takes the data
    set's default (on for CIFAR, off otherwise). ``val_size``: the validation split
    carved from the training set first (a fraction of it, or a number of images; 0:
    none), stratified by class, the same for every seed and every ``train_size``;
    ``train_size`` then takes its subset from the rest.

    The normalisation statistics come from the training images actually used
    (the subset, when ``train_size`` is set). Raises :class:`UserError` for an
    unknown name, a bad argument, missing or unreadable files, or a failed
    download; a failed load leaves nothing behind on disk.
    """
    spec = _spec(name)
    if not isinstance(download, bool):
        raise UserError(f"dataset.download must be true or false, got {download!r}")
    if augment is not None and not isinstance(augment, bool):
        raise UserError(f"dataset.augment must be true, false or null, got {augment!r}")
    for key, value in (("train_size", train_size), ("test_size", test_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"dataset.{key} must be a whole number or null, got {value!r}")

    if spec.torchvision_class is None:
        train_raw, train_y, test_raw, test_y, levels = _load_digits()
    else:
        train_raw, train_y, test_raw, test_y = _load_torchvision(name, spec, root, download)
        levels = 255

    train_raw, train_y, val_raw, val_y = _carve_val(train_raw, train_y, val_size)
    train_raw, train_y = _subset(train_raw, train_y, train_size, "train_size", _TRAIN_SUBSET_SEED)
    test_raw, test_y = _subset(test_raw, test_y, test_size, "test_size", _TEST_SUBSET_SEED)
    mean, std = _channel_stats(train_raw, levels)
    return DataSplits(
        name=name,
        train_x=_normalise(train_raw, levels, mean, std),
        train_y=train_y,
        test_x=_normalise(test_raw, levels, mean, std),
        test_y=test_y,
        num_classes=spec.num_classes,
        mean=mean,
        std=std,
        augment=spec.augment if augment is None else augment,
        val_x=_normalise(val_raw, levels, mean, std),
        val_y=val_y,
    )


def _carve_val(images: Tensor, labels: Tensor, val_size: float | int):
    """(train images, train labels, val images, val labels): ``val_size`` of the training
    set (a fraction below 1, or a count) held out, stratified by class."""
    import torch

    available = len(labels)
    if isinstance(val_size, bool) or not isinstance(val_size, int | float) or val_size < 0:
        raise UserError(
            f"dataset.val_size must be a fraction in [0, 1) or a count, got {val_size!r}"
        )
    fraction = isinstance(val_size, float) and val_size < 1
    count = round(val_size * available) if fraction else int(val_size)
    if count >= available:
        raise UserError(
            f"dataset.val_size={val_size} leaves no training images "
            f"({available} in the training set)"
        )
    val_idx = stratified_subset(labels, count, _VAL_SPLIT_SEED)
    keep = torch.ones(available, dtype=torch.bool)
    keep[val_idx] = False
    return images[keep], labels[keep], images[val_idx].contiguous(), labels[val_idx].contiguous()


def stratified_subset(labels: Tensor, count: int, seed: int) -> Tensor:
    """``count`` indices, in ascending order, with each class in proportion to its share
    of ``labels`` (largest remainders decide the last ones), chosen by a fixed
    permutation within each class: the same on every run and machine."""
    import numpy as np
    import torch

    y = labels.numpy()
    rng = np.random.RandomState(seed)  # its stream is frozen across numpy versions
    classes, sizes = np.unique(y, return_counts=True)
    exact = sizes * count / len(y)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: count - int(take.sum())]:
        take[i] += 1
    chosen = [
        rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)
    ]
    index = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(index.astype(np.int64))


def expected_files(name: str, root: str | Path = "data") -> list[Path]:
    """The files that must be on disk under ``root`` for data set ``name``.

    Empty for ``digits``, which ships with scikit-learn. The names come from
    torchvision's classes, so they follow whatever torchvision reads.
    """
    spec = _spec(name)
    if spec.torchvision_class is None:
        return []
    cls = _torchvision_class(spec)
    folder = _data_folder(cls, Path(root).expanduser())
    if hasattr(cls, "resources"):  # MNIST family: raw/, the .gz files uncompressed
        names = [Path(archive).stem for archive, _md5 in cls.resources]
    else:  # CIFAR family: the extracted python batches
        names = [entry[0] for entry in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [folder / n for n in names]


def _spec(name: Any) -> _Spec:
    if not isinstance(name, str) or name not in _SPECS:
        raise UserError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    return _SPECS[name]


def _torchvision_class(spec: _Spec) -> type:
    import torchvision.datasets

    return getattr(torchvision.datasets, spec.torchvision_class)


def _data_folder(cls: type, root: Path) -> Path:
    if hasattr(cls, "base_folder"):  # CIFAR: root/cifar-10-batches-py
        return root / cls.base_folder
    return root / cls.__name__ / "raw"  # MNIST: root/MNIST/raw


def _where_to_get(cls: type) -> str:
    if hasattr(cls, "mirrors"):
        files = ", ".join(archive for archive, _md5 in cls.resources)
        return f"uncompressed from {files} at {cls.mirrors[0]}"
    return f"extracted from {cls.url}"


def _load_digits():
    import torch

    from normbench import digits

    train_x, train_y, test_x, test_y = digits.split()
    return (
        torch.from_numpy(train_x),
        torch.from_numpy(train_y),
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        digits.LEVELS,
    )


def _load_torchvision(name: str, spec: _Spec, root: str | Path, download: bool):
    cls = _torchvision_class(spec)
    root = Path(root).expanduser().absolute()
    folder = _data_folder(cls, root)
    files = expected_files(name, root)
    missing = [f for f in files if not f.is_file()]
    listing = ", ".join(f.name for f in files)

    if missing and not download:
        partial = (
            f" (missing: {', '.join(f.name for f in missing)})" if len(missing) < len(files) else ""
        )
        raise UserError(
            f"data set {name!r} not found: {folder} must hold {listing}{partial}. "
            f"Run with dataset.download=true to fetch them, or place them there "
            f"({_where_to_get(cls)})."
        )
    if missing:
        _download(name, cls, root, folder, files, listing)

    try:
        train = cls(root=str(root), train=True, download=False)
        test = cls(root=str(root), train=False, download=False)
    except Exception as err:  # any failure to read present files is a bad file on disk
        raise UserError(
            f"could not read data set {name!r} from {folder}: {_reason(err)}. "
            f"The files there may be corrupt or incomplete: remove them and run with "
            f"dataset.download=true, or replace them ({_where_to_get(cls)})."
        ) from err
    splits = []
    for split, dataset in (("training", train), ("test", test)):
        images, labels = _as_tensors(dataset)
        _check_split(name, folder, split, images, labels, spec.num_classes)
        splits += [images, labels]
    return tuple(splits)


def _check_split(name, folder, split, images, labels, num_classes: int) -> None:
    """What torchvision reads without complaint but cannot be trained on: as many labels
    as images, every label a class of the data set."""
    if len(images) != len(labels):
        raise UserError(
            f"data set {name!r} in {folder}: the {split} split has {len(images)} images but "
            f"{len(labels)} labels; the files do not belong together: replace them"
        )
    if len(images) == 0:
        raise UserError(f"data set {name!r} in {folder}: the {split} split has no images")
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise UserError(
            f"data set {name!r} in {folder}: {int(bad.sum())} {split} labels are outside the "
            f"{num_classes} classes 0-{num_classes - 1} (label {int(labels[first])} at index "
            f"{first}); the label file is not this data set's: replace it"
        )


def _download(name: str, cls: type, root: Path, folder: Path, files: list[Path], listing: str):
    """Let torchvision fetch the files; on failure remove everything the attempt created."""
    candidates = [_first_missing(folder)] + files
    if hasattr(cls, "filename"):  # CIFAR's archive lands in root
        candidates.append(root / cls.filename)
    else:
        candidates += [folder / archive for archive, _md5 in cls.resources]
    new = [p for p in candidates if p is not None and not p.exists()]
    try:
        cls(root=str(root), train=True, download=True)
    except Exception as err:  # offline, a proxy, a full disk, a bad checksum: all the user's to fix
        for path in new:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink(missing_ok=True)
        raise UserError(
            f"downloading data set {name!r} failed ({_reason(err)}). "
            f"Place {listing} in {folder} ({_where_to_get(cls)}) and run again."
        ) from err


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what a download creates)."""
    missing = None
    while not path.exists():
        missing = path
        if path.parent == path:
            break
        path = path.parent
    return missing


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no details"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}"


def _as_tensors(dataset) -> tuple[Tensor, Tensor]:
    """torchvision's ``.data``/``.targets`` as uint8 NCHW images and int64 labels."""
    import numpy as np
    import torch

    data = dataset.data
    if isinstance(data, np.ndarray):  # CIFAR: numpy (N, H, W, C)
        images = torch.from_numpy(data).permute(0, 3, 1, 2)
    else:  # MNIST: tensor (N, H, W)
        images = data.unsqueeze(1)
    targets = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    return images.contiguous(), targets


def _subset(
    images: Tensor, labels: Tensor, size: int | None, key: str, seed: int
) -> tuple[Tensor, Tensor]:
    if size is None:
        return images, labels
    available = len(labels)
    if not 1 <= size <= available:
        raise UserError(f"dataset.{key} must be between 1 and {available}, got {size}")
    index = _fixed_subset(available, size, seed)
    return images[index].contiguous(), labels[index].contiguous()


def _fixed_subset(available: int, size: int, seed: int) -> Tensor:
    """``size`` indices out of ``available``, the same on every run and machine.

    A prefix of one fixed permutation, so a smaller subset lies inside a larger
    one (a data-size study grows its training set, it does not redraw it).
    """
    import numpy as np
    import torch

    chosen = np.random.RandomState(seed).permutation(available)[:size]
    return torch.from_numpy(np.sort(chosen))


def _channel_stats(raw: Tensor, levels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of ``raw / levels``.

    Computed from a histogram of the integer pixel values in float64: exact, and no
    float copy of the whole training set.
    """
    import torch

    means, stds = [], []
    values = torch.arange(256, dtype=torch.float64) / levels
    for c in range(raw.shape[1]):
        counts = torch.bincount(raw[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / n
        std = var.sqrt().item()
        means.append(mean.item())
        # A constant channel (a tiny subset) would divide by zero; leave its scale alone.
        stds.append(std if std > 0 else 1.0)
    return tuple(means), tuple(stds)


def _normalise(raw: Tensor, levels: int, mean: tuple[float, ...], std: tuple[float, ...]):
    import torch

    shape = (1, len(mean), 1, 1)
    x = raw.to(torch.float32).div_(levels)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(shape))
    return x.div_(torch.tensor(std, dtype=torch.float32).view(shape))


# --------------------------------------------------------------------------- batching


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: full batches only (the last partial one is dropped)."""
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if batch_size > num_train:
        raise UserError(
            f"batch_size {batch_size} is larger than the training set ({num_train} images); "
            f"use a batch_size of at most {num_train}"
        )
    return num_train // batch_size


def train_batches(
    data: DataSplits, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled training batches, augmented when ``data.augment``.

    The order and the augmentation draw from ``generator`` (a CPU generator), so
    the same seed gives the same batches on any device. The trailing partial
    batch is dropped: a batch of one would break BatchNorm, and equal batches
    keep a batch-size study honest.
    """
    import torch

    _check_cpu(generator)
    steps = steps_per_epoch(data.num_train, batch_size)
    order = torch.randperm(data.num_train, generator=generator).to(data.train_x.device)
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        x = data.train_x[index]
        if data.augment:
            x = augment_batch(x, generator)
        yield x, data.train_y[index]


#: The most images an eval-mode step takes on the CPU, whatever ``eval_batch_size`` says: a
#: step whose activations stay in the cores' caches ran faster than one of 1,000 images
#: (benchmarks/README.md, "Whole training runs").
CPU_EVAL_IMAGES = 256


def eval_step_size(batch_size: int, x: Tensor) -> int:
    """Images per step of an eval-mode pass over ``x``: ``batch_size`` (the run's
    ``eval_batch_size``), at most :data:`CPU_EVAL_IMAGES` where ``x`` is on the CPU. In
    eval mode a layer's output for an image does not depend on the other images of its
    step, so the step's size changes the speed, not the figures (up to the last bits of
    float32 sums a convolution may add in another order)."""
    return min(batch_size, CPU_EVAL_IMAGES) if x.is_cpu else batch_size


def eval_batches(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``x`` and ``y`` in order, in batches of ``batch_size`` (the last may be smaller)."""
    if batch_size < 1:
        raise UserError(f"eval_batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(y), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def augment_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop (zero padding :data:`PAD`) then horizontal flip (p=0.5), per image.

    Each image moves by up to PAD pixels each way, the uncovered border is zero
    (the channel mean, as the data is normalised), then is mirrored left-right
    with probability one half. One gather for the whole batch; the random numbers
    come from ``generator`` on the CPU and move to ``x``'s device.
    """
    import torch
    import torch.nn.functional as F

    _check_cpu(generator)
    n, _c, h, w = x.shape
    draws = torch.stack(
        [
            torch.randint(0, 2 * PAD + 1, (n,), generator=generator),  # crop row in padded image
            torch.randint(0, 2 * PAD + 1, (n,), generator=generator),  # crop column
            torch.randint(0, 2, (n,), generator=generator),  # 1: flip
        ]
    ).to(x.device)
    top, left, flip = draws[0], draws[1], draws[2].bool()
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = top[:, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _check_cpu(generator: torch.Generator) -> None:
    if generator.device.type != "cpu":
        raise ValueError(
            f"the batch generator must be a CPU torch.Generator, got one on {generator.device}"
        )
