"""Pascal VOC 2007 multi-label classification: the reader on a tiny tree in the official layout
(JPEGs, XML annotations, ImageSets lists), the datamodule's multi-hot batches and views, the
per-image reference AP metric and the primary-metric factory."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data_fixtures import write_voc2007
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision

from sskt_lightning.data import VOC_CLASSES, ImageDataModule, ensure_available, read_voc2007
from sskt_lightning.errors import ConfigError, DataError, DataNotFoundError
from sskt_lightning.metrics import ReferenceImageAP, primary_metric

VOC = ("VOCdevkit", "VOC2007")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return root, write_voc2007(root, n_trainval=8, n_test=5, size=(20, 24))


# ----------------------------------------------------------------------------- reader


def test_reader_shapes_labels_and_split(voc_root):
    root, written = voc_root
    train, test = read_voc2007(root, "train", image_size=16), read_voc2007(root, "test", image_size=[12, 16])
    assert tuple(train.images.shape) == (8, 3, 16, 16) and tuple(test.images.shape) == (5, 3, 12, 16)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert tuple(train.labels.shape) == (8, 20) and tuple(test.labels.shape) == (5, 20)
    assert train.classes == VOC_CLASSES and len(VOC_CLASSES) == 20 and VOC_CLASSES[11] == "dog"
    assert train.multi_label and set(train.labels.unique().tolist()) == {0, 1}
    assert torch.equal(train.labels, torch.from_numpy(written["train"]["labels"]))
    assert torch.equal(test.labels, torch.from_numpy(written["test"]["labels"]))
    # the first trainval image has a dog and two persons (with <part><name>head</name>...): exactly 2 classes
    assert train.labels[0].nonzero().flatten().tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    # images follow the list files (solid colours survive JPEG and resizing within a few levels)
    for arrays, split in ((train, "train"), (test, "test")):
        mean_rgb = arrays.images.float().mean((2, 3))
        assert (mean_rgb - torch.from_numpy(written[split]["colors"]).float()).abs().max() < 6


def test_difficult_only_class_is_positive(voc_root):
    root, written = voc_root
    labels = read_voc2007(root, "train", image_size=8).labels
    found = 0
    for row, objects in enumerate(written["train"]["objects"]):
        for name in {n for n, d in objects if d} - {n for n, d in objects if not d}:  # only difficult instances
            assert labels[row, VOC_CLASSES.index(name)] == 1
            found += 1
        assert labels[row].sum() == len({n for n, _ in objects})
    assert found >= 2


def test_default_size_is_224(voc_root):
    root, _ = voc_root
    assert tuple(read_voc2007(root, "test").images.shape) == (5, 3, 224, 224)


@pytest.fixture
def no_network(offline):
    """Every DNS lookup fails (conftest's ``offline``, which records lookups and back-off sleeps)."""
    return offline


@pytest.mark.parametrize("split, tar", [("train", "VOCtrainval_06-Nov-2007.tar"), ("test", "VOCtest_06-Nov-2007.tar")])
def test_missing_data_download_fails_fast(tmp_path, no_network, split, tar):
    before = socket.getdefaulttimeout()
    with pytest.raises(DataNotFoundError) as info:
        read_voc2007(tmp_path / "data", split, download=True)
    # fast as events, not seconds (a wall-clock limit fails on a loaded machine): the official site, then
    # torchvision's mirror, each looked up once; no retry, no back-off sleep
    assert no_network.lookups == ["host.robots.ox.ac.uk", "thor.robots.ox.ac.uk"] and no_network.sleeps == [], \
        (no_network.lookups, no_network.sleeps)
    msg = str(info.value)
    assert str(tmp_path.joinpath("data", *VOC)) in msg and "ImageSets/Main" in msg
    assert "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar" in msg
    assert "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar" in msg
    assert "Download failed" in msg and tar in msg and "paths.data_dir" in msg
    assert info.value.__context__ is None and info.value.__cause__ is None  # no torchvision traceback
    assert socket.getdefaulttimeout() == before


def test_missing_data_without_download_and_partial_trees(tmp_path, no_network):
    with pytest.raises(DataNotFoundError, match="download=False") as info:
        read_voc2007(tmp_path, "test", download=False)
    assert str(tmp_path.joinpath(*VOC, "ImageSets", "Main", "test.txt")) in str(info.value)
    written = write_voc2007(tmp_path, n_trainval=3, n_test=2, size=8)
    ensure_available("voc2007", tmp_path, ["train", "test"], download=False)
    folder = tmp_path.joinpath(*VOC)
    (folder / "JPEGImages" / f"{written['test']['ids'][1]}.jpg").unlink()
    with pytest.raises(DataNotFoundError, match="1 of their files are missing") as info:
        read_voc2007(tmp_path, "test")
    assert f"{written['test']['ids'][1]}.jpg" in str(info.value)
    (folder / "Annotations" / f"{written['train']['ids'][2]}.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match="not a readable VOC annotation"):
        read_voc2007(tmp_path, "train", image_size=8)
    with pytest.raises(ConfigError, match="split"):
        read_voc2007(tmp_path, "val")


# ----------------------------------------------------------------------------- datamodule


def test_datamodule_multi_hot_batches_and_val_split(voc_root):
    root, written = voc_root
    dm = ImageDataModule("voc2007", root, batch_size=2, val_size=3, download=False, image_size=16)
    assert dm.multi_label and dm.metric == "map"  # known before loading
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (20, 3, (16, 16))
    assert dm.class_names == VOC_CLASSES
    assert dm.mean == (0.485, 0.456, 0.406) and dm.std == (0.229, 0.224, 0.225)
    assert (dm.num_train, dm.num_val, dm.num_test) == (5, 3, 5)
    train, val = set(dm.train_indices.tolist()), set(dm.val_indices.tolist())
    assert not train & val and train | val == set(range(8))  # validation held out of trainval
    assert dm.test_indices.tolist() == list(range(5))
    full = torch.from_numpy(written["train"]["labels"])
    seen = []
    for images, labels, index in dm.train_dataloader():
        assert images.shape == (2, 3, 16, 16) and labels.shape == (2, 20) and labels.dtype == torch.int64
        assert torch.equal(labels, full[index]) and torch.equal(images, dm.train_arrays.images[index])
        seen += index.tolist()
    assert set(seen) <= train and len(seen) == 4  # drop_last
    images, labels, index = next(iter(dm.val_dataloader()))
    assert sorted(index.tolist()) == sorted(val) and torch.equal(labels, full[index])
    test_labels = torch.cat([labels for _, labels, _ in dm.test_dataloader()])
    assert torch.equal(test_labels, torch.from_numpy(written["test"]["labels"]))
    batch = next(iter(dm.train_dataloader()))
    dm.trainer = SimpleNamespace(training=True)
    out = dm.on_after_batch_transfer(batch, 0)
    assert out[0].dtype == torch.float32 and out[0].shape == (2, 3, 16, 16) and torch.equal(out[1], batch[1])


def test_datamodule_train_part_and_metric_option(voc_root):
    root, _ = voc_root
    parts = [ImageDataModule("voc2007", root, val_size=1, download=False, image_size=8, train_part=[k, 2],
                             metric="reference_image_ap") for k in (0, 1)]
    a, b = (set(torch.cat([p.train_indices, p.val_indices]).tolist()) for p in parts)
    assert not a & b and a | b == set(range(8))
    assert parts[0].metric == "reference_image_ap" and parts[0].num_val == 1


@pytest.mark.parametrize("view", [{"label_map": [0] * 20}, {"classes": [0, 1]}, {"labels_per_class": 2},
                                  {"class_names": ["a"] * 20}])
def test_label_views_rejected_for_voc(voc_root, view):
    root, _ = voc_root
    with pytest.raises(ConfigError, match=f"data.{next(iter(view))} cannot be used with voc2007"):
        ImageDataModule("voc2007", root, val_size=2, download=False, image_size=8, **view)


def test_metric_option_must_fit_the_data(voc_root):
    root, _ = voc_root
    with pytest.raises(ConfigError, match="data.metric"):
        ImageDataModule("voc2007", root, metric="acc")
    with pytest.raises(ConfigError, match="data.metric"):
        ImageDataModule("cifar10", root, metric="reference_image_ap")
    with pytest.raises(ConfigError, match="data.metric"):
        ImageDataModule("voc2007", root, metric="mAP")
    assert ImageDataModule("cifar10", root).metric == "acc" and not ImageDataModule("cifar10", root).multi_label


# ----------------------------------------------------------------------------- metrics


def _sklearn_ap(scores: list[float], labels: list[int]) -> float:
    """average_precision_score written out: sum over distinct thresholds of (R_n - R_{n-1}) * P_n."""
    positives = sum(labels)
    if positives == 0:
        return 0.0
    ap, prev_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        chosen = [lab for s, lab in zip(scores, labels) if s >= threshold]
        recall = sum(chosen) / positives
        ap += (recall - prev_recall) * sum(chosen) / len(chosen)
        prev_recall = recall
    return ap


def _image_ap(preds: torch.Tensor, target: torch.Tensor) -> list[float]:
    """ReferenceImageAP of each image on its own."""
    out = []
    for p, t in zip(preds, target):
        metric = ReferenceImageAP(num_labels=preds.shape[1])
        metric.update(p[None], t[None])
        out.append(metric.compute().item())
    return out


def test_reference_image_ap_by_hand():
    # image 0: both positives ranked first -> AP 1; image 1: its positive ranked 2nd -> AP 1/2
    preds = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.6, 0.1]])
    target = torch.tensor([[1, 0, 1], [0, 1, 0]])
    assert _image_ap(preds, target) == [1.0, 0.5]
    metric = ReferenceImageAP(num_labels=3)
    metric.update(preds, target)
    assert metric.compute().item() == pytest.approx(0.75)
    # per class every positive outranks every negative: the standard macro mAP is 1, not 0.75
    standard = MultilabelAveragePrecision(num_labels=3, average="macro")
    standard.update(preds, target)
    assert standard.compute().item() == pytest.approx(1.0)
    # one more image whose positive is ranked 3rd of 3 (AP 1/3), added in a second update
    metric.update(torch.tensor([[0.7, 0.2, 0.3]]), torch.tensor([[0, 1, 0]]))
    assert metric.compute().item() == pytest.approx((1 + 0.5 + 1 / 3) / 3)


def test_reference_image_ap_edge_cases_by_hand():
    """Ties, an image without a positive, an all-positive image, and logits a float32 sigmoid would tie."""
    preds = torch.tensor([
        [0.5, 0.5, 0.1, 0.9],    # positive 0 tied with negative 1, both below negative 3: P at the run end = 1/3
        [0.5, 0.5, 0.5, 0.1],    # positives 0, 2 in a 3-way tie with negative 1: each 2/3 -> AP 2/3
        [0.2, 0.7, 0.1, 0.3],    # no positive label: AP 0 (the reference's sklearn AP; LRAP would say 1)
        [0.2, 0.7, 0.1, 0.3],    # every label positive: AP 1
        [30.0, 20.0, -5.0, -9.0],  # logits: the positive (30) is first -> AP 1 (a float32 sigmoid ties 30 and 20)
    ])
    target = torch.tensor([[1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    expected = [1 / 3, 2 / 3, 0.0, 1.0, 1.0]
    assert _image_ap(preds, target) == pytest.approx(expected)
    metric = ReferenceImageAP(num_labels=4)
    metric.update(preds, target)
    assert metric.compute().item() == pytest.approx(sum(expected) / 5)


def test_reference_image_ap_matches_sklearn_definition_with_ties():
    gen = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 5, (40, 20), generator=gen).float() / 4  # many tied scores
    target = (torch.rand(40, 20, generator=gen) < 0.2).long()
    target[0] = 0  # an image with no positive label counts 0
    expected = [_sklearn_ap(p.tolist(), t.tolist()) for p, t in zip(preds, target)]
    # APs are ratios of small counts (exactly rounded float ops, no transcendental): a float32 result is
    # within ~1e-7 of the float64 reference on any CPU, the 40-image mean too; abs 1e-6 keeps a 10x margin
    assert _image_ap(preds, target) == pytest.approx(expected, abs=1e-6)
    metric = ReferenceImageAP(num_labels=20)
    for chunk in range(0, 40, 16):  # uneven batches: still the mean over images
        metric.update(preds[chunk:chunk + 16], target[chunk:chunk + 16])
    assert metric.compute().item() == pytest.approx(float(np.mean(expected)), abs=1e-6)


def test_reference_image_ap_state_sums_across_processes():
    preds, target = torch.rand(6, 20), (torch.rand(6, 20) < 0.3).long()
    target[2] = 0
    whole, left, right = ReferenceImageAP(20), ReferenceImageAP(20), ReferenceImageAP(20)
    whole.update(preds, target)
    left.update(preds[:4], target[:4])
    right.update(preds[4:], target[4:])
    assert left._reductions["measure"] is left._reductions["total"]  # both dist_reduce_fx="sum"
    left.merge_state(right)
    assert left.compute().item() == pytest.approx(whole.compute().item())
    assert int(left.total) == 6


def test_primary_metric_cases():
    assert isinstance(primary_metric({"num_classes": 10}), MulticlassAccuracy)
    assert isinstance(primary_metric({"num_classes": 10, "multi_label": False, "metric": "acc"}), MulticlassAccuracy)
    standard = primary_metric({"num_classes": 20, "multi_label": True})
    assert isinstance(standard, MultilabelAveragePrecision) and standard.average == "macro"
    assert isinstance(primary_metric({"num_classes": 20, "multi_label": True, "metric": "map"}),
                      MultilabelAveragePrecision)
    reference = primary_metric({"num_classes": 20, "multi_label": True, "metric": "reference_image_ap"})
    assert isinstance(reference, ReferenceImageAP) and reference.num_labels == 20
    with pytest.raises(ConfigError, match="metric"):
        primary_metric({"num_classes": 10, "multi_label": False, "metric": "map"})
    with pytest.raises(ConfigError, match="metric"):
        primary_metric({"num_classes": 20, "multi_label": True, "metric": "acc"})
