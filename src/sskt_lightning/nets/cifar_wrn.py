"""Wide ResNets (Zagoruyko & Komodakis 2016) for 32 px input, registered as ``cifar_wrn16_2``, ``cifar_wrn40_2``.

WRN-d-k: 3x3 stem with 16 channels, 3 stages of ``n = (d - 4) / 6`` pre-activation wide basic blocks
(BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3) with 16k/32k/64k channels, stride 2 at stages 2 and 3,
1x1 conv shortcuts where the shape changes, then a final BN-ReLU (``final_act``), global average
pool and ``fc``. ``drop_rate`` is the dropout *inside* each block (default 0), as in the paper.

``feature_info``: entries 0 and 1 point to ``layer1``/``layer2``, whose outputs are the
pre-activation residual sums (no BN-ReLU applied yet). Entry 2 points to ``final_act``: the last
stage's output *after* the final BN-ReLU, i.e. exactly what ``forward_features`` returns (as timm
does for pre-activation nets, whose last feature entry is the final norm).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from timm.models import register_model
from torch import nn

from sskt_lightning.nets._common import CifarClassifier, conv3x3, create_model, stage_info


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block; the 1x1 shortcut (if any) reads the pre-activated input."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_chs, out_chs, stride)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = conv3x3(out_chs, out_chs)
        self.shortcut = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + shortcut


class CifarWideResNet(CifarClassifier):
    """WRN-depth-widen_factor: ``conv1`` stem, ``layer1..layer3``, ``final_act`` (BN-ReLU), pool, ``fc``.

    Args:
        depth: total depth, ``6n + 4``.
        widen_factor: channel multiplier ``k``.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input image channels.
        drop_rate: dropout between the two convs of every block.
    """

    def __init__(
        self,
        depth: int = 40,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ):
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        super().__init__(num_classes, widths[-1], in_chans)
        self.drop_rate = drop_rate
        self.conv1 = conv3x3(in_chans, 16)
        in_chs = 16
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(WideBasicBlock(in_chs, w, stride if j == 0 else 1, drop_rate))
                in_chs = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.final_act = nn.Sequential(
            OrderedDict(bn=nn.BatchNorm2d(in_chs), act=nn.ReLU(inplace=True))
        )
        self.feature_info = stage_info(widths, [1, 2, 4], ["layer1", "layer2", "final_act"])
        self._build_head()  # drop_rate is in-block dropout here, not head dropout

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.final_act(x)


_FEATURES = dict(out_indices=(0, 1, 2))   # features_only: layer1, layer2, final_act


@register_model
def cifar_wrn16_2(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-16-2, ~0.69M params."""
    return create_model("cifar_wrn16_2", CifarWideResNet, pretrained, dict(depth=16, widen_factor=2),
                        _FEATURES, **kwargs)


@register_model
def cifar_wrn40_2(pretrained: bool = False, **kwargs: Any) -> CifarWideResNet:
    """WRN-40-2, ~2.2M params."""
    return create_model("cifar_wrn40_2", CifarWideResNet, pretrained, dict(depth=40, widen_factor=2),
                        _FEATURES, **kwargs)
