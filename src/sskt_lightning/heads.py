"""Auxiliary heads: the target's guess at each source's class distribution.

Two forms (METHODS.md, SSKT):
  * :class:`LinearHead` - ``Linear(feature_dim, K)`` on the pooled penultimate feature;
  * :class:`TransferModule` - one branch on the output of every stage of the target, each
    Conv1x1(c->m)-BN-ReLU, Conv3x3/s2(m->m)-BN-ReLU, Conv1x1(m->o)-BN-ReLU, global average pool;
    the branch vectors are averaged (as the reference code does) and fed to ``Linear(o, K)``.
"""
from __future__ import annotations

import torch
from torch import nn

from sskt_lightning.errors import ConfigError
from sskt_lightning.nets.factory import NetOutput


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class LinearHead(nn.Module):
    uses = "pooled"

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, out: NetOutput) -> torch.Tensor:
        return self.fc(out.pooled)


class TransferModule(nn.Module):
    uses = "stages"

    def __init__(self, stage_channels: list[int], num_classes: int, out_dim: int, mid_dim: int):
        super().__init__()
        if not stage_channels:
            raise ConfigError("The transfer module needs at least one target stage.")
        self.branches = nn.ModuleList(
            nn.Sequential(conv_bn_relu(c, mid_dim, 1), conv_bn_relu(mid_dim, mid_dim, 3, stride=2),
                          conv_bn_relu(mid_dim, out_dim, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            for c in stage_channels)
        self.fc = nn.Linear(out_dim, num_classes)

    def forward(self, out: NetOutput) -> torch.Tensor:
        vectors = [branch(feat) for branch, feat in zip(self.branches, out.stages, strict=True)]
        return self.fc(torch.stack(vectors).mean(0))


def transfer_module_sizes(num_features: int, out_dim: int | None, mid_dim: int | None) -> tuple[int, int]:
    """Default sizes from the target's width: o = min(final width, 1000), m = o // 2.

    This gives the reference sizes without per-architecture tables: CIFAR ResNets (width 64) get
    o=64, m=32; ImageNet ResNet-50 (width 2048) gets o=1000, m=500.
    """
    out_dim = out_dim or min(num_features, 1000)
    return out_dim, mid_dim or max(out_dim // 2, 1)


def build_head(kind: str, target, num_classes: int, out_dim: int | None = None,
               mid_dim: int | None = None) -> nn.Module:
    """An auxiliary head of ``kind`` ('linear' | 'transfer_module') for a :class:`TappedNet`."""
    if kind == "linear":
        return LinearHead(target.num_features, num_classes)
    if kind == "transfer_module":
        o, m = transfer_module_sizes(target.num_features, out_dim, mid_dim)
        return TransferModule(target.stage_channels, num_classes, o, m)
    raise ConfigError(f"Unknown aux_head {kind!r}: choose 'linear' or 'transfer_module'.")
