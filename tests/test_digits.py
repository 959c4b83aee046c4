"""normbench.digits: scikit-learn's split of the digits, cached, and a damaged cache ignored."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from normbench import digits


def sklearn_split():
    """The split as scikit-learn makes it, independently of normbench's cache."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    train, test = np.sort(train), np.sort(test)
    return images[train], labels[train], images[test], labels[test]


def same(got, want) -> bool:
    return len(got) == len(want) == 4 and all(
        a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(got, want, strict=True)
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMBENCH_DATA_CACHE", str(tmp_path))
    return tmp_path / "digits"


def cached_files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def written(cache):
    """scikit-learn's split, the cache file ``digits.split()`` wrote of it, and its bytes."""
    want = sklearn_split()
    digits.split()
    (name,) = cached_files(cache)
    path = cache / name
    return want, path, path.read_bytes()


def test_the_split_is_sklearns_and_a_second_process_reads_it_without_sklearn(cache):
    want = sklearn_split()
    assert [len(a) for a in want] == [1437, 1437, 360, 360]
    assert same(digits.split(), want)
    (name,) = cached_files(cache)  # one file, no temporary left beside it
    assert name.startswith("split-") and name.endswith(".npz")

    code = (
        "import sys, numpy as np\n"
        "from normbench import digits\n"
        "arrays = digits.split()\n"
        "assert 'sklearn' not in sys.modules, 'scikit-learn imported'\n"
        "np.savez(sys.argv[1], *arrays)\n"
    )
    out = cache.parent / "out.npz"
    env = {**os.environ, "NORMBENCH_DATA_CACHE": str(cache.parent)}
    done = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    with np.load(out) as npz:
        assert same([npz[f"arr_{i}"] for i in range(4)], want)


def _damages(good: bytes, arrays):
    """Files that are not a split of the digits, each with what is wrong with it."""
    train_x, train_y, test_x, test_y = arrays
    yield "empty", b""
    yield "truncated", good[: len(good) // 2]
    yield "not a zip", b"PK\x03\x04" + b"\x00" * 64
    rng = np.random.default_rng(0)
    for i in range(6):  # random bytes flipped inside the file
        data = bytearray(good)
        for at in rng.integers(0, len(data), size=8):
            data[at] ^= 0xFF
        yield f"flipped {i}", bytes(data)

    def npz(save=np.savez, **arrays):
        from io import BytesIO

        buffer = BytesIO()
        save(buffer, **arrays)
        return buffer.getvalue()

    base = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    yield "a key missing", npz(**{k: v for k, v in base.items() if k != "test_y"})
    yield "an extra key", npz(**base, extra=np.zeros(1))
    yield "labels as int32", npz(**{**base, "train_y": train_y.astype(np.int32)})
    yield "images as float", npz(**{**base, "test_x": test_x.astype(np.float32)})
    yield "a label of 10", npz(**{**base, "test_y": np.where(test_y == 3, 10, test_y)})
    yield "a level of 17", npz(**{**base, "train_x": np.where(train_x == 16, 17, train_x)})
    yield "images swapped", npz(**{**base, "train_x": test_x, "test_x": train_x})
    yield "an object array", npz(**{**base, "train_y": np.array([None] * len(train_y))})
    yield "Fortran order", npz(**{**base, "train_x": np.asfortranarray(train_x)})
    yield "over a megabyte", good + bytes(1 << 20)
    yield "the split, compressed", npz(np.savez_compressed, **base)
    # 8 MB of zeros in a few kB: read only the entry's header, never unpacked
    yield (
        "a small file unpacking large",
        npz(np.savez_compressed, **{**base, "train_x": np.zeros((8 << 20,), np.uint8)}),
    )


def test_a_damaged_or_foreign_cache_file_is_recomputed_and_replaced(cache):
    want, path, good = written(cache)
    for what, data in _damages(good, want):
        path.write_bytes(data)
        assert same(digits.split(), want), what
        assert cached_files(cache) == [path.name], what
        with np.load(path, allow_pickle=False) as npz:  # replaced by a good file
            assert same([npz[k] for k in ("train_x", "train_y", "test_x", "test_y")], want)
        with zipfile.ZipFile(path) as archive:  # (the compressed split too: rewritten)
            assert {e.compress_type for e in archive.infolist()} == {zipfile.ZIP_STORED}, what


def test_a_flipped_byte_never_passes_for_the_split(cache):
    """Fuzz: whatever a damaged file holds, the split returned is scikit-learn's."""
    want, path, good = written(cache)
    rng = np.random.default_rng(1)
    for _ in range(40):
        data = bytearray(good)
        at = int(rng.integers(0, len(data)))
        data[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        assert same(digits.split(), want)


def test_a_cache_that_cannot_be_written_only_costs_the_recomputation(cache):
    cache.parent.mkdir(exist_ok=True)
    cache.write_text("a file where the folder would be")
    assert same(digits.split(), sklearn_split())
    assert cache.read_text() == "a file where the folder would be"


def test_the_cache_file_is_a_plain_npz(cache):
    digits.split()
    (name,) = cached_files(cache)
    with zipfile.ZipFile(cache / name) as z:
        assert sorted(z.namelist()) == ["test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]


def test_no_home_folder_only_costs_the_recomputation(monkeypatch):
    monkeypatch.delenv("NORMBENCH_DATA_CACHE", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(digits.Path, "home", staticmethod(no_home))
    assert same(digits.split(), sklearn_split())


def test_a_hostile_version_string_never_leaves_the_cache_folder(cache, monkeypatch):
    monkeypatch.setattr(digits.metadata, "version", lambda name: "../../1.0\n/évil")
    assert same(digits.split(), sklearn_split())
    (name,) = cached_files(cache)
    assert name == "split-seed0-test0.2-.._.._1.0___vil.npz"


def test_the_split_is_a_stratified_partition_of_sklearns_images():
    """Independently of how the split is made: train and test together are the 1,797
    images and labels of ``load_digits``, each once and in the data set's order, and each
    class is split in proportion."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train_x, train_y, test_x, test_y = digits.split()
    assert len(train_y) == 1437 and len(test_y) == 360
    rows = lambda x, y: [x[i].tobytes() + bytes([y[i]]) for i in range(len(y))]  # noqa: E731
    everything = rows(bunch.images.astype(np.uint8)[:, None], bunch.target)
    train, test = rows(train_x, train_y), rows(test_x, test_y)
    assert sorted(train + test) == sorted(everything)
    position = {row: i for i, row in enumerate(everything)}
    assert len(position) == len(everything)  # no two images alike with their labels
    for part in (train, test):  # each in the data set's own order
        at = [position[row] for row in part]
        assert at == sorted(at)
    for label in range(10):
        share = (bunch.target == label).sum() * 360 / 1797
        assert abs((test_y == label).sum() - share) <= 1


def test_a_named_pipe_in_the_files_place_never_blocks(cache):
    want = sklearn_split()
    digits.split()
    (name,) = cached_files(cache)
    (cache / name).unlink()
    os.mkfifo(cache / name)
    assert same(digits.split(), want)  # not waiting for a writer that never comes
    assert (cache / name).is_file()  # replaced by the split


def test_processes_starting_together_on_an_empty_cache_agree(cache):
    code = (
        "import hashlib, sys\n"
        "from normbench import digits\n"
        "print(hashlib.sha256(b''.join(a.tobytes() for a in digits.split())).hexdigest())\n"
    )
    env = {**os.environ, "NORMBENCH_DATA_CACHE": str(cache.parent)}
    started = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    hashes = {p.communicate(timeout=120)[0].strip() for p in started}
    assert all(p.returncode == 0 for p in started)
    import hashlib

    want = hashlib.sha256(b"".join(a.tobytes() for a in sklearn_split())).hexdigest()
    assert hashes == {want}
    (name,) = cached_files(cache)  # one file, no temporary left
    assert name.endswith(".npz")


def test_without_scikit_learns_version_nothing_is_cached(cache, monkeypatch):
    def missing(name):
        raise digits.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(digits.metadata, "version", missing)
    assert same(digits.split(), sklearn_split())
    assert cached_files(cache) == []


def test_the_cache_file_follows_the_umask(cache):
    before = os.umask(0o027)
    try:
        digits.split()
    finally:
        os.umask(before)
    (name,) = cached_files(cache)
    assert (cache / name).stat().st_mode & 0o777 == 0o640
