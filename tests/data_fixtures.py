"""Write tiny datasets in the real on-disk formats (CIFAR pickles, STL-10 binaries, idx .gz, ImageFolder,
Pascal VOC 2007: JPEGs + XML annotations + ImageSets lists).

Each writer returns what it wrote as `{split: (images uint8 N×C×H×W, labels int64 N)}` in the
logical (row-major, channel-first) layout, so tests can compare the readers' output with it.
Labels cycle through the classes (every class present); pixels are seeded random noise.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import types
from pathlib import Path

import numpy as np

from sskt_lightning.data.formats import CIFAR10_CLASSES, STL10_CLASSES, VOC_CLASSES

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


def _images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _labels(n: int, num_classes: int, offset: int = 0) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) + offset) % num_classes


class _Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the CIFAR batches: protocol 2, every str/bytes as a
    (SHORT_)BINSTRING (loaded as bytes with encoding='bytes'), numpy's reconstructor under its
    numpy 1 name `numpy.core.multiarray._reconstruct` (then numpy.ndarray, numpy.dtype)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin1"))

    def save_global(self, obj, name=None) -> None:
        if getattr(obj, "__module__", None) in ("numpy._core.multiarray", "numpy.core.multiarray"):
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[bytes], dispatch[str], dispatch[types.FunctionType] = save_bytes, save_str, save_global


def python2_pickle(obj) -> bytes:
    """`obj` pickled as Python 2 wrote the CIFAR batches (see `_Python2Pickler`)."""
    f = io.BytesIO()
    _Python2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def _dump(path: Path, obj: dict) -> None:
    """Pickle like the originals: bytes keys, Python 2's protocol-2 opcodes."""
    Path(path).write_bytes(python2_pickle(obj))


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
                      n_per_class: int = 4, size: int | tuple[int, int] = 16, splits: tuple[str, ...] = ("train", "test"),
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


def voc_objects(g: int) -> list[tuple[str, int]]:
    """(class name, difficult) of the objects in the g-th written VOC image (trainval first, then test).

    Image 0 holds a dog and two persons; every image has class g % 20; every third (g % 3 == 1)
    also a difficult-only object of class (g + 7) % 20; g % 4 == 2 repeats its main class as difficult.
    """
    if g == 0:
        return [("dog", 0), ("person", 0), ("person", 0)]
    objects = [(VOC_CLASSES[g % 20], 0)]
    if g % 3 == 1:
        objects.append((VOC_CLASSES[(g + 7) % 20], 1))
    if g % 4 == 2:
        objects.append((VOC_CLASSES[g % 20], 1))
    return objects


def _voc_xml(image_id: str, width: int, height: int, objects: list[tuple[str, int]]) -> str:
    """A standard VOC annotation; persons get <part>s with their own <name> (as in the real files)."""
    parts = []
    for name, difficult in objects:
        body = (f"<name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                f"<difficult>{difficult}</difficult>"
                f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>{width}</xmax><ymax>{height}</ymax></bndbox>")
        if name == "person":
            body += ("<part><name>head</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>5</xmax><ymax>5</ymax>"
                     "</bndbox></part><part><name>hand</name><bndbox><xmin>3</xmin><ymin>3</ymin><xmax>4</xmax>"
                     "<ymax>4</ymax></bndbox></part>")
        parts.append(f"\t<object>\n\t\t{body}\n\t</object>")
    return (f"<annotation>\n\t<folder>VOC2007</folder>\n\t<filename>{image_id}.jpg</filename>\n"
            f"\t<source><database>The VOC2007 Database</database><annotation>PASCAL VOC2007</annotation></source>\n"
            f"\t<size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n"
            f"\t<segmented>0</segmented>\n" + "\n".join(parts) + "\n</annotation>\n")


def write_voc2007(root: str | Path, n_trainval: int = 8, n_test: int = 5, size: int | tuple[int, int] = 24,
                  seed: int = 0) -> dict[str, dict]:
    """`<root>/VOCdevkit/VOC2007/` with JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/{trainval,test}.txt.

    Ids are 6-digit, trainval and test interleaved (as in the real set); each list file is sorted.
    Images are solid colours (JPEG keeps them within a few levels) of height h and width
    w + 8 * (g % 3), so the reader must resize. One extra image/annotation pair is in no list.
    Returns `{"train"|"test": {"ids", "colors" N×3 uint8, "labels" N×20 int64, "objects"}}`,
    labels counting difficult objects as positive.
    """
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    folder = Path(root) / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    total = n_trainval + n_test
    in_test = np.zeros(total, dtype=bool)
    in_test[np.random.default_rng(seed).permutation(total)[:n_test]] = True
    numbers = {"train": np.flatnonzero(~in_test) * 2 + 5, "test": np.flatnonzero(in_test) * 2 + 5}
    colors = np.random.default_rng(seed + 1).integers(20, 236, size=(total + 1, 3), dtype=np.uint8)
    out, g = {}, 0
    for split, image_set in (("train", "trainval"), ("test", "test")):
        ids = [f"{k:06d}" for k in numbers[split]]
        labels = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.int64)
        objects = []
        for row, image_id in enumerate(ids):
            objs = voc_objects(g)
            width = w + 8 * (g % 3)
            Image.new("RGB", (width, h), tuple(int(c) for c in colors[g])).save(
                folder / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (folder / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, width, h, objs))
            labels[row, [VOC_CLASSES.index(name) for name, _ in objs]] = 1
            objects.append(objs)
            g += 1
        (folder / "ImageSets" / "Main" / f"{image_set}.txt").write_text("\n".join(ids) + "\n")
        out[split] = {"ids": ids, "colors": colors[g - len(ids):g], "labels": labels, "objects": objects}
    extra = f"{2 * total + 11:06d}"  # on disk, in no list: must not be read
    Image.new("RGB", (w, h), tuple(int(c) for c in colors[total])).save(folder / "JPEGImages" / f"{extra}.jpg")
    (folder / "Annotations" / f"{extra}.xml").write_text(_voc_xml(extra, w, h, [("cat", 0)]))
    return out
