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
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision

from sskt_lightning.errors import ConfigError

METRICS = ("acc", "map", "reference_image_ap")


def image_average_precision(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Average precision of each image (row) over its K class scores: a B-vector.

    The classes of one image are ranked by score and the image's positive labels are the
    relevant items; AP is sklearn's `average_precision_score(target[i], preds[i])`, i.e.
    `sum_n (R_n - R_{n-1}) P_n` over the distinct score thresholds (tied scores form one step).
    A row without any positive label gets 0 (sklearn >= 0.22 does the same, with a warning).
    """
    if preds.shape != target.shape or preds.ndim != 2:
        raise ValueError(f"preds and target must both be B×K, got {tuple(preds.shape)} and {tuple(target.shape)}")
    scores, order = preds.float().sort(dim=1, descending=True, stable=True)
    hits = target.gather(1, order).float()
    k = scores.shape[1]
    # precision at the end of each run of tied scores, assigned to every position of the run
    precision = hits.cumsum(1) / torch.arange(1, k + 1, device=preds.device, dtype=torch.float32)
    run_end = torch.ones_like(hits, dtype=torch.bool)
    run_end[:, :-1] = scores[:, :-1] != scores[:, 1:]
    positions = torch.arange(k, device=preds.device).expand_as(hits)
    end_index = torch.where(run_end, positions, torch.full_like(positions, k))
    end_index = end_index.flip(1).cummin(1).values.flip(1)  # the first run end at or after each position
    positives = hits.sum(1)
    ap = (hits * precision.gather(1, end_index)).sum(1) / positives.clamp(min=1)
    return torch.where(positives > 0, ap, torch.zeros_like(ap))


class ReferenceImageAP(Metric):
    """The SSKT reference code's VOC metric. NOT the standard VOC mAP - do not report it as such.

    The reference code computes average precision *per image* over its 20 class scores (how well
    the image's own labels are ranked above its other classes; see `image_average_precision`)
    and averages these over images. The standard metric (`MultilabelAveragePrecision`, macro) is
    AP *per class* over all test images, averaged over classes; the two differ and are not
    comparable. The reference averages per-image APs within each batch and then averages the
    batch means; this metric keeps the exact mean over all images (the same when every batch has
    the same size), summing per-image APs and counting images, so it is exact under DDP.

    `update(preds, target)`: preds B×K scores (logits or probabilities: AP only uses the ranking),
    target B×K multi-hot 0/1. Images without a positive label count as AP 0.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_labels: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_labels = num_labels
        self.add_state("ap_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if self.num_labels is not None and preds.shape[-1] != self.num_labels:
            raise ValueError(f"expected {self.num_labels} class scores per image, got {preds.shape[-1]}")
        self.ap_sum += image_average_precision(preds, target).sum().to(self.ap_sum.dtype)
        self.count += preds.shape[0]

    def compute(self) -> torch.Tensor:
        return (self.ap_sum / self.count).float()


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
