"""What a soft-label store is keyed by, and how a run's source bank gets its stores.

A store holds one source's logits for every (image, view) of one image array. Its key is
everything those logits depend on:

  * the source: architecture, a content hash of its weights, its BatchNorm mode, its input
    adapter's signature (size, interpolation, antialias, channels, normalisation statistics);
  * the data: dataset name, split, the image array's dtype, shape and content hash, and the
    data module's normalisation (``data.mean`` / ``data.std``; the reference adapter feeds the
    normalised batch to the source unchanged);
  * the augmentation: pad, flip (the view space and how view ids are numbered);
  * the precision the source runs at (``trainer.precision``) and the storage layout;
  * how it is computed (:func:`compute_signature`): the device type, and on CUDA the TF32
    settings (TF32's ~1e-3 relative error exceeds the fp16 storage's rounding, 2^-11);
  * this code's store format version.

Not in the key: the torch / cuDNN version, ``channels_last`` and ``torch.compile``. They change
which fp32 kernels run, and so the logits by a few fp32 ulps: far below the fp16 storage rounding.

A store whose key differs is another store: a changed source, adapter, dataset or augmentation
never reads an old entry; it fills (or builds) its own store, and the log says which fields
differ from the stores already there.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sskt_lightning.cache.store import (
    FORMAT_VERSION,
    GIB,
    META,
    Layout,
    SoftLabelStore,
    array_digest,
    choose_layout,
    describe_difference,
    list_stores,
    read_meta,
    store_path,
)
from sskt_lightning.errors import CacheError, ConfigError

log = logging.getLogger(__name__)

MODES = ("off", "read_write", "read_only")
# trainer.precision spellings -> Lightning's canonical names
_PRECISION = {"32": "32-true", "32-true": "32-true", "64": "64-true", "64-true": "64-true",
              "16": "16-mixed", "16-mixed": "16-mixed", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
              "16-true": "16-true", "bf16-true": "bf16-true"}


def cache_mode(mode, source_bn: str = "eval") -> str:
    """``method.cache`` as one of :data:`MODES` (YAML's ``off``/``false``/null read as off);
    refuses a cache with ``source_bn=train``."""
    mode = "off" if mode in (None, False, "false", "False", "none", "None") else str(mode)
    if mode not in MODES:
        raise ConfigError(f"method.cache={mode!r}; choose one of {MODES}: off (no cache), read_write (look "
                          "up, run and store the misses), read_only (look up, run the misses, store nothing).")
    if mode != "off" and source_bn == "train":
        raise ConfigError(
            f"method.cache={mode} cannot be used with method.source_bn=train: in train mode a source's "
            "BatchNorm normalises with the statistics of the whole batch (and its running statistics "
            "drift), so an image's soft label depends on the other images in its batch and cannot be "
            "cached per image. Use method.source_bn=eval, or method.cache=off.")
    return mode


def precision_name(precision) -> str:
    name = _PRECISION.get(str(precision))
    if name is None:
        raise ConfigError(f"the soft-label cache does not know trainer.precision={precision!r}; use one "
                          f"of {sorted(set(_PRECISION.values()))} or method.cache=off.")
    return name


@dataclass
class StreamData:
    """The image array one stream's sample indices point into, and the normalisation
    (``data.mean`` / ``data.std``) the data module applies to it before any source sees it."""
    dataset: str
    split: str
    images: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def key(self) -> dict:
        """The data part of a store's key. It holds the normalisation for every input adapter:
        ``adapter=reference`` feeds the normalised batch to the source as is, so its logits
        depend on ``data.mean`` / ``data.std`` although its own signature does not say them."""
        return {"dataset": self.dataset, "split": self.split, "dtype": str(self.images.dtype),
                "shape": list(self.images.shape), "sha256": array_digest(self.images),
                "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std]}


def compute_signature(device_type: str, matmul_tf32: bool = False, cudnn_tf32: bool = False,
                      float32_matmul_precision: str = "highest") -> dict:
    """How a source's logits are computed, beyond ``trainer.precision``: the device type (``cpu``,
    ``cuda``, ``mps``) and, on CUDA, whether fp32 matmuls and cuDNN convolutions may use TF32
    (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``,
    ``torch.get_float32_matmul_precision()``). TF32 rounds products to a 10-bit mantissa, a
    ~1e-3 relative error, larger than the fp16 storage's 2^-11: a store computed with TF32 is
    not what a run without it computes, nor is a CPU's store a GPU's."""
    if device_type == "cuda":
        return {"device": "cuda", "matmul_tf32": bool(matmul_tf32), "cudnn_tf32": bool(cudnn_tf32),
                "float32_matmul_precision": str(float32_matmul_precision)}
    return {"device": str(device_type)}


def _tf32(legacy, new_api) -> bool:
    """A TF32 flag as in effect: the legacy ``allow_tf32`` getter, or (torch raises when the legacy
    and the new ``fp32_precision`` API were both used) the new API's setting."""
    try:
        return bool(legacy())
    except RuntimeError:
        return new_api() == "tf32"


def current_compute(device) -> dict:
    """:func:`compute_signature` for ``device`` with this process's current TF32 settings."""
    device_type = torch.device(device).type
    if device_type != "cuda":
        return compute_signature(device_type)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return compute_signature(
        "cuda", _tf32(lambda: matmul.allow_tf32, lambda: getattr(matmul, "fp32_precision", None)),
        _tf32(lambda: cudnn.allow_tf32, lambda: getattr(getattr(cudnn, "conv", None), "fp32_precision", None)),
        torch.get_float32_matmul_precision())


def store_key(source_signature: dict, data_key: dict, augment_signature: dict, precision: str,
              layout: Layout, compute: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "source": source_signature, "data": data_key,
            "augment": augment_signature, "precision": precision, "compute": compute,
            "layout": layout.describe()}


class MissingStore:
    """Stands for a store that does not exist (``read_only``): every lookup misses."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.hits = self.misses = 0

    def lookup(self, index, view):
        index = np.asarray(index)
        self.misses += index.size
        return np.zeros(index.size, dtype=bool), np.empty(0, self.layout.dtype)

    def stats(self) -> dict:
        return {"hits": 0, "misses": self.misses, "written": 0, "hit_rate": 0.0 if self.misses else None,
                "write_stopped": None}

    def close(self) -> None:
        pass


def explain_new_store(cache_dir, key: dict, labels: dict) -> str | None:
    """For a key with no store yet: which fields differ from the stores of the same source and
    data already in ``cache_dir`` (None when there are none). A store whose ``meta.json`` cannot
    be read is named as such (its source is unknown), not an error."""
    notes = []
    for path in list_stores(cache_dir):
        try:
            meta = read_meta(path)
        except CacheError:
            notes.append(f"{path.name} (unreadable {META}: remove it: python -m sskt_lightning.cache clear "
                         f"--key {path.name})")
            continue
        other = meta.get("labels") or {}
        if (other.get("source"), other.get("dataset"), other.get("split")) == (
                labels["source"], labels["dataset"], labels["split"]):
            notes.append(f"{path.name} (differs in {describe_difference(meta.get('key') or {}, key) or 'nothing'})")
    return "; ".join(notes) or None


def open_stores(bank, streams: Mapping[str, StreamData], augment, precision, cache_dir, mode: str,
                budget_gb: float = 16.0, topk: int | None = None, *, compute: dict) -> dict[str, list]:
    """One store per (source, image array) for each stream: ``{stream: [store per source]}``;
    ``compute``: where the sources run (:func:`current_compute`).

    Streams over the same array (the labelled stream and an unlabeled pool of the same training
    images) share their stores."""
    precision = precision_name(precision)
    cache_dir = Path(os.path.normpath(os.path.expanduser(str(cache_dir))))
    writable = mode == "read_write"
    data_keys: dict[tuple, dict] = {}     # (id(images), mean, std) -> data key (hash each array once)
    opened: dict[str, object] = {}        # store dir name -> store
    signatures = {key: source.signature() for key, source in bank.sources.items()}
    out: dict[str, list] = {}
    for stream, data in streams.items():
        ident = (id(data.images), tuple(data.mean), tuple(data.std))
        if ident not in data_keys:
            data_keys[ident] = data.key()
        dkey = data_keys[ident]
        per_source = []
        for key, source in bank.sources.items():
            entries = len(data.images) * augment.num_views
            layout = choose_layout(entries, source.num_classes, budget_gb * GIB, topk)
            skey = store_key(signatures[key], dkey, augment.signature(), precision, layout, compute)
            path = store_path(cache_dir, skey)
            if path.name in opened:
                per_source.append(opened[path.name])
                continue
            labels = {"source": key, "architecture": signatures[key]["architecture"],
                      "dataset": data.dataset, "split": data.split, "precision": precision,
                      "device": compute["device"]}
            if not (path / META).is_file():
                why = explain_new_store(cache_dir, skey, labels)
                what = f"source {key!r} on {data.dataset}/{data.split}"
                if why:
                    log.warning("cache: no store for %s with this key; not using %s", what, why)
                if not writable:
                    log.warning("cache (read_only): no store for %s at %s: every lookup misses and the "
                                "source runs (build one: python -m sskt_lightning.cache build ...)", what, path)
                    store = MissingStore(layout)
                    opened[path.name] = store
                    per_source.append(store)
                    continue
                log.info("cache: new store for %s at %s (%s, %.2f GiB when full)", what, path, layout.kind
                         + (f" k={layout.k}" if layout.k else ""), entries * layout.bytes_per_entry / GIB)
            store = SoftLabelStore.create_or_open(cache_dir, skey, len(data.images), augment.num_views, layout,
                                                  labels, writable=writable)
            log.info("cache: %s store %s: %d of %d entries filled", key, path.name, store.count_filled(),
                     store.num_images * store.num_views)
            opened[path.name] = store
            per_source.append(store)
        out[stream] = per_source
    return out


def data_streams(datamodule) -> dict[str, StreamData]:
    """The arrays the data module's training streams index (``labeled``; ``unlabeled`` if any)."""
    getter = getattr(datamodule, "source_streams", None)
    if getter is None:
        raise ConfigError("method.cache needs sskt_lightning's ImageDataModule (it says which image array "
                          f"each stream's indices point into); got {type(datamodule).__name__}.")
    return {stream: StreamData(datamodule.name, split, images, tuple(datamodule.mean), tuple(datamodule.std))
            for stream, (split, images) in getter().items()}


def attach(bank, mode: str, *, datamodule, precision, cache_dir, device, budget_gb: float = 16.0,
           topk: int | None = None, temperature: float = 1.0, source_bn: str = "eval") -> None:
    """Give the source bank ``bank`` its stores for this run: the values are the run's, passed by
    the method at ``on_fit_start`` (the trainer's data module and precision, ``paths.cache_dir``,
    the device the sources run on); ``temperature``: the T at which the method softens the
    sources' logits."""
    mode = cache_mode(mode, source_bn)
    if mode == "off" or len(bank) == 0:
        return
    if datamodule is None:
        raise ConfigError("method.cache needs the run's data module (trainer.fit(module, datamodule=...)).")
    if not cache_dir:
        raise ConfigError("method.cache is on but paths.cache_dir is not set (conf/paths/default.yaml).")
    stores = open_stores(bank, data_streams(datamodule), datamodule.augment, precision, cache_dir, mode,
                         budget_gb, topk, compute=current_compute(device))
    bank.attach_cache(stores, write=mode == "read_write", temperature=temperature)
