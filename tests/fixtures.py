"""Tiny copies of the torchvision data sets, in torchvision's own on-disk formats.

Tests that need MNIST or CIFAR on disk write a handful of images with these
writers and let normbench read them through the real torchvision classes. Each
writer returns the numbers it wrote, so a test can check what was loaded
against them.

CIFAR's classes check the md5 of every file; :func:`trust_cifar_files` points
the class attributes holding the expected sums at the fixture's files (through
``monkeypatch``, so the change ends with the test) and production keeps the
real check.

Use from another test file::

    from fixtures import tiny_datasets  # noqa: F401  (the pytest fixture)

    def test_run_on_mnist(tiny_datasets):
        root = tiny_datasets["mnist"].root   # pass as dataset.root=...
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

TORCHVISION_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")

_MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_CIFAR = {
    # name: (folder, train files, test file, meta file, meta key, label key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "label_names",
        "labels",
        10,
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        "test",
        "meta",
        "fine_label_names",
        "fine_labels",
        100,
    ),
}


@dataclass(frozen=True)
class TinyData:
    """What a writer put on disk: uint8 images (N, C, H, W) and int labels, per split."""

    name: str
    root: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def write_mnist(
    root: Path, name: str = "mnist", n_train: int = 20, n_test: int = 10, seed: int = 0
) -> TinyData:
    """MNIST or Fashion-MNIST IDX files (uncompressed) under ``root/<Class>/raw``."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / _MNIST_FOLDERS[name] / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    splits = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 + seed) % 10
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 0x00000803, images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 0x00000801, labels.astype(np.uint8))
        splits[prefix] = (images[:, None], labels.astype(np.int64))
    return TinyData(name, Path(root), *splits["train"], *splits["t10k"])


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    # IDX: big-endian int32 magic (type 0x08 = uint8, then the number of dims), the dims, the bytes.
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_cifar(
    root: Path, name: str = "cifar10", n_train: int = 15, n_test: int = 6, seed: int = 0
) -> TinyData:
    """CIFAR-10 or CIFAR-100 python pickles under ``root/cifar-10-batches-py`` (or -100-)."""
    folder_name, train_files, test_file, meta_file, meta_key, label_key, classes = _CIFAR[name]
    rng = np.random.default_rng(seed)
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    train_images = rng.integers(0, 256, size=(n_train, 3, 32, 32), dtype=np.uint8)
    train_labels = (np.arange(n_train) * 7 + seed) % classes
    test_images = rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8)
    test_labels = (np.arange(n_test) * 7 + seed + 1) % classes
    chunks = np.array_split(np.arange(n_train), len(train_files))
    for file_name, chunk in zip(train_files, chunks, strict=True):
        _write_cifar_batch(folder / file_name, train_images[chunk], train_labels[chunk], label_key)
    _write_cifar_batch(folder / test_file, test_images, test_labels, label_key)
    names = [f"class_{i}" for i in range(classes)]
    with open(folder / meta_file, "wb") as f:
        pickle.dump({meta_key: names}, f)
    train_labels, test_labels = train_labels.astype(np.int64), test_labels.astype(np.int64)
    return TinyData(name, Path(root), train_images, train_labels, test_images, test_labels)


def _write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: str) -> None:
    # The real batches are Python 2 pickles with str keys; torchvision reads them with
    # encoding="latin1" and indexes entry["data"], so the keys here are str as well.
    entry = {"data": images.reshape(len(images), 3 * 32 * 32), label_key: labels.tolist()}
    if label_key == "fine_labels":
        entry["coarse_labels"] = (labels // 5).tolist()
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def trust_cifar_files(monkeypatch: pytest.MonkeyPatch, name: str, root: Path) -> None:
    """Make torchvision's CIFAR class expect the md5 sums of the files now under ``root``."""
    import torchvision.datasets

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = Path(root) / cls.base_folder

    def md5(file_name: str) -> str:
        return hashlib.md5((folder / file_name).read_bytes()).hexdigest()

    monkeypatch.setattr(cls, "train_list", [[f, md5(f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5(f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


def write_dataset(
    root: Path, name: str, monkeypatch: pytest.MonkeyPatch | None = None, **sizes: int
) -> TinyData:
    """Write the tiny ``name``; for CIFAR, with ``monkeypatch``, also trust its files."""
    if name in _MNIST_FOLDERS:
        return write_mnist(root, name, **sizes)
    data = write_cifar(root, name, **sizes)
    if monkeypatch is not None:
        trust_cifar_files(monkeypatch, name, root)
    return data


@pytest.fixture
def tiny_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, TinyData]:
    """All four torchvision data sets, tiny, under one ``root`` (``tmp_path / "data"``)."""
    root = tmp_path / "data"
    return {name: write_dataset(root, name, monkeypatch) for name in TORCHVISION_DATASETS}
