"""Auxiliary heads: the target's guess at each source's class distribution.

Three forms:
  * :class:`LinearHead` - ``Linear(feature_dim, K)`` on the pooled penultimate feature (SSKT);
  * :class:`MLPHead` - ``Linear(f, f)``-ReLU-``Linear(f, K)`` on the pooled feature (the MAXL
    reference's auxiliary head);
  * :class:`TransferHead` - the paper's "transfer module" (``aux_head=transfer_module``; not the
    LightningModule :class:`~sskt_lightning.module.TransferModule`): one branch on the output of
    every stage of the target, each Conv1x1(c->m)-BN-ReLU, Conv3x3/s2(m->m)-BN-ReLU,
    Conv1x1(m->o)-BN-ReLU, global average pool; the branch vectors are averaged (as the reference
    code does) and fed to ``Linear(o, K)`` (experiments/paper/README.md, "Transfer module").

Transfer-module sizes (:func:`transfer_module_sizes`): ``width="auto"`` (default) gives
o = min(final width, 1000), m = o // 2; ``width="reference"`` gives the SSKT reference code's sizes:
o = the final width for nets narrower than 512 (CIFAR ResNets: o=64, m=32), o=1000, m=500 for
wider ones (ImageNet-style ResNet-18/34/50, whose reference head is 1000/500 whatever the width).
The reference's branch convs have biases (redundant before BatchNorm); ``conv_bias=True`` builds
them too.
"""
from __future__ import annotations

import torch
from torch import nn

from sskt_lightning.errors import ConfigError
from sskt_lightning.nets.factory import NetOutput

HEAD_KINDS = ("linear", "mlp", "transfer_module")
TM_WIDTHS = ("auto", "reference")
REFERENCE_WIDE = 512   # final width from which the reference's ImageNet-style 1000/500 head applies


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias),
        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class LinearHead(nn.Module):
    uses = "pooled"

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, out: NetOutput) -> torch.Tensor:
        return self.fc(out.pooled)


class MLPHead(nn.Module):
    """``Linear(f, hidden)``-ReLU-``Linear(hidden, K)`` on the pooled feature (hidden defaults to f)."""

    uses = "pooled"

    def __init__(self, feature_dim: int, num_classes: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or feature_dim
        self.fc1 = nn.Linear(feature_dim, hidden_dim)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, num_classes)

    def forward(self, out: NetOutput) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(out.pooled)))


class TransferHead(nn.Module):
    uses = "stages"

    def __init__(self, stage_channels: list[int], num_classes: int, out_dim: int, mid_dim: int,
                 conv_bias: bool = False):
        super().__init__()
        if not stage_channels:
            raise ConfigError("The transfer module needs at least one target stage.")
        self.branches = nn.ModuleList(
            nn.Sequential(conv_bn_relu(c, mid_dim, 1, bias=conv_bias),
                          conv_bn_relu(mid_dim, mid_dim, 3, stride=2, bias=conv_bias),
                          conv_bn_relu(mid_dim, out_dim, 1, bias=conv_bias),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            for c in stage_channels)
        self.fc = nn.Linear(out_dim, num_classes)

    def forward(self, out: NetOutput) -> torch.Tensor:
        vectors = [branch(feat) for branch, feat in zip(self.branches, out.stages, strict=True)]
        return self.fc(torch.stack(vectors).mean(0))


def transfer_module_sizes(num_features: int, out_dim: int | None, mid_dim: int | None,
                          width: str = "auto") -> tuple[int, int]:
    """``(o, m)`` of the transfer module for a target whose final width is ``num_features``.

    ``out_dim`` / ``mid_dim`` win when given. Otherwise ``width="auto"``: o = min(width, 1000);
    ``width="reference"``: o = width below 512 (CIFAR ResNets: 64), else 1000 (the reference's
    ImageNet-style ResNets, 18/34/50 alike). m = o // 2 in both (the reference's ``channel_out // 2``).
    """
    if width not in TM_WIDTHS:
        raise ConfigError(f"method.tm_width={width!r}: choose one of {list(TM_WIDTHS)}.")
    if out_dim is None:
        if width == "reference":
            out_dim = num_features if num_features < REFERENCE_WIDE else 1000
        else:
            out_dim = min(num_features, 1000)
    return out_dim, mid_dim or max(out_dim // 2, 1)


def build_head(kind: str, target, num_classes: int, out_dim: int | None = None,
               mid_dim: int | None = None, width: str = "auto", conv_bias: bool = False) -> nn.Module:
    """An auxiliary head of ``kind`` ('linear' | 'mlp' | 'transfer_module') for a :class:`TappedNet`."""
    if kind == "linear":
        return LinearHead(target.num_features, num_classes)
    if kind == "mlp":
        return MLPHead(target.num_features, num_classes)
    if kind == "transfer_module":
        o, m = transfer_module_sizes(target.num_features, out_dim, mid_dim, width)
        return TransferHead(target.stage_channels, num_classes, o, m, conv_bias=conv_bias)
    raise ConfigError(f"Unknown aux_head {kind!r}: choose one of {list(HEAD_KINDS)}.")
