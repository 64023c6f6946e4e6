"""Write tiny datasets in the real on-disk formats (CIFAR pickles, STL-10 binaries, idx .gz, ImageFolder).

Each writer returns what it wrote as `{split: (images uint8 N×C×H×W, labels int64 N)}` in the
logical (row-major, channel-first) layout, so tests can compare the readers' output with it.
Labels cycle through the classes (every class present); pixels are seeded random noise.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

from sskt_lightning.data.formats import CIFAR10_CLASSES, STL10_CLASSES

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


def _images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _labels(n: int, num_classes: int, offset: int = 0) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) + offset) % num_classes


def _dump(path: Path, obj: dict) -> None:
    """Pickle like the originals: bytes keys (they were written by Python 2)."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Arrays:
    """`<root>/cifar-10-batches-py/` with data_batch_1..5 (n_train spread over them), test_batch, batches.meta."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = (_images(n_train, (3, 32, 32), seed), _labels(n_train, 10))
    test = (_images(n_test, (3, 32, 32), seed + 1), _labels(n_test, 10, offset=3))
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _dump(folder / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(),
                                            b"data": train[0][part].reshape(len(part), 3072),
                                            b"labels": train[1][part].tolist()})
    _dump(folder / "test_batch", {b"data": test[0].reshape(n_test, 3072), b"labels": test[1].tolist()})
    _dump(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                    b"num_cases_per_batch": 10000, b"num_vis": 3072})
    return {"train": train, "test": test}


def cifar100_names() -> list[str]:
    return [f"class_{i:02d}" for i in range(100)]


def write_cifar100(root: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Arrays:
    """`<root>/cifar-100-python/` with train, test (fine and coarse labels) and meta."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out = {"train": (_images(n_train, (3, 32, 32), seed), _labels(n_train, 100)),
           "test": (_images(n_test, (3, 32, 32), seed + 1), _labels(n_test, 100, offset=7))}
    for split, (images, labels) in out.items():
        _dump(folder / split, {b"data": images.reshape(len(images), 3072), b"fine_labels": labels.tolist(),
                               b"coarse_labels": (labels // 5).tolist()})
    _dump(folder / "meta", {b"fine_label_names": [c.encode() for c in cifar100_names()],
                            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]})
    return out


def write_stl10(root: str | Path, n_train: int = 30, n_test: int = 20, n_unlabeled: int = 40, seed: int = 0) -> Arrays:
    """`<root>/stl10_binary/`: X files column-major (each channel stored transposed), y files 1..10."""
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    out: Arrays = {}
    for k, (split, n) in enumerate((("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled))):
        images = _images(n, (3, 96, 96), seed + k)
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # column-major, as the originals
        labels = _labels(n, 10, offset=k) if split != "unlabeled" else np.full(n, -1, dtype=np.int64)
        if split != "unlabeled":
            (labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
        out[split] = (images, labels)
    (folder / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    return out


def _idx_bytes(array: np.ndarray) -> bytes:
    """idx format: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion_mnist(folder: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0,
                        compress: bool = True) -> Arrays:
    """The 4 idx files (`train-images-idx3-ubyte.gz`, ...) directly in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: Arrays = {}
    for k, (split, prefix, n) in enumerate((("train", "train", n_train), ("test", "t10k", n_test))):
        images, labels = _images(n, (1, 28, 28), seed + k), _labels(n, 10, offset=k)
        for kind, array in (("images-idx3", images[:, 0]), ("labels-idx1", labels.astype(np.uint8))):
            name = folder / f"{prefix}-{kind}-ubyte"
            data = _idx_bytes(array)
            if compress:
                with gzip.open(f"{name}.gz", "wb") as f:
                    f.write(data)
            else:
                name.write_bytes(data)
        out[split] = (images, labels)
    return out


def write_imagefolder(root: str | Path, classes: list[str] | tuple[str, ...] = ("cat", "dog", "fox"),
                      n_per_class: int = 4, size: int | tuple[int, int] = 16, splits: tuple[str, ...] = ("train", "val"),
                      mode: str = "RGB", seed: int = 0) -> Arrays:
    """`<root>/<split>/<class>/<i>.png` (lossless, so pixels can be compared); size int or (h, w)."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    chans = 1 if mode == "L" else 3
    out: Arrays = {}
    for k, split in enumerate(splits):
        images = _images(len(classes) * n_per_class, (chans, h, w), seed + k)
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), n_per_class)
        for i, (img, label) in enumerate(zip(images, labels)):
            path = Path(root) / split / classes[label] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = img[0] if chans == 1 else img.transpose(1, 2, 0)
            Image.fromarray(pixels).save(path)
        out[split] = (images, labels)
    return out
