"""Reading data never runs code and never ends in a traceback: hostile CIFAR pickles are refused,
corrupt or inconsistent files are named with the fix, ImageFolder trees are checked, and the data
options (class names, paths.data_dir for ImageFolder, eval_batch_size) work from the config."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    python2_pickle,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_imagefolder,
    write_stl10,
)

from sskt_lightning.compose import compose_config
from sskt_lightning.data import ImageDataModule, read_cifar10, read_cifar100, read_fashion_mnist, read_imagefolder
from sskt_lightning.data.formats import CIFAR10_CLASSES, STL10_CLASSES, read_stl10
from sskt_lightning.errors import ConfigError, DataError, DataNotFoundError
from sskt_lightning.train import CONFIG_DIR


class Payload:
    """Unpickling this creates `marker` (an `open(marker, "w")` call), as a __reduce__ exploit would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def no_chain(err: BaseException) -> bool:
    """The error prints without a chained traceback from inside a library."""
    return err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def _hostile_cifar(root: Path, marker: Path) -> Path:
    """A CIFAR-10 tree whose data_batch_3 carries the payload beside valid data and labels."""
    write_cifar10(root, n_train=20, n_test=5)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"batch_label": Payload(marker), b"labels": [1, 2, 3, 4],
                                    b"data": np.zeros((4, 3072), dtype=np.uint8)}, protocol=2))
    return batch


def test_the_payload_runs_under_plain_pickle(tmp_path):
    """The test's payload is live: plain pickle.load (what the reader used before) creates the marker."""
    proof = tmp_path / "proof"
    batch = _hostile_cifar(tmp_path / "data", proof)
    loaded = pickle.loads(batch.read_bytes(), encoding="bytes")
    loaded[b"batch_label"].close()
    assert proof.exists()


def test_hostile_cifar_batch_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    batch = _hostile_cifar(tmp_path / "data", marker)
    with pytest.raises(DataError) as info:
        read_cifar10(tmp_path / "data", "train")
    msg = str(info.value)
    assert str(batch) in msg and "Refused" in msg and "io.open" in msg and "cifar-10-python.tar.gz" in msg
    assert no_chain(info.value)
    assert not marker.exists()


@pytest.mark.slow
def test_hostile_cifar_batch_through_the_cli(tmp_path):
    marker = tmp_path / "marker"
    batch = _hostile_cifar(tmp_path / "data", marker)
    proc = subprocess.run([sys.executable, "-m", "sskt_lightning.train", "data=cifar10", "model=resnet20",
                           "method=scratch", "trainer=smoke", "data.val_size=4", "data.num_workers=0",
                           f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(batch) in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    results = tmp_path / "run" / "results.json"   # a failed run records its failure, never a score
    assert not results.exists() or json.loads(results.read_text())["status"] == "failed"


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_batches_written_by_python3_still_load(tmp_path, protocol):
    """Re-pickled batches: protocol 2 from Python 3 writes bytes via _codecs.encode, numpy 2 names numpy._core."""
    written = write_cifar10(tmp_path, n_train=10, n_test=6)
    images, labels = written["test"]
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": images.reshape(6, 3072), b"labels": labels.tolist(), b"batch_label": b"testing"},
                    f, protocol=protocol)
    arrays = read_cifar10(tmp_path, "test")
    assert torch.equal(arrays.images, torch.from_numpy(images)) and arrays.labels.tolist() == labels.tolist()


def test_codecs_encode_is_admitted_for_latin1_only(tmp_path):
    write_cifar10(tmp_path, n_train=10, n_test=2)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00abX\x04\x00\x00\x00zlibq\x00\x86R.")
    with pytest.raises(DataError, match="_codecs.encode"):
        read_cifar10(tmp_path, "test")


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(p.read_bytes()[:500]), "truncated or not a CIFAR pickle"),
    (lambda p: p.write_bytes(b""), "truncated or not a CIFAR pickle"),
    (lambda p: p.write_bytes(b"GIF89a garbage" * 10), "truncated or not a CIFAR pickle"),
    (lambda p: p.write_bytes(python2_pickle([1, 2, 3])), "not a CIFAR batch"),
    (lambda p: p.write_bytes(python2_pickle({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})),
     "N×3072 uint8"),
    (lambda p: p.write_bytes(python2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})),
     "expected 2 integer labels"),
    (lambda p: p.write_bytes(python2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]})),
     r"outside the class ids 0..9 \(e.g. 10 at image 1\)"),
    (lambda p: p.write_bytes(python2_pickle({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, [2, 3], 4]})),
     r"expected 3 integer labels .*ragged .*e.g. \[2, 3\]"),
    (lambda p: p.write_bytes(python2_pickle({b"data": np.zeros((2, 3072), np.uint8)})), "no 'labels' entry"),
])
def test_bad_cifar_batches_name_the_file_and_the_fix(tmp_path, damage, match):
    write_cifar10(tmp_path, n_train=10, n_test=2)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    damage(batch)
    with pytest.raises(DataError, match=match) as info:
        read_cifar10(tmp_path, "test")
    assert str(batch) in str(info.value) and "To fix" in str(info.value)
    assert no_chain(info.value)


def test_cifar100_fine_labels_checked_against_100_classes(tmp_path):
    write_cifar100(tmp_path, n_train=10, n_test=2)
    (tmp_path / "cifar-100-python" / "test").write_bytes(python2_pickle(
        {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [99, 100], b"coarse_labels": [0, 0]}))
    with pytest.raises(DataError, match=r"0..99"):
        read_cifar100(tmp_path, "test")
    (tmp_path / "cifar-100-python" / "meta").write_bytes(python2_pickle({b"fine_label_names": [b"a", b"b"]}))
    with pytest.raises(DataError, match="100 class names"):
        read_cifar100(tmp_path, "train")


@pytest.mark.parametrize("names, match", [
    ([b"\xff\xfeplane"] + [b"x"] * 9, r"class name 0 \(b'\\xff\\xfeplane'\) is not UTF-8"),
    ([b"plane"] + [7] * 9, "class name 1 is a int, not text"),
])
def test_bad_cifar_class_names_name_the_meta_file(tmp_path, names, match):
    write_cifar10(tmp_path, n_train=10, n_test=2)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(python2_pickle({b"label_names": names}))
    with pytest.raises(DataError, match=match) as info:
        read_cifar10(tmp_path, "test")
    assert str(meta) in str(info.value) and "To fix" in str(info.value)
    assert no_chain(info.value)


def test_bad_stl10_files(tmp_path):
    write_stl10(tmp_path, n_train=3, n_test=2, n_unlabeled=2)
    folder = tmp_path / "stl10_binary"
    (folder / "unlabeled_X.bin").write_bytes((folder / "unlabeled_X.bin").read_bytes()[:-5])
    with pytest.raises(DataError, match="unlabeled_X.bin is truncated"):
        read_stl10(tmp_path, "unlabeled")
    np.array([1, 0, 3], dtype=np.uint8).tofile(folder / "train_y.bin")  # y files hold 1..10
    with pytest.raises(DataError, match="train_y.bin"):
        read_stl10(tmp_path, "train")
    np.array([1, 2], dtype=np.uint8).tofile(folder / "train_y.bin")
    with pytest.raises(DataError, match="expected 3 integer labels"):
        read_stl10(tmp_path, "train")


@pytest.mark.parametrize("content, match", [
    (b"a\nb\nc\n", r"lists 3 lines \('a', 'b', 'c'\); STL-10 needs 10"),
    ("\n".join(["cat"] * 10).encode(), "10 distinct"),
    (b"\xff\xfe" + "\n".join(STL10_CLASSES).encode(), "is not UTF-8 text"),
])
def test_bad_stl10_class_names_file(tmp_path, content, match):
    write_stl10(tmp_path, n_train=3, n_test=2, n_unlabeled=2)
    names = tmp_path / "stl10_binary" / "class_names.txt"
    names.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        read_stl10(tmp_path, "train")
    assert str(names) in str(info.value) and "delete it" in str(info.value)
    assert no_chain(info.value)
    names.unlink()   # no file: the standard names
    assert read_stl10(tmp_path, "train").classes == STL10_CLASSES


@pytest.mark.parametrize("compress", [True, False])
def test_bad_fashion_mnist_files(tmp_path, compress):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_fashion_mnist(raw, n_train=6, n_test=4, compress=compress)
    suffix = ".gz" if compress else ""
    images = raw / f"t10k-images-idx3-ubyte{suffix}"
    data = gzip.decompress(images.read_bytes()) if compress else images.read_bytes()
    damaged = data[:-100]
    images.write_bytes(gzip.compress(damaged) if compress else damaged)
    with pytest.raises(DataError, match="not a readable idx file") as info:
        read_fashion_mnist(tmp_path, "test")
    assert str(images) in str(info.value) and no_chain(info.value)
    write_fashion_mnist(raw, n_train=6, n_test=4, compress=compress)
    labels = raw / f"t10k-labels-idx1-ubyte{suffix}"
    bad = bytes([0, 0, 8, 1, 0, 0, 0, 4, 0, 1, 12, 3])  # label 12 of 10 classes
    labels.write_bytes(gzip.compress(bad) if compress else bad)
    with pytest.raises(DataError, match="outside the class ids 0..9"):
        read_fashion_mnist(tmp_path, "test")


def test_a_gzip_bomb_in_fashion_mnist_is_unpacked_no_further_than_its_idx_header_says(tmp_path, monkeypatch):
    """A .gz is unpacked into a temporary directory for torchvision's reader; it stops at the size
    the idx header declares, so a small .gz cannot fill the disk."""
    from contextlib import contextmanager

    from sskt_lightning.data import formats

    kept = tmp_path / "unpacked"
    kept.mkdir()

    @contextmanager
    def kept_dir(prefix=None):     # the temporary directory, kept to measure what was written there
        yield str(kept)

    monkeypatch.setattr(formats.tempfile, "TemporaryDirectory", kept_dir)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_fashion_mnist(raw, n_train=6, n_test=4)
    images = raw / "t10k-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + (4).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with gzip.open(images, "wb") as f:           # declares 4 images, holds 8 MB more
        f.write(header + bytes(4 * 28 * 28))
        for _ in range(8):
            f.write(bytes(1 << 20))
    assert images.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"unpacks to more than the 3,152 bytes its idx header declares") as info:
        read_fashion_mnist(tmp_path, "test")
    assert str(images) in str(info.value) and no_chain(info.value)
    assert sum(f.stat().st_size for f in kept.iterdir()) <= len(header) + 4 * 28 * 28
    with gzip.open(images, "wb") as f:           # a header declaring 100 GB: refused before unpacking
        f.write(bytes([0, 0, 8, 3]) + (100_000).to_bytes(4, "big") + (1000).to_bytes(4, "big") * 2)
    with pytest.raises(DataError, match=r"shape \(100000, 1000, 1000\).*Nothing was unpacked"):
        read_fashion_mnist(tmp_path, "test")


# ----------------------------------------------------------------------------- ImageFolder


def test_corrupt_and_empty_images_are_named(tmp_path):
    write_imagefolder(tmp_path, ["a", "b"], n_per_class=3, size=8)
    empty = tmp_path / "train" / "a" / "0001.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="not a readable image") as info:
        read_imagefolder(tmp_path, "train")
    assert str(empty) in str(info.value) and "data.skip_bad_images=true" in str(info.value)
    truncated = tmp_path / "test" / "b" / "0004.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DataError, match="not a readable image") as info:
        read_imagefolder(tmp_path, "test")
    assert str(truncated) in str(info.value) and no_chain(info.value)


def test_skip_bad_images_leaves_them_out_with_a_count(tmp_path, caplog):
    written = write_imagefolder(tmp_path, ["a", "b"], n_per_class=3, size=8)
    (tmp_path / "train" / "a" / "0001.png").write_bytes(b"")
    (tmp_path / "train" / "b" / "0005.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="sskt_lightning"):
        arrays = read_imagefolder(tmp_path, "train", skip_bad_images=True)
    assert arrays.labels.tolist() == [0, 0, 1, 1]
    keep = [0, 2, 3, 4]
    assert torch.equal(arrays.images, torch.from_numpy(written["train"][0][keep]))
    assert "left out 2 unreadable image(s)" in caplog.text
    # through the data module and its config option
    dm = ImageDataModule("imagefolder", tmp_path, val_size=1, download=False, skip_bad_images=True)
    assert len(dm.train_arrays) == 4 and dm.num_test == 6
    with pytest.raises(ConfigError, match="skip_bad_images"):
        ImageDataModule("cifar10", tmp_path, skip_bad_images=True)


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_class_folder_is_an_error(tmp_path, split):
    write_imagefolder(tmp_path, ["a", "b", "c"], n_per_class=2, size=8)
    for f in (tmp_path / split / "b").iterdir():
        f.unlink()
    (tmp_path / split / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="without images") as info:
        ImageDataModule("imagefolder", tmp_path, val_size=1, download=False).setup()
    assert str(tmp_path / split / "b") in str(info.value)


def test_test_folder_is_the_test_split_and_val_is_accepted(tmp_path, caplog):
    write_imagefolder(tmp_path, ["a", "b"], n_per_class=2, size=8, splits=("train", "val"))
    with caplog.at_level(logging.INFO, logger="sskt_lightning"):
        from_val = read_imagefolder(tmp_path, "test")
    assert len(from_val) == 4 and "used as the TEST split" in caplog.text
    written = write_imagefolder(tmp_path, ["a", "b"], n_per_class=3, size=8, splits=("test",), seed=5)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sskt_lightning"):
        from_test = read_imagefolder(tmp_path, "test")
    assert torch.equal(from_test.images, torch.from_numpy(written["test"][0]))
    assert "is not used" in caplog.text
    with pytest.raises(DataNotFoundError) as info:
        read_imagefolder(tmp_path / "none", "test")
    assert "test/<class_name>" in str(info.value) and "paths.data_dir" in str(info.value)


def test_imagefolder_takes_paths_data_dir(tmp_path):
    data = tmp_path / "pets"
    write_imagefolder(data, ["cat", "dog"], n_per_class=3, size=8)
    cfg = compose_config(["data=imagefolder", f"paths.data_dir={data}", "data.image_size=8", "data.val_size=2"],
                         tmp_path / "run")
    assert cfg.data.data_dir == str(data)
    from hydra.utils import instantiate
    dm = instantiate(cfg.data)
    assert dm.class_names == ["cat", "dog"] and dm.num_test == 6


# ----------------------------------------------------------------------------- options


def test_classes_by_name(tmp_path):
    write_cifar10(tmp_path, n_train=40, n_test=20)
    by_name = ImageDataModule("cifar10", tmp_path, val_size=2, download=False, classes=["cat", "dog"])
    by_id = ImageDataModule("cifar10", tmp_path, val_size=2, download=False, classes=[3, 5])
    assert by_name.class_names == ["cat", "dog"] == by_id.class_names
    assert torch.equal(by_name.task.train, by_id.task.train) and torch.equal(by_name.task.test, by_id.task.test)
    mixed = ImageDataModule("cifar10", tmp_path, val_size=2, download=False, classes=["ship", 0, "3"])
    assert mixed.class_names == ["ship", "airplane", "cat"]
    with pytest.raises(ConfigError, match="not class names of cifar10") as info:
        ImageDataModule("cifar10", tmp_path, val_size=2, download=False, classes=["cat", "kitten"]).setup()
    assert "'kitten'" in str(info.value) and all(c in str(info.value) for c in CIFAR10_CLASSES)


@pytest.mark.parametrize("option", sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml")))
def test_eval_batch_size_without_plus(tmp_path, option):
    cfg = compose_config([f"data={option}", "data.eval_batch_size=48"], tmp_path)
    assert cfg.data.eval_batch_size == 48
    assert compose_config([f"data={option}"], tmp_path).data.eval_batch_size is None  # 2 × batch_size
