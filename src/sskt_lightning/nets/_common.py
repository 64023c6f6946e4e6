"""Shared pieces of the CIFAR-style nets: the timm-style head interface, init and the factory.

Every ``cifar_*`` model subclasses :class:`CifarClassifier`, which provides ``forward_head``,
``forward``, ``get_classifier``, ``reset_classifier`` and ``pretrained_cfg``; subclasses build
their trunk, set ``feature_info`` and implement ``forward_features``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from sskt_lightning.errors import WeightsError

CIFAR10_MEAN: Tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: Tuple[float, ...] = (0.2470, 0.2435, 0.2616)

def make_pretrained_cfg(
    in_chans: int, num_classes: int, first_conv: str = "conv1", classifier: str = "fc"
) -> Dict[str, Any]:
    """A timm-style ``pretrained_cfg`` dict for a 32 px model (CIFAR-10 stats for 3 channels, 0.5 otherwise)."""
    if in_chans == 3:
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        mean, std = (0.5,) * in_chans, (0.5,) * in_chans
    cfg: Dict[str, Any] = dict(
        input_size=(in_chans, 32, 32),
        mean=mean,
        std=std,
        interpolation="bilinear",
        crop_pct=1.0,
        num_classes=num_classes,
        classifier=classifier,
        first_conv=first_conv,
    )
    return cfg


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs with zero bias; BatchNorm weight 1, bias 0.

    Linear layers keep PyTorch's default init.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows or precedes it)."""
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


class CifarClassifier(nn.Module):
    """Base class: global-average-pool + (dropout) + linear classifier ``fc`` on ``forward_features``.

    Subclasses call ``super().__init__(...)`` first, build their trunk, set ``self.feature_info``,
    implement ``forward_features`` and end ``__init__`` with ``self._build_head(drop_rate)``, which
    adds the head after the trunk (so ``fc`` comes last in ``state_dict``) and initialises weights.
    The class attribute ``first_conv`` names the stem conv for ``pretrained_cfg``.
    """

    feature_info: List[Dict[str, Any]]
    first_conv: str = "conv1"   # the stem conv, for pretrained_cfg

    def __init__(
        self,
        num_classes: int,
        num_features: int,
        in_chans: int,
    ):
        super().__init__()
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"need num_classes >= 0 and in_chans >= 1, got {num_classes}, {in_chans}")
        self.num_classes = num_classes
        self.num_features = num_features
        self.in_chans = in_chans
        self.pretrained_cfg = make_pretrained_cfg(in_chans, num_classes, self.first_conv)

    def _build_head(self, head_drop_rate: float = 0.0) -> None:
        """Add dropout (``head_drop_rate``) + ``fc`` after the trunk, then initialise all weights."""
        self.head_drop = nn.Dropout(head_drop_rate) if head_drop_rate > 0 else nn.Identity()
        self.fc: nn.Module = self._make_fc(self.num_classes)
        init_weights(self)

    def _make_fc(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global-average-pool and flatten ``x``; return that if ``pre_logits`` else the logits."""
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        if pre_logits:
            return x
        return self.fc(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final ``nn.Linear`` (``nn.Identity`` after ``reset_classifier(0)``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` (0: no classifier)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"cifar_* nets only support global_pool='avg', got {global_pool!r}")
        ref = next(self.parameters())
        self.num_classes = num_classes
        self.fc = self._make_fc(num_classes).to(device=ref.device, dtype=ref.dtype)
        self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes)


def create_model(name: str, cls: type, pretrained: bool, model_args: Dict[str, Any],
                 feature_cfg: Optional[Dict[str, Any]] = None, **kwargs: Any) -> nn.Module:
    """Build ``cls(**model_args, **kwargs)`` for the registered timm entrypoint ``name`` through
    timm's own ``build_model_with_cfg``, so the timm conventions hold as for timm's nets:
    ``features_only=True`` (with ``out_indices``, ``feature_cls``) wraps the net in timm's
    ``FeatureListNet``, which returns the stage maps listed in ``feature_info``;
    ``pretrained_cfg_overlay`` and ``cache_dir`` are consumed by timm.

    ``feature_cfg``: the entrypoint's defaults for that wrapper (``out_indices``: every stage,
    ``flatten_sequential`` where the stages sit inside one ``nn.Sequential``). The net's
    ``pretrained_cfg`` describes the instance (its ``in_chans``, classes and 32 px statistics, see
    :func:`make_pretrained_cfg`); a ``pretrained_cfg`` passed in (a hub tag) is ignored, as there
    are no hub weights. ``device``/``dtype`` move the built net. Any other unknown keyword reaches
    the constructor and raises ``TypeError`` there.
    """
    from timm.models import build_model_with_cfg

    if pretrained:
        raise WeightsError(
            f"There are no hub weights for {name!r}: the cifar_* nets are defined locally by "
            "sskt_lightning and have no pretrained download. Create it with pretrained=False and "
            "load a local weights file (a state_dict / checkpoint path) instead."
        )
    kwargs.pop("pretrained_cfg", None)
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    # The defaults of every CifarClassifier subclass: 10 classes, 3 channels.
    num_classes, in_chans = kwargs.setdefault("num_classes", 10), kwargs.setdefault("in_chans", 3)
    cfg = make_pretrained_cfg(in_chans, num_classes, getattr(cls, "first_conv", "conv1"))
    model = build_model_with_cfg(cls, name, False, pretrained_cfg=cfg, feature_cfg=dict(feature_cfg or {}),
                                 **model_args, **kwargs)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def stage_info(num_chs: Sequence[int], reductions: Sequence[int], modules: Sequence[str]) -> List[Dict[str, Any]]:
    """``feature_info`` list: one ``dict(num_chs, reduction, module)`` per stage."""
    return [dict(num_chs=c, reduction=r, module=m) for c, r, m in zip(num_chs, reductions, modules, strict=True)]
