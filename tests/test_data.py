"""Data: readers on tiny files in the real formats, task views, batch augmentation, the datamodule."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from data_fixtures import (
    cifar100_names,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_imagefolder,
    write_stl10,
)

from sskt_lightning.data import (
    BatchAugment,
    ImageDataModule,
    class_lookup,
    make_task_split,
    normalize,
    pick_per_class,
    read_cifar10,
    read_cifar100,
    read_fashion_mnist,
    read_imagefolder,
    read_stl10,
    split_val,
    take_part,
)
from sskt_lightning.data import formats
from sskt_lightning.data.formats import FASHION_MNIST_CLASSES
from sskt_lightning.errors import ConfigError, DataNotFoundError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
# T-shirt, pullover, dress, coat, shirt -> tops; trouser; sandal, sneaker, ankle boot -> footwear; bag
COARSE_MAP = [0, 1, 0, 0, 0, 2, 0, 2, 3, 2]


def _check(arrays, expected, n, shape):
    images, labels = expected
    assert arrays.images.dtype == torch.uint8 and arrays.labels.dtype == torch.int64
    assert tuple(arrays.images.shape) == (n, *shape)
    assert torch.equal(arrays.images, torch.from_numpy(images))
    assert torch.equal(arrays.labels, torch.from_numpy(labels))


# ----------------------------------------------------------------------------- readers


def test_cifar10_reader(tmp_path):
    written = write_cifar10(tmp_path, n_train=23, n_test=7)
    train, test = read_cifar10(tmp_path, "train"), read_cifar10(tmp_path, "test")
    _check(train, written["train"], 23, (3, 32, 32))
    _check(test, written["test"], 7, (3, 32, 32))
    assert train.classes[0] == "airplane" and train.classes[9] == "truck" and len(train.classes) == 10


def test_cifar_pixel_layout(tmp_path):
    """A CIFAR row is R plane, G plane, B plane, each 32×32 row-major."""
    write_cifar10(tmp_path, n_train=5, n_test=1)
    row = np.zeros(3072, dtype=np.uint8)
    row[1] = 200  # R, row 0, col 1
    row[1024 + 32 * 2] = 100  # G, row 2, col 0
    row[2048 + 32 * 31 + 30] = 50  # B, row 31, col 30
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:  # as Python 3 re-pickles a batch
        pickle.dump({b"data": row[None], b"labels": [4]}, f, protocol=2)
    img = read_cifar10(tmp_path, "test").images[0]
    assert img[0, 0, 1] == 200 and img[0, 1, 0] == 0
    assert img[1, 2, 0] == 100 and img[1, 0, 2] == 0
    assert img[2, 31, 30] == 50
    assert int(img.sum()) == 350


def test_cifar100_reader(tmp_path):
    written = write_cifar100(tmp_path, n_train=150, n_test=30)
    train = read_cifar100(tmp_path, "train")
    _check(train, written["train"], 150, (3, 32, 32))
    _check(read_cifar100(tmp_path, "test"), written["test"], 30, (3, 32, 32))
    assert train.classes == cifar100_names()
    assert int(train.labels.max()) == 99


def test_stl10_reader(tmp_path):
    written = write_stl10(tmp_path, n_train=12, n_test=5, n_unlabeled=7)
    train = read_stl10(tmp_path, "train")
    _check(train, written["train"], 12, (3, 96, 96))
    _check(read_stl10(tmp_path, "test"), written["test"], 5, (3, 96, 96))
    unl = read_stl10(tmp_path, "unlabeled")
    _check(unl, written["unlabeled"], 7, (3, 96, 96))
    assert (unl.labels == -1).all()
    assert train.labels.min() == 0 and train.labels.max() == 9  # y files hold 1..10
    assert train.classes[2] == "car"


def test_stl10_column_major_transpose(tmp_path):
    """The file stores each channel column by column: file offset x*96 + y is pixel (row y, col x)."""
    write_stl10(tmp_path, n_train=1, n_test=1, n_unlabeled=1)
    raw = np.zeros(3 * 96 * 96, dtype=np.uint8)
    raw[1] = 255  # channel 0, column 0, row 1
    raw[96 * 96 + 96 * 5 + 2] = 77  # channel 1, column 5, row 2
    raw.tofile(tmp_path / "stl10_binary" / "train_X.bin")
    np.array([3], dtype=np.uint8).tofile(tmp_path / "stl10_binary" / "train_y.bin")
    arrays = read_stl10(tmp_path, "train")
    img = arrays.images[0]
    assert img[0, 1, 0] == 255 and img[0, 0, 1] == 0
    assert img[1, 2, 5] == 77 and img[1, 5, 2] == 0
    assert arrays.labels.tolist() == [2]


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reader_local(tmp_path, compress):
    written = write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", n_train=30, n_test=12, compress=compress)
    train = read_fashion_mnist(tmp_path, "train", download=False)
    _check(train, written["train"], 30, (1, 28, 28))
    _check(read_fashion_mnist(tmp_path, "test", download=False), written["test"], 12, (1, 28, 28))
    assert train.classes == FASHION_MNIST_CLASSES


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_files(tmp_path):
    train = read_fashion_mnist(tmp_path, "train", download=False)
    test = read_fashion_mnist(tmp_path, "test", download=False)
    assert tuple(train.images.shape) == (60000, 1, 28, 28) and tuple(test.images.shape) == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.images.dtype == torch.uint8 and 0.25 < train.images.float().mean() / 255 < 0.32


def test_imagefolder_reader(tmp_path):
    written = write_imagefolder(tmp_path, ["ant", "bee", "cow"], n_per_class=3, size=(10, 12))
    train = read_imagefolder(tmp_path, "train")
    _check(train, written["train"], 9, (3, 10, 12))
    _check(read_imagefolder(tmp_path, "test", classes=train.classes), written["test"], 9, (3, 10, 12))
    assert train.classes == ["ant", "bee", "cow"]


def test_imagefolder_resize_gray_and_test_dir(tmp_path):
    write_imagefolder(tmp_path, ["a", "b"], n_per_class=2, size=(20, 40), splits=("train", "test"))
    arrays = read_imagefolder(tmp_path, "test", image_size=16, in_chans=1)
    assert tuple(arrays.images.shape) == (4, 1, 16, 16)
    wide = read_imagefolder(tmp_path, "train", image_size=[8, 12])
    assert tuple(wide.images.shape) == (4, 3, 8, 12)


def test_imagefolder_errors(tmp_path):
    write_imagefolder(tmp_path, ["a", "b"], n_per_class=2, size=8, splits=("train",))
    write_imagefolder(tmp_path, ["a", "c"], n_per_class=2, size=8, splits=("val",))
    with pytest.raises(ConfigError, match="same class folders"):
        read_imagefolder(tmp_path, "test", classes=read_imagefolder(tmp_path, "train").classes)
    write_imagefolder(tmp_path / "mixed", ["a"], n_per_class=1, size=8, splits=("train",))
    Image.new("RGB", (9, 9)).save(tmp_path / "mixed/train/a/other.png")
    with pytest.raises(ConfigError, match="image_size"):
        read_imagefolder(tmp_path / "mixed", "train")
    with pytest.raises(DataNotFoundError, match="train/<class_name>"):
        read_imagefolder(tmp_path / "nothing", "train")


# ----------------------------------------------------------------------------- missing data


@pytest.fixture
def no_network(monkeypatch, offline):
    """Every DNS lookup fails (conftest's ``offline``, which records lookups and back-off sleeps), and
    Debian's Fashion-MNIST package is out of sight."""
    monkeypatch.setattr(formats, "DEBIAN_FASHION_MNIST_DIR", Path("/nonexistent/fashion-mnist"))
    return offline


@pytest.mark.parametrize("reader, folder, url", [
    (read_cifar10, "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    (read_cifar100, "cifar-100-python", "cifar-100-python.tar.gz"),
    (read_stl10, "stl10_binary", "stl10_binary.tar.gz"),
    (read_fashion_mnist, "FashionMNIST", "fashion-mnist"),
])
def test_missing_data_download_fails_fast(tmp_path, no_network, reader, folder, url):
    before = socket.getdefaulttimeout()
    with pytest.raises(DataNotFoundError) as info:
        reader(tmp_path / "data", "train", download=True)
    # fast as events, not seconds (a wall-clock limit fails on a loaded machine): one lookup of the download
    # host, then the error; no retry, no back-off sleep
    assert len(no_network.lookups) == 1 and no_network.sleeps == [], (no_network.lookups, no_network.sleeps)
    msg = str(info.value)
    assert str(tmp_path / "data" / folder) in msg and url in msg
    assert "Download failed" in msg and "paths.data_dir" in msg
    assert info.value.__context__ is None and info.value.__cause__ is None  # no torchvision traceback
    assert socket.getdefaulttimeout() == before


def test_missing_data_without_download(tmp_path, no_network):
    with pytest.raises(DataNotFoundError, match="download=False") as info:
        read_stl10(tmp_path, "unlabeled", download=False)
    assert str(tmp_path / "stl10_binary" / "unlabeled_X.bin") in str(info.value)
    with pytest.raises(DataNotFoundError, match="FashionMNIST/raw"):
        read_fashion_mnist(tmp_path, "test", download=False)


# ----------------------------------------------------------------------------- views


def test_label_map_coarse_fashion():
    lookup, names = class_lookup(FASHION_MNIST_CLASSES, label_map=COARSE_MAP)
    assert lookup.tolist() == COARSE_MAP
    assert names == ["T-shirt/top+Pullover+Dress+Coat+Shirt", "Trouser", "Sandal+Sneaker+Ankle boot", "Bag"]
    labels = torch.arange(10).repeat(3)
    split = make_task_split(labels, torch.arange(10), FASHION_MNIST_CLASSES, label_map=COARSE_MAP, val_size=5)
    assert split.num_classes == 4
    assert split.test_labels.tolist() == COARSE_MAP
    assert torch.equal(split.train_labels, torch.tensor(COARSE_MAP).repeat(3))
    _, renamed = class_lookup(FASHION_MNIST_CLASSES, label_map=COARSE_MAP, class_names=["tops", "trouser", "foot", "bag"])
    assert renamed == ["tops", "trouser", "foot", "bag"]


def test_class_subset_and_bad_maps():
    names = [f"c{i}" for i in range(5)]
    labels = torch.arange(5).repeat(4)
    split = make_task_split(labels, torch.arange(5), names, classes=[3, 1], val_size=2)
    assert split.class_names == ["c3", "c1"]
    kept = torch.cat([split.train, split.val])
    assert set(labels[kept].tolist()) == {1, 3} and len(kept) == 8
    assert split.train_labels[labels == 3].eq(0).all() and split.train_labels[labels == 1].eq(1).all()
    assert split.train_labels[labels == 0].eq(-1).all()
    assert split.test.tolist() == [1, 3] and split.test_labels[split.test].tolist() == [1, 0]
    # subset + label_map: entries of dropped classes are ignored
    lookup, merged = class_lookup(names, classes=[0, 2, 4], label_map=[0, 9, 1, 9, 0])
    assert lookup.tolist() == [0, -1, 1, -1, 0] and merged == ["c0+c4", "c2"]
    with pytest.raises(ConfigError, match="without gaps"):
        class_lookup(names, label_map=[0, 0, 2, 2, 2])
    with pytest.raises(ConfigError, match="one entry per original class"):
        class_lookup(names, label_map=[0, 1])
    with pytest.raises(ConfigError, match="outside"):
        class_lookup(names, classes=[7])


def test_train_part_halves_disjoint_and_covering():
    idx = torch.arange(101)
    halves = [take_part(idx, [k, 2]) for k in (0, 1)]
    assert len(set(halves[0].tolist()) & set(halves[1].tolist())) == 0
    assert sorted(halves[0].tolist() + halves[1].tolist()) == list(range(101))
    assert abs(len(halves[0]) - len(halves[1])) <= 1
    assert halves[0].tolist() != list(range(51))  # a permutation, not a slice
    # the part does not depend on the run seed or split seed
    labels = torch.arange(10).repeat(20)
    a = make_task_split(labels, labels, list("abcdefghij"), train_part=[0, 2], val_size=10, seed=1, split_seed=3)
    b = make_task_split(labels, labels, list("abcdefghij"), train_part=[1, 2], val_size=10, seed=2, split_seed=4)
    part_a, part_b = set(torch.cat([a.train, a.val]).tolist()), set(torch.cat([b.train, b.val]).tolist())
    assert not part_a & part_b and len(part_a | part_b) == 200
    with pytest.raises(ConfigError, match="train_part"):
        take_part(idx, [2, 2])


def test_val_split():
    idx = torch.arange(50, 150)
    train, val = split_val(idx, 30, seed=0)
    assert len(val) == 30 and len(train) == 70
    assert not set(train.tolist()) & set(val.tolist()) and set(train.tolist()) | set(val.tolist()) == set(range(50, 150))
    assert torch.equal(split_val(idx, 30, seed=0)[1], val)
    assert not torch.equal(split_val(idx, 30, seed=1)[1], val)
    assert len(split_val(idx, 0.25)[1]) == 25
    for bad in (0, 100, 1.5, -0.1, "x"):
        with pytest.raises(ConfigError, match="val_size"):
            split_val(idx, bad)


def test_labels_per_class_and_unlabeled_pool():
    labels = torch.arange(4).repeat(30)  # 30 per class
    names = ["a", "b", "c", "d"]
    split = make_task_split(labels, labels, names, val_size=20, labels_per_class=5, seed=7)
    assert torch.bincount(labels[split.train], minlength=4).tolist() == [5, 5, 5, 5]
    train, val, unl = (set(t.tolist()) for t in (split.train, split.val, split.unlabeled))
    assert not train & val and not train & unl and not val & unl
    assert train | val | unl == set(range(120)) and len(unl) == 120 - 20 - 20
    same = make_task_split(labels, labels, names, val_size=20, labels_per_class=5, seed=7)
    other = make_task_split(labels, labels, names, val_size=20, labels_per_class=5, seed=8)
    assert torch.equal(same.train, split.train) and torch.equal(same.val, split.val)
    assert not torch.equal(other.train, split.train)
    assert torch.equal(other.val, split.val)  # the validation set follows split_seed, not seed
    with pytest.raises(ConfigError, match="labels_per_class=40"):
        pick_per_class(split.train, labels, 40, 4)


# ----------------------------------------------------------------------------- augmentation


def test_flip_only():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = BatchAugment(pad=0, flip=True)(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all()
    assert 10 < int(flipped.sum()) < 54  # about half flipped, per sample


def test_crop_is_shifted_window_with_zero_fill():
    torch.manual_seed(1)
    x = torch.randint(1, 256, (32, 2, 6, 7), dtype=torch.uint8)  # no zeros in the input
    pad = 2
    out = BatchAugment(pad=pad, flip=False)(x)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    shifts = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 7])]
        assert found, f"sample {i} is not a window of its padded input"
        shifts.add(found[0])
    assert len(shifts) > 5  # every sample draws its own offset
    assert (out == 0).any()  # zero fill where the window leaves the image


def test_augment_float_and_seeded():
    x = torch.randn(8, 3, 5, 5)
    torch.manual_seed(3)
    a = BatchAugment(pad=1)(x)
    torch.manual_seed(3)
    b = BatchAugment(pad=1)(x)
    assert a.dtype == torch.float32 and a.shape == x.shape and torch.equal(a, b)
    assert BatchAugment(pad=0, flip=False)(x) is x


def test_normalize_by_hand():
    x = torch.tensor([[[[0, 51]], [[255, 102]]]], dtype=torch.uint8)  # 1×2×1×2
    out = normalize(x, mean=(0.5, 0.2), std=(0.25, 0.5))
    expected = torch.tensor([[[[(0 - 0.5) / 0.25, (0.2 - 0.5) / 0.25]], [[(1 - 0.2) / 0.5, (0.4 - 0.2) / 0.5]]]])
    assert out.dtype == torch.float32
    # float32, two exactly rounded elementwise ops: within 1 ulp of the double expectation on any CPU;
    # allclose's default rtol 1e-5 plus atol 1e-6 is ~80 ulp of these values (|x| <= 2)
    assert torch.allclose(out, expected, atol=1e-6)


# ----------------------------------------------------------------------------- datamodule


@pytest.fixture
def cifar_root(tmp_path):
    write_cifar10(tmp_path, n_train=60, n_test=20)
    return tmp_path


def test_datamodule_loaders(cifar_root):
    dm = ImageDataModule("cifar10", cifar_root, batch_size=16, val_size=10, download=False)
    dm.setup("fit")
    arrays = dm.train_arrays
    dm.setup("fit")
    assert dm.train_arrays is arrays  # setup is idempotent
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 3, (32, 32))
    assert (dm.num_train, dm.num_val, dm.num_test, dm.num_unlabeled) == (50, 10, 20, 0)
    assert dm.mean == (0.4914, 0.4822, 0.4465) and dm.std == (0.2470, 0.2435, 0.2616) and not dm.multi_label
    loader = dm.train_dataloader()
    assert len(loader) == 3  # drop_last
    seen = []
    for images, labels, index in loader:
        assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32)
        assert labels.dtype == torch.int64 and index.dtype == torch.int64
        assert torch.equal(images, arrays.images[index]) and torch.equal(labels, arrays.labels[index])
        seen += index.tolist()
    assert set(seen) <= set(dm.train_indices.tolist()) and len(set(seen)) == 48
    assert seen != sorted(seen)  # shuffled
    val = list(dm.val_dataloader())
    assert len(val) == 1 and val[0][2].tolist() == dm.val_indices.tolist()
    assert not set(dm.val_indices.tolist()) & set(dm.train_indices.tolist())
    test_images, test_labels, test_index = next(iter(dm.test_dataloader()))
    assert test_index.tolist() == list(range(20)) and torch.equal(test_images, dm.test_arrays.images)


def test_images_on_device_give_the_same_batches(cifar_root):
    """data.on_device: the loaders carry labels and indices only; after the transfer the images
    are gathered from the device copy of the right split, and every stream, split and augmented
    view equals the host path's."""
    def module(on_device):
        dm = ImageDataModule("cifar10", cifar_root, batch_size=8, val_size=10, download=False, seed=3,
                             labels_per_class=3, unlabeled=True, on_device=on_device)
        dm.setup("fit")
        return dm

    host, dev = module(False), module(True)
    train_h, train_d = next(iter(host.train_dataloader()["labeled"])), next(iter(dev.train_dataloader()["labeled"]))
    assert len(train_d) == 2 and torch.equal(train_d[0], train_h[1]) and torch.equal(train_d[1], train_h[2])
    for dm in (host, dev):
        dm.trainer = SimpleNamespace(training=True, testing=False)
    streams = [{"labeled": next(iter(dm.train_dataloader()["labeled"])),
                "unlabeled": next(iter(dm.train_dataloader()["unlabeled"]))} for dm in (host, dev)]
    assert len(streams[1]["unlabeled"]) == 1                       # the index only
    out_h, out_d = host.on_after_batch_transfer(streams[0], 0), dev.on_after_batch_transfer(streams[1], 0)
    for k in ("labeled", "unlabeled"):
        assert all(torch.equal(a, b) for a, b in zip(out_h[k], out_d[k], strict=True))
    for stage, loader in (("val", "val_dataloader"), ("test", "test_dataloader")):
        for dm in (host, dev):
            dm.trainer = SimpleNamespace(training=False, testing=stage == "test")
        a = host.on_after_batch_transfer(next(iter(getattr(host, loader)())), 0)
        b = dev.on_after_batch_transfer(next(iter(getattr(dev, loader)())), 0)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), stage
    assert {split for split, _ in dev._device_arrays} == {"train", "unlabeled", "test"}


def test_datamodule_worker_loader(cifar_root):
    dm = ImageDataModule("cifar10", cifar_root, batch_size=8, val_size=10, download=False, num_workers=1)
    images, labels, index = next(iter(dm.val_dataloader()))
    assert images.shape == (10, 3, 32, 32) and torch.equal(labels, dm.train_arrays.labels[index])


def test_on_after_batch_transfer(cifar_root):
    dm = ImageDataModule("cifar10", cifar_root, batch_size=16, val_size=10, download=False, augment_pad=4)
    batch = next(iter(dm.train_dataloader()))
    out = dm.on_after_batch_transfer(batch, 0)  # no trainer: normalise only
    assert out[0].dtype == torch.float32 and torch.equal(out[1], batch[1]) and torch.equal(out[2], batch[2])
    mean = torch.tensor(dm.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.std).view(1, 3, 1, 1)
    # elementwise float32 ops only (no reduction, no transcendental): rtol 1e-5 + atol 1e-6 holds on any CPU
    assert torch.allclose(out[0], (batch[0].float() / 255 - mean) / std, atol=1e-6)
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    aug = dm.on_after_batch_transfer(batch, 0)
    assert aug[0].shape == out[0].shape and not torch.equal(aug[0], out[0])
    dm.trainer = SimpleNamespace(training=False)
    assert torch.equal(dm.on_after_batch_transfer(batch, 0)[0], out[0])


def test_unlabeled_pool_loader(cifar_root):
    dm = ImageDataModule("cifar10", cifar_root, batch_size=4, val_size=10, download=False,
                         labels_per_class=2, unlabeled=True, unlabeled_ratio=2.0, seed=3)
    loaders = dm.train_dataloader()
    assert set(loaders) == {"labeled", "unlabeled"}
    assert dm.num_train == 20 and dm.num_unlabeled == 30
    unl = next(iter(loaders["unlabeled"]))
    assert len(unl) == 2 and unl[0].shape == (8, 3, 32, 32) and unl[1].dtype == torch.int64
    assert torch.equal(unl[0], dm.train_arrays.images[unl[1]])
    assert set(dm.unlabeled_indices.tolist()).isdisjoint(dm.train_indices.tolist() + dm.val_indices.tolist())
    batch = {"labeled": next(iter(loaders["labeled"])), "unlabeled": unl}
    dm.trainer = SimpleNamespace(training=True)
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["labeled"][0].dtype == torch.float32 and len(out["labeled"]) == 4      # (x, y, index, view)
    assert out["unlabeled"][0].dtype == torch.float32 and len(out["unlabeled"]) == 3  # (x, index, view)


def test_unlabeled_without_pool_is_config_error(cifar_root):
    dm = ImageDataModule("cifar10", cifar_root, val_size=10, download=False, unlabeled=True)
    with pytest.raises(ConfigError, match="no unlabeled pool"):
        dm.setup("fit")


def test_stl10_unlabeled_split(tmp_path):
    write_stl10(tmp_path, n_train=20, n_test=10, n_unlabeled=9)
    dm = ImageDataModule("stl10", tmp_path, batch_size=4, val_size=4, download=False, unlabeled=True)
    loaders = dm.train_dataloader()
    assert dm.num_unlabeled == 9 and dm.image_size == (96, 96)
    images, index = next(iter(loaders["unlabeled"]))
    assert images.shape == (4, 3, 96, 96)
    assert torch.equal(images, formats.read_stl10(tmp_path, "unlabeled").images[index])


def test_fashion_datamodule_coarse_labels(tmp_path):
    write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", n_train=40, n_test=20)
    dm = ImageDataModule("fashion_mnist", tmp_path, batch_size=8, val_size=0.25, download=False, label_map=COARSE_MAP)
    dm.setup("fit")
    assert dm.num_classes == 4 and dm.class_names[3] == "Bag" and dm.in_chans == 1
    assert (dm.num_train, dm.num_val, dm.mean, dm.std) == (30, 10, (0.2860,), (0.3530,))
    images, labels, index = next(iter(dm.train_dataloader()))
    assert labels.max() <= 3 and torch.equal(labels, torch.tensor(COARSE_MAP)[dm.train_arrays.labels[index]])
    assert dm.on_after_batch_transfer((images, labels, index), 0)[0].shape == (8, 1, 28, 28)


def test_imagefolder_datamodule_gray(tmp_path):
    write_imagefolder(tmp_path, ["a", "b"], n_per_class=5, size=20)
    dm = ImageDataModule("imagefolder", tmp_path, batch_size=2, val_size=2, download=False, image_size=12, in_chans=1)
    assert (dm.num_classes, dm.in_chans, dm.image_size, dm.mean, dm.std) == (2, 1, (12, 12), (0.5,), (0.5,))
    assert dm.num_test == 10


def test_datamodule_config_errors(cifar_root):
    with pytest.raises(ConfigError, match="image_size"):
        ImageDataModule("cifar10", cifar_root, val_size=10, download=False, image_size=64).setup()
    with pytest.raises(ConfigError, match="data.name"):
        ImageDataModule("mnist", cifar_root)
    with pytest.raises(ConfigError, match="mean"):
        ImageDataModule("cifar10", cifar_root, val_size=10, download=False, mean=[0.5], std=[0.5]).setup()


def test_lightning_fit_with_combined_loader(cifar_root, tmp_path):
    """Under a Trainer the dict loader is combined (max_size_cycle) and batches arrive normalised."""
    import lightning as L
    from small_trainer import small_trainer

    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 10)

        def training_step(self, batch, batch_idx):
            x, y, idx, view = batch["labeled"]
            xu, idx_u, view_u = batch["unlabeled"]
            seen.append((x.dtype, xu.dtype, len(batch["unlabeled"]), float(x.mean())))
            return torch.nn.functional.cross_entropy(self.lin(x.mean((2, 3))), y)

        def validation_step(self, batch, batch_idx):
            seen.append(("val", batch[0].dtype))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ImageDataModule("cifar10", cifar_root, batch_size=4, val_size=10, download=False,
                         labels_per_class=2, unlabeled=True)
    trainer = small_trainer(tmp_path, max_steps=3, limit_val_batches=1)
    trainer.fit(Probe(), datamodule=dm)
    train_steps = [s for s in seen if s[0] != "val"]
    assert len(train_steps) == 3
    assert all(s[:3] == (torch.float32, torch.float32, 3) for s in train_steps)
    assert all(abs(s[3]) < 3 for s in train_steps)  # normalised, not 0..255
    assert ("val", torch.float32) in seen
