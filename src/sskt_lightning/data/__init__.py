"""Datasets in memory (uint8), task views, device-side augmentation, the LightningDataModule.

The datasets are the entries of :data:`DATASETS` (:mod:`sskt_lightning.data.specs`)."""

from sskt_lightning.data.augment import BatchAugment, normalize
from sskt_lightning.data.datamodule import METRICS, ImageDataModule, IndexedImages, collate_batch, data_info_of
from sskt_lightning.data.formats import (
    VOC_CLASSES,
    ImageArrays,
    read_cifar10,
    read_cifar100,
    read_fashion_mnist,
    read_imagefolder,
    read_stl10,
    read_voc2007,
)
from sskt_lightning.data.specs import (
    DATASET_STATS,
    DATASETS,
    MULTI_LABEL_DATASETS,
    READERS,
    DatasetSpec,
    dataset_spec,
    ensure_available,
)
from sskt_lightning.data.views import TaskSplit, class_lookup, make_task_split, pick_per_class, split_val, take_part

__all__ = [
    "BatchAugment", "normalize",
    "DATASET_STATS", "METRICS", "ImageDataModule", "IndexedImages", "collate_batch", "data_info_of",
    "MULTI_LABEL_DATASETS", "READERS", "VOC_CLASSES", "ImageArrays", "ensure_available",
    "read_cifar10", "read_cifar100", "read_fashion_mnist", "read_imagefolder", "read_stl10", "read_voc2007",
    "DATASETS", "DatasetSpec", "dataset_spec",
    "TaskSplit", "class_lookup", "make_task_split", "pick_per_class", "split_val", "take_part",
]  # fmt: skip
