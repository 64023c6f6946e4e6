"""Readers for the real on-disk dataset formats, each returning in-memory `ImageArrays`.

Every reader is `read_<name>(root, split, download=False) -> ImageArrays`, and every
`locate_<name>(root, split, download)` finds (downloading if allowed) a split's files without
reading them; `sskt_lightning.data.specs.DATASETS` names them per dataset. File lists, URLs,
checksums, downloads and parsing come from torchvision.datasets wherever it reads the same files
into the same uint8 arrays (STL10, the MNIST idx readers, VOCDetection.parse_voc_xml, ImageFolder's
file listing, download_and_extract_archive). What remains here is what torchvision lacks: a
restricted unpickler for CIFAR (torchvision unpickles with plain pickle, which runs code), STL-10's
unlabeled split as a memory map, Debian's gzipped Fashion-MNIST files, threaded decoding and
resizing, and the errors: missing files become a `DataNotFoundError` that says where we looked and
what to do (after a download attempt with `download=True`); files that are present but unusable
raise `DataError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import pickle
import socket
import struct
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, STL10, FashionMNIST, VOCDetection
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.datasets.voc import DATASET_YEAR_DICT

from sskt_lightning.errors import ConfigError, DataError, DataNotFoundError

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 20.0
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = IMG_EXTENSIONS  # torchvision's ImageFolder extensions

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip
FASHION_MNIST_CLASSES = list(FashionMNIST.classes)
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


@dataclass
class ImageArrays:
    """A whole split in memory: uint8 images N×C×H×W, class names, and int64 labels: N class ids
    (-1 = unknown), or for multi-label data N×K multi-hot rows of 0/1 (K = number of classes)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        n, k = len(self.images), len(self.classes)
        if self.labels.dtype != torch.int64 or self.labels.shape not in ((n,), (n, k)):
            raise ValueError(f"labels must be int64 of shape ({n},) or multi-hot ({n}, {k}), got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2


# --------------------------------------------------------------------------- download plumbing


@contextmanager
def _socket_timeout(seconds: float):
    """Bound every blocking socket call made inside (downloads must never hang)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _try_download(fetch: Callable[[], object]) -> str | None:
    """Run `fetch`; return None on success or a one-line reason on any failure."""
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            fetch()
    except Exception as err:  # noqa: BLE001 - any failure means "not available"; reported below
        return f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]
    return None


def _not_found(title: str, looked: Sequence[Path], reason: str, fix: str) -> DataNotFoundError:
    """Build the user-facing error: what, where we looked, why the download failed, what to do."""
    paths = "\n".join(f"  - {p}" for p in looked)
    return DataNotFoundError(f"{title} not found. Looked for:\n{paths}\n{reason}\nTo fix: {fix}")


def _download_reason(download: bool, failure: str | None) -> str:
    if not download:
        return "Download not attempted (download=False)."
    return f"Download failed: {failure}"


def _archive_fix(dataset: type, root: Path) -> str:
    return (f"download {dataset.url} and extract it under {root} (giving {root / dataset.base_folder}/), "
            f"or set paths.data_dir=<dir that contains {dataset.base_folder}/>.")


def _ensure_archive(title: str, dataset: type, root: Path, files: Sequence[str], download: bool) -> Path:
    """`<root>/<dataset.base_folder>` once all `files` are in it, fetching torchvision's archive
    (URL and md5 from the torchvision dataset class) if allowed."""
    folder = root / dataset.base_folder

    def missing() -> list[Path]:
        return [folder / f for f in files if not (folder / f).is_file()]

    if not missing():
        return folder
    failure = None
    if download:
        failure = _try_download(lambda: download_and_extract_archive(
            dataset.url, str(root), filename=dataset.filename, md5=dataset.tgz_md5))
        if failure is None and not missing():
            return folder
        failure = failure or f"the archive did not contain {', '.join(map(str, missing()))}"
    raise _not_found(title, missing(), _download_reason(download, failure), _archive_fix(dataset, root))


def _check_split(split: str, allowed: Sequence[str], title: str) -> None:
    if split not in allowed:
        raise ConfigError(f"{title} has no split {split!r}; choose one of {list(allowed)}.")


def _check_labels(labels: np.ndarray, n: int, num_classes: int, where: str, fix: str) -> np.ndarray:
    """Labels as an int64 N-vector of class ids in 0..num_classes-1, else DataError naming `where`."""
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError):   # ragged: numpy refuses to build an array from nested lists of other lengths
        raise DataError(f"{where}: expected {n} integer labels (one per image), got a ragged sequence (lists "
                        f"nested in it, e.g. {_first_nested(labels)}). {fix}") from None
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: expected {n} integer labels (one per image), got {labels.dtype} array of "
                        f"shape {labels.shape}. {fix}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{where}: {bad.size} labels are outside the class ids 0..{num_classes - 1} "
                        f"(e.g. {labels[bad[0]]} at image {bad[0]}). {fix}")
    return labels.astype(np.int64)


def _first_nested(labels) -> str:
    """The first entry of `labels` that is itself a sequence, shortened, for the error message."""
    try:
        found = next((x for x in labels if isinstance(x, (list, tuple, np.ndarray))), None)
    except TypeError:
        found = None
    text = "a nested sequence" if found is None else repr(found)
    return text if len(text) <= 60 else f"{text[:57]}..."


# --------------------------------------------------------------------------- CIFAR
# File names, URLs and checksums come from torchvision's CIFAR10/CIFAR100, but not their reader:
# it unpickles the batches with plain pickle.load, which runs any code a pickle carries (a
# __reduce__ payload). `_CifarUnpickler` admits only the globals the format needs.

_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy.core.multiarray._reconstruct (numpy._core in numpy 2)
_NUMPY_SCALAR = np.int64(0).__reduce__()[0]  # numpy.core.multiarray.scalar


def _latin1_encode(text: str, encoding: str) -> bytes:
    """`_codecs.encode` as Python 3 writes bytes into protocol-2 pickles, for latin-1 text only."""
    if encoding != "latin1" or not isinstance(text, str):
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


# Everything a CIFAR batch refers to: the originals (Python 2 cPickle, protocol 2, numpy 1 arrays)
# name numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype; numpy >= 2 writes
# numpy._core; Python 3 writes bytes into protocol-2 pickles through _codecs.encode.
_CIFAR_GLOBALS: dict[tuple[str, str], object] = {
    **{(m, "_reconstruct"): _NUMPY_RECONSTRUCT for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _NUMPY_SCALAR for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something a CIFAR batch never holds (and that could run code)."""


class _CifarUnpickler(pickle.Unpickler):
    """Dicts, lists, tuples, bytes, str, numbers and numpy arrays; every other global is refused."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def _load_batch(path: Path, dataset: type) -> dict:
    """A CIFAR pickle (written by Python 2: loaded with encoding='bytes') as a dict with str keys."""
    fix = f"To fix: delete {path.parent} and extract {dataset.url} again (data.download=true fetches it)."
    try:
        with open(path, "rb") as f:
            raw = _CifarUnpickler(f, encoding="bytes").load()
    except _Refused as err:
        raise DataError(f"Refused to load {path}: its pickle asks for {err}, which a CIFAR batch never holds and "
                        f"which could run code (CIFAR batches hold only dicts, lists, bytes, numbers and numpy "
                        f"arrays). Nothing from it was run. {fix}") from None
    except Exception as err:  # noqa: BLE001 - any parse failure means a bad file; reported with its name
        raise DataError(f"{path} is not a readable CIFAR batch ({type(err).__name__}: {err}); it is truncated or "
                        f"not a CIFAR pickle. {fix}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path} holds a {type(raw).__name__}, not a CIFAR batch (a dict). {fix}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_arrays(paths: Sequence[Path], dataset: type, label_key: str, classes: list[str]) -> ImageArrays:
    """Concatenate CIFAR batches: "data" is N×3072 uint8 (R plane, G plane, B plane, each row-major)."""
    images, labels = [], []
    for path in paths:
        batch = _load_batch(path, dataset)
        fix = f"To fix: replace it with the file from {dataset.url}."
        data = batch.get("data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: 'data' must be an N×3072 uint8 array (32×32 RGB images), got {got}. {fix}")
        if label_key not in batch:
            raise DataError(f"{path} has no {label_key!r} entry (keys: {sorted(map(str, batch))}). {fix}")
        labels.append(_check_labels(batch[label_key], len(data), len(classes), str(path), fix))
        images.append(data)
    data = np.concatenate(images).reshape(-1, 3, 32, 32)  # as torchvision's CIFAR10 does (but from a safe load)
    return ImageArrays(torch.from_numpy(data), torch.from_numpy(np.concatenate(labels)), classes)


def _cifar_classes(folder: Path, dataset: type, count: int, default: list[str] | None) -> list[str]:
    meta = folder / dataset.meta["filename"]
    if not meta.is_file() and default is not None:
        return list(default)
    names = _load_batch(meta, dataset).get(dataset.meta["key"])
    fix = f"To fix: replace it with the file from {dataset.url}."
    if not isinstance(names, list) or len(names) != count:
        raise DataError(f"{meta}: {dataset.meta['key']!r} must list the {count} class names. {fix}")
    out = []
    for i, name in enumerate(names):
        if not isinstance(name, (bytes, str)):
            raise DataError(f"{meta}: class name {i} is a {type(name).__name__}, not text. {fix}")
        try:
            out.append(name.decode("utf-8") if isinstance(name, bytes) else name)
        except UnicodeDecodeError as err:
            raise DataError(f"{meta}: class name {i} ({name[:40]!r}) is not UTF-8 text ({err.reason} at byte "
                            f"{err.start}). {fix}") from None
    return out


def _cifar_files(dataset: type, split: str, title: str) -> list[str]:
    _check_split(split, ("train", "test"), title)
    return [name for name, _md5 in (dataset.train_list if split == "train" else dataset.test_list)]


def locate_cifar10(root: Path, split: str, download: bool) -> Path:
    return _ensure_archive("CIFAR-10", CIFAR10, root, _cifar_files(CIFAR10, split, "CIFAR-10"), download)


def locate_cifar100(root: Path, split: str, download: bool) -> Path:
    files = [*_cifar_files(CIFAR100, split, "CIFAR-100"), CIFAR100.meta["filename"]]  # the class names are needed
    return _ensure_archive("CIFAR-100", CIFAR100, root, files, download)


def read_cifar10(root: str | Path, split: str = "train", download: bool = False) -> ImageArrays:
    """CIFAR-10 from `<root>/cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta)."""
    folder = locate_cifar10(Path(root), split, download)
    classes = _cifar_classes(folder, CIFAR10, 10, CIFAR10_CLASSES)
    return _cifar_arrays([folder / f for f in _cifar_files(CIFAR10, split, "CIFAR-10")], CIFAR10, "labels", classes)


def read_cifar100(root: str | Path, split: str = "train", download: bool = False) -> ImageArrays:
    """CIFAR-100 (fine labels) from `<root>/cifar-100-python/` (train, test, meta)."""
    folder = locate_cifar100(Path(root), split, download)
    classes = _cifar_classes(folder, CIFAR100, 100, None)
    return _cifar_arrays([folder / split], CIFAR100, "fine_labels", classes)


# --------------------------------------------------------------------------- STL-10

_STL_IMAGE_BYTES = 3 * 96 * 96


class _STL10Files(STL10):
    """torchvision's STL10 reader (`.data`: N×3×96×96 uint8, `.labels`: 0-based) without the md5 pass
    over all five files, the 2.7 GB unlabeled one included, that it makes on every load
    (`locate_stl10` checks that the split's files are there, the reader that they are whole)."""

    def _check_integrity(self) -> bool:
        return True


def _stl10_files(split: str) -> list[str]:
    _check_split(split, ("train", "test", "unlabeled"), "STL-10")
    return [f"{split}_X.bin"] + ([] if split == "unlabeled" else [f"{split}_y.bin"])


def locate_stl10(root: Path, split: str, download: bool) -> Path:
    return _ensure_archive("STL-10", STL10, root, _stl10_files(split), download)


def read_stl10(root: str | Path, split: str = "train", download: bool = False) -> ImageArrays:
    """STL-10 from `<root>/stl10_binary/`; split in train/test/unlabeled (unlabeled labels are -1)."""
    folder = locate_stl10(Path(root), split, download)
    x_file, fix = folder / f"{split}_X.bin", f"To fix: extract {STL10.url} again."
    size = x_file.stat().st_size
    if size == 0 or size % _STL_IMAGE_BYTES:
        raise DataError(f"{x_file} is truncated: {size} bytes is not a whole, non-zero number of 3×96×96 images. {fix}")
    if split == "unlabeled":
        # kept: torchvision reads all 100k images (2.7 GB) into memory; a copy-on-write memmap
        # reads pages on demand. The file stores each channel column-major: swap H and W.
        flat = np.memmap(x_file, dtype=np.uint8, mode="c")
        images = torch.from_numpy(flat.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))
        return ImageArrays(images, torch.full((len(images),), -1, dtype=torch.int64), list(STL10_CLASSES))
    classes = _stl10_classes(folder, fix)   # checked before torchvision reads the file unchecked
    stl = _STL10Files(str(root), split=split)
    labels = _check_labels(stl.labels, len(stl.data), 10, f"{folder / f'{split}_y.bin'} (labels 1..10)", fix)
    return ImageArrays(torch.from_numpy(np.ascontiguousarray(stl.data)), torch.from_numpy(labels), classes)


def _stl10_classes(folder: Path, fix: str) -> list[str]:
    """The names in class_names.txt (UTF-8, one a line, for labels 1..10), or the standard names
    when there is no such file."""
    path = folder / STL10.class_names_file
    if not path.is_file():
        return list(STL10_CLASSES)
    try:
        names = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); it should list the 10 "
                        f"class names, one a line. {fix} Or delete it: the standard names are used then.") from None
    except OSError as err:
        raise DataError(f"{path} cannot be read ({type(err).__name__}: {err.strerror or err}). {fix}") from None
    if len(names) != 10 or not all(n.strip() for n in names) or len(set(names)) != 10:
        raise DataError(f"{path} lists {len(names)} lines ({', '.join(map(repr, names[:4]))}"
                        f"{', ...' if len(names) > 4 else ''}); STL-10 needs 10 distinct, non-empty class names, "
                        f"one a line, in the order of labels 1..10. {fix} Or delete it: the standard names "
                        f"are used then.")
    return names


# --------------------------------------------------------------------------- Fashion-MNIST


def _find_idx(folder: Path, name: str) -> Path | None:
    """The uncompressed `name` (torchvision's layout) or `name.gz` (Debian's, or a manual download)."""
    return next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


def _fashion_files(folders: Sequence[Path], prefix: str) -> tuple[Path, Path] | None:
    """First folder holding both the image and the label file of a split."""
    for folder in folders:
        images, labels = _find_idx(folder, f"{prefix}-images-idx3-ubyte"), _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return images, labels
    return None


def locate_fashion_mnist(root: Path, split: str, download: bool) -> tuple[Path, Path]:
    """(images, labels) idx files of a split: `<root>/FashionMNIST/raw/`, Debian's dir, or download."""
    _check_split(split, ("train", "test"), "Fashion-MNIST")
    prefix = "train" if split == "train" else "t10k"
    raw = Path(root) / "FashionMNIST" / "raw"  # torchvision's FashionMNIST(root).raw_folder
    folders = [raw, DEBIAN_FASHION_MNIST_DIR]
    found = _fashion_files(folders, prefix)
    failure = None
    if found is None and download:  # torchvision's mirrors and md5s; unpacks next to the .gz files
        failure = _try_download(lambda: FashionMNIST(str(root), train=split == "train", download=True))
        found = _fashion_files([raw], prefix)
        failure = failure if found is None else None
    if found is None:
        looked = [f / f"{prefix}-{kind}-ubyte[.gz]" for f in folders for kind in ("images-idx3", "labels-idx1")]
        fix = (f"download the 4 files from {FashionMNIST.mirrors[0]} into {raw}/, install Debian's "
               f"dataset-fashion-mnist package, or set paths.data_dir=<dir that contains FashionMNIST/raw/>.")
        raise _not_found("Fashion-MNIST", looked, _download_reason(download, failure), fix)
    return found


# Bytes per item of each idx type code (torchvision's SN3_PASCALVINCENT_TYPEMAP: u8, i8, i16, i32, f32, f64).
_IDX_ITEM_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}
IDX_MAX_BYTES = 2 * 1024**3  # what an unpacked idx file may declare; Fashion-MNIST's largest is 47 MB


def _gunzip_idx(path: Path, out: Path, fix: str) -> None:
    """Unpack the idx file `path` (.gz) into `out`, writing no more than the size its header
    declares (magic 0 0 type ndim, then ndim big-endian uint32 dims): a gzip bomb or a file with
    trailing data stops there, and a header declaring more than IDX_MAX_BYTES is refused first."""
    with gzip.open(path, "rb") as src, open(out, "wb") as dst:
        magic = src.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_ITEM_BYTES or not 1 <= magic[3] <= 3:
            raise DataError(f"{path} does not unpack to an idx file (it starts with {magic!r}, not 0 0 <type> "
                            f"<1..3 dims>). {fix}")
        dims = src.read(4 * magic[3])
        if len(dims) < 4 * magic[3]:
            raise DataError(f"{path} is truncated: its idx header ends after {4 + len(dims)} bytes. {fix}")
        shape = struct.unpack(f">{magic[3]}I", dims)
        size = 4 + len(dims) + math.prod(shape) * _IDX_ITEM_BYTES[magic[2]]
        if size > IDX_MAX_BYTES:
            raise DataError(f"{path}: its idx header declares an array of shape {shape} ({size:,} bytes unpacked), "
                            f"more than the {IDX_MAX_BYTES:,} bytes an idx file is allowed here; it is corrupt or "
                            f"not a Fashion-MNIST file. Nothing was unpacked. {fix}")
        dst.write(magic + dims)
        left = size - 4 - len(dims)
        while chunk := src.read(min(1 << 20, left + 1)):
            if len(chunk) > left:
                raise DataError(f"{path} unpacks to more than the {size:,} bytes its idx header declares (shape "
                                f"{shape}); unpacking was stopped there. It is corrupt (or a gzip bomb). {fix}")
            dst.write(chunk)
            left -= len(chunk)


def _read_idx(path: Path, reader: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """An idx file through torchvision's MNIST reader, which opens plain files only: a .gz is
    unpacked into a temporary directory first, no larger than its header says (`_gunzip_idx`)."""
    fix = f"To fix: download it again from {FashionMNIST.mirrors[0]}."
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        with tempfile.TemporaryDirectory(prefix="sskt-idx-") as tmp:
            unpacked = Path(tmp) / path.stem
            _gunzip_idx(path, unpacked, fix)
            return reader(str(unpacked))
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - torchvision checks headers with assert; any failure is a bad file
        raise DataError(f"{path} is not a readable idx file ({type(err).__name__}: {err}); it is truncated or "
                        f"corrupt. {fix}") from None


def read_fashion_mnist(root: str | Path, split: str = "train", download: bool = False) -> ImageArrays:
    """Fashion-MNIST idx files from `<root>/FashionMNIST/raw/`, else Debian's package dir, else download."""
    image_file, label_file = locate_fashion_mnist(Path(root), split, download)
    images, labels = _read_idx(image_file, read_image_file), _read_idx(label_file, read_label_file)
    if images.ndim != 3:
        raise DataError(f"{image_file} holds an array of shape {tuple(images.shape)}, not N×H×W images. To fix: "
                        f"download it again from {FashionMNIST.mirrors[0]}.")
    labels = _check_labels(labels.numpy(), len(images), 10, f"{label_file} (for {len(images)} images in "
                           f"{image_file.name})", f"To fix: download both again from {FashionMNIST.mirrors[0]}.")
    return ImageArrays(images.unsqueeze(1), torch.from_numpy(labels), list(FASHION_MNIST_CLASSES))


# --------------------------------------------------------------------------- decoding (ImageFolder, VOC)

_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on bad files


def _fit_image(img, size: tuple[int, int] | None):
    """Resize so the image covers `size` (aspect kept), then center-crop to it.

    Kept: torchvision's Resize(int) + CenterCrop matches this only for square targets; `size` may be [h, w].
    """
    if size is None:
        return img
    h, w = size
    scale = max(h / img.height, w / img.width)
    new_w, new_h = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - w) // 2, (new_h - h) // 2
    return img.crop((left, top, left + w, top + h))


def _load_image(path: Path, mode: str, size: tuple[int, int] | None, fix: str) -> np.ndarray:
    """One image as a C×H×W uint8 array (PIL, as torchvision's pil_loader); DataError naming the file."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(_fit_image(img.convert(mode), size), dtype=np.uint8)
    except _IMAGE_ERRORS as err:
        raise DataError(f"{path} is not a readable image ({type(err).__name__}: {err}). To fix: {fix}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _thread_map(fn: Callable, items: Sequence) -> list:
    """`map` on a thread pool: PIL releases the GIL while decoding and resizing."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, items))


def _as_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = (int(v) for v in image_size)
    return (h, w)


# --------------------------------------------------------------------------- ImageFolder


def _imagefolder_dir(root: Path, split: str) -> Path | None:
    """train -> train/; test -> test/, or val/ when there is no test/ (with a note in the log)."""
    if split == "train":
        return root / "train" if (root / "train").is_dir() else None
    test, val = root / "test", root / "val"
    if test.is_dir():
        if val.is_dir():
            log.info("ImageFolder: %s is the test split; %s is not used (validation images are held out of "
                     "train/ by data.val_size).", test, val)
        return test
    if val.is_dir():
        log.info("ImageFolder: no %s, so %s is used as the TEST split (it is evaluated once, at the end; "
                 "validation images are held out of train/ by data.val_size). Rename it test/.", test, val)
        return val
    return None


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """Sorted class folders -> their image files, as torchvision's ImageFolder lists them."""
    # hidden folders (.ipynb_checkpoints, ...) are skipped: torchvision's find_classes would make them classes
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    by_class: dict[str, list[Path]] = {c: [] for c in classes}
    if classes:
        for path, i in make_dataset(str(split_dir), {c: i for i, c in enumerate(classes)},
                                    extensions=IMG_EXTENSIONS, allow_empty=True):
            by_class[classes[i]].append(Path(path))
    return by_class


def _stack_images(arrays: list[np.ndarray], files: list[Path]) -> torch.Tensor:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ConfigError(f"ImageFolder images differ in size ({sorted(shapes)[:3]} ..., e.g. {files[0]}); "
                          f"set data.image_size=<int or [h, w]> to resize them.")
    return torch.from_numpy(np.stack(arrays))


def _imagefolder_tree(root: Path) -> str:
    return (f"{root}/train/<class_name>/<image>.jpg|png|... and {root}/test/<class_name>/<image> "
            f"(the test split; val/ is accepted as its name; same class folders in both)")


def locate_imagefolder(root: Path, split: str, download: bool) -> tuple[Path, dict[str, list[Path]]]:
    """(split dir, class -> files); DataNotFoundError when there are no images."""
    _check_split(split, ("train", "test"), "ImageFolder")
    split_dir = _imagefolder_dir(root, split)
    by_class = _class_files(split_dir) if split_dir else {}
    if split_dir is None or not any(by_class.values()):
        looked = [root / n for n in (["train"] if split == "train" else ["test", "val"])]
        reason = "ImageFolder data cannot be downloaded." if download else "Download not attempted (download=False)."
        raise _not_found(f"ImageFolder {split} images", looked, reason,
                         f"put images in {_imagefolder_tree(root)}, or set paths.data_dir=<dir holding train/>.")
    return split_dir, by_class


def read_imagefolder(root: str | Path, split: str = "train", download: bool = False,
                     image_size: int | Sequence[int] | None = None, in_chans: int = 3,
                     classes: Sequence[str] | None = None, skip_bad_images: bool = False) -> ImageArrays:
    """Images from `<root>/train/<class>/...` or (split "test") `<root>/test/` (or `val/`).

    Classes are the sorted folder names (pass `classes` to require exactly these); every class
    folder must hold images. Each image is converted to RGB (or L when `in_chans=1`) and, with
    `image_size`, resized so it covers the target size keeping its aspect ratio, then
    center-cropped (int -> square). Without `image_size` all images must already share one size.
    An unreadable image is a DataError naming it, or with `skip_bad_images` is left out (the
    count is logged). There is no download.
    """
    if in_chans not in (1, 3):
        raise ConfigError(f"ImageFolder in_chans must be 1 or 3, got {in_chans}.")
    root = Path(root)
    split_dir, by_class = locate_imagefolder(root, split, download)
    if classes is not None and list(classes) != list(by_class):
        raise ConfigError(f"ImageFolder {split_dir} has classes {list(by_class)}, but train/ has {list(classes)}; "
                          f"both splits need the same class folders: {_imagefolder_tree(root)}.")
    mode, size = ("L" if in_chans == 1 else "RGB"), _as_size(image_size)
    fix = "replace or delete it, or set data.skip_bad_images=true to leave unreadable images out."

    def load(path: Path) -> np.ndarray | None:
        try:
            return _load_image(path, mode, size, fix)
        except DataError:
            if not skip_bad_images:
                raise
            return None

    files = [(p, i) for i, c in enumerate(by_class) for p in by_class[c]]
    arrays = _thread_map(load, [p for p, _ in files])
    bad = [p for (p, _), a in zip(files, arrays) if a is None]
    if bad:
        log.warning("ImageFolder %s: left out %d unreadable image(s) (data.skip_bad_images=true), e.g. %s",
                    split_dir, len(bad), bad[0])
        files, arrays = [f for f, a in zip(files, arrays) if a is not None], [a for a in arrays if a is not None]
    counts = Counter(i for _, i in files)
    empty = [str(split_dir / c) for k, c in enumerate(by_class) if not counts[k]]
    if empty:
        raise DataError(f"ImageFolder class folder(s) without {'readable ' if bad else ''}images: {', '.join(empty)} "
                        f"(images are files ending in {' '.join(IMG_EXTENSIONS)}). To fix: put images in them, or "
                        f"remove these classes from both train/ and the test folder.")
    images = _stack_images(arrays, [p for p, _ in files])
    labels = torch.tensor([i for _, i in files], dtype=torch.int64)
    return ImageArrays(images, labels, list(by_class))


# --------------------------------------------------------------------------- Pascal VOC 2007

VOC_DIR = Path(DATASET_YEAR_DICT["2007"]["base_dir"])  # VOCdevkit/VOC2007, where both archives extract
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/"  # the official site; torchvision's URLs are a mirror
_VOC_SPLITS = {"train": ("trainval", DATASET_YEAR_DICT["2007"]), "test": ("test", DATASET_YEAR_DICT["2007-test"])}
VOC_IMAGE_SIZE = 224


def _download_voc(root: Path, archive: dict) -> None:
    """Fetch and extract one VOC archive (torchvision's md5), trying the official site, then torchvision's mirror."""
    errors = []
    for url in (VOC_URL + archive["filename"], archive["url"]):
        try:
            download_and_extract_archive(url, str(root), filename=archive["filename"], md5=archive["md5"])
            return
        except Exception as err:  # noqa: BLE001 - try the next mirror; all reasons are reported
            errors.append(f"{url}: {type(err).__name__}: {err}")
    raise RuntimeError("; ".join(errors))


def _voc_fix(root: Path) -> str:
    tars = " and ".join(VOC_URL + a["filename"] for _, a in _VOC_SPLITS.values())
    mirror = _VOC_SPLITS["train"][1]["url"].rsplit("/", 1)[0] + "/"
    return (f"download {tars} (mirror: {mirror}) and extract both under {root} (giving "
            f"{root / VOC_DIR}/), or set paths.data_dir=<dir that contains {VOC_DIR}/> to use a local copy.")


def locate_voc2007(root: Path, split: str, download: bool) -> tuple[list[Path], list[Path]]:
    """(JPEG paths, annotation paths) of the split, in list-file order, once they are all on disk."""
    _check_split(split, tuple(_VOC_SPLITS), "Pascal VOC 2007")
    image_set, archive = _VOC_SPLITS[split]
    folder = root / VOC_DIR
    list_file = folder / "ImageSets" / "Main" / f"{image_set}.txt"
    failure = None
    if not list_file.is_file() and download:
        failure = _try_download(lambda: _download_voc(root, archive))
        failure = failure or f"{archive['filename']} did not contain {list_file.relative_to(root)}"
    if not list_file.is_file():
        looked = [list_file, folder / "Annotations", folder / "JPEGImages"]
        raise _not_found(f"Pascal VOC 2007 {image_set}", looked, _download_reason(download, failure), _voc_fix(root))
    voc = VOCDetection(str(root), year="2007", image_set=image_set)  # reads the list file into file paths
    images, annotations = [Path(p) for p in voc.images], [Path(p) for p in voc.annotations]
    missing = [p for pair in zip(images, annotations) for p in pair if not p.is_file()]
    if missing or not images:
        reason = (f"{list_file} lists {len(images)} images, but {len(missing)} of their files are missing "
                  f"(a partial extraction?)." if images else f"{list_file} lists no images.")
        raise _not_found(f"Pascal VOC 2007 {image_set}", missing[:5] or [list_file], reason, _voc_fix(root))
    return images, annotations


def _voc_labels(xml_path: Path) -> list[int]:
    """Class ids of the image's objects, difficult ones included (torchvision's parse_voc_xml)."""
    try:
        annotation = VOCDetection.parse_voc_xml(ET.parse(xml_path).getroot())["annotation"]
        objects = annotation.get("object", [])  # a list: one dict per <object> (their <part>s are nested)
        names = {obj["name"] for obj in objects}
    except (ET.ParseError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{xml_path} is not a readable VOC annotation ({type(err).__name__}: {err}). To fix: "
                        f"re-extract the archive.") from None
    unknown = sorted(map(str, names - set(VOC_CLASSES)))
    if unknown:
        raise DataError(f"{xml_path} has objects of class {unknown}, not among the 20 VOC classes. To fix: "
                        f"re-extract the archive.")
    return sorted(VOC_CLASSES.index(n) for n in names)


def _load_images_into(paths: Sequence[Path], size: tuple[int, int]) -> torch.Tensor:
    """Decode, resize and center-crop RGB images into one preallocated N×3×H×W uint8 tensor.

    Kept: torchvision's VOC dataset decodes one image per __getitem__; this fills the whole split
    at once on threads, without a second copy of it in memory.
    """
    out = torch.empty((len(paths), 3, *size), dtype=torch.uint8)
    rows = out.numpy()  # shares out's memory

    def load(k: int) -> None:
        rows[k] = _load_image(paths[k], "RGB", size, "re-extract the archive.")

    _thread_map(load, range(len(paths)))
    return out


def read_voc2007(root: str | Path, split: str = "train", download: bool = False,
                 image_size: int | Sequence[int] = VOC_IMAGE_SIZE) -> ImageArrays:
    """Pascal VOC 2007 classification from `<root>/VOCdevkit/VOC2007/` (the official tars' layout).

    Split "train" is the 5011 trainval images (`ImageSets/Main/trainval.txt`), "test" the 4952
    test images (`test.txt`), in the order the list files give. Labels are N×20 multi-hot rows
    (`VOC_CLASSES` order): an image is positive for a class when its `Annotations/<id>.xml` has at
    least one object of it, *difficult objects included* (so no image is ever "unknown" for a
    class; the official evaluation instead ignores images whose only instances are difficult).
    Images are converted to RGB, resized to cover `image_size` keeping the aspect ratio and
    center-cropped (int -> square), as `read_imagefolder` does. 224 px: 754 MB for trainval.
    List files and annotations are read by torchvision's VOCDetection.
    """
    size = _as_size(image_size)
    if size is None:
        raise ConfigError("Pascal VOC images differ in size; data.image_size must be set (e.g. 224).")
    image_files, annotations = locate_voc2007(Path(root), split, download)
    labels = torch.zeros((len(image_files), len(VOC_CLASSES)), dtype=torch.int64)
    for row, xml_path in enumerate(annotations):
        labels[row, _voc_labels(xml_path)] = 1
    return ImageArrays(_load_images_into(image_files, size), labels, list(VOC_CLASSES))
