"""Frozen source networks and the per-source input adapter.

A source is built from its config (``conf/source/*.yaml``) by name (timm / torchvision), with
weights from the hub, from a URL, from a local file, or from a checkpoint this project wrote. Its
class count comes from the weights. It never trains: no gradients, no optimizer, eval mode unless
``bn_mode='train'`` (the reference code's behaviour: BatchNorm uses batch statistics and its
running stats drift, weights stay fixed).

All sources are called through one seam, :meth:`SourceBank.forward` (images, their sample indices
and view ids in, one logits tensor per source out). With a soft-label cache attached
(``method.cache``, :mod:`sskt_lightning.cache`) the bank answers ``(stream, index, view)`` from the
cache and runs a network only on the misses.
"""
from __future__ import annotations

import logging
import socket
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sskt_lightning import weights as W
from sskt_lightning.data.specs import IMAGENET_MEAN, IMAGENET_STD
from sskt_lightning.errors import ConfigError, WeightsError
from sskt_lightning.nets.factory import _classifier, _replace_classifier, create_network

log = logging.getLogger(__name__)



@dataclass
class SourceSpec:
    """One entry of ``cfg.source`` (see ``conf/source/``)."""
    key: str
    name: str | None = None          # timm / torchvision / cifar_* name; None: read from a checkpoint
    pretrained: bool = True          # hub weights (or ``url``) when no local ``weights`` file
    weights: str | None = None       # local .safetensors / .pth / .ckpt (this project's too)
    url: str | None = None           # weights URL for non-hub weights (e.g. CSAIL Places365)
    num_classes: int | None = None   # None: from the weights
    strip_prefix: Sequence[str] = field(default_factory=tuple)
    mean: Sequence[float] | None = None       # None: the net's pretrained config
    std: Sequence[float] | None = None
    in_chans: int | None = None
    input_size: int | None = None    # None: the net's pretrained resolution
    adapter: str = "project"         # project: InputAdapter | reference: ReferenceInputAdapter
    scale_factor: float | None = None  # adapter=reference only; None: 7/3 (the reference code's)

    @classmethod
    def from_config(cls, key: str, cfg: Mapping) -> SourceSpec:
        known = set(cls.__dataclass_fields__) - {"key"}
        extra = set(cfg) - known
        if extra:
            raise ConfigError(f"source.{key}: unknown option(s) {sorted(extra)}; known: {sorted(known)}.")
        return cls(key=key, **dict(cfg))


class InputAdapter(nn.Module):
    """Target-normalised images -> the source's input: resize, 1<->3 channels, re-normalise.

    ``x_src = (resize(x * std_data + mean_data) - mean_src) / std_src``; runs on the device.
    """

    def __init__(self, data_mean, data_std, src_mean, src_std, src_size: int | None):
        super().__init__()
        c_in, c_out = len(data_mean), len(src_mean)
        if c_in not in (1, c_out) and c_out != 1:
            raise ConfigError(f"Cannot adapt {c_in}-channel images to a {c_out}-channel source.")
        self.c_in, self.c_out, self.size = c_in, c_out, src_size
        as_buf = lambda v: torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        self.register_buffer("data_mean", as_buf(data_mean), persistent=False)
        self.register_buffer("data_std", as_buf(data_std), persistent=False)
        self.register_buffer("src_mean", as_buf(src_mean), persistent=False)
        self.register_buffer("src_std", as_buf(src_std), persistent=False)

    def signature(self) -> dict:
        """Everything the adapted image depends on besides the input (part of a cache key)."""
        channels = ("same" if self.c_in == self.c_out else
                    "expand 1->3" if (self.c_in, self.c_out) == (1, 3) else "mean 3->1")
        return {"type": "InputAdapter", "size": self.size, "interpolation": "bilinear",
                "align_corners": False, "antialias": "when downsampling", "channels": channels,
                "data_mean": self.data_mean.flatten().tolist(), "data_std": self.data_std.flatten().tolist(),
                "src_mean": self.src_mean.flatten().tolist(), "src_std": self.src_std.flatten().tolist()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.data_std + self.data_mean                 # back to [0, 1] pixels
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            down = self.size < min(x.shape[-2:])
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=down)
        if self.c_in == 1 and self.c_out == 3:
            x = x.expand(-1, 3, -1, -1)
        elif self.c_in == 3 and self.c_out == 1:
            x = x.mean(1, keepdim=True)
        return (x - self.src_mean) / self.src_std


ADAPTERS = ("project", "reference")
REFERENCE_SCALE = 7 / 3   # the SSKT reference code: 32 px CIFAR -> 74 px, 96 px STL-10 -> 224 px


class ReferenceInputAdapter(nn.Module):
    """What the SSKT reference code feeds its sources: the target's *normalised* batch, bilinearly
    upsampled by a fixed factor, with no re-normalisation to the source's statistics.

    Exactly ``F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)`` -- the
    semantics of the reference's ``nn.Upsample(scale_factor=7/3, mode='bilinear')``: the output
    size is ``floor(s * size)`` (32 -> 74, 96 -> 224) and the sampling grid uses ``1/s`` as given
    (not the ratio of the sizes). ``scale_factor=1`` passes the batch through unchanged (the
    reference's VOC path, whose 224 px images are not resized). The channels must already match:
    the reference had no 1-channel data, so this adapter refuses it rather than guessing (use the
    project adapter, which converts 1 -> 3 channels and re-normalises).
    """

    kind = "reference"
    mode = "bilinear"
    align_corners = False

    def __init__(self, scale_factor: float = REFERENCE_SCALE, data_chans: int = 3, src_chans: int = 3,
                 key: str = "<name>"):
        super().__init__()
        if not scale_factor or float(scale_factor) <= 0:
            raise ConfigError(f"source.{key}.scale_factor={scale_factor}: must be a positive number "
                              f"(the reference code's is 7/3 = {REFERENCE_SCALE!r}).")
        if data_chans != src_chans:
            raise ConfigError(
                f"source.{key}.adapter=reference feeds the target's {data_chans}-channel batch to the "
                f"source unchanged, but the source takes {src_chans} channels. The reference code had "
                f"only RGB data; use source.{key}.adapter=project (converts channels and re-normalises).")
        self.scale_factor = float(scale_factor)
        self.channels = int(data_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_factor == 1.0:
            return x
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode,
                             align_corners=self.align_corners)

    def signature(self) -> dict:
        """Every setting the adapter's output depends on (a soft-label cache key)."""
        return {"kind": self.kind, "scale_factor": self.scale_factor, "mode": self.mode,
                "align_corners": self.align_corners, "recompute_scale_factor": None,
                "antialias": False, "normalise": False, "channels": self.channels}

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor!r}, mode={self.mode!r}, align_corners={self.align_corners}"


class FrozenSource(nn.Module):
    def __init__(self, key: str, net: nn.Module, adapter: nn.Module, bn_mode: str = "eval"):
        super().__init__()
        if bn_mode not in ("eval", "train"):
            raise ConfigError(f"source_bn must be 'eval' or 'train' (reference behaviour), got {bn_mode!r}.")
        self.key, self.net, self.adapter, self.bn_mode = key, net, adapter, bn_mode
        self.num_classes = _classifier(net).out_features
        self.class_names: list[str] | None = None
        self._signature: dict | None = None      # set by the first dtype conversion (see _apply)
        net.requires_grad_(False)
        self.train(False)

    def _apply(self, fn, recurse=True):
        """``.to`` / ``.half`` / ``.double`` ... (also through a parent module, as Lightning's
        precision plugin converts the whole LightningModule for ``16-true``, ``bf16-true`` and
        ``64-true`` before ``on_fit_start``). The first conversion that changes a dtype freezes
        :meth:`signature` at its value before the conversion, so training and ``cache build``
        (which hashes the source before casting it) key the same store; the precision is a key
        field of its own. A device or memory-format move leaves the signature live."""
        if self._signature is not None:
            return super()._apply(fn, recurse)
        weights = dict(self.net.state_dict())             # views of the tensors before the conversion
        adapter = self.adapter.signature()
        dtypes = {name: t.dtype for name, t in weights.items()}
        out = super()._apply(fn, recurse)
        after = self.net.state_dict()
        if adapter != self.adapter.signature() or any(after[n].dtype != d for n, d in dtypes.items()):
            self._signature = self._signature_of(weights, adapter)
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        if self.bn_mode == "eval":
            self.net.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(x))

    def signature(self) -> dict:
        """Everything this source's logits depend on besides the input image: the architecture,
        a content hash of its weights (parameters and buffers), its BatchNorm mode and its input
        adapter's signature (part of a cache key; hashing ResNet-50's weights takes ~0.3 s).
        After a dtype conversion: the signature from before it (see :meth:`_apply`)."""
        if self._signature is not None:
            return dict(self._signature)
        return self._signature_of(self.net.state_dict(), self.adapter.signature())

    def _signature_of(self, weights: Mapping[str, torch.Tensor], adapter: dict) -> dict:
        from sskt_lightning.cache.store import digest_of, tensors_digest
        net = self.net
        return {"architecture": f"{type(net).__module__}.{type(net).__qualname__}",
                "module_tree_sha256": digest_of(repr(net)), "num_classes": self.num_classes,
                "weights_sha256": tensors_digest(sorted(weights.items())),
                "bn_mode": self.bn_mode, "adapter": adapter}


class SourceBank(nn.Module):
    """All frozen sources of a run: ``forward(images, index, view, stream)`` -> one logits tensor
    per source. The one seam through which every frozen network labels images.

    Without a cache the networks run on ``images`` (``index``/``view`` unused). With a cache
    attached (:meth:`attach_cache`, done by :func:`sskt_lightning.cache.attach` when
    ``method.cache`` is on) each source answers ``(stream, index[i], view[i])`` from its store
    and runs only on the misses (stored when the cache is writable); every answer, hit or miss,
    is the stored precision's value, so a cold and a warm cache give the same numbers.
    """

    def __init__(self, sources: Sequence[FrozenSource]):
        super().__init__()
        self.sources = nn.ModuleDict({s.key: s for s in sources})
        self._stores: dict[str, list] = {}       # stream -> one store per source (not module state)
        self._write, self._temperature = False, 1.0

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def num_classes(self) -> list[int]:
        return [s.num_classes for s in self.sources.values()]

    # ------------------------------------------------------------------ the cache
    @property
    def cached(self) -> bool:
        return bool(self._stores)

    def attach_cache(self, stores: Mapping[str, Sequence], write: bool, temperature: float = 1.0) -> None:
        """``stores``: stream name (``labeled``, ``unlabeled``) -> one store per source, in order;
        ``temperature``: the T at which the caller softens the logits (a top-k layout rebuilds
        its tail for that T; full fp16 logits do not depend on it)."""
        for stream, per_source in stores.items():
            if len(per_source) != len(self.sources):
                raise ConfigError(f"cache: stream {stream!r} has {len(per_source)} stores for "
                                  f"{len(self.sources)} sources")
        self._stores, self._write, self._temperature = dict(stores), bool(write), float(temperature)

    def detach_cache(self) -> dict:
        """Commit and close every store; returns each store's hit/miss counts by source."""
        stats, closed = {}, set()
        for per_source in self._stores.values():
            for key, store in zip(self.sources, per_source):
                if id(store) not in closed:
                    closed.add(id(store))
                    store.close()                     # commits what is pending
                    stats.setdefault(key, []).append(store.stats())
        self._stores = {}
        return stats

    def _segments(self, n: int, stream) -> list[tuple[str, int, int]]:
        if isinstance(stream, str):
            return [(stream, 0, n)]
        out, start = [], 0
        for name, count in stream:
            out.append((name, start, start + int(count)))
            start += int(count)
        if start != n:
            raise ValueError(f"stream segments cover {start} samples, the batch has {n}")
        return out

    def _cached_forward(self, x, index, view, stream) -> list[torch.Tensor]:
        if index is None or view is None:
            raise ConfigError("method.cache needs each batch's sample index and view id: batches "
                              "(x, y, index, view) from sskt_lightning's ImageDataModule.")
        idx, vw = index.cpu().numpy(), view.cpu().numpy()
        segments = self._segments(len(x), stream)
        for name, _, _ in segments:
            if name not in self._stores:
                raise ConfigError(f"cache: no store for the {name!r} stream (have {sorted(self._stores)})")
        outputs = []
        for k, source in enumerate(self.sources.values()):
            out = torch.empty(len(x), source.num_classes, device=x.device)
            hit = np.zeros(len(x), dtype=bool)
            for name, a, b in segments:
                store = self._stores[name][k]
                seg_hit, rows = store.lookup(idx[a:b], vw[a:b])
                if rows.shape[0]:
                    out[a:b][torch.from_numpy(seg_hit).to(x.device)] = store.layout.decode(
                        rows, x.device, self._temperature)
                hit[a:b] = seg_hit
            if not hit.all():
                miss = np.flatnonzero(~hit)
                logits = source(x[torch.from_numpy(miss).to(x.device)])
                for name, a, b in segments:
                    store = self._stores[name][k]
                    sel = (miss >= a) & (miss < b)
                    if sel.any():
                        rows = store.layout.encode(logits[torch.from_numpy(sel).to(x.device)])
                        out[torch.from_numpy(miss[sel]).to(x.device)] = store.layout.decode(
                            rows, x.device, self._temperature)
                        if self._write:
                            store.put(idx[miss[sel]], vw[miss[sel]], rows)
            outputs.append(out)
        return outputs

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None, view: torch.Tensor | None = None,
                stream: str | Sequence[tuple[str, int]] = "labeled") -> list[torch.Tensor]:
        """One logits tensor per source for images ``x`` (normalised, augmented).

        ``index``/``view``: each sample's index in its split's image array and its view id;
        ``stream``: which stream the samples come from (``"labeled"``, ``"unlabeled"``), or
        ``[(stream, count), ...]`` for a batch concatenated from several streams."""
        if self._stores:
            return self._cached_forward(x, index, view, stream)
        return [s(x) for s in self.sources.values()]


def _fix_offline(spec: SourceSpec) -> str:
    return (f"Offline? Download the file and pass source.{spec.key}.weights=/path/to/file "
            f"(.safetensors, .pth or a .ckpt of this project), or set source.{spec.key}.pretrained=false "
            "for random weights (smoke runs only).")


def _build_net(spec: SourceSpec, data_info: Mapping) -> tuple[nn.Module, dict]:
    """The network with its weights loaded, and its input statistics from the weights' origin
    (plus ``class_names`` when the weights say them: checkpoints of this project)."""
    stats: dict = {}
    if spec.weights:
        obj = W.read_file(spec.weights, f"source.{spec.key}.weights")
        name, in_chans = spec.name, spec.in_chans or 3
        if W.is_project_checkpoint(obj):
            info = obj["hyper_parameters"]["data_info"]
            name = name or obj["hyper_parameters"]["model_name"]
            in_chans = spec.in_chans or info["in_chans"]
            stats = {"mean": info["mean"], "std": info["std"], "input_size": info["image_size"],
                     "class_names": info.get("class_names")}
        if not name:
            raise ConfigError(f"source.{spec.key}.name is required: {spec.weights} is not a "
                              "checkpoint of this project, so it does not say its architecture.")
        sd = W.extract_state_dict(obj, tuple(spec.strip_prefix), f"source.{spec.key}.weights={spec.weights}")
        net = create_network(name, num_classes=spec.num_classes or 1000, in_chans=in_chans)
        classifier = _classifier(net)
        clf_key = next(k for k, m in net.named_modules() if m is classifier) + ".weight"
        if clf_key in sd and sd[clf_key].shape[0] != classifier.out_features:
            if spec.num_classes is not None:
                raise WeightsError(
                    f"source.{spec.key}.num_classes={spec.num_classes} but {spec.weights} has "
                    f"{sd[clf_key].shape[0]} classes; remove num_classes to take it from the file.")
            _replace_classifier(net, sd[clf_key].shape[0])
        W.load_into(net, sd, f"source {spec.key!r} ({spec.weights})")
    elif spec.pretrained and spec.url:
        sd = W.extract_state_dict(W.fetch_url(spec.url, f"source {spec.key!r}", _fix_offline(spec)),
                                  tuple(spec.strip_prefix), f"The file at source.{spec.key}.url={spec.url}")
        net = create_network(spec.name, num_classes=spec.num_classes or 1000, in_chans=spec.in_chans or 3)
        W.load_into(net, sd, f"source {spec.key!r} ({spec.url})")
    elif spec.pretrained:
        kwargs = {"num_classes": spec.num_classes} if spec.num_classes else {}
        net = create_pretrained(spec.name, spec.in_chans or 3, f"source {spec.key!r}", _fix_offline(spec),
                                **kwargs)
    else:
        warnings.warn(f"source {spec.key!r} ({spec.name}) has RANDOM weights (pretrained=false): "
                      "fine for smoke runs, meaningless for transfer.", stacklevel=2)
        net = create_network(spec.name, num_classes=spec.num_classes or 1000, in_chans=spec.in_chans or 3)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    stats.setdefault("mean", cfg.get("mean", IMAGENET_MEAN))
    stats.setdefault("std", cfg.get("std", IMAGENET_STD))
    stats.setdefault("input_size", cfg.get("input_size", (3, 224, 224))[-1])
    return net, stats


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_cache_only_when_offline():
    """Without network, make the Hugging Face hub answer from its cache at once (instead of
    retrying for a minute): the cached file loads, a missing one fails fast."""
    if _reachable("huggingface.co"):
        yield
        return
    from huggingface_hub import constants
    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def create_pretrained(name: str, in_chans: int, what: str, fix: str, **kwargs) -> nn.Module:
    """A network with hub weights (timm / torchvision); offline, the cache answers at once and a
    missing file is a :class:`WeightsError` saying ``what`` failed and ``fix``."""
    import timm
    from sskt_lightning.nets.factory import TORCHVISION_PREFIX
    try:
        if name.startswith(TORCHVISION_PREFIX):
            return create_network(name, kwargs.pop("num_classes", 1000), in_chans, pretrained=True, **kwargs)
        with _hub_cache_only_when_offline():
            return timm.create_model(name, pretrained=True, in_chans=in_chans, **kwargs)
    except (ConfigError, WeightsError):
        raise
    except Exception as err:  # hub errors come in many types (HTTP, offline, missing cache)
        from huggingface_hub import constants
        raise WeightsError(f"Could not fetch pretrained weights for {what} ({name}) from the hub, nor "
                           f"find them in its cache {constants.HF_HUB_CACHE} or torch's "
                           f"{torch.hub.get_dir()}: {type(err).__name__}: {str(err)[:160]}. {fix}") from None


def _check_adapter_options(spec: SourceSpec) -> None:
    if spec.adapter not in ADAPTERS:
        raise ConfigError(f"source.{spec.key}.adapter={spec.adapter!r}: choose 'project' (resize to the "
                          f"source's resolution and re-normalise) or 'reference' (the SSKT reference "
                          f"code: upsample the normalised batch by scale_factor).")
    if spec.adapter == "project" and spec.scale_factor is not None:
        raise ConfigError(f"source.{spec.key}.scale_factor applies to adapter=reference only; the project "
                          f"adapter resizes to source.{spec.key}.input_size. Set "
                          f"source.{spec.key}.adapter=reference, or remove scale_factor.")
    if spec.adapter == "reference" and spec.input_size is not None:
        raise ConfigError(f"source.{spec.key}.adapter=reference scales by source.{spec.key}.scale_factor, "
                          f"not to a size: set source.{spec.key}.input_size=null (it is "
                          f"{spec.input_size}).")


def build_source(spec: SourceSpec, data_info: Mapping, bn_mode: str = "eval") -> FrozenSource:
    _check_adapter_options(spec)
    net, stats = _build_net(spec, data_info)
    if spec.adapter == "reference":
        scale = REFERENCE_SCALE if spec.scale_factor is None else spec.scale_factor
        src_chans = spec.in_chans or len(spec.mean or stats["mean"])   # as the project adapter's c_out
        adapter = ReferenceInputAdapter(scale, len(data_info["mean"]), src_chans, spec.key)
        log.info("source %s: %s, %d classes, the target's normalised batch upsampled x%.4g "
                 "(adapter=reference)", spec.key, spec.name or spec.weights,
                 _classifier(net).out_features, adapter.scale_factor)
        source = FrozenSource(spec.key, net, adapter, bn_mode)
        source.class_names = stats.get("class_names")
        return source
    size = spec.input_size or stats["input_size"]
    size = size[-1] if isinstance(size, (list, tuple)) else size
    mean, std = tuple(spec.mean or stats["mean"]), tuple(spec.std or stats["std"])
    adapter = InputAdapter(data_info["mean"], data_info["std"], mean, std, int(size))
    log.info("source %s: %s, %d classes, input %d px", spec.key, spec.name or spec.weights,
             _classifier(net).out_features, size)
    source = FrozenSource(spec.key, net, adapter, bn_mode)
    source.class_names = stats.get("class_names")  # None when the weights do not say
    return source


def build_sources(source_cfg: Mapping | None, data_info: Mapping, bn_mode: str = "eval") -> SourceBank:
    """A :class:`SourceBank` from ``cfg.source`` (a mapping of key -> source options)."""
    specs = [SourceSpec.from_config(k, v) for k, v in (source_cfg or {}).items()]
    return SourceBank([build_source(s, data_info, bn_mode) for s in specs])
