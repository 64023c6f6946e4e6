"""`ImageDataModule`: in-memory uint8 datasets, task views, device-side augmentation.

Batches from the loaders (before `on_after_batch_transfer`):
  train / val / test: `(images uint8 B×C×H×W, labels int64 B, sample_index int64 B)`; for
                      multi-label data (voc2007) labels are int64 B×K multi-hot 0/1 rows
  unlabeled stream:   `(images uint8 B×C×H×W, sample_index int64 B)` - no labels at all
`sample_index` is the image's index in the full split array it comes from (train split for
train, val and the labels_per_class pool; test split for test; STL-10's unlabeled split for
its unlabeled stream), stable across epochs and runs. After the transfer to the device the
images are normalised float32, augmented during training only.

Training length. An epoch is one pass over the labelled images (`data.steps_per_epoch=null`), or
exactly `data.steps_per_epoch` batches whatever the number of labels: the labelled images are
drawn from successive shuffled passes (:class:`CyclingSampler`), so 20 labelled images and
`steps_per_epoch=50` give 50 full batches per epoch. The unlabeled stream draws
`round(batch_size * unlabeled_ratio)` images per step from the whole pool, reshuffled whenever the
pool is exhausted (continuing across epochs), for as many steps as the labelled loader has. Every
random draw of the data module comes from the torch.Generators in `self._generators`, seeded by
`data.seed` and saved in every checkpoint (`state_dict`): 0 and 1 choose the labelled and
unlabeled images (the one-pass labelled loader draws from generator 0's state; the cycling streams
are a function of the generators' seeds and the epoch number, see `CyclingSampler`), 2 and 3 draw
the labelled and unlabeled streams' augmentation views, 4 the unlabeled stream's strong views
(`strong_views`, below). So a resumed epoch replays exactly, and
two runs with the same seed see the same images in the same views at every step whatever their
method or settings: the soft-label cache filled by one run serves the others completely.

Strong views (FixMatch). With `strong_views` on (the harness turns it on for a method whose
`strong_views` capability is true), every training batch also has `"unlabeled_strong"`: the strong
view (`sskt_lightning.data.strong.StrongAugment`: its own pad-crop-flip, RandAugment, Cutout) of the
same uint8 unlabeled images as `batch["unlabeled"]`, in the same order, normalised like them. They
are drawn from generator 4 alone, so the weak views (and the soft-label cache, which only ever sees
the weak views with their view ids) are the same with or without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from sskt_lightning.data.augment import BatchAugment, normalize
from sskt_lightning.data.formats import ImageArrays
from sskt_lightning.data.strong import StrongAugment
from sskt_lightning.data.specs import DATASETS, DatasetSpec, dataset_spec, ensure_available
from sskt_lightning.data.views import TaskSplit, check_multi_label_views, make_task_split
from sskt_lightning.errors import ConfigError
from sskt_lightning.metrics import METRICS  # acc (single-label); map, reference_image_ap (multi-label)

UNLABELED_SOURCES = ("auto", "split", "pool")

AUGMENT_SEED_OFFSET = 10_007                           # the augmentation generators' seeds: seed + this + stream
STATISTICS_SEED_OFFSET = 20_011                        # statistics_images' order: seed + this
AUGMENT_GENERATOR = {"labeled": 2, "unlabeled": 3}     # stream -> its augmentation generator in `_generators`
STRONG_GENERATOR = 4                                   # the unlabeled stream's strong views (`strong_views`)
STRONG_KEY = "unlabeled_strong"                        # their key in a training batch


class IndexedImages(Dataset):
    """Items `(image, label, index)` (or `(image, index)` without labels) of `images[indices]`.

    `__getitems__` fetches a whole batch with one indexing op; `collate_batch` passes it through.
    With `images_on_device` the items leave the image out (`(label, index)` / `(index,)`): the data
    module gathers the images from its device copy after the transfer (`data.on_device`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, indices: torch.Tensor,
                 images_on_device: bool = False) -> None:
        self.images, self.labels, self.indices = images, labels, indices
        self.images_on_device = images_on_device

    def __len__(self) -> int:
        return len(self.indices)

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = () if self.images_on_device else (self.images[idx],)
        if self.labels is None:
            return (*image, idx)
        return (*image, self.labels[idx], idx)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self._fetch(self.indices[i])

    def __getitems__(self, ids: list[int]) -> tuple[torch.Tensor, ...]:
        return self._fetch(self.indices[torch.as_tensor(ids, dtype=torch.int64)])


class CyclingSampler(Sampler[int]):
    """An endless stream of random passes over `size` items, served `num_samples` per epoch.

    Pass j is a permutation drawn from a generator seeded by (`seed`, j); epoch e serves positions
    [e * num_samples, (e + 1) * num_samples) of the stream. So every item comes once per pass, a
    pass that runs out is followed by a new shuffled one, and an epoch continues where the last one
    stopped (across epochs, not restarting a pass). The order is a function of the seed and the
    epoch alone: Lightning calls `set_epoch(e)` at every epoch start (also after a resume, which
    therefore replays the same order); without it, each iteration counts as the next epoch.
    """

    def __init__(self, size: int, num_samples: int, seed: int) -> None:
        if size < 1:
            raise ValueError("CyclingSampler needs at least one item")
        self.size, self.num_samples, self.seed = int(size), int(num_samples), int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def _pass(self, j: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + j * 7_919) % 2**62)
        return torch.randperm(self.size, generator=gen)

    def __iter__(self):
        start, epoch = self.epoch * self.num_samples, self.epoch
        self.epoch = epoch + 1          # the next epoch, unless set_epoch says otherwise
        if self.num_samples == 0:
            return iter([])
        first, last = start // self.size, (start + self.num_samples - 1) // self.size
        stream = torch.cat([self._pass(j) for j in range(first, last + 1)])
        offset = start - first * self.size
        return iter(stream[offset: offset + self.num_samples].tolist())


def collate_batch(data: Any) -> tuple[torch.Tensor, ...]:
    """A batch from `IndexedImages.__getitems__` (a tuple) as is; a list of items is stacked."""
    return data if isinstance(data, tuple) else tuple(default_collate(data))


def _plain(value: Any) -> Any:
    """OmegaConf ListConfig (or any sequence) -> list, recursively; other values unchanged."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _class_ids(classes: Sequence[int | str] | None, names: Sequence[str], dataset: str) -> list[int] | None:
    """data.classes as class ids: ints are ids; strings are the dataset's class names (or ids in quotes)."""
    if classes is None:
        return None
    names = list(names)
    unknown = [c for c in classes if isinstance(c, str) and c not in names and not c.isdigit()]
    if unknown:
        raise ConfigError(f"data.classes has {unknown}, not class names of {dataset}; give class ids "
                          f"0..{len(names) - 1} or names from {names}.")
    return [names.index(c) if isinstance(c, str) and c in names else int(c) for c in classes]


def data_info_of(dm) -> dict:
    """What the model needs to know about the data (and what a checkpoint records of it), from a data
    module (:class:`ImageDataModule`, or any object with its properties): its ``data_info``."""
    return {"name": dm.name, "num_classes": int(dm.num_classes), "in_chans": int(dm.in_chans),
            "image_size": list(dm.image_size), "mean": list(dm.mean), "std": list(dm.std),
            "multi_label": bool(getattr(dm, "multi_label", False)), "metric": dm.metric,
            "class_names": list(dm.class_names)}


def _with_unlabeled_split() -> str:
    return " / ".join(n for n, spec in DATASETS.items() if spec.unlabeled_split)


class ImageDataModule(L.LightningDataModule):
    """One image-classification dataset with its task view; see the module docstring for batches.

    `setup()` may be called before a Trainer exists (e.g. to read `num_classes`); it loads the
    data once and is a no-op afterwards. Properties call it on first use.
    """

    def __init__(self, name: str = "cifar10", data_dir: str = "data", batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 0, val_size: int | float = 5000,
                 split_seed: int = 0, seed: int = 0, download: bool = True, classes: Sequence[int] | None = None,
                 label_map: Sequence[int | None] | None = None, class_names: Sequence[str] | None = None,
                 train_part: Sequence[int] | None = None, labels_per_class: int | None = None,
                 augment_pad: int = 4, augment_flip: bool = True, image_size: int | Sequence[int] | None = None,
                 in_chans: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, unlabeled: bool = False, unlabeled_ratio: float = 1.0,
                 unlabeled_source: str = "auto", pin_memory: bool = False, persistent_workers: bool | None = None,
                 drop_last_train: bool = True, metric: str | None = None, skip_bad_images: bool = False,
                 steps_per_epoch: int | None = None, val_per_class: int | None = None,
                 on_device: bool = False) -> None:
        super().__init__()  # no save_hyperparameters: checkpoints stay loadable with weights_only=True
        spec = dataset_spec(name)   # a ConfigError for an unknown name
        if unlabeled_source not in UNLABELED_SOURCES:
            raise ConfigError(f"data.unlabeled_source must be one of {UNLABELED_SOURCES}, got {unlabeled_source!r}.")
        if batch_size < 1 or unlabeled_ratio <= 0:
            raise ConfigError(f"data.batch_size must be >= 1 and data.unlabeled_ratio > 0, "
                              f"got {batch_size} and {unlabeled_ratio}.")
        if steps_per_epoch is not None and (isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int)
                                            or steps_per_epoch < 1):
            raise ConfigError(f"data.steps_per_epoch must be an integer >= 1 (batches per epoch, whatever the "
                              f"number of labels) or null (one pass over the labelled images), got "
                              f"{steps_per_epoch!r}.")
        multi = spec.multi_label
        if metric is not None and (metric not in METRICS or (metric == "acc") == multi):
            fits = [m for m in METRICS if (m == "acc") != multi]
            raise ConfigError(f"data.metric={metric!r} does not fit {name} ({'multi' if multi else 'single'}-label "
                              f"data); choose one of {fits} (or null for {fits[0]}).")
        if skip_bad_images and "skip_bad_images" not in spec.options:
            takers = [n for n, s in DATASETS.items() if "skip_bad_images" in s.options]
            raise ConfigError(f"data.skip_bad_images=true applies to {' / '.join(takers)} data only, not {name}.")
        if multi:
            check_multi_label_views(name, classes=classes, label_map=label_map, class_names=class_names,
                                    labels_per_class=labels_per_class, val_per_class=val_per_class)
        self.metric_arg = metric
        self.spec: DatasetSpec = spec   # what this dataset is (data.specs.DATASETS)
        self.name, self.data_dir, self.download = name, str(data_dir), bool(download)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or 2 * batch_size)
        self.processes = 1      # split_batch_across: the batch sizes above are per process
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.on_device = bool(on_device)
        self._device_arrays: dict[tuple[str, str], torch.Tensor] = {}
        self.persistent_workers = self.num_workers > 0 and persistent_workers is not False
        self.val_size, self.split_seed, self.seed = val_size, int(split_seed), int(seed)
        self.classes, self.label_map, self.class_names_override = _plain(classes), _plain(label_map), _plain(class_names)
        self.train_part, self.labels_per_class = _plain(train_part), labels_per_class
        self.val_per_class, self.steps_per_epoch = val_per_class, steps_per_epoch
        self.augment = BatchAugment(augment_pad, augment_flip)
        self.strong_augment = StrongAugment(augment_pad, augment_flip)
        self.strong_views = False   # the harness turns it on for a method with the strong_views capability
        self.image_size_arg, self.in_chans_arg = _plain(image_size), in_chans
        self.mean_arg, self.std_arg = _plain(mean), _plain(std)
        self.unlabeled, self.unlabeled_ratio, self.unlabeled_source = bool(unlabeled), unlabeled_ratio, unlabeled_source
        self.drop_last_train, self.skip_bad_images = bool(drop_last_train), bool(skip_bad_images)
        self._split: TaskSplit | None = None
        self._pending_generator_states: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ loading

    def prepare_data(self) -> None:
        """Download missing files (Lightning runs this on one process per node)."""
        if self.download:
            ensure_available(self.name, self.data_dir, self._splits_needed(), download=True)

    def _splits_needed(self) -> list[str]:
        return ["train", "test"] + (["unlabeled"] if self._unlabeled_kind() == "split" else [])

    def _read(self, split: str, classes: list[str] | None = None) -> ImageArrays:
        """One split through the spec's reader, with the ``data.*`` options it takes (those left
        unset keep the reader's defaults); ``classes``: the train split's class names (test split)."""
        given = {"image_size": self.image_size_arg, "in_chans": self.in_chans_arg or None, "classes": classes,
                 "skip_bad_images": self.skip_bad_images}
        options = {k: given[k] for k in self.spec.options if given[k] is not None}
        return self.spec.reader(self.data_dir, split, self.download, **options)

    def setup(self, stage: str | None = None) -> None:
        """Read the train and test splits once and build the task view (idempotent)."""
        if self._split is not None:
            return
        train = self._read("train")
        test = self._read("test", classes=train.classes)
        self._check_fixed_format(train)
        classes = _class_ids(self.classes, train.classes, self.name)  # names -> ids, before the task split
        split = make_task_split(
            train.labels, test.labels, train.classes, classes=classes, label_map=self.label_map,
            class_names=self.class_names_override, train_part=self.train_part, val_size=self.val_size,
            split_seed=self.split_seed, labels_per_class=self.labels_per_class, seed=self.seed,
            val_per_class=self.val_per_class)
        self._train_arrays, self._test_arrays = train, test
        self._unlabeled_images, self._unlabeled_idx = self._unlabeled_pool(train, split)
        self._mean, self._std = self._stats(train.images.shape[1])
        self._generators = [torch.Generator().manual_seed(self.seed + k) for k in (0, 1)] + [
            torch.Generator().manual_seed(self.seed + AUGMENT_SEED_OFFSET + k) for k in (0, 1, 2)]
        if self._pending_generator_states is not None:   # load_state_dict came before setup
            self.load_state_dict({"generators": self._pending_generator_states})
        self._split = split

    def _check_fixed_format(self, train: ImageArrays) -> None:
        """data.image_size / data.in_chans convert the images of a dataset whose reader takes them
        (the spec's options); for any other they must match the images as they are."""
        size, chans = tuple(train.images.shape[2:]), train.images.shape[1]
        wanted = self.image_size_arg
        wanted = None if wanted is None else tuple(wanted) if isinstance(wanted, list) else (wanted, wanted)
        if (wanted is not None and wanted != size and not self.spec.resizable) or (
                self.in_chans_arg not in (None, chans) and not self.spec.free_channels):
            resizable = [n for n, s in DATASETS.items() if s.resizable]
            free = [n for n, s in DATASETS.items() if s.free_channels]
            raise ConfigError(f"{self.name} images are {chans}×{size[0]}×{size[1]}; data.image_size can only resize "
                              f"{' / '.join(resizable)} data and data.in_chans only convert {' / '.join(free)} "
                              f"data (adapt inputs in the model instead).")

    def _unlabeled_kind(self) -> str:
        if self.unlabeled_source != "auto":
            return self.unlabeled_source
        return "split" if self.spec.unlabeled_split and self.labels_per_class is None else "pool"

    def _unlabeled_pool(self, train: ImageArrays, split: TaskSplit) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(images, indices) of the unlabeled stream; (None, empty) when unlabeled=False."""
        if not self.unlabeled:
            return None, split.unlabeled[:0]
        if self._unlabeled_kind() == "split":
            if not self.spec.unlabeled_split:
                raise ConfigError(f"data.unlabeled_source=split needs a dataset with an unlabeled split "
                                  f"({_with_unlabeled_split()}), not {self.name}; use pool with data.labels_per_class.")
            images = self._read("unlabeled").images
            return images, torch.arange(len(images))
        if len(split.unlabeled) == 0:
            raise ConfigError("data.unlabeled=true but there is no unlabeled pool: set data.labels_per_class "
                              "(the rest of the training images become unlabeled) or use the unlabeled split of "
                              f"{_with_unlabeled_split()}.")
        return train.images, split.unlabeled

    def _stats(self, chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean, std = self.spec.stats(chans)
        mean, std = tuple(self.mean_arg or mean), tuple(self.std_arg or std)
        if len(mean) != chans or len(std) != chans:
            raise ConfigError(f"data.mean / data.std need {chans} values (one per channel), got {mean} / {std}.")
        return tuple(map(float, mean)), tuple(map(float, std))

    @property
    def task(self) -> TaskSplit:
        """The task view (index arrays and labels); loads the data on first use."""
        if self._split is None:
            self.setup()
        return self._split

    @property
    def train_arrays(self) -> ImageArrays:
        """The full train split in memory (all classes; index it with the task's indices)."""
        self.task
        return self._train_arrays

    @property
    def test_arrays(self) -> ImageArrays:
        self.task
        return self._test_arrays

    # ------------------------------------------------------------------ properties

    @property
    def data_info(self) -> dict:
        """What the model needs to know about the data (see :func:`data_info_of`); loads the data."""
        return data_info_of(self)

    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self.task.class_names)

    @property
    def in_chans(self) -> int:
        return int(self.train_arrays.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.train_arrays.images.shape[2:]
        return int(h), int(w)

    @property
    def mean(self) -> tuple[float, ...]:
        self.task
        return self._mean

    @property
    def std(self) -> tuple[float, ...]:
        self.task
        return self._std

    @property
    def multi_label(self) -> bool:
        """True for multi-label data (labels are B×K multi-hot rows); known without loading."""
        return self.spec.multi_label

    @property
    def metric(self) -> str:
        """The evaluation metric's name (one of `METRICS`): data.metric, else acc / map by label type."""
        return self.metric_arg or self.spec.default_metric

    @property
    def num_train(self) -> int:
        return len(self.task.train)

    @property
    def num_val(self) -> int:
        return len(self.task.val)

    @property
    def num_test(self) -> int:
        return len(self.task.test)

    @property
    def num_unlabeled(self) -> int:
        """Images in the unlabeled stream (0 when unlabeled=False)."""
        self.task
        return len(self._unlabeled_idx)

    @property
    def train_indices(self) -> torch.Tensor:
        return self.task.train

    @property
    def val_indices(self) -> torch.Tensor:
        return self.task.val

    @property
    def test_indices(self) -> torch.Tensor:
        return self.task.test

    @property
    def unlabeled_indices(self) -> torch.Tensor:
        self.task
        return self._unlabeled_idx

    def statistics_images(self, n: int) -> torch.Tensor:
        """Up to ``n`` training images (uint8, unaugmented) to recompute BatchNorm statistics on
        (``model.ema_bn=recompute``): the unlabeled stream's images when there is one, else the
        labelled ones, in an order fixed by ``data.seed`` (its own generator: no draw from the
        training streams, so a resumed run gets the same images). The same on every process."""
        task = self.task
        if self.unlabeled:
            images, idx = self._unlabeled_images, self._unlabeled_idx
        else:
            images, idx = self._train_arrays.images, task.train
        order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(self.seed + STATISTICS_SEED_OFFSET))
        return images[idx[order[:n]]]

    def split_batch_across(self, world_size: int) -> None:
        """Make the configured (global) batch sizes per-process for ``world_size`` processes."""
        if world_size <= 1:
            return
        for attr in ("batch_size", "eval_batch_size"):
            value = getattr(self, attr)
            if value % world_size:
                raise ConfigError(
                    f"data.{attr}={value} is the global batch size and must divide by the "
                    f"{world_size} processes (devices x nodes); choose a multiple of {world_size}.")
            setattr(self, attr, value // world_size)
        self.processes = world_size

    @property
    def global_eval_batch_size(self) -> int:
        """The configured evaluation batch size over all processes (``split_batch_across`` made the
        attribute per-process): what a computation that every process repeats in whole uses, so it
        does not depend on the process count."""
        return self.eval_batch_size * self.processes

    @property
    def unlabeled_batch_size(self) -> int:
        return max(1, round(self.batch_size * self.unlabeled_ratio))

    # ------------------------------------------------------------------ resume state

    def state_dict(self) -> dict[str, Any]:
        """The sampling state (every generator in ``_generators``): saved in each checkpoint by
        Lightning, so a resumed run draws the same batches as an uninterrupted one."""
        gens = getattr(self, "_generators", None)
        return {"generators": [g.get_state() for g in gens]} if gens else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("generators")
        if not states:
            return
        gens = getattr(self, "_generators", None)
        if gens is None:
            self._pending_generator_states = list(states)
            return
        if len(states) == STRONG_GENERATOR and len(gens) == STRONG_GENERATOR + 1:
            # a checkpoint from before the strong views' generator (4 states): it starts from its seed
            gens[STRONG_GENERATOR].manual_seed(gens[STRONG_GENERATOR].initial_seed())
        elif len(states) != len(gens):
            raise ConfigError(f"The checkpoint holds {len(states)} data sampler states, this data module "
                              f"has {len(gens)}: it was written by another version of the harness. Start the run afresh "
                              f"(without resume=), or resume it with the version that wrote it.")
        for gen, state in zip(gens, states):
            gen.set_state(state)
        self._pending_generator_states = None

    # ------------------------------------------------------------------ loaders

    def _loader(self, dataset: Dataset, batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
        train = generator is not None
        sampler = None
        if not train and torch.distributed.is_available() and torch.distributed.is_initialized():
            # evaluation under DDP: shard without the padding duplicates of DistributedSampler, so
            # every sample is counted exactly once (torchmetrics sums the shards' states)
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=train, generator=generator, sampler=sampler,
            drop_last=train and self.drop_last_train and len(dataset) >= batch_size,  # never zero batches
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers, collate_fn=collate_batch)

    def _labeled_loader(self) -> DataLoader:
        task = self.task
        data = IndexedImages(self._train_arrays.images, task.train_labels, task.train, self.on_device)
        if self.steps_per_epoch is None:   # one pass over the labelled images
            return self._loader(data, self.batch_size, self._generators[0])
        sampler = CyclingSampler(len(data), self.steps_per_epoch * self.batch_size, self._generators[0].initial_seed())
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          generator=self._generators[0],  # the loader's base seed: no draw from the global RNG
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.persistent_workers, collate_fn=collate_batch)

    def train_dataloader(self) -> DataLoader | dict[str, DataLoader]:
        """Labelled loader, or `{"labeled": ..., "unlabeled": ...}` when unlabeled=True.

        An epoch has `steps_per_epoch` batches, or (null) one pass over the labelled images. The
        unlabeled stream draws exactly one batch of `unlabeled_batch_size` images per labelled batch,
        from shuffled passes over the whole pool (reshuffled when a pass is exhausted), so both
        loaders have the same length whatever the pool's size.
        """
        labeled = self._labeled_loader()
        if not self.unlabeled:
            return labeled
        pool = IndexedImages(self._unlabeled_images, None, self._unlabeled_idx, self.on_device)
        sampler = CyclingSampler(len(pool), len(labeled) * self.unlabeled_batch_size,
                                 self._generators[1].initial_seed())
        unlabeled = DataLoader(pool, batch_size=self.unlabeled_batch_size, sampler=sampler, drop_last=True,
                               generator=self._generators[1],  # no draw from the global RNG
                               num_workers=self.num_workers, pin_memory=self.pin_memory,
                               persistent_workers=self.persistent_workers, collate_fn=collate_batch)
        return {"labeled": labeled, "unlabeled": unlabeled}

    def val_dataloader(self) -> DataLoader:
        task = self.task
        return self._loader(IndexedImages(self._train_arrays.images, task.train_labels, task.val, self.on_device),
                            self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        task = self.task
        return self._loader(IndexedImages(self._test_arrays.images, task.test_labels, task.test, self.on_device),
                            self.eval_batch_size)

    # ------------------------------------------------------------------ device side

    def _training(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return bool(trainer is not None and trainer.training)

    def _device_images(self, split: str, device: torch.device) -> torch.Tensor:
        """`data.on_device`: the uint8 array of `split` (train: also val; test; unlabeled), copied
        to `device` once and kept there."""
        key = (split, str(device))
        if key not in self._device_arrays:
            host = {"train": self._train_arrays.images, "test": self._test_arrays.images,
                    "unlabeled": self._unlabeled_images}[split]
            self._device_arrays[key] = host.to(device)
        return self._device_arrays[key]

    def _split_of(self, stream: str) -> str:
        """The array an on-device batch's indices point into (see the module docstring)."""
        if stream == "unlabeled":
            return "unlabeled"
        trainer = getattr(self, "trainer", None)
        return "test" if trainer is not None and trainer.testing else "train"

    def prepare_batch(self, batch: Any, augment: bool = False, stream: str = "labeled",
                      split: str | None = None) -> Any:
        """uint8 images -> (augmented if `augment`) normalised float, plus each sample's view id
        (`BatchAugment`: which crop offset and flip it got; the identity view when not augmenting)
        appended to the batch: `(x, y, index)` -> `(x, y, index, view)`, `(x, index)` ->
        `(x, index, view)`; dicts per stream. Index and view name the exact input a frozen source
        sees: the soft-label cache (`sskt_lightning.cache`) is keyed by them. Each stream draws its
        views from its own generator (after `setup`; torch's global RNG before it). With
        `data.on_device` the batch arrives without images and they are gathered here from the
        device copy of `split` (default: the one the trainer's stage reads). With `strong_views` on
        and `augment`, a dict batch also gets `"unlabeled_strong"` (`strong_view` of the unlabeled
        stream's uint8 images: same images, same order; no view id, nothing caches it)."""
        if isinstance(batch, dict):
            out = {k: self.prepare_batch(v, augment, k, split) for k, v in batch.items()}
            if augment and self.strong_views and "unlabeled" in batch:
                out[STRONG_KEY] = self.strong_view(self._images_of(batch["unlabeled"], "unlabeled", split))
            return out
        images = self._images_of(batch, stream, split)
        rest = batch if self.on_device else batch[1:]
        if augment:
            gens = getattr(self, "_generators", None)
            gen = gens[AUGMENT_GENERATOR[stream]] if gens else None
            images, view = self.augment(images, return_view=True, generator=gen)
        else:
            view = torch.full((images.shape[0],), self.augment.identity_view, dtype=torch.int64,
                              device=images.device)
        if images.dtype == torch.uint8:
            images = normalize(images, self.mean, self.std)
        return (images, *rest, view)

    def _images_of(self, batch: tuple, stream: str, split: str | None) -> torch.Tensor:
        """The uint8 images of one stream's batch (with `data.on_device`, gathered by its indices)."""
        if self.on_device:
            index = batch[-1]
            return self._device_images(split or self._split_of(stream), index.device)[index]
        return batch[0]

    def strong_view(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised strong views of uint8 `images` (`StrongAugment`), drawn from generator 4
        (torch's default CPU generator before `setup`). Never cached: nothing keys them."""
        gens = getattr(self, "_generators", None)
        gen = gens[STRONG_GENERATOR] if gens else torch.default_generator
        return normalize(self.strong_augment(images, generator=gen), self.mean, self.std)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise on the device; augment only while the trainer is training. Under
        ``trainer.precision=*-true`` the normalised images take the module's dtype (Lightning's own
        input conversion ran before this hook, on the uint8 batch, which it leaves alone)."""
        batch = self.prepare_batch(batch, augment=self._training())
        plugin = getattr(getattr(self, "trainer", None), "precision_plugin", None)
        return plugin.convert_input(batch) if plugin is not None else batch

    def source_streams(self) -> dict[str, tuple[str, torch.Tensor]]:
        """For the soft-label cache: stream -> (split name, the image array its indices point into)."""
        streams = {"labeled": ("train", self.train_arrays.images)}
        if self.unlabeled:
            split = "unlabeled" if self._unlabeled_kind() == "split" else "train"
            streams["unlabeled"] = (split, self._unlabeled_images)
        return streams
