"""scikit-learn's handwritten digits, split into training and test images once and cached.

Importing scikit-learn (and scipy with it) takes longer than several epochs of a digits
run (benchmarks/README.md). The split (``train_test_split``, stratified, a fixed seed)
depends only on scikit-learn's version, so the first run of a version stores it in
``~/.cache/normbench/digits/`` (or ``$NORMBENCH_DATA_CACHE/digits/``) and later runs read that
file without importing scikit-learn.

The file is never trusted: only a small regular file is read, without pickles, and one
whose arrays differ in name, dtype, shape or range from a split of the 1,797 images is
recomputed and replaced. A folder that cannot be written costs the import, nothing
else. The file is written to a temporary name and renamed, so a reader never sees half
of one.
"""

from __future__ import annotations

import io
import math
import os
import secrets
import stat
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

TEST_FRACTION = 0.2  # 1797 images -> 1437 train / 360 test
SPLIT_SEED = 0  # train_test_split's random_state
IMAGES = 1797
LEVELS = 16  # grey levels 0..16
CLASSES = 10
_TRAIN = IMAGES - math.ceil(IMAGES * TEST_FRACTION)  # train_test_split rounds the test size up
_KEYS = ("train_x", "train_y", "test_x", "test_y")
MAX_FILE_BYTES = 1 << 20  # several times the split's file


def cache_folder() -> Path:
    root = os.environ.get("NORMBENCH_DATA_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "normbench"
    return base / "digits"


def _cache_file() -> Path | None:
    """The cache file of the installed scikit-learn, or None where there is no place for
    one (no home folder to be found) or no version to name it by."""
    try:
        version = metadata.version("scikit-learn")
        folder = cache_folder()
    except (metadata.PackageNotFoundError, RuntimeError):  # RuntimeError: no home folder
        return None
    # The version names the file: a character outside [0-9A-Za-z.+-_] never reaches a path.
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in ".+-_" else "_" for c in version)
    # The split's settings name it too: a file of other settings is another file.
    return folder / f"split-seed{SPLIT_SEED}-test{TEST_FRACTION}-{safe}.npz"


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)``: uint8 images ``(N, 1, 8, 8)`` with values
    0..16 and int64 labels 0..9, each split in the data set's own order."""
    path = _cache_file()
    if path is not None:
        cached = _read(path)
        if cached is not None:
            return cached
    arrays = _compute()
    if path is not None:
        _write(path, arrays)
    return arrays


def _compute() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    # Sorted: the split is a set of images; keep the data set's own order within it.
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached split, or None where the file is missing or not a split of the digits.
    Only a regular file of at most :data:`MAX_FILE_BYTES` is read (a named pipe would
    block the run, a huge one exhaust its memory), and only uncompressed entries no
    larger than the split's arrays (a small compressed entry may unpack to gigabytes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE_BYTES:
            return None
        data = file.read(MAX_FILE_BYTES + 1)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
            if sorted(e.filename for e in entries) != sorted(f"{key}.npy" for key in _KEYS):
                return None
            if any(
                e.compress_type != zipfile.ZIP_STORED or e.file_size > MAX_FILE_BYTES
                for e in entries
            ):
                return None
            arrays = tuple(
                np.lib.format.read_array(archive.open(f"{key}.npy"), allow_pickle=False)
                for key in _KEYS
            )
    except Exception:  # noqa: BLE001 - whatever a damaged file raises, the cure is to recompute
        return None
    return arrays if _valid(*arrays) else None


def _valid(train_x, train_y, test_x, test_y) -> bool:
    """The arrays' dtypes, shapes (C order) and value ranges are a split's. (The zip's
    checksums catch a damaged byte; a file someone wrote with other values in range
    passes, as anything else they could write in the user's own folders would.)"""
    test = IMAGES - _TRAIN
    for array, dtype, shape, top in (
        (train_x, np.uint8, (_TRAIN, 1, 8, 8), LEVELS),
        (train_y, np.int64, (_TRAIN,), CLASSES - 1),
        (test_x, np.uint8, (test, 1, 8, 8), LEVELS),
        (test_y, np.int64, (test,), CLASSES - 1),
    ):
        if array.dtype != dtype or array.shape != shape or not array.flags.c_contiguous:
            return False
        if array.min() < 0 or array.max() > top:
            return False
    return True


def _write(path: Path, arrays: tuple[np.ndarray, ...]) -> None:
    """``arrays`` to ``path``, through a temporary file in its folder renamed over it (a
    reader sees the old file or the new one), created with the umask's permissions; the
    temporary is removed whatever stops the write (an error, Ctrl-C)."""
    temp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError:
        return  # a folder that cannot be written: the split is computed on every run
    done = False
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, **dict(zip(_KEYS, arrays, strict=True)))
        os.replace(temp, path)
        done = True
    except OSError:
        pass  # a full disk, say: the split is computed again next time
    finally:
        if not done:
            temp.unlink(missing_ok=True)
