"""VGG-16 with BatchNorm for 32 px input, registered with timm as ``cifar_vgg16_bn``.

Conv config ``[64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M]`` (3x3 conv-BN-ReLU,
``M`` = 2x2 max-pool), then a *single* ``Linear(512, num_classes)`` classifier as in common CIFAR
VGG code (not ImageNet VGG's three 4096-wide FC layers); ~14.7M params.

The trunk ``features`` holds 5 blocks, each ending with its max-pool. ``feature_info[i]['module']``
is ``features.{i}``: the block's output *after* its max-pool (reductions 2, 4, 8, 16, 32). The last
one is 512 x 1 x 1 and is what ``forward_features`` returns.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Union

import torch
from timm.models import register_model
from torch import nn

from sskt_lightning.nets._common import CifarClassifier, conv3x3, create_model, stage_info

VGG16_CFG: List[Union[int, str]] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]


def _split_blocks(cfg: Sequence[Union[int, str]]) -> List[List[int]]:
    """Split a VGG config at each ``"M"`` into per-block conv widths."""
    blocks: List[List[int]] = [[]]
    for v in cfg:
        if v == "M":
            blocks.append([])
        else:
            blocks[-1].append(int(v))
    if blocks[-1]:
        raise ValueError(f"VGG config must end with 'M', got {list(cfg)}")
    return blocks[:-1]


class CifarVGG(CifarClassifier):
    """VGG with BatchNorm: ``features`` (conv-BN-ReLU blocks, each closed by a max-pool), global
    average pool (a no-op on the final 1x1 map at 32 px), ``fc``.

    Args:
        cfg: conv widths and ``"M"`` pool markers; must end with ``"M"``.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input image channels.
        drop_rate: dropout on the pooled feature before ``fc``.
    """

    first_conv = "features.0.0"

    def __init__(
        self,
        cfg: Sequence[Union[int, str]] = tuple(VGG16_CFG),
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ):
        block_widths = _split_blocks(cfg)
        super().__init__(num_classes, block_widths[-1][-1], in_chans)
        blocks, in_chs = [], in_chans
        for widths in block_widths:
            layers: List[nn.Module] = []
            for w in widths:
                layers += [conv3x3(in_chs, w), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                in_chs = w
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        self.feature_info = stage_info(
            [w[-1] for w in block_widths],
            [2 ** (i + 1) for i in range(len(block_widths))],
            [f"features.{i}" for i in range(len(block_widths))],
        )
        self._build_head(drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_model
def cifar_vgg16_bn(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-16-BN with a single linear classifier, ~14.7M params."""
    # the stages are features.0..4, inside one nn.Sequential: timm's FeatureListNet flattens it
    feature_cfg = dict(out_indices=tuple(range(len(_split_blocks(VGG16_CFG)))), flatten_sequential=True)
    return create_model("cifar_vgg16_bn", CifarVGG, pretrained, dict(cfg=tuple(VGG16_CFG)), feature_cfg, **kwargs)
