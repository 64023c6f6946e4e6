"""FixMatch's strong view: pad-crop-flip, RandAugment ("RA": random ops, random magnitudes), Cutout.

:class:`StrongAugment` augments a uint8 batch B×C×H×W (1 or 3 channels, any H×W) on whatever device
the batch is on, each sample with its own draw:

1. its own pad-crop-flip (:class:`~sskt_lightning.data.augment.BatchAugment`, the weak view's
   augmentation, drawn anew);
2. RandAugment in FixMatch's "RA" variant: ``num_ops`` (2) operations drawn uniformly, with
   replacement, from FixMatch's list, each with its own magnitude drawn uniformly from the op's range
   (the FixMatch paper's table of ranges, as in microsoft/Semi-supervised-learning
   ``semilearn/datasets/augmentation/randaugment.py``):

   ============  ===============  ===========================================================
   op            range            what it does (uint8 in, uint8 out)
   ============  ===============  ===========================================================
   AutoContrast  -                stretch each channel to [0, 255]
   Brightness    [0.05, 0.95]     blend with black (factor 1 = unchanged)
   Color         [0.05, 0.95]     blend with the grayscale image (1 channel: unchanged)
   Contrast      [0.05, 0.95]     blend with the image's mean gray level
   Equalize      -                histogram equalisation per channel
   Identity      -                unchanged
   Posterize     [4, 8]           keep int(v) bits
   Rotate        [-30, 30] deg    counter-clockwise about the centre, nearest, black fill
   Sharpness     [0.05, 0.95]     blend with the 3×3 smoothed image (borders kept)
   ShearX        [-0.3, 0.3]      output (x, y) <- input (x + v·y, y), nearest, black fill
   ShearY        [-0.3, 0.3]      output (x, y) <- input (x, y + v·x)
   Solarize      [0, 256]         invert the pixels >= v
   TranslateX    [-0.3, 0.3]      output (x, y) <- input (x + v·W, y)
   TranslateY    [-0.3, 0.3]      output (x, y) <- input (x, y + v·H)
   ============  ===============  ===========================================================

   The colour ops compute exactly what ``torchvision.transforms.v2.functional`` computes per image
   (``adjust_brightness`` / ``adjust_saturation`` / ``adjust_contrast`` / ``adjust_sharpness`` /
   ``posterize`` / ``solarize``; ``autocontrast`` and ``equalize`` are called as they are), with a
   per-sample factor, batched per op; the geometric ones are one nearest-neighbour gather with PIL's
   affine convention (pixel centres at +0.5, the inverse map of ``Image.transform`` / ``rotate``);
3. Cutout: one square of side ``L·W`` with ``L`` uniform in [0, ``cutout``] (0.5), its centre
   uniform over the image, clipped at the borders, filled with gray 127 on every channel (the gray of
   google-research/fixmatch's cutout; semilearn fills CIFAR's mean colour instead, which has no
   meaning for 1-channel or other data).

Every random number comes from the ``torch.Generator`` passed in (drawn on its device, the host for
the data module's generators; then one small copy to the batch's device), so the same generator
state gives bit-identical views. Per batch it draws, in this order: the pad-crop-flip (B crop
rows, B crop columns, B flips), the ops (B×num_ops integers), their magnitudes (B×num_ops uniforms,
float64), the Cutout (B×3 uniforms: side, centre x, centre y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from sskt_lightning.data.augment import BatchAugment

# FixMatch's RandAugment list and each op's magnitude range (semilearn's augment_list, the paper's table)
RA_OPS: tuple[tuple[str, float, float], ...] = (
    ("AutoContrast", 0.0, 1.0),
    ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95),
    ("Equalize", 0.0, 1.0),
    ("Identity", 0.0, 1.0),
    ("Posterize", 4.0, 8.0),
    ("Rotate", -30.0, 30.0),
    ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3),
    ("ShearY", -0.3, 0.3),
    ("Solarize", 0.0, 256.0),
    ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)
OP_NAMES = tuple(name for name, _, _ in RA_OPS)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
CUTOUT_FILL = 127


# ---------------------------------------------------------------------- the ops, batched per op
# Each takes uint8 images n×C×H×W and the n magnitudes v (float64, on the images' device, already
# mapped into the op's range) and returns uint8 n×C×H×W.

def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(img: torch.Tensor, degenerate: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with a per-sample ratio: img·r + degenerate·(1 - r), clamped, truncated."""
    r = _col(ratio.to(torch.float32))
    a = _col((1.0 - ratio).to(torch.float32))
    # addcmul: a fused multiply-add like torchvision's ``add_(..., alpha=)`` (bit-identical results)
    return torch.addcmul(img.float() * r, degenerate, a).clamp_(0, 255).to(torch.uint8)


def _gray(img: torch.Tensor) -> torch.Tensor:
    """The uint8 image's gray level as float n×1×H×W (torchvision's weights, floored for 3 channels)."""
    return TF.rgb_to_grayscale(img).float() if img.shape[1] == 3 else img.float()


def auto_contrast(img, v):
    return TF.autocontrast(img)


def brightness(img, v):
    return (img.float() * _col(v.to(torch.float32))).clamp_(0, 255).to(torch.uint8)


def color(img, v):
    if img.shape[1] == 1:      # saturation of a gray image: unchanged (PIL, torchvision)
        return img
    return _blend(img, _gray(img), v)


def contrast(img, v):
    mean = _gray(img).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(img, mean, v)


def equalize(img, v):
    return TF.equalize(img)


def identity(img, v):
    return img


def posterize(img, v):
    bits = v.floor().clamp(1, 8).to(torch.int64)
    mask = ((255 << (8 - bits)) & 255).to(torch.uint8)
    return img & _col(mask)


def sharpness(img, v):
    n, c, h, w = img.shape
    if h <= 2 or w <= 2:
        return img
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=torch.float32, device=img.device)
    out = img.to(torch.float32, copy=True)
    blurred = F.conv2d(out, kernel.expand(c, 1, 3, 3), groups=c).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.addcmul_(blurred - inner, _col((1.0 - v).to(torch.float32)))   # x + (1 - r)(y - x), as torchvision
    return out.clamp_(0, 255).to(torch.uint8)


def solarize(img, v):
    return torch.where(img.float() >= _col(v.to(torch.float32)), 255 - img, img)


def _affine(img: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Output pixel (x, y) takes input pixel floor(a·X + b·Y + c), floor(d·X + e·Y + f) (X = x + 0.5,
    Y = y + 0.5: PIL's ``Image.transform(AFFINE)`` convention), or 0 outside; ``m``: n×6 (a..f)."""
    n, c, h, w = img.shape
    dev = img.device
    dt = torch.float32 if dev.type == "mps" else torch.float64
    m = m.to(dev, dt)
    xs = torch.arange(w, device=dev, dtype=dt).add_(0.5).view(1, 1, w)
    ys = torch.arange(h, device=dev, dtype=dt).add_(0.5).view(1, h, 1)
    p = [m[:, k].view(n, 1, 1) for k in range(6)]
    sx = (p[0] * xs + p[1] * ys + p[2]).floor_().to(torch.int64)
    sy = (p[3] * xs + p[4] * ys + p[5]).floor_().to(torch.int64)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    flat = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    out = img.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)
    return torch.where(inside.unsqueeze(1), out, torch.zeros((), dtype=img.dtype, device=dev))


def affine_params(name: str, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The n×6 inverse affine maps (PIL's data tuple) of a geometric op with magnitudes ``v``."""
    v = v.to(torch.float64)
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if name == "ShearX":
        cols = (one, v, zero, zero, one, zero)
    elif name == "ShearY":
        cols = (one, zero, zero, v, one, zero)
    elif name == "TranslateX":
        cols = (one, zero, v * w, zero, one, zero)
    elif name == "TranslateY":
        cols = (one, zero, zero, zero, one, v * h)
    elif name == "Rotate":   # PIL's Image.rotate(v): counter-clockwise about the centre (w/2, h/2)
        t = -v * (math.pi / 180.0)
        a, b, d, e = t.cos(), t.sin(), -t.sin(), t.cos()
        cx, cy = w / 2.0, h / 2.0
        cols = (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)
    else:
        raise ValueError(f"{name} is not a geometric op")
    return torch.stack(cols, dim=1)


def _geometric(name):
    def op(img, v):
        return _affine(img, affine_params(name, v, img.shape[2], img.shape[3]))
    op.__name__ = name
    return op


OP_FUNCTIONS = {
    "AutoContrast": auto_contrast, "Brightness": brightness, "Color": color, "Contrast": contrast,
    "Equalize": equalize, "Identity": identity, "Posterize": posterize, "Sharpness": sharpness,
    "Solarize": solarize, **{name: _geometric(name) for name in GEOMETRIC},
}


def apply_op(name: str, img: torch.Tensor, v: torch.Tensor | float) -> torch.Tensor:
    """Op ``name`` with magnitude(s) ``v`` (in the op's range; one per image, or one for all) on
    uint8 images n×C×H×W."""
    v = torch.as_tensor(v, dtype=torch.float64, device=img.device).expand(img.shape[0])
    return OP_FUNCTIONS[name](img, v)


def cutout_boxes(u: torch.Tensor, h: int, w: int, size: float = 0.5) -> torch.Tensor:
    """Cutout squares from uniforms ``u`` (n×3: side, centre x, centre y): n×4 int64 ``x0, y0, x1, y1``,
    the box ``x0 <= x < x1, y0 <= y < y1``. Side ``s = u0·size·W`` (semilearn's ``Cutout``: a share
    of the width), centre ``(u1·W, u2·H)``, top-left corner ``int(max(0, centre - s/2))``, clipped."""
    u = u.to(torch.float64)
    s = u[:, 0] * size * w
    x0 = (u[:, 1] * w - s / 2).clamp(min=0).floor()
    y0 = (u[:, 2] * h - s / 2).clamp(min=0).floor()
    x1 = torch.minimum(x0 + s, torch.full_like(s, w)).ceil()
    y1 = torch.minimum(y0 + s, torch.full_like(s, h)).ceil()
    return torch.stack([x0, y0, x1, y1], dim=1).to(torch.int64)


def cutout(img: torch.Tensor, boxes: torch.Tensor, fill: int = CUTOUT_FILL) -> torch.Tensor:
    """Fill each image's box (``cutout_boxes``) with ``fill`` on every channel."""
    n, c, h, w = img.shape
    b = boxes.to(img.device).view(n, 4, 1, 1)
    cols = torch.arange(w, device=img.device).view(1, 1, w)
    rows = torch.arange(h, device=img.device).view(1, h, 1)
    inside = (cols >= b[:, 0]) & (cols < b[:, 2]) & (rows >= b[:, 1]) & (rows < b[:, 3])
    return torch.where(inside.unsqueeze(1), torch.full((), fill, dtype=img.dtype, device=img.device), img)


# ---------------------------------------------------------------------- the strong view

@dataclass
class StrongDraw:
    """One batch's random choices (host tensors): crop/flip view ids, op ids B×num_ops, their
    uniforms B×num_ops (float64 in [0, 1)), the Cutout uniforms B×3."""
    view: torch.Tensor
    ops: torch.Tensor
    mags: torch.Tensor
    cut: torch.Tensor


class StrongAugment:
    """FixMatch's strong augmentation of a uint8 batch (see the module docstring).

    Args:
        pad, flip: the pad-crop-flip that comes first (the data module passes the weak view's).
        num_ops: RandAugment ops per image (FixMatch: 2).
        cutout: the largest Cutout side as a share of the width (FixMatch: 0.5; 0 turns it off).
        fill: the Cutout's gray level.
    """

    def __init__(self, pad: int = 4, flip: bool = True, num_ops: int = 2, cutout: float = 0.5,
                 fill: int = CUTOUT_FILL) -> None:
        if num_ops < 0 or not 0 <= cutout <= 1:
            raise ValueError(f"num_ops must be >= 0 and cutout in [0, 1], got {num_ops} and {cutout}")
        self.crop = BatchAugment(pad, flip)
        self.num_ops, self.cutout, self.fill = int(num_ops), float(cutout), int(fill)

    def __repr__(self) -> str:
        return (f"StrongAugment(pad={self.crop.pad}, flip={self.crop.flip}, num_ops={self.num_ops}, "
                f"cutout={self.cutout}, fill={self.fill})")

    def draw(self, b: int, generator: torch.Generator) -> StrongDraw:
        """The random choices for ``b`` images, all from ``generator`` (on its device)."""
        where = generator.device
        view = self.crop.draw(b, where, generator)
        ops = torch.randint(0, len(RA_OPS), (b, self.num_ops), device=where, generator=generator)
        mags = torch.rand((b, self.num_ops), dtype=torch.float64, device=where, generator=generator)
        cut = torch.rand((b, 3), dtype=torch.float64, device=where, generator=generator)
        return StrongDraw(view, ops, mags, cut)

    def apply(self, x: torch.Tensor, d: StrongDraw) -> torch.Tensor:
        """Render the draw ``d`` on uint8 images ``x`` (B×C×H×W) on their device."""
        if x.ndim != 4 or x.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 B×C×H×W batch, got {x.dtype} of shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        dev = x.device
        x = self.crop.apply(x, d.view.to(dev, non_blocking=True))
        lo = torch.tensor([r[1] for r in RA_OPS], dtype=torch.float64)
        hi = torch.tensor([r[2] for r in RA_OPS], dtype=torch.float64)
        ops = d.ops.cpu()
        mags = (lo[ops] + (hi - lo)[ops] * d.mags.cpu()).to(dev, non_blocking=True)
        for k in range(self.num_ops):
            column = ops[:, k]
            for o in column.unique().tolist():
                name = OP_NAMES[o]
                if name == "Identity":
                    continue
                idx = (column == o).nonzero().squeeze(1)
                if len(idx) == b:
                    x = OP_FUNCTIONS[name](x, mags[:, k])
                    continue
                idx = idx.to(dev, non_blocking=True)
                x = x.index_copy(0, idx, OP_FUNCTIONS[name](x.index_select(0, idx), mags[idx, k]))
        if self.cutout > 0:
            x = cutout(x, cutout_boxes(d.cut.cpu(), h, w, self.cutout).to(dev, non_blocking=True), self.fill)
        return x

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The strong view of every image of ``x``, drawn from ``generator``."""
        if x.ndim != 4:
            raise ValueError(f"expected a B×C×H×W batch, got shape {tuple(x.shape)}")
        return self.apply(x, self.draw(x.shape[0], generator))
