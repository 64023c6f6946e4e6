"""The dataset table (`sskt_lightning.data.specs.DATASETS`): it and conf/data/ name the same
datasets, and a dataset added as one entry is read, checked and normalised from its entry alone."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sskt_lightning.compose import CONFIG_DIR
from sskt_lightning.data import DATASETS, DatasetSpec, ImageDataModule, dataset_spec, ensure_available
from sskt_lightning.data.formats import ImageArrays
from sskt_lightning.errors import ConfigError

DATA_CONFIGS = sorted((Path(CONFIG_DIR) / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", DATA_CONFIGS, ids=lambda p: p.stem)
def test_every_data_config_names_a_registered_dataset(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem, f"{path} is chosen by data={path.stem} but reads data.name={cfg.name}"
    assert cfg.name in DATASETS, f"{path} names {cfg.name!r}, which has no entry in data.specs.DATASETS"


def test_every_registered_dataset_has_a_data_config():
    assert sorted(DATASETS) == [p.stem for p in DATA_CONFIGS]
    assert all(spec.name == name for name, spec in DATASETS.items())


def test_the_table_says_what_the_datasets_are():
    """The facts the data module used to spell with `if name == ...`, now read from the table."""
    assert [n for n, s in DATASETS.items() if s.multi_label] == ["voc2007"]
    assert [n for n, s in DATASETS.items() if s.unlabeled_split] == ["stl10"]
    assert [n for n, s in DATASETS.items() if s.resizable] == ["imagefolder", "voc2007"]
    assert [n for n, s in DATASETS.items() if s.free_channels] == ["imagefolder"]
    assert DATASETS["imagefolder"].stats(1) == ((0.5,), (0.5,))
    assert DATASETS["imagefolder"].stats(3) == DATASETS["voc2007"].stats(3) == (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert DATASETS["fashion_mnist"].stats(1) == ((0.2860,), (0.3530,))


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(ConfigError, match="cifar10.*voc2007"):
        dataset_spec("cifar11")
    with pytest.raises(ConfigError, match="not a known dataset"):
        ImageDataModule("cifar11")
    with pytest.raises(ConfigError, match="unknown dataset"):
        ensure_available("cifar11", ".", ["train"])


def test_a_spec_with_an_unknown_option_is_refused():
    with pytest.raises(ValueError, match="options"):
        DatasetSpec("x", lambda *a: None, lambda *a: None, (0.5,), (0.5,), options=("image_sizes",))


# ------------------------------------------------------------------ a dataset added as one entry
SIZES = {"train": 40, "test": 12, "unlabeled": 30}


def _toy_reader(root, split, download=False, image_size=None):
    """4 classes of 1×8×8 images (16×16 with image_size=16), seeded by the split's name."""
    side = image_size or 8
    gen = torch.Generator().manual_seed(len(split))
    n = SIZES[split]
    images = torch.randint(0, 256, (n, 1, side, side), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n, dtype=torch.int64) % 4 if split != "unlabeled" else torch.full((n,), -1)
    return ImageArrays(images, labels, ["a", "b", "c", "d"])


@pytest.fixture
def toy(monkeypatch):
    located = []
    spec = DatasetSpec("toy", _toy_reader, lambda root, split, download: located.append(split), (0.25,), (0.125,),
                       splits=("train", "test", "unlabeled"), options=("image_size",))
    monkeypatch.setitem(DATASETS, "toy", spec)
    return located


def test_a_new_dataset_is_one_entry(toy):
    dm = ImageDataModule("toy", val_size=8, unlabeled=True)
    dm.prepare_data()
    assert toy == ["train", "test", "unlabeled"]            # its unlabeled split is fetched too
    dm.setup()
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (4, 1, (8, 8))
    assert (dm.mean, dm.std) == ((0.25,), (0.125,))
    assert (dm.num_train, dm.num_val, dm.num_test, dm.num_unlabeled) == (32, 8, 12, 30)
    assert (dm.multi_label, dm.metric) == (False, "acc")
    assert ImageDataModule("toy", val_size=8, image_size=16).image_size == (16, 16)   # resizable: taken


def test_a_new_dataset_keeps_its_fixed_format(toy):
    with pytest.raises(ConfigError, match="in_chans"):
        ImageDataModule("toy", val_size=8, in_chans=3).setup()        # not in the spec's options
    with pytest.raises(ConfigError, match="skip_bad_images.*imagefolder"):
        ImageDataModule("toy", skip_bad_images=True)
    assert ImageDataModule("toy", val_size=8, labels_per_class=2, unlabeled=True).num_unlabeled == 32 - 8


def test_data_info_comes_from_the_data_module(toy):
    dm = ImageDataModule("toy", val_size=8)
    assert dm.data_info == {"name": "toy", "num_classes": 4, "in_chans": 1, "image_size": [8, 8], "mean": [0.25],
                            "std": [0.125], "multi_label": False, "metric": "acc", "class_names": ["a", "b", "c", "d"]}
    from sskt_lightning.data import data_info_of
    from sskt_lightning.train import data_info_of as old_name   # the entry point's name for it, kept
    assert data_info_of(dm) == old_name(dm) == dm.data_info
