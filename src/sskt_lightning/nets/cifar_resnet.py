"""CIFAR ResNets for 32 px input, registered with timm as ``cifar_resnet*``.

Two families:

* ``cifar_resnet20/32/44/56/110`` -- He et al. 2016 (Sec. 4.2) CIFAR ResNets, as in the SSKT
  reference code: 3x3 stem with 16 channels, 3 stages of ``n = (depth - 2) / 6`` BasicBlocks with
  16/32/64 channels, stride 2 at stages 2 and 3, and *option A* shortcuts where the shape changes:
  identity, subsampled with the stride, channels zero-padded on both sides, no parameters. Conv and
  linear weights are Kaiming-normal with fan-in (``init="fan_in"``). With 10 classes ResNet-20 has
  269,722 parameters and ResNet-32 464,154. ``shortcut="B"`` (``model.kwargs.shortcut=B``) uses
  1x1 conv + BN projections instead (272,474 / 466,906 parameters).
* ``cifar_resnet18/34/50`` -- ImageNet ResNet widths 64/128/256/512 (BasicBlock for 18/34,
  Bottleneck with expansion 4 for 50) with the common CIFAR adaptation: a 3x3 stride-1 stem and
  no max-pool; projection (option B) shortcuts and Kaiming fan-out conv init, as torchvision's
  ResNets (``init="fan_out"``).

``feature_info[i]['module']`` is ``layer{i+1}``: the output of the last block of each stage
(after its final ReLU). The last entry's output is what ``forward_features`` returns.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from sskt_lightning.errors import ConfigError
from sskt_lightning.nets._common import CifarClassifier, conv3x3, create_model, stage_info


SHORTCUTS = ("A", "B")
INITS = ("fan_in", "fan_out")


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2016): keep every ``stride``-th pixel and zero-pad the channels
    from ``in_chs`` to ``out_chs``, half before and half after (the odd one after). No parameters."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"an option-A shortcut cannot reduce channels ({in_chs} -> {out_chs})")
        self.stride = stride
        self.pad_before = (out_chs - in_chs) // 2
        self.pad_after = out_chs - in_chs - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


def _shortcut(in_chs: int, out_chs: int, stride: int, kind: str = "B") -> Optional[nn.Module]:
    """The shortcut where the shape changes (``None``: identity): option ``"A"`` (subsample +
    zero-pad, no parameters) or ``"B"`` (1x1 conv + BN projection)."""
    if stride == 1 and in_chs == out_chs:
        return None
    if kind == "A":
        return ZeroPadShortcut(in_chs, out_chs, stride)
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_chs),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (post-activation)."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = conv3x3(in_chs, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample = _shortcut(in_chs, out_chs, stride, shortcut)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand (x4), with a residual connection."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.downsample = _shortcut(in_chs, out_chs, stride, shortcut)
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + shortcut)


class CifarResNet(CifarClassifier):
    """ResNet for 32 px input: 3x3 stride-1 stem (``conv1``/``bn1``/``act1``), stages ``layer1..layerN``
    (stride 1 for the first, 2 for the rest), global average pool, ``fc``.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage.
        widths: planes per stage; the stem has ``widths[0]`` channels.
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: input image channels.
        drop_rate: dropout on the pooled feature before ``fc``.
        shortcut: ``"A"`` (subsample + zero-padded channels, no parameters) or ``"B"`` (1x1 conv + BN
            projection) where a block changes the shape.
        init: ``"fan_in"`` (Kaiming-normal, fan-in, on every conv and linear weight: He et al.'s
            CIFAR nets and the SSKT reference) or ``"fan_out"`` (Kaiming-normal fan-out convs,
            PyTorch's default linear init: torchvision's ResNets).
    """

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        shortcut: str = "B",
        init: str = "fan_out",
    ):
        if len(layers) != len(widths):
            raise ValueError(f"layers {layers} and widths {widths} must have the same length")
        shortcut = str(shortcut).upper()
        if shortcut not in SHORTCUTS:
            raise ConfigError(f"model.kwargs.shortcut={shortcut!r}: choose 'A' (zero-padded identity, "
                              f"no parameters) or 'B' (1x1 conv projection).")
        if init not in INITS:
            raise ConfigError(f"model.kwargs.init={init!r}: choose one of {list(INITS)}.")
        super().__init__(num_classes, widths[-1] * block.expansion, in_chans)
        self.shortcut, self.init = shortcut, init
        self.conv1 = conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)

        in_chs, reduction, reductions, names = widths[0], 1, [], []
        for i, (n_blocks, planes) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_chs, planes, stride if j == 0 else 1, shortcut))
                in_chs = planes * block.expansion
            reduction *= stride
            reductions.append(reduction)
            names.append(f"layer{i + 1}")
            self.add_module(names[-1], nn.Sequential(*blocks))
        self.stage_names = names
        self.feature_info = stage_info([w * block.expansion for w in widths], reductions, names)
        self._build_head(drop_rate)
        if init == "fan_in":   # fc got its fan-in init in _make_fc
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)

    def _make_fc(self, num_classes: int) -> nn.Module:
        fc = super()._make_fc(num_classes)
        if getattr(self, "init", None) == "fan_in" and isinstance(fc, nn.Linear):
            nn.init.kaiming_normal_(fc.weight)
        return fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x


_CIFAR_WIDTHS = (16, 32, 64)
_IMAGENET_WIDTHS = (64, 128, 256, 512)


def _features(args: dict) -> dict:
    """``features_only`` defaults: every stage (``layer1..N``, children of the net itself)."""
    return dict(out_indices=tuple(range(len(args["layers"]))))


def _cifar_depth(name: str, depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    """He et al. CIFAR ResNet of ``depth = 6n + 2``: option-A shortcuts and fan-in init unless
    ``shortcut`` / ``init`` say otherwise."""
    n = (depth - 2) // 6
    kwargs.setdefault("shortcut", "A")
    kwargs.setdefault("init", "fan_in")
    args = dict(block=BasicBlock, layers=(n, n, n), widths=_CIFAR_WIDTHS)
    return create_model(name, CifarResNet, pretrained, args, _features(args), **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (3x3 BasicBlocks, 16/32/64 channels, option-A shortcuts), 269,722 params
    with 10 classes; ``shortcut="B"`` for 1x1 projection shortcuts."""
    return _cifar_depth("cifar_resnet20", 20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (option-A shortcuts), 464,154 params with 10 classes."""
    return _cifar_depth("cifar_resnet32", 32, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR, ~0.66M params."""
    return _cifar_depth("cifar_resnet44", 44, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR, ~0.85M params."""
    return _cifar_depth("cifar_resnet56", 56, pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR, ~1.7M params."""
    return _cifar_depth("cifar_resnet110", 110, pretrained, **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2) with a CIFAR stem, ~11.2M params."""
    args = dict(block=BasicBlock, layers=(2, 2, 2, 2), widths=_IMAGENET_WIDTHS)
    return create_model("cifar_resnet18", CifarResNet, pretrained, args, _features(args), **kwargs)


@register_model
def cifar_resnet34(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3) with a CIFAR stem, ~21.3M params."""
    args = dict(block=BasicBlock, layers=(3, 4, 6, 3), widths=_IMAGENET_WIDTHS)
    return create_model("cifar_resnet34", CifarResNet, pretrained, args, _features(args), **kwargs)


@register_model
def cifar_resnet50(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-50 (Bottleneck x4, 3-4-6-3) with a CIFAR stem, ~23.5M params."""
    args = dict(block=Bottleneck, layers=(3, 4, 6, 3), widths=_IMAGENET_WIDTHS)
    return create_model("cifar_resnet50", CifarResNet, pretrained, args, _features(args), **kwargs)
