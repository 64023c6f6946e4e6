"""Batch augmentation and normalisation on whatever device the batch is on (torch RNGs only).

The augmentation has a finite view space: a crop offset ``(dy, dx)`` in ``[0, 2·pad]²`` and a flip
bit, i.e. ``(2·pad + 1)² × 2`` views (162 for pad 4 with flips). Every sample's view is one integer,

    view = (dy · (2·pad + 1) + dx) · F + flip          (F = 2 with flips, 1 without)

which travels in the batch beside the sample index, so a soft-label cache can be keyed by
``(image, view)``; :meth:`BatchAugment.apply` renders any given view exactly as the random draw
would have rendered it.
"""

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

    # ------------------------------------------------------------------ the view space
    @property
    def num_views(self) -> int:
        """How many distinct views an image can get (1 without augmentation)."""
        return (2 * self.pad + 1) ** 2 * (2 if self.flip else 1)

    @property
    def identity_view(self) -> int:
        """The view id of the unaugmented image (centre crop, no flip): what eval batches carry."""
        return (self.pad * (2 * self.pad + 1) + self.pad) * (2 if self.flip else 1)

    def signature(self) -> dict:
        """Everything a view's pixels depend on, besides the image (part of a cache key)."""
        return {"type": "pad_crop_flip", "pad": self.pad, "flip": self.flip, "fill": 0,
                "num_views": self.num_views, "view_id": "(dy*(2*pad+1)+dx)*F+flip"}

    def encode(self, dy: torch.Tensor, dx: torch.Tensor, flipped: torch.Tensor | None) -> torch.Tensor:
        view = dy * (2 * self.pad + 1) + dx
        if self.flip:
            view = view * 2 + flipped.long()
        return view

    def decode(self, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """view ids (in ``[0, num_views)``, not checked: no device sync) -> (dy, dx, flipped)."""
        view = torch.as_tensor(view, dtype=torch.int64)
        flipped = (view % 2).bool() if self.flip else torch.zeros_like(view, dtype=torch.bool)
        offset = view // 2 if self.flip else view
        side = 2 * self.pad + 1
        return offset // side, offset % side, flipped

    # ------------------------------------------------------------------ drawing and rendering
    def draw(self, b: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """Random view ids for `b` samples on `device`. With `generator` (the data module's
        per-stream augmentation generator) the ids are drawn on that generator's device (the host:
        `b` integers, then one small copy), so a run's views depend on its seed and step only, not on
        whatever else drew from torch's global RNG (dropout, a method's own sampling); without one,
        from torch's global RNG on `device`."""
        if not self.pad and not self.flip:
            return torch.zeros(b, dtype=torch.int64, device=device)
        p = self.pad
        where = generator.device if generator is not None else device
        dy = torch.randint(0, 2 * p + 1, (b,), device=where, generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), device=where, generator=generator)
        flipped = torch.rand(b, device=where, generator=generator) < 0.5 if self.flip else None
        return self.encode(dy, dx, flipped).to(device, non_blocking=True)

    def apply(self, x: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Render view `view[i]` of image `x[i]` (B×C×H×W, any dtype): one gather for the batch."""
        if x.ndim != 4:
            raise ValueError(f"expected a B×C×H×W batch, got shape {tuple(x.shape)}")
        if not self.pad and not self.flip:
            return x
        b, c, h, w = x.shape
        dev, p = x.device, self.pad
        dy, dx, flipped = self.decode(view.to(dev))
        padded = F.pad(x, (p, p, p, p)) if p else x
        cols = torch.arange(w, device=dev).expand(b, w)
        if self.flip:
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        rows = dy[:, None] + torch.arange(h, device=dev)  # B×H
        cols = dx[:, None] + cols  # B×W
        return padded[
            torch.arange(b, device=dev)[:, None, None, None],
            torch.arange(c, device=dev)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]

    def __call__(self, x: torch.Tensor, return_view: bool = False, generator: torch.Generator | None = None):
        """Augment `x` with a random view per sample (drawn from `generator`, else torch's global
        RNG); with `return_view`, also the view ids."""
        if x.ndim != 4:
            raise ValueError(f"expected a B×C×H×W batch, got shape {tuple(x.shape)}")
        view = self.draw(x.shape[0], x.device, generator)
        out = self.apply(x, view)
        return (out, view) if return_view else out


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 B×C×H×W (or C×H×W) -> float32: x/255, then (x - mean) / std per channel."""
    shape = (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return (x.float() / 255.0 - m) / s
