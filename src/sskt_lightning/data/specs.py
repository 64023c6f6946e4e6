"""The datasets: one :class:`DatasetSpec` per dataset, in :data:`DATASETS`.

Everything the data module knows about a dataset comes from its entry here: its reader and file
locator (:mod:`sskt_lightning.data.formats`), its on-disk splits, the normalisation statistics,
which ``data.*`` options its reader takes (a resizable format, a free channel count, ...), and
whether its labels are multi-label. Adding a dataset is one reader in ``formats.py``, one entry in
:data:`DATASETS` and one ``conf/data/<name>.yaml`` (a test keeps the table and the configs equal).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sskt_lightning.data import formats
from sskt_lightning.data.formats import ImageArrays
from sskt_lightning.errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_STATS = ((0.5,), (0.5,))
READER_OPTIONS = ("image_size", "in_chans", "classes", "skip_bad_images")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the harness.

    Attributes:
        name: ``data.name`` (and the ``conf/data/<name>.yaml`` it is chosen by).
        reader: ``reader(root, split, download, **options) -> ImageArrays`` (one whole split).
        locate: ``locate(root, split, download)``: finds (downloading if allowed) the files of a
            split without reading them (``prepare_data``); raises ``DataNotFoundError`` otherwise.
        mean, std: the per-channel normalisation statistics (``data.mean`` / ``data.std`` replace them).
        splits: the splits on disk; ``"unlabeled"`` is a split of unlabeled images, the stream
            ``data.unlabeled_source=auto`` takes unless ``data.labels_per_class`` makes a pool.
        options: the ``data.*`` options the reader takes (of :data:`READER_OPTIONS`): with
            ``image_size`` the images are resized to it, with ``in_chans`` converted to that many
            channels; a dataset without them has a fixed format, which those options must match.
            ``classes`` passes the train split's class names to the test split's reader;
            ``skip_bad_images`` leaves unreadable images out.
        gray_stats: mean / std for one-channel images of a dataset that takes ``in_chans``.
        multi_label: labels are N×K multi-hot rows (BCE loss, the ``map`` metric by default).
    """

    name: str
    reader: Callable[..., ImageArrays]
    locate: Callable[[Path, str, bool], object]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...] = ("train", "test")
    options: tuple[str, ...] = ()
    gray_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    multi_label: bool = False

    def __post_init__(self) -> None:
        unknown = [o for o in self.options if o not in READER_OPTIONS]
        if unknown or len(self.mean) != len(self.std) or not {"train", "test"} <= set(self.splits):
            raise ValueError(f"DatasetSpec({self.name!r}): options must be among {READER_OPTIONS} (got {unknown}), "
                             f"mean and std need one value per channel, splits must include train and test.")

    @property
    def resizable(self) -> bool:
        """The reader resizes to ``data.image_size`` (images differ in size on disk)."""
        return "image_size" in self.options

    @property
    def free_channels(self) -> bool:
        """The reader converts to ``data.in_chans`` channels."""
        return "in_chans" in self.options

    @property
    def unlabeled_split(self) -> bool:
        """The dataset has a split of unlabeled images."""
        return "unlabeled" in self.splits

    @property
    def default_metric(self) -> str:
        return "map" if self.multi_label else "acc"

    def stats(self, chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The default (mean, std) for images with ``chans`` channels."""
        if chans == 1 and self.gray_stats is not None:
            return self.gray_stats
        return self.mean, self.std


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("cifar10", formats.read_cifar10, formats.locate_cifar10,
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    DatasetSpec("cifar100", formats.read_cifar100, formats.locate_cifar100,
                (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    DatasetSpec("stl10", formats.read_stl10, formats.locate_stl10,
                (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), splits=("train", "test", "unlabeled")),
    DatasetSpec("fashion_mnist", formats.read_fashion_mnist, formats.locate_fashion_mnist, (0.2860,), (0.3530,)),
    DatasetSpec("imagefolder", formats.read_imagefolder, formats.locate_imagefolder, IMAGENET_MEAN, IMAGENET_STD,
                options=("image_size", "in_chans", "classes", "skip_bad_images"), gray_stats=GRAY_STATS),
    DatasetSpec("voc2007", formats.read_voc2007, formats.locate_voc2007, IMAGENET_MEAN, IMAGENET_STD,
                options=("image_size",), multi_label=True),
)}

# views of the table, by the names the rest of the package has used
READERS: dict[str, Callable[..., ImageArrays]] = {name: spec.reader for name, spec in DATASETS.items()}
DATASET_STATS = {name: (spec.mean, spec.std) for name, spec in DATASETS.items()}
MULTI_LABEL_DATASETS = frozenset(name for name, spec in DATASETS.items() if spec.multi_label)
RESIZABLE_DATASETS = tuple(name for name, spec in DATASETS.items() if spec.resizable)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of ``data.name``; a ConfigError naming the known datasets otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"data.name={name!r} is not a known dataset; choose one of {sorted(DATASETS)}.") from None


def ensure_available(name: str, root: str | Path, splits: Sequence[str], download: bool = True) -> None:
    """Check that the files of `splits` are on disk, downloading them if allowed, without reading them."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    for split in splits:
        DATASETS[name].locate(Path(root), split, download)
