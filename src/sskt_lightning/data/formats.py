"""Readers for the real on-disk dataset formats, each returning in-memory `ImageArrays`.

Every reader is `read_<name>(root, split, download=False) -> ImageArrays`. Missing files with
`download=True` are fetched with torchvision's own download helpers; any failure (no network,
bad checksum, ...) becomes a `DataNotFoundError` that says where we looked and what to do.
"""

from __future__ import annotations

import gzip
import os
import pickle
import socket
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sskt_lightning.errors import ConfigError, DataNotFoundError

DOWNLOAD_TIMEOUT_S = 20.0
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
MULTI_LABEL_DATASETS = frozenset({"voc2007"})  # labels are N×K multi-hot rows
RESIZABLE_DATASETS = ("imagefolder", "voc2007")  # readers that take image_size (images differ in size on disk)


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


@dataclass(frozen=True)
class _Archive:
    """Where a dataset lives on disk and where its official archive comes from."""

    title: str
    folder: str
    url: str
    md5: str


_CIFAR10 = _Archive("CIFAR-10", "cifar-10-batches-py",
                    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
_CIFAR100 = _Archive("CIFAR-100", "cifar-100-python",
                     "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")
_STL10 = _Archive("STL-10", "stl10_binary",
                  "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "91f7769df0f17e558f3565bffb0c7dfb")
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


@contextmanager
def _socket_timeout(seconds: float):
    """Bound every blocking socket call made inside (downloads must never hang)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _try_download(fetch: Callable[[], None]) -> str | None:
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


def _archive_fix(archive: _Archive, root: Path) -> str:
    return (f"download {archive.url} and extract it under {root} (giving {root / archive.folder}/), "
            f"or set paths.data_dir=<dir that contains {archive.folder}/>.")


def _ensure_archive(archive: _Archive, root: Path, files: Sequence[str], download: bool) -> Path:
    """Return `<root>/<folder>` once all `files` are in it, downloading the archive if allowed."""
    folder = root / archive.folder

    def missing() -> list[Path]:
        return [folder / f for f in files if not (folder / f).is_file()]

    if not missing():
        return folder
    failure = None
    if download:
        from torchvision.datasets.utils import download_and_extract_archive

        failure = _try_download(lambda: download_and_extract_archive(archive.url, str(root), md5=archive.md5))
        if failure is None and not missing():
            return folder
        failure = failure or f"the archive did not contain {', '.join(map(str, missing()))}"
    raise _not_found(archive.title, missing(), _download_reason(download, failure), _archive_fix(archive, root))


def _check_split(split: str, allowed: Sequence[str], title: str) -> None:
    if split not in allowed:
        raise ConfigError(f"{title} has no split {split!r}; choose one of {list(allowed)}.")


# --------------------------------------------------------------------------- CIFAR


def _load_pickle(path: Path) -> dict:
    """Load a CIFAR pickle (written by Python 2) with str keys."""
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _decode_names(names: Sequence) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _cifar_arrays(paths: Sequence[Path], label_key: str, classes: list[str]) -> ImageArrays:
    """Concatenate CIFAR batches: b"data" is N×3072 (R plane, G plane, B plane, each row-major)."""
    parts = [_load_pickle(p) for p in paths]
    data = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([np.asarray(p[label_key], dtype=np.int64) for p in parts])
    return ImageArrays(torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels), classes)


def _cifar_classes(meta: Path, key: str, default: list[str] | None) -> list[str]:
    if meta.is_file():
        return _decode_names(_load_pickle(meta)[key])
    if default is None:
        raise DataNotFoundError(f"CIFAR-100 class names not found: {meta} is missing.")
    return list(default)


def _cifar10_files(split: str) -> list[str]:
    _check_split(split, ("train", "test"), "CIFAR-10")
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _locate_cifar10(root: Path, split: str, download: bool) -> Path:
    return _ensure_archive(_CIFAR10, root, _cifar10_files(split), download)


def _locate_cifar100(root: Path, split: str, download: bool) -> Path:
    _check_split(split, ("train", "test"), "CIFAR-100")
    return _ensure_archive(_CIFAR100, root, [split, "meta"], download)


def read_cifar10(root: str | Path, split: str = "train", download: bool = False) -> ImageArrays:
    """CIFAR-10 from `<root>/cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta)."""
    folder, files = _locate_cifar10(Path(root), split, download), _cifar10_files(split)
    classes = _cifar_classes(folder / "batches.meta", "label_names", CIFAR10_CLASSES)
    return _cifar_arrays([folder / f for f in files], "labels", classes)


def read_cifar100(root: str | Path, split: str = "train", download: bool = False) -> ImageArrays:
    """CIFAR-100 (fine labels) from `<root>/cifar-100-python/` (train, test, meta)."""
    folder = _locate_cifar100(Path(root), split, download)
    classes = _cifar_classes(folder / "meta", "fine_label_names", None)
    return _cifar_arrays([folder / split], "fine_labels", classes)


# --------------------------------------------------------------------------- STL-10


def _stl_images(path: Path, in_memory: bool) -> torch.Tensor:
    """STL-10 X file: N×3×96×96 stored column-major, so swap the last two axes to get N×3×H×W."""
    if in_memory:
        flat = np.fromfile(path, dtype=np.uint8)
    else:  # the 100k unlabeled images (2.7 GB): copy-on-write memmap, pages read on demand
        flat = np.memmap(path, dtype=np.uint8, mode="c")
    if flat.size % (3 * 96 * 96):
        raise DataNotFoundError(f"{path} is truncated: {flat.size} bytes is not a whole number of 3×96×96 images.")
    images = flat.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    return torch.from_numpy(np.ascontiguousarray(images) if in_memory else images)


def _stl10_files(split: str) -> list[str]:
    _check_split(split, ("train", "test", "unlabeled"), "STL-10")
    return [f"{split}_X.bin"] + ([] if split == "unlabeled" else [f"{split}_y.bin"])


def _locate_stl10(root: Path, split: str, download: bool) -> Path:
    return _ensure_archive(_STL10, root, _stl10_files(split), download)


def read_stl10(root: str | Path, split: str = "train", download: bool = False) -> ImageArrays:
    """STL-10 from `<root>/stl10_binary/`; split in train/test/unlabeled (unlabeled labels are -1)."""
    folder, files = _locate_stl10(Path(root), split, download), _stl10_files(split)
    images = _stl_images(folder / files[0], in_memory=split != "unlabeled")
    if split == "unlabeled":
        labels = torch.full((len(images),), -1, dtype=torch.int64)
    else:
        labels = torch.from_numpy(np.fromfile(folder / files[1], dtype=np.uint8).astype(np.int64) - 1)
    names_file = folder / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else list(STL10_CLASSES)
    return ImageArrays(images, labels, classes)


# --------------------------------------------------------------------------- Fashion-MNIST


def parse_idx(data: bytes) -> np.ndarray:
    """Parse an idx file (big-endian header: 0, 0, type code 0x08 = ubyte, ndim; then dims)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"not a uint8 idx file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"idx body has {body.size} bytes, header says {tuple(dims)}")
    return body.reshape(tuple(dims))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return parse_idx(f.read())


def _find_idx(folder: Path, name: str) -> Path | None:
    """`name.gz` or the uncompressed `name` in `folder`."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _fashion_files(folders: Sequence[Path], prefix: str) -> tuple[Path, Path] | None:
    """First folder holding both the image and the label file of a split."""
    for folder in folders:
        images, labels = _find_idx(folder, f"{prefix}-images-idx3-ubyte"), _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return images, labels
    return None


def _download_fashion(raw: Path) -> None:
    from torchvision.datasets.utils import download_url

    for filename, md5 in _FASHION_MD5.items():
        download_url(_FASHION_URL + filename, str(raw), filename=filename, md5=md5)


def _locate_fashion_mnist(root: Path, split: str, download: bool) -> tuple[Path, Path]:
    """(images, labels) idx files of a split: `<root>/FashionMNIST/raw/`, Debian's dir, or download."""
    _check_split(split, ("train", "test"), "Fashion-MNIST")
    prefix = "train" if split == "train" else "t10k"
    raw = Path(root) / "FashionMNIST" / "raw"
    folders = [raw, DEBIAN_FASHION_MNIST_DIR]
    found = _fashion_files(folders, prefix)
    failure = None
    if found is None and download:
        failure = _try_download(lambda: _download_fashion(raw))
        found = _fashion_files([raw], prefix)
        failure = failure if found is None else None
    if found is None:
        looked = [f / f"{prefix}-{kind}-ubyte[.gz]" for f in folders for kind in ("images-idx3", "labels-idx1")]
        fix = (f"download the 4 files from {_FASHION_URL} into {raw}/, install Debian's "
               f"dataset-fashion-mnist package, or set paths.data_dir=<dir that contains FashionMNIST/raw/>.")
        raise _not_found("Fashion-MNIST", looked, _download_reason(download, failure), fix)
    return found


def read_fashion_mnist(root: str | Path, split: str = "train", download: bool = False) -> ImageArrays:
    """Fashion-MNIST idx files from `<root>/FashionMNIST/raw/`, else Debian's package dir, else download."""
    found = _locate_fashion_mnist(Path(root), split, download)
    images, labels = (_read_idx(p) for p in found)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DataNotFoundError(f"Fashion-MNIST files {found} have inconsistent shapes {images.shape}, {labels.shape}.")
    return ImageArrays(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                       list(FASHION_MNIST_CLASSES))


# --------------------------------------------------------------------------- ImageFolder


def _imagefolder_dir(root: Path, split: str) -> Path | None:
    """train -> train/; test -> val/, or test/ when there is no val/."""
    names = ["train"] if split == "train" else ["val", "test"]
    return next((root / n for n in names if (root / n).is_dir()), None)


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """Sorted class folders -> sorted image files in each."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    return {c: sorted(p for p in (split_dir / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            for c in classes}


def _fit_image(img, size: tuple[int, int] | None):
    """Resize so the image covers `size` (aspect kept, shorter side first), then center-crop to it."""
    from PIL import Image

    if size is None:
        return img
    h, w = size
    scale = max(h / img.height, w / img.width)
    new_w, new_h = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - w) // 2, (new_h - h) // 2
    return img.crop((left, top, left + w, top + h))


def _load_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(_fit_image(img.convert(mode), size), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _as_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = (int(v) for v in image_size)
    return (h, w)


def _stack_images(arrays: list[np.ndarray], files: list[Path]) -> torch.Tensor:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ConfigError(f"ImageFolder images differ in size ({sorted(shapes)[:3]} ..., e.g. {files[0]}); "
                          f"set data.image_size=<int or [h, w]> to resize them.")
    return torch.from_numpy(np.stack(arrays))


def _imagefolder_tree(root: Path) -> str:
    return (f"{root}/train/<class_name>/<image>.jpg|png|... and {root}/val/<class_name>/<image> "
            f"(same class folders in both)")


def _locate_imagefolder(root: Path, split: str, download: bool) -> tuple[Path, dict[str, list[Path]]]:
    """(split dir, class -> files); DataNotFoundError when there are no images."""
    _check_split(split, ("train", "test"), "ImageFolder")
    split_dir = _imagefolder_dir(root, split)
    by_class = _class_files(split_dir) if split_dir else {}
    if split_dir is None or not any(by_class.values()):
        looked = [root / n for n in (["train"] if split == "train" else ["val", "test"])]
        reason = "ImageFolder data cannot be downloaded." if download else "Download not attempted (download=False)."
        raise _not_found(f"ImageFolder {split} images", looked, reason,
                         f"put images in {_imagefolder_tree(root)}, or set paths.data_dir=<dir holding train/>.")
    return split_dir, by_class


def read_imagefolder(root: str | Path, split: str = "train", download: bool = False,
                     image_size: int | Sequence[int] | None = None, in_chans: int = 3,
                     classes: Sequence[str] | None = None) -> ImageArrays:
    """Images from `<root>/train/<class>/...` or (split "test") `<root>/val/` (or `test/`).

    Classes are the sorted folder names (pass `classes` to require exactly these). Each image is
    converted to RGB (or L when `in_chans=1`) and, with `image_size`, resized so it covers the
    target size keeping its aspect ratio, then center-cropped (int -> square). Without
    `image_size` all images must already share one size. There is no download.
    """
    if in_chans not in (1, 3):
        raise ConfigError(f"ImageFolder in_chans must be 1 or 3, got {in_chans}.")
    split_dir, by_class = _locate_imagefolder(Path(root), split, download)
    files = [(p, i) for i, c in enumerate(by_class) for p in by_class[c]]
    if classes is not None and list(classes) != list(by_class):
        raise ConfigError(f"ImageFolder {split_dir} has classes {list(by_class)}, but train/ has {list(classes)}; "
                          f"both splits need the same class folders: {_imagefolder_tree(root)}.")
    mode = "L" if in_chans == 1 else "RGB"
    images = _stack_images([_load_image(p, mode, _as_size(image_size)) for p, _ in files], [p for p, _ in files])
    labels = torch.tensor([i for _, i in files], dtype=torch.int64)
    return ImageArrays(images, labels, list(by_class))


# --------------------------------------------------------------------------- Pascal VOC 2007

VOC_DIR = Path("VOCdevkit") / "VOC2007"
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/"  # the official site
_VOC_MIRRORS = (VOC_URL, "https://thor.robots.ox.ac.uk/pascal/VOC/voc2007/")  # thor: torchvision's mirror
_VOC_TARS = {  # split -> (image set, archive, md5); both archives extract into VOCdevkit/VOC2007/
    "train": ("trainval", "VOCtrainval_06-Nov-2007.tar", "c52e279531787c972589f7e41ab4ae64"),
    "test": ("test", "VOCtest_06-Nov-2007.tar", "b6e924de25625d8de591ea690078ad9f"),
}
VOC_IMAGE_SIZE = 224


def _download_voc(root: Path, tar: str, md5: str) -> None:
    """Fetch and extract one VOC archive, trying the official site, then the mirror."""
    from torchvision.datasets.utils import download_and_extract_archive

    errors = []
    for base in _VOC_MIRRORS:
        try:
            download_and_extract_archive(base + tar, str(root), filename=tar, md5=md5)
            return
        except Exception as err:  # noqa: BLE001 - try the next mirror; all reasons are reported
            errors.append(f"{base}: {type(err).__name__}: {err}")
    raise RuntimeError("; ".join(errors))


def _voc_fix(root: Path) -> str:
    tars = " and ".join(VOC_URL + t for _, t, _ in _VOC_TARS.values())
    return (f"download {tars} (mirror: {_VOC_MIRRORS[1]}) and extract both under {root} (giving "
            f"{root / VOC_DIR}/), or set paths.data_dir=<dir that contains {VOC_DIR}/> to use a local copy.")


def _locate_voc2007(root: Path, split: str, download: bool) -> tuple[Path, list[str]]:
    """(`<root>/VOCdevkit/VOC2007`, image ids of the split) once the split's files are all on disk."""
    _check_split(split, tuple(_VOC_TARS), "Pascal VOC 2007")
    image_set, tar, md5 = _VOC_TARS[split]
    folder = root / VOC_DIR
    list_file = folder / "ImageSets" / "Main" / f"{image_set}.txt"
    failure = None
    if not list_file.is_file() and download:
        failure = _try_download(lambda: _download_voc(root, tar, md5))
        failure = failure or f"{tar} did not contain {list_file.relative_to(root)}"
    if not list_file.is_file():
        looked = [list_file, folder / "Annotations", folder / "JPEGImages"]
        raise _not_found(f"Pascal VOC 2007 {image_set}", looked, _download_reason(download, failure), _voc_fix(root))
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    missing = [p for i in ids for p in (folder / "JPEGImages" / f"{i}.jpg", folder / "Annotations" / f"{i}.xml")
               if not p.is_file()]
    if missing or not ids:
        reason = (f"{list_file} lists {len(ids)} images, but {len(missing)} of their files are missing "
                  f"(a partial extraction?)." if ids else f"{list_file} lists no images.")
        raise _not_found(f"Pascal VOC 2007 {image_set}", missing[:5] or [list_file], reason, _voc_fix(root))
    return folder, ids


def _voc_labels(xml_path: Path) -> list[int]:
    """Class ids of the image's objects (`<annotation><object><name>`), difficult ones included."""
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as err:
        raise DataNotFoundError(f"{xml_path} is not a readable VOC annotation ({err}); "
                                f"re-extract the archive.") from None
    ids = set()
    for obj in tree.getroot().findall("object"):  # direct children only: person <part>s have <name>s too
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise DataNotFoundError(f"{xml_path} has an object of class {name!r}, not one of the 20 VOC classes.")
        ids.add(VOC_CLASSES.index(name))
    return sorted(ids)


def _load_images_into(paths: Sequence[Path], size: tuple[int, int]) -> torch.Tensor:
    """Decode, resize and center-crop RGB images into one preallocated N×3×H×W uint8 tensor (threads)."""
    out = torch.empty((len(paths), 3, *size), dtype=torch.uint8)
    rows = out.numpy()  # shares out's memory

    def load(k: int) -> None:
        try:
            rows[k] = _load_image(paths[k], "RGB", size)
        except OSError as err:  # PIL: truncated or not an image
            raise DataNotFoundError(f"{paths[k]} is not a readable image ({err}); re-extract the archive.") from None

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(load, range(len(paths))))  # PIL releases the GIL while decoding and resizing
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
    """
    size = _as_size(image_size)
    if size is None:
        raise ConfigError("Pascal VOC images differ in size; data.image_size must be set (e.g. 224).")
    folder, ids = _locate_voc2007(Path(root), split, download)
    labels = torch.zeros((len(ids), len(VOC_CLASSES)), dtype=torch.int64)
    for row, image_id in enumerate(ids):
        labels[row, _voc_labels(folder / "Annotations" / f"{image_id}.xml")] = 1
    images = _load_images_into([folder / "JPEGImages" / f"{i}.jpg" for i in ids], size)
    return ImageArrays(images, labels, list(VOC_CLASSES))


READERS: dict[str, Callable[..., ImageArrays]] = {
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "stl10": read_stl10,
    "fashion_mnist": read_fashion_mnist,
    "imagefolder": read_imagefolder,
    "voc2007": read_voc2007,
}

_LOCATORS: dict[str, Callable[[Path, str, bool], object]] = {
    "cifar10": _locate_cifar10,
    "cifar100": _locate_cifar100,
    "stl10": _locate_stl10,
    "fashion_mnist": _locate_fashion_mnist,
    "imagefolder": _locate_imagefolder,
    "voc2007": _locate_voc2007,
}


def ensure_available(name: str, root: str | Path, splits: Sequence[str], download: bool = True) -> None:
    """Check that the files of `splits` are on disk, downloading them if allowed, without reading them."""
    if name not in _LOCATORS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {sorted(_LOCATORS)}.")
    for split in splits:
        _LOCATORS[name](Path(root), split, download)
