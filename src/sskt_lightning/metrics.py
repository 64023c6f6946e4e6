"""Evaluation metrics: the primary metric of a run, chosen from what the data module reports.

`primary_metric(data_info)` covers the three cases (logged as ``val/acc`` / ``test/acc``):
  - single-label data: top-1 accuracy, `MulticlassAccuracy(num_classes, average="micro")`;
  - multi-label data (VOC 2007), ``metric: map`` (default): the standard per-class macro mAP,
    `MultilabelAveragePrecision(num_labels, average="macro")`;
  - multi-label data, ``metric: reference_image_ap``: `ReferenceImageAP`, the SSKT reference
    code's per-image AP - NOT the standard metric; only for comparing with the paper's code.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MultilabelAveragePrecision,
    MultilabelRankingAveragePrecision,
)

from sskt_lightning.errors import ConfigError

METRICS = ("acc", "map", "reference_image_ap")


class ReferenceImageAP(MultilabelRankingAveragePrecision):
    """The SSKT reference code's VOC metric. NOT the standard VOC mAP - do not report it as such.

    The reference computes average precision *per image* over its K class scores (how well the
    image's own labels are ranked above its other classes: sklearn's `average_precision_score`
    of the image's row) and averages these over images. That is torchmetrics' label ranking
    average precision: for each positive class, (positives scored at least as high) / (classes
    scored at least as high), averaged over the image's positives; tied scores count at the end
    of their run in both. Two differences are removed here:
      - an image without a positive label counts 0, as sklearn's AP gives (LRAP counts it 1);
        VOC has no such image (every annotation has an object);
      - scores go in as their within-image ranks scaled into [0, 1): torchmetrics passes logits
        through a float32 sigmoid, which ties every logit above ~16.6 at 1.0.
    The standard metric (`MultilabelAveragePrecision`, macro) is AP *per class* over all test
    images, averaged over classes; the two are not comparable. The reference averages per-image
    APs within each batch, then the batch means; this keeps the exact mean over all images (sum
    and count states, so exact under DDP).

    `update(preds, target)`: preds B×K scores (logits or probabilities: only their order
    matters), target B×K multi-hot 0/1.
    """

    def __init__(self, num_labels: int, **kwargs) -> None:
        super().__init__(num_labels=num_labels, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.ndim != 2 or preds.shape != target.shape or preds.shape[1] != self.num_labels:
            raise ValueError(f"expected B×{self.num_labels} scores and targets, got {tuple(preds.shape)} and "
                             f"{tuple(target.shape)}")
        ranks = (preds[:, :, None] > preds[:, None, :]).sum(2).double() / preds.shape[1]  # order and ties kept
        positive = target.sum(1) > 0
        self.total += (~positive).sum()  # images without a positive: AP 0
        if positive.any():
            super().update(ranks[positive], target[positive])


def primary_metric(data_info: Mapping) -> Metric:
    """A fresh metric for the run's data: ``num_classes``, ``multi_label`` and optional ``metric``.

    ``metric`` (the data module's `metric` property) is one of `METRICS`; missing or None means
    ``acc`` for single-label and ``map`` for multi-label data (older checkpoints lack the key).
    """
    n = int(data_info["num_classes"])
    multi = bool(data_info.get("multi_label", False))
    name = data_info.get("metric") or ("map" if multi else "acc")
    if name not in METRICS or (name == "acc") == multi:
        raise ConfigError(f"metric {name!r} does not fit {'multi' if multi else 'single'}-label data; "
                          f"choose one of {[m for m in METRICS if (m == 'acc') != multi]}.")
    if name == "acc":
        return MulticlassAccuracy(num_classes=n, average="micro")
    if name == "map":
        return MultilabelAveragePrecision(num_labels=n, average="macro")
    return ReferenceImageAP(num_labels=n)
