"""Datasets in memory (uint8), task views, device-side augmentation, the LightningDataModule."""

from sskt_lightning.data.augment import BatchAugment, normalize
from sskt_lightning.data.datamodule import DATASET_STATS, METRICS, ImageDataModule, IndexedImages, collate_batch
from sskt_lightning.data.formats import (
    MULTI_LABEL_DATASETS,
    READERS,
    VOC_CLASSES,
    ImageArrays,
    ensure_available,
    read_cifar10,
    read_cifar100,
    read_fashion_mnist,
    read_imagefolder,
    read_stl10,
    read_voc2007,
)
from sskt_lightning.data.views import TaskSplit, class_lookup, make_task_split, pick_per_class, split_val, take_part

__all__ = [
    "BatchAugment", "normalize",
    "DATASET_STATS", "METRICS", "ImageDataModule", "IndexedImages", "collate_batch",
    "MULTI_LABEL_DATASETS", "READERS", "VOC_CLASSES", "ImageArrays", "ensure_available",
    "read_cifar10", "read_cifar100", "read_fashion_mnist", "read_imagefolder", "read_stl10", "read_voc2007",
    "TaskSplit", "class_lookup", "make_task_split", "pick_per_class", "split_val", "take_part",
]  # fmt: skip
