"""Batch augmentation and normalisation on whatever device the batch is on (torch RNG only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class BatchAugment:
    """Random crop with `pad` px of zero padding and random horizontal flip (p=0.5), per sample.

    Works on a uint8 or float batch B×C×H×W and returns the same dtype and shape. Each sample
    draws its own crop offset and flip; the whole batch is one gather, no loop over samples.
    Zero fill means black when applied to uint8 images before `normalize` (the usual CIFAR recipe).
    """

    def __init__(self, pad: int = 4, flip: bool = True) -> None:
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.pad = int(pad)
        self.flip = bool(flip)

    def __repr__(self) -> str:
        return f"BatchAugment(pad={self.pad}, flip={self.flip})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a B×C×H×W batch, got shape {tuple(x.shape)}")
        if not self.pad and not self.flip:
            return x
        b, c, h, w = x.shape
        dev, p = x.device, self.pad
        padded = F.pad(x, (p, p, p, p)) if p else x
        dy = torch.randint(0, 2 * p + 1, (b,), device=dev)
        dx = torch.randint(0, 2 * p + 1, (b,), device=dev)
        cols = torch.arange(w, device=dev).expand(b, w)
        if self.flip:
            flipped = torch.rand(b, device=dev) < 0.5
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        rows = dy[:, None] + torch.arange(h, device=dev)  # B×H
        cols = dx[:, None] + cols  # B×W
        return padded[
            torch.arange(b, device=dev)[:, None, None, None],
            torch.arange(c, device=dev)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 B×C×H×W (or C×H×W) -> float32: x/255, then (x - mean) / std per channel."""
    shape = (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return (x.float() / 255.0 - m) / s
