"""The soft-label store: one source's logits for every (image, view) of one image array, on disk.

A store is a directory ``<cache_dir>/<key digest>/`` holding

    meta.json     the full key (what the logits depend on), the layout, the shape
    payload.bin   N × V slots, one per (image, view), in the layout's row format (a sparse file)
    filled.bin    N × V bytes: 1 where the slot holds a committed entry, 0 elsewhere
    lock          the writers' lock file (``fcntl.flock``)

Safety rules:
  * A store appears atomically: it is built in a temporary directory beside its final place and
    renamed into place (``os.rename``; fsync before); when two processes create the same store at
    once, one rename wins and the other opens the winner's store.
  * A reader trusts only slots whose ``filled`` byte is 1. A writer writes payloads first
    (``os.pwrite``), makes them durable (``os.fdatasync``), then sets their ``filled`` bytes, all
    under an exclusive ``flock``. A writer that crashes at any point leaves either committed
    entries or slots a reader ignores: never a half-written entry marked as filled.
  * ``meta.json`` must hold exactly the key that was asked for; anything else is refused
    (:class:`~sskt_lightning.errors.CacheError`), never read.

Layouts (:class:`Layout`): ``fp16`` stores all K logits in float16 (the online logits up to fp16
rounding: relative error <= 2^-11); ``topk`` stores the k largest logits (float16), their class
indices (uint16) and two numbers about the other K - k ("tail") logits, their log-mean-exp at T = 1
and at T = 3 (float32), from which the softmax is rebuilt at any temperature: the top k logits to
fp16 rounding, the tail's total probability matched at T = 1 and T = 3 (to float32 rounding) and
interpolated in between and beyond, each tail class getting an equal share of it (see
``Layout.decode`` for the formula and the error bound).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import numbers
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sskt_lightning.atomic import atomic_write_text
from sskt_lightning.errors import CacheError, OutputError
from sskt_lightning.jsonfile import load_object

if TYPE_CHECKING:   # torch is imported where tensors are handled: `cache info` starts without it
    import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
FP16_MAX = 65504.0
GIB = 1024 ** 3
META, PAYLOAD, FILLED, LOCK = "meta.json", "payload.bin", "filled.bin", "lock"
STORE_NAME_LENGTH = 24          # hex digits of the key's SHA-256
TMP_PREFIX = ".tmp-"


# ---------------------------------------------------------------------------------------- digests
def digest_of(obj) -> str:
    """SHA-256 of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor of any dtype (bfloat16 included), on the host."""
    import torch
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and contents (a network's state dict)."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def array_digest(images: torch.Tensor, chunk: int = 1 << 26) -> str:
    """SHA-256 of an image array's dtype, shape and bytes (chunked: no copy of the whole array)."""
    import torch
    flat = images.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy() \
        if images.numel() else np.zeros(0, np.uint8)
    h = hashlib.sha256(f"{images.dtype}|{tuple(images.shape)}|".encode())
    for start in range(0, flat.size, chunk):
        h.update(memoryview(flat[start:start + chunk]))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """How one (image, view) entry is stored: ``fp16`` (all K logits) or ``topk`` (k of them)."""
    kind: str
    num_classes: int
    k: int | None = None

    def __post_init__(self):
        if self.kind not in ("fp16", "topk"):
            raise CacheError(f"unknown cache layout {self.kind!r}")
        if not _is_count(self.num_classes):
            raise CacheError(f"a cache layout needs a whole number of classes >= 1, got {self.num_classes!r}")
        if self.kind == "topk" and not (_is_count(self.k) and self.k < self.num_classes <= 65536):
            raise CacheError(f"top-k layout needs 1 <= k < K <= 65536, got k={self.k!r}, K={self.num_classes}")

    @property
    def dtype(self) -> np.dtype:
        if self.kind == "fp16":
            return np.dtype(("<f2", (self.num_classes,)))
        return np.dtype([("val", "<f2", (self.k,)), ("idx", "<u2", (self.k,)), ("tail", "<f4", (2,))])

    @property
    def bytes_per_entry(self) -> int:
        return self.dtype.itemsize

    def describe(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes, "k": self.k}

    def encode(self, logits: torch.Tensor) -> np.ndarray:
        """B×K logits -> B stored rows (host numpy, this layout's dtype)."""
        import torch
        z = logits.detach().float().clamp(-FP16_MAX, FP16_MAX)
        if self.kind == "fp16":
            return z.half().cpu().numpy()
        val, idx = z.topk(self.k, dim=1)
        rest = z.scatter(1, idx, float("-inf")).double()
        log_n = math.log(self.num_classes - self.k)
        g1 = rest.logsumexp(1) - log_n                      # log-mean-exp of the tail at T = 1
        g3 = (rest / 3).logsumexp(1) - log_n                # ... and at T = 3
        rows = np.empty(z.shape[0], self.dtype)
        rows["val"] = val.half().cpu().numpy()
        rows["idx"] = idx.to(torch.int32).cpu().numpy().astype(np.uint16)
        rows["tail"] = torch.stack([g1, g3], 1).float().cpu().numpy()
        return rows

    def decode(self, rows: np.ndarray, device: torch.device | str = "cpu", temperature: float = 1.0) -> torch.Tensor:
        """Stored rows -> B×K float32 logits on ``device``, to be used at ``temperature`` T.

        ``fp16``: the logits (T plays no role). ``topk``: the k stored logits at their classes;
        every tail class gets one logit ``c(T)`` such that ``(K - k) exp(c/T)`` estimates the tail's
        ``sum exp(z_j / T)``. With ``g(s) = log mean_tail exp(s z_j)`` (convex, ``g(0) = 0``) stored
        at ``s = 1`` and ``s = 1/3`` and modelled as ``g(s) = a s + b s^2`` (exact for Gaussian tail
        logits), ``c(T) = T g(1/T) = a + b / T``: the tail's total probability is exact at T = 1
        and T = 3. Then ``KL(p_T || q_T) <= P_tail(T) log(K - k)`` (P_tail(T): the tail's true
        probability at T; each tail class gets an equal share), plus the interpolation error of
        the tail's total at other temperatures."""
        import torch
        if self.kind == "fp16":
            return torch.from_numpy(np.ascontiguousarray(rows)).to(device).float()
        n = rows.shape[0]
        val = torch.from_numpy(np.ascontiguousarray(rows["val"])).to(device).float()
        idx = torch.from_numpy(rows["idx"].astype(np.int64)).to(device)
        g = torch.from_numpy(np.ascontiguousarray(rows["tail"])).to(device)
        b = 1.5 * (g[:, 0] - 3 * g[:, 1])            # from g(1) = a + b and g(1/3) = a/3 + b/9
        a = g[:, 0] - b
        out = (a + b / float(temperature))[:, None].expand(n, self.num_classes).clone()
        return out.scatter_(1, idx, val)


def choose_layout(num_entries: int, num_classes: int, budget_bytes: float, topk: int | None = None) -> Layout:
    """``fp16`` when all K logits of every entry fit ``budget_bytes``; else ``topk`` with the
    largest k that fits (or the given ``topk``). Refuses a budget too small for k >= 1."""
    if topk is not None:
        return Layout("fp16", num_classes) if topk >= num_classes else Layout("topk", num_classes, int(topk))
    if num_entries * 2 * num_classes <= budget_bytes:
        return Layout("fp16", num_classes)
    k = int((budget_bytes / max(num_entries, 1) - 8) // 4)    # 2 B value + 2 B index each, 8 B tail
    if k < 1:
        raise CacheError(
            f"method.cache_budget_gb={budget_bytes / GIB:g} is too small for {num_entries:,} (image, view) "
            f"entries even with the top-1 logit: raise it to at least {num_entries * 8 / GIB:.2f}.")
    return Layout("topk", num_classes, min(k, num_classes - 1))


# ---------------------------------------------------------------------------------------- files
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SoftLabelStore:
    """One store: ``lookup`` committed entries, ``put`` new ones, ``commit`` them.

    Entries are addressed by ``(index, view)``: the image's index in its array (the batch's
    sample index) and the augmentation's view id. ``put`` buffers; ``commit`` writes under the
    store's lock (see the module docstring); buffered entries are also committed every
    ``commit_every`` entries and by :meth:`close`.
    """

    def __init__(self, path: Path, writable: bool, commit_every: int = 4096):
        self.path, self.writable, self.commit_every = Path(path), bool(writable), int(commit_every)
        self.meta = read_meta(self.path)
        try:
            self.num_images, self.num_views = (_meta_count(self.meta, name) for name in ("num_images", "num_views"))
            self.layout = Layout(**self.meta["layout"])
        except KeyError as err:
            raise _damaged(self.path, f"its {META} has no {err}") from None
        except (TypeError, ValueError, CacheError) as err:
            raise _damaged(self.path, f"its {META} does not describe a store: {err}") from None
        payload_size = self.num_images * self.num_views * self.layout.bytes_per_entry
        for name, size in ((PAYLOAD, payload_size), (FILLED, self.num_images * self.num_views)):
            try:
                actual = (self.path / name).stat().st_size
            except FileNotFoundError:
                raise _damaged(self.path, f"it has no {name}") from None
            if actual != size:
                raise CacheError(f"cache store {self.path} is damaged: {name} has {actual} bytes, expected "
                                 f"{size}. Remove it: python -m sskt_lightning.cache clear --key {self.path.name}")
        self._payload = np.memmap(self.path / PAYLOAD, self.layout.dtype, "r", shape=(self.num_images, self.num_views))
        self._filled = np.memmap(self.path / FILLED, np.uint8, "r+" if writable else "r",
                                 shape=(self.num_images, self.num_views))
        self._fd = os.open(self.path / PAYLOAD, os.O_RDWR if writable else os.O_RDONLY)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_count = 0
        self.hits = self.misses = self.written = 0
        self.write_stopped: str | None = None    # why this writer stopped storing (a full disk)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create_or_open(cls, cache_dir: str | Path, key: dict, num_images: int, num_views: int,
                       layout: Layout, labels: dict | None = None, writable: bool = True,
                       commit_every: int = 4096) -> SoftLabelStore:
        """The store for ``key`` under ``cache_dir``: opened if present (its key checked), created
        atomically otherwise."""
        path = store_path(cache_dir, key)
        if not path.is_dir():
            if not writable:
                raise FileNotFoundError(path)
            _publish(path, key, num_images, num_views, layout, labels or {})
        store = cls(path, writable, commit_every)
        store.check_key(key)
        return store

    def check_key(self, key: dict) -> None:
        if self.meta.get("key") != key:
            diff = describe_difference(self.meta.get("key") or {}, key)
            raise CacheError(f"cache store {self.path} does not hold what its name says (its key differs in "
                             f"{diff}): refusing to read it. Remove it: python -m sskt_lightning.cache clear "
                             f"--key {self.path.name}")

    # ------------------------------------------------------------------ reading
    def _check(self, index: np.ndarray, view: np.ndarray) -> None:
        if index.size and (index.min() < 0 or index.max() >= self.num_images or view.min() < 0
                           or view.max() >= self.num_views):
            raise CacheError(f"cache lookup out of range: indices in [{index.min()}, {index.max()}] (store has "
                             f"{self.num_images} images), views in [{view.min()}, {view.max()}] "
                             f"(store has {self.num_views}); the batch does not come from the data this "
                             f"store was made for ({self.meta.get('labels')}).")

    def lookup(self, index: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask, stored rows of the hits, in batch order) for entries ``(index[i], view[i])``."""
        index, view = np.asarray(index, np.int64), np.asarray(view, np.int64)
        self._check(index, view)
        hit = self._filled[index, view] == 1
        rows = self._payload[index[hit], view[hit]]     # read after the flags (see module docstring)
        n = int(hit.sum())
        self.hits += n
        self.misses += hit.size - n
        return hit, np.asarray(rows)

    def count_filled(self) -> int:
        return int(np.count_nonzero(self._filled))

    def missing(self, images: np.ndarray | None = None) -> np.ndarray:
        """(index, view) pairs without a committed entry, as a P×2 array (for ``images``, else all)."""
        images = np.arange(self.num_images) if images is None else np.asarray(images, np.int64)
        empty = self._filled[images] == 0                          # len(images) × V
        rows, views = np.nonzero(empty)
        return np.stack([images[rows], views], 1)

    # ------------------------------------------------------------------ writing
    def put(self, index: np.ndarray, view: np.ndarray, rows: np.ndarray) -> None:
        """Buffer entries (committed every ``commit_every`` entries and by ``commit``/``close``)."""
        if not self.writable:
            raise CacheError(f"cache store {self.path} is open read-only")
        index, view = np.asarray(index, np.int64), np.asarray(view, np.int64)
        self._check(index, view)
        if self.write_stopped:
            return                                   # the disk is full: said once, in _stop_writing
        rows = np.ascontiguousarray(rows)
        if len(rows) != index.size or rows.nbytes != index.size * self.layout.bytes_per_entry:
            raise CacheError(f"rows of {rows.dtype} {rows.shape} do not fit the layout {self.layout}")
        self._pending.append((index, view, rows))
        self._pending_count += index.size
        if self._pending_count >= self.commit_every:
            self.commit()

    def commit(self) -> int:
        """Write the buffered entries: payloads, fdatasync, then their flags; under the lock.

        Only empty slots are written: an entry already filled (by this writer or another) is
        never rewritten, since readers read filled slots without the lock; of several entries
        for one slot in the buffer the first is written. Returns the number of entries written."""
        if not self._pending:
            return 0
        index = np.concatenate([p[0] for p in self._pending])
        view = np.concatenate([p[1] for p in self._pending])
        rows = np.concatenate([p[2] for p in self._pending])
        self._pending, self._pending_count = [], 0
        size = self.layout.bytes_per_entry
        slots, first = np.unique(index * self.num_views + view, return_index=True)   # first occurrences
        index, view, rows = index[first], view[first], rows[first]
        with open(self.path / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                empty = self._filled[index, view] == 0            # under the lock: no other writer now
                index, view, slots = index[empty], view[empty], slots[empty]
                raw = rows[empty].view(np.uint8).reshape(-1, size)
                for off, row in zip((slots * size).tolist(), raw):
                    _pwrite_all(self._fd, row.tobytes(), off)
                if len(index):
                    os.fdatasync(self._fd)                # payloads durable before any flag says so
                    self._filled[index, view] = 1         # allocated at creation: no new blocks
            except OSError as err:
                if err.errno not in DISK_FULL:
                    raise
                self._stop_writing(err)                   # no flag set: the written payloads stay unread
                return 0
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.written += len(index)
        return len(index)

    def _stop_writing(self, err: OSError) -> None:
        """A full disk (or quota) while committing: store nothing more for the rest of the run,
        say so once. Lookups go on and misses run the source, so the run computes the same."""
        self.write_stopped = f"{err.strerror or err} (errno {errno.errorcode.get(err.errno, err.errno)})"
        self._pending, self._pending_count = [], 0
        log.warning("cache: %s while writing to store %s (%s): it stops storing for the rest of this run; "
                    "its lookups go on and its misses run the source, so results are unchanged. Free space "
                    "(python -m sskt_lightning.cache clear), or set paths.cache_dir=/a/larger/disk, a lower "
                    "method.cache_budget_gb, or method.cache=read_only.", self.write_stopped, self.path,
                    self.meta.get("labels"))

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            if self.writable:
                self.commit()
                self._filled.flush()
        finally:
            os.close(self._fd)
            self._fd = None
            self._payload = self._filled = None

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "written": self.written,
                "hit_rate": self.hits / total if total else None, "write_stopped": self.write_stopped}


def store_path(cache_dir: str | Path, key: dict) -> Path:
    return Path(cache_dir) / digest_of(key)[:STORE_NAME_LENGTH]


def _is_count(value) -> bool:
    """A whole number >= 1 (a bool or a float is not one, e.g. from a hand-edited meta.json)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _meta_count(meta: dict, name: str) -> int:
    value = meta[name]
    if not _is_count(value):
        raise ValueError(f"{name}={value!r} is not a whole number >= 1")
    return int(value)


def _damaged(path: Path, why: str) -> CacheError:
    return CacheError(f"cache store {path} is damaged: {why}. Remove it: python -m sskt_lightning.cache "
                      f"clear --key {path.name}")


def read_meta(path: str | Path) -> dict:
    """A store's ``meta.json``; a :class:`CacheError` naming the store and how to remove it when
    the file is missing or unreadable (a store copied in part, a torn write by another tool)."""
    path = Path(path)
    try:
        return load_object(path / META)
    except FileNotFoundError:
        raise _damaged(path, f"it has no {META}") from None
    except (OSError, ValueError) as err:     # JSONDecodeError, UnicodeDecodeError, not an object
        raise _damaged(path, f"its {META} cannot be read ({type(err).__name__}: {err})") from None


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """``os.pwrite`` until every byte is written (a short write is retried; a full disk raises)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _allocate(f, size: int) -> None:
    """Give a file ``size`` bytes of real blocks: a store's flags are written through a memory map,
    and a write to a hole of a full disk through a map is a SIGBUS, not an error to handle."""
    try:
        os.posix_fallocate(f.fileno(), 0, size)
        return
    except AttributeError:                            # no posix_fallocate (macOS)
        pass
    except OSError as err:
        if err.errno in DISK_FULL:
            raise
    chunk = bytes(min(size, 1 << 20))                 # the file system cannot fallocate: write zeros
    for start in range(0, size, len(chunk) or 1):
        f.write(chunk[:size - start])
    f.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _publish(path: Path, key: dict, num_images: int, num_views: int, layout: Layout, labels: dict) -> None:
    """Create a store in a temporary directory beside ``path`` and rename it into place; refused
    when the store would not fit the disk once full."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        need = num_images * num_views * (layout.bytes_per_entry + 1)       # payload + flags, when full
        free = shutil.disk_usage(parent).free
        if need > free:
            raise CacheError(
                f"the cache store for {labels or key} needs {human_bytes(need)} when full, but {parent} has "
                f"{human_bytes(free)} free. Lower method.cache_budget_gb (a top-k layout: fewer bytes an "
                f"entry), set paths.cache_dir=/a/larger/disk, free space (python -m sskt_lightning.cache "
                f"clear), or set method.cache=read_only or off.")
        tmp = parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as err:
        raise CacheError(f"cannot write the soft-label cache under {parent} ({err.strerror}): set "
                         "paths.cache_dir=/a/writable/dir, or method.cache=read_only / off.") from None
    try:
        meta = {"format_version": FORMAT_VERSION, "key": key, "num_images": int(num_images),
                "num_views": int(num_views), "layout": layout.describe(), "labels": labels,
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        (tmp / LOCK).touch()
        with open(tmp / PAYLOAD, "wb") as f:
            f.truncate(num_images * num_views * layout.bytes_per_entry)   # sparse: costs what gets written
            os.fsync(f.fileno())
        with open(tmp / FILLED, "wb") as f:
            _allocate(f, num_images * num_views)      # 1 B an entry, allocated (see _allocate)
            os.fsync(f.fileno())
        try:
            atomic_write_text(tmp / META, json.dumps(meta, indent=1))
        except OutputError as err:   # its advice is the run directory's; a store has its own
            why = os.strerror(err.errno) if err.errno else str(err)   # the errno of the OSError it explains
            raise CacheError(f"cannot create the cache store for {labels or key} under {parent} (writing its "
                             f"{META}: {why}): free space (python -m sskt_lightning.cache clear), or set "
                             "paths.cache_dir=/a/writable/disk, or method.cache=read_only or off.") from None
        _fsync_dir(tmp)
        try:
            os.rename(tmp, path)                      # atomic; fails if another process won
        except OSError:
            if not (path / META).is_file():
                raise
        else:
            _fsync_dir(parent)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise CacheError(f"cannot create the cache store for {labels or key} under {parent} ({err.strerror}): "
                         "free space (python -m sskt_lightning.cache clear), or set paths.cache_dir="
                         "/a/larger/disk, or method.cache=read_only or off.") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def describe_difference(old: dict, new: dict, prefix: str = "") -> str:
    """The key fields that differ, e.g. ``source.weights_sha256, augment.pad``."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = describe_difference(a, b, f"{prefix}{k}.")
            if sub:
                diffs.append(sub)
        elif a != b:
            diffs.append(f"{prefix}{k}")
    return ", ".join(diffs)


def list_stores(cache_dir: str | Path) -> list[Path]:
    """Every published store under ``cache_dir`` (temporary directories excluded)."""
    root = Path(cache_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX)
                  and (p / META).is_file())


def list_store_dirs(cache_dir: str | Path) -> list[Path]:
    """:func:`list_stores` plus directories named like a store but without ``meta.json``
    (damaged: ``info`` shows them, ``clear`` removes them)."""
    root = Path(cache_dir)
    if not root.is_dir():
        return []
    hexdigits = set("0123456789abcdef")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX) and (
        (p / META).is_file() or (len(p.name) == STORE_NAME_LENGTH and set(p.name) <= hexdigits)))


def disk_usage(path: Path) -> int:
    """Bytes actually allocated on disk (sparse files count what was written)."""
    return sum(f.stat().st_blocks * 512 for f in Path(path).rglob("*") if f.is_file())
