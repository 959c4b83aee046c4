"""Tests for normbench.data: loading through torchvision from tiny on-disk fixtures,
subsets, errors that leave the disk untouched, batching and augmentation."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets
import yaml
from fixtures import TORCHVISION_DATASETS, TinyData, write_dataset

from normbench import schema
from normbench.data import (
    DATASETS,
    PAD,
    DataSplits,
    augment_batch,
    eval_batches,
    expected_files,
    load_dataset,
    steps_per_epoch,
    train_batches,
)
from normbench.errors import UserError

CONF = Path(__file__).resolve().parent.parent / "normbench" / "conf" / "dataset"
CLASSES = {
    "mnist": torchvision.datasets.MNIST,
    "fashion_mnist": torchvision.datasets.FashionMNIST,
    "cifar10": torchvision.datasets.CIFAR10,
    "cifar100": torchvision.datasets.CIFAR100,
}
FOLDERS = {
    "mnist": "MNIST/raw",
    "fashion_mnist": "FashionMNIST/raw",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
}


def tree(root: Path) -> list[str]:
    """Everything under root (relative), to show a call wrote nothing."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits")


@pytest.fixture(params=TORCHVISION_DATASETS)
def tiny_set(request, tmp_path, monkeypatch) -> TinyData:
    return write_dataset(tmp_path / "data", request.param, monkeypatch)


# --------------------------------------------------------------------------- loading


def test_loader_reads_fixture_through_torchvision(tiny_set: TinyData):
    data = load_dataset(tiny_set.name, root=tiny_set.root)
    channels = tiny_set.train_images.shape[1]
    side = 28 if "mnist" in tiny_set.name else 32
    assert data.name == tiny_set.name
    assert data.train_x.shape == (len(tiny_set.train_labels), channels, side, side)
    assert data.test_x.shape == (len(tiny_set.test_labels), channels, side, side)
    assert data.train_x.dtype == data.test_x.dtype == torch.float32
    assert data.train_y.dtype == data.test_y.dtype == torch.int64
    assert data.train_y.tolist() == tiny_set.train_labels.tolist()
    assert data.test_y.tolist() == tiny_set.test_labels.tolist()
    assert data.num_classes == (100 if tiny_set.name == "cifar100" else 10)
    assert (data.in_channels, data.image_size) == (channels, (side, side))
    assert (data.num_train, data.num_test) == (
        len(tiny_set.train_labels),
        len(tiny_set.test_labels),
    )
    assert data.augment == tiny_set.name.startswith("cifar")

    # The statistics and every pixel, against the fixture's own numbers (CHW order kept).
    pixels = tiny_set.train_images / 255.0
    mean = pixels.mean(axis=(0, 2, 3))
    std = pixels.std(axis=(0, 2, 3))
    np.testing.assert_allclose(data.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(data.std, std, rtol=1e-12)
    shape = (1, channels, 1, 1)
    expect_train = (pixels - mean.reshape(shape)) / std.reshape(shape)
    expect_test = (tiny_set.test_images / 255.0 - mean.reshape(shape)) / std.reshape(shape)
    np.testing.assert_allclose(data.train_x.numpy(), expect_train, atol=1e-5)
    np.testing.assert_allclose(data.test_x.numpy(), expect_test, atol=1e-5)


def test_normalised_training_data_has_zero_mean_unit_std(tiny_set: TinyData, digits: DataSplits):
    for data in (load_dataset(tiny_set.name, root=tiny_set.root), digits):
        x = data.train_x.double()
        zeros, ones = torch.zeros(data.in_channels).double(), torch.ones(data.in_channels).double()
        torch.testing.assert_close(x.mean((0, 2, 3)), zeros, atol=1e-6, rtol=0)
        torch.testing.assert_close(x.std((0, 2, 3), correction=0), ones, atol=1e-6, rtol=0)


def test_digits_is_a_fixed_stratified_split(digits: DataSplits):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    assert (digits.num_train, digits.num_test) == (1437, 360)
    assert digits.num_classes == 10
    assert (digits.in_channels, digits.image_size) == (1, (8, 8))
    assert digits.augment is False
    # Stratified: every class holds ~20% of its images in the test split.
    counts = torch.bincount(digits.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # Seed-independent: the same split whatever the global RNG state.
    torch.manual_seed(123)
    np.random.seed(123)
    again = load_dataset("digits", root="/nonexistent", download=True)  # both unused
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)
    # Pixel values: sklearn's 0..16 scaled to [0, 1], then normalised.
    bunch = load_digits()
    train_idx, test_idx = train_test_split(
        np.arange(1797), test_size=0.2, stratify=bunch.target, random_state=0
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    pixels = bunch.images[train_idx] / 16.0
    assert digits.mean[0] == pytest.approx(pixels.mean(), rel=1e-12)
    assert digits.std[0] == pytest.approx(pixels.std(), rel=1e-12)
    expect = (bunch.images[test_idx] / 16.0 - pixels.mean()) / pixels.std()
    np.testing.assert_allclose(digits.test_x[:, 0].numpy(), expect, atol=1e-5)
    assert digits.test_y.tolist() == bunch.target[test_idx].tolist()


def test_unknown_data_set_names_the_valid_ones():
    with pytest.raises(UserError, match="unknown data set 'svhn'") as err:
        load_dataset("svhn")
    for name in DATASETS:
        assert name in str(err.value)
    with pytest.raises(UserError, match="unknown data set"):
        expected_files("svhn", "data")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"download": "yes"}, "dataset.download"),
        ({"augment": "on"}, "dataset.augment"),
        ({"train_size": 2.5}, "dataset.train_size"),
        ({"train_size": True}, "dataset.train_size"),
        ({"test_size": "10"}, "dataset.test_size"),
    ],
)
def test_bad_argument_types_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        load_dataset("digits", **kwargs)


def test_augment_overrides_the_default(tiny_set: TinyData):
    assert load_dataset(tiny_set.name, root=tiny_set.root, augment=True).augment is True
    assert load_dataset(tiny_set.name, root=tiny_set.root, augment=False).augment is False
    assert load_dataset("digits", augment=True).augment is True


def test_expected_files_follow_torchvision_layout():
    assert expected_files("digits", "anywhere") == []
    assert expected_files("mnist", "d") == [
        Path("d/MNIST/raw") / f
        for f in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    ]
    assert expected_files("fashion_mnist", "d")[0] == Path(
        "d/FashionMNIST/raw/train-images-idx3-ubyte"
    )
    assert [p.name for p in expected_files("cifar10", "d")] == [
        *(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
    ]
    assert expected_files("cifar100", "d") == [
        Path("d/cifar-100-python") / f for f in ("train", "test", "meta")
    ]


def test_to_moves_every_tensor(digits: DataSplits):
    moved = digits.to("cpu")
    assert isinstance(moved, DataSplits) and moved.name == "digits"
    assert moved.train_x.device.type == "cpu" and moved.mean == digits.mean


# --------------------------------------------------------------------------- errors on disk


@pytest.mark.parametrize("name", TORCHVISION_DATASETS)
@pytest.mark.parametrize("root_exists", [False, True])
def test_missing_files_name_path_and_files_and_create_nothing(tmp_path, name, root_exists):
    root = tmp_path / "data"
    if root_exists:
        root.mkdir()
    with pytest.raises(UserError) as err:
        load_dataset(name, root=root)
    message = str(err.value)
    assert repr(name) in message
    assert str(root / FOLDERS[name]) in message
    for path in expected_files(name, root):
        assert path.name in message
    assert "dataset.download=true" in message
    assert root.exists() == root_exists and tree(root) == []


def test_partly_missing_files_are_listed(tmp_path, monkeypatch):
    write_dataset(tmp_path, "mnist")
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    before = tree(tmp_path)
    with pytest.raises(UserError, match=r"missing: t10k-labels-idx1-ubyte\)"):
        load_dataset("mnist", root=tmp_path)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", TORCHVISION_DATASETS)
def test_failed_download_says_where_to_place_the_files(tmp_path, monkeypatch, name):
    def offline(self):
        raise RuntimeError("Error downloading: <urlopen error [Errno -3] name resolution>")

    monkeypatch.setattr(CLASSES[name], "download", offline)
    root = tmp_path / "data"
    with pytest.raises(UserError) as err:
        load_dataset(name, root=root, download=True)
    message = str(err.value)
    assert f"downloading data set {name!r} failed" in message
    assert "name resolution" in message  # the reason
    assert f"in {root / FOLDERS[name]}" in message
    for path in expected_files(name, root):
        assert path.name in message
    assert not root.exists()


@pytest.mark.parametrize("root_exists", [False, True])
def test_failed_download_removes_the_folders_torchvision_created(
    tmp_path, monkeypatch, root_exists
):
    # Offline, torchvision's MNIST.download makes raw/ and then fails in the fetch.
    def no_network(url, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_network)
    root = tmp_path / "data"
    if root_exists:
        (root / "other").mkdir(parents=True)
    with pytest.raises(UserError, match="Temporary failure in name resolution"):
        load_dataset("mnist", root=root, download=True)
    assert tree(root) == (["other"] if root_exists else [])


def test_present_files_are_never_downloaded(tiny_set: TinyData, monkeypatch):
    def forbidden(self):
        raise AssertionError("download attempted although the files are present")

    monkeypatch.setattr(CLASSES[tiny_set.name], "download", forbidden)
    before = tree(tiny_set.root)
    data = load_dataset(tiny_set.name, root=tiny_set.root, download=True)
    assert data.num_train == len(tiny_set.train_labels)
    assert tree(tiny_set.root) == before  # loading writes nothing either


def test_cifar_files_failing_the_md5_check_are_a_user_error(tmp_path):
    # No trust_cifar_files: torchvision's real md5 sums reject the fixture, as they
    # would a corrupt download.
    write_dataset(tmp_path, "cifar10")
    before = tree(tmp_path)
    with pytest.raises(UserError, match="could not read data set 'cifar10'.*corrupt"):
        load_dataset("cifar10", root=tmp_path, download=True)
    assert tree(tmp_path) == before


def test_truncated_mnist_file_is_a_user_error(tmp_path):
    write_dataset(tmp_path, "mnist")
    images = tmp_path / "MNIST/raw/train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"could not read data set 'mnist' from {tmp_path}"):
        load_dataset("mnist", root=tmp_path)


# --------------------------------------------------------------------------- subsets


def test_subsets_are_fixed_nested_and_taken_from_the_data(tmp_path, monkeypatch):
    written = write_dataset(tmp_path, "cifar10", monkeypatch, n_train=40, n_test=12)
    torch.manual_seed(0)
    small = load_dataset("cifar10", root=tmp_path, train_size=10, test_size=5)
    torch.manual_seed(1)
    np.random.seed(1)
    again = load_dataset("cifar10", root=tmp_path, train_size=10, test_size=5)
    larger = load_dataset("cifar10", root=tmp_path, train_size=20)
    assert (small.num_train, small.num_test) == (10, 5)
    assert (larger.num_train, larger.num_test) == (20, 12)
    assert torch.equal(small.train_x, again.train_x) and torch.equal(small.test_y, again.test_y)

    def rows(data: DataSplits, split: str) -> list[int]:
        """Which fixture images the split holds, found from its raw pixels."""
        x = getattr(data, f"{split}_x")
        shape = (1, -1, 1, 1)
        raw = x * torch.tensor(data.std).view(shape) + torch.tensor(data.mean).view(shape)
        raw = (raw * 255).round().to(torch.uint8).numpy()
        source = getattr(written, f"{split}_images")
        found = [int(np.flatnonzero((source == image).all(axis=(1, 2, 3)))[0]) for image in raw]
        assert (
            getattr(written, f"{split}_labels")[found].tolist()
            == getattr(data, f"{split}_y").tolist()
        )
        return found

    small_rows = rows(small, "train")
    assert len(set(small_rows)) == 10
    assert set(small_rows) < set(rows(larger, "train"))
    assert len(set(rows(small, "test"))) == 5
    # Statistics come from the images trained on.
    np.testing.assert_allclose(
        small.mean, (written.train_images[small_rows] / 255.0).mean(axis=(0, 2, 3)), rtol=1e-12
    )


def test_subset_of_digits(digits):
    data = load_dataset("digits", train_size=100, test_size=360)
    assert (data.num_train, data.num_test) == (100, 360)
    assert torch.equal(data.test_y, digits.test_y)


@pytest.mark.parametrize(
    ("key", "value", "limit"),
    [
        ("train_size", 0, 1437),
        ("train_size", -3, 1437),
        ("train_size", 1438, 1437),
        ("test_size", 0, 360),
        ("test_size", 361, 360),
    ],
)
def test_invalid_subset_sizes(key, value, limit):
    with pytest.raises(
        UserError, match=f"dataset.{key} must be between 1 and {limit}, got {value}"
    ):
        load_dataset("digits", **{key: value})


# --------------------------------------------------------------------------- batching


def synthetic(n: int, augment: bool = False, shape=(1, 6, 10)) -> DataSplits:
    """Images whose every pixel says which image and where (all values > 0); labels = ids."""
    x = 1.0 + torch.arange(n * int(np.prod(shape)), dtype=torch.float32).view(n, *shape)
    y = torch.arange(n)
    return DataSplits("synthetic", x, y, x[:2], y[:2], n, (0.0,), (1.0,), augment)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_steps_per_epoch():
    assert steps_per_epoch(100, 32) == 3
    assert steps_per_epoch(96, 32) == 3
    assert steps_per_epoch(5, 5) == 1
    with pytest.raises(UserError, match="larger than the training set"):
        steps_per_epoch(5, 6)
    with pytest.raises(UserError, match="at least 1"):
        steps_per_epoch(5, 0)


def test_train_batches_drop_last_and_use_each_sample_at_most_once():
    data = synthetic(103)
    batches = list(train_batches(data, 10, gen(0)))
    assert len(batches) == steps_per_epoch(103, 10) == 10
    assert all(len(xb) == len(yb) == 10 for xb, yb in batches)
    ids = torch.cat([yb for _, yb in batches])
    assert len(set(ids.tolist())) == 100  # no repeats, 3 left over
    for xb, yb in batches:  # images travel with their labels
        assert torch.equal(xb, data.train_x[yb])
    assert ids.tolist() != sorted(ids.tolist())  # shuffled


def test_train_batches_are_reproducible_from_the_generator():
    for augment in (False, True):
        data = synthetic(64, augment=augment)
        first = list(train_batches(data, 16, gen(7)))
        second = list(train_batches(data, 16, gen(7)))
        other = list(train_batches(data, 16, gen(8)))
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for a, b in zip(first, second, strict=True)
        )
        assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    # Consecutive epochs from one generator differ.
    g = gen(0)
    epoch1 = torch.cat([yb for _, yb in train_batches(synthetic(64), 16, g)])
    epoch2 = torch.cat([yb for _, yb in train_batches(synthetic(64), 16, g)])
    assert not torch.equal(epoch1, epoch2)


def test_train_batches_augment_only_when_asked():
    plain = synthetic(32)
    for xb, yb in train_batches(plain, 8, gen(0)):
        assert torch.equal(xb, plain.train_x[yb])
    augmented = synthetic(32, augment=True)
    changed = False
    for xb, yb in train_batches(augmented, 8, gen(0)):
        matches = crop_flip_matches(augmented.train_x[yb], xb)
        assert (matches.sum(axis=1) == 1).all()
        changed |= not torch.equal(xb, augmented.train_x[yb])
    assert changed


def test_eval_batches_keep_order_and_the_last_batch():
    x, y = torch.randn(23, 1, 2, 2), torch.arange(23)
    batches = list(eval_batches(x, y, 10))
    assert [len(yb) for _, yb in batches] == [10, 10, 3]
    assert torch.equal(torch.cat([xb for xb, _ in batches]), x)
    assert torch.equal(torch.cat([yb for _, yb in batches]), y)
    assert len(list(eval_batches(x, y, 100))) == 1


# --------------------------------------------------------------------------- augmentation


def crop_flip_matches(x: torch.Tensor, out: torch.Tensor) -> np.ndarray:
    """(N, 2 * 9 * 9) booleans: which zero-padded crop (top, left), flipped or not, out[i] is."""
    x, out = x.numpy(), out.numpy()
    h, w = x.shape[2:]
    padded = np.pad(x, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))
    columns = []
    for flip in (False, True):
        for top in range(2 * PAD + 1):
            for left in range(2 * PAD + 1):
                crop = padded[:, :, top : top + h, left : left + w]
                if flip:
                    crop = crop[..., ::-1]
                columns.append((crop == out).all(axis=(1, 2, 3)))
    return np.stack(columns, axis=1)


def test_augment_batch_crops_and_flips_each_image():
    x = synthetic(1000, shape=(3, 6, 10)).train_x
    out = augment_batch(x, gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    matches = crop_flip_matches(x, out)
    assert (matches.sum(axis=1) == 1).all()  # each output is exactly one shifted (flipped) copy
    choice = matches.argmax(axis=1)
    flipped, top, left = choice // 81, choice % 81 // 9, choice % 9
    assert 0.44 < flipped.mean() < 0.56  # p = 0.5
    assert set(top) == set(left) == set(range(2 * PAD + 1))  # shifts of -4..4 both ways
    assert torch.equal(augment_batch(x, gen(0)), out)  # the generator decides
    assert not torch.equal(augment_batch(x, gen(1)), out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_on_cuda_equal_batches_on_cpu():
    data = synthetic(64, augment=True, shape=(3, 8, 8))
    cpu = list(train_batches(data, 16, gen(3)))
    cuda = list(train_batches(data.to("cuda"), 16, gen(3)))
    for (xc, yc), (xg, yg) in zip(cpu, cuda, strict=True):
        assert xg.is_cuda and torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_config_matches_load_dataset(name):
    path = CONF / f"{name}.yaml"
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 10  # the description `list` shows
    cfg = yaml.safe_load(path.read_text())
    # the schema it is checked against first (its keys' types and rules), then its values
    assert cfg.pop("defaults") == ["/schema/dataset/images@_here_", "_self_"]
    assert list(cfg) == list(inspect.signature(load_dataset).parameters)
    assert list(cfg) == [f.name for f in dataclasses.fields(schema.Dataset)]
    assert cfg["name"] == name
    assert cfg["root"] == "data" and cfg["download"] is False
    assert cfg["train_size"] is None and cfg["test_size"] is None and cfg["augment"] is None


# ------------------------------------------------------------------ the validation split


def test_the_validation_split_is_stratified_disjoint_and_fixed():
    import torch

    from normbench.data import stratified_subset

    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    index = stratified_subset(labels, 10, seed=5)
    assert len(index) == len(set(index.tolist())) == 10
    assert torch.equal(index, index.sort().values)
    assert torch.bincount(labels[index]).tolist() == [5, 3, 2]  # the classes' shares
    assert torch.equal(index, stratified_subset(labels, 10, seed=5))
    # largest remainders: 7 of (50, 30, 20) is 3.5, 2.1, 1.4 -> 4, 2, 1
    assert torch.bincount(labels[stratified_subset(labels, 7, seed=5)]).tolist() == [4, 2, 1]


def test_digits_validation_split_is_ten_percent_and_the_same_for_every_train_size():
    import torch

    full = load_dataset("digits", val_size=0.1)
    assert (full.num_val, full.num_train) == (144, 1437 - 144)
    counts = torch.bincount(full.val_y, minlength=10)
    everything = torch.bincount(torch.cat([full.train_y, full.val_y]), minlength=10)
    assert ((counts - 0.1 * everything).abs() <= 1).all()
    small = load_dataset("digits", val_size=0.1, train_size=100)
    assert small.num_train == 100
    # the same images (up to the normalisation, which follows the training images used)
    raw = [
        (d.val_x * torch.tensor(d.std).view(1, -1, 1, 1) + torch.tensor(d.mean).view(1, -1, 1, 1))
        for d in (full, small)
    ]
    torch.testing.assert_close(raw[0], raw[1])
    assert torch.equal(full.val_y, small.val_y)
    assert load_dataset("digits", val_size=0).num_val == 0
    assert load_dataset("digits", val_size=30).num_val == 30


def test_a_run_without_a_validation_split_records_no_val_metrics(tiny):
    from normbench import runner

    summary = runner.run(tiny("dataset.val_size=0")).summary
    assert summary["best_val_acc"] is None and summary["test_acc_at_best_val"] is None


def test_carving_the_validation_split_keeps_every_image_once():
    import torch

    from normbench.data import _carve_val

    labels = torch.arange(200) % 7
    images = torch.arange(200).view(200, 1, 1, 1)  # each image its own index
    train_x, train_y, val_x, val_y = _carve_val(images, labels, 0.15)
    assert len(val_x) == 30 and len(train_x) == 170
    seen = torch.cat([train_x, val_x]).flatten().sort().values
    assert torch.equal(seen, torch.arange(200))  # disjoint, and nothing lost
    assert torch.equal(labels[val_x.flatten()], val_y)
