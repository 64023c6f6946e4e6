"""Reading runs from disk: every ``results.json`` (merged with its ``protocol.json``), the failed jobs
and their reasons, and the validation curves in the runs' ``metrics.csv``."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sskt_lightning.jsonfile import load_object
from sskt_lightning.report.common import FAILED_NAME, PROTOCOL_NAME, RESULTS_NAME, ReportError


def _natural_key(p: Path) -> list:
    """Sort ``.../10/results.json`` after ``.../9/results.json``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in p.parts]


def _roots(dirs: Sequence[str | Path] | str | Path) -> list[Path]:
    dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
    roots = [Path(d) for d in dirs]
    for root in roots:
        if not root.exists():
            raise ReportError(f"report: directory not found: {root}")
    return roots


def _files(roots: list[Path], name: str) -> list[Path]:
    seen, out = set(), []
    for root in roots:
        found = [root] if root.is_file() and root.name == name else sorted(root.rglob(name), key=_natural_key)
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                out.append(f)
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return load_object(path)
    except (OSError, ValueError) as e:     # ValueError: JSONDecodeError, UnicodeDecodeError, not an object
        print(f"report: warning: skipping unreadable {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _failed(r: dict) -> bool:
    return str(r.get("status", "")).lower() in ("failed", "failure", "error")


def load_results(dirs: Sequence[str | Path] | str | Path, include_search: bool = False) -> list[dict]:
    """Every successful run's results.json under ``dirs`` (recursively), in a stable order.

    Each dict is the file's content plus ``_path`` and ``_dir``, merged with the run's
    ``protocol.json`` when there is one (keys ``name``, ``setting``, ``phase``, ``params``). Failed
    runs (``status: failed``) and, unless ``include_search``, protocol search trials are left out.
    """
    out = []
    for f in _files(_roots(dirs), RESULTS_NAME):
        data = _read_json(f)
        if data is None or _failed(data):
            continue
        side = f.parent / PROTOCOL_NAME
        if side.is_file():
            data.update(_read_json(side) or {})
        if data.get("phase") == "search" and not include_search:
            continue
        data["_path"], data["_dir"] = str(f), str(f.parent)
        out.append(data)
    return out


def _reason(text: str) -> str:
    """The last meaningful line of a traceback or message (the exception and its message)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no reason recorded)"


def load_failures(dirs: Sequence[str | Path] | str | Path, include_search: bool = False) -> list[dict]:
    """Failed jobs under ``dirs``: ``{"dir", "reason"}`` for each directory holding ``failed.txt``
    without a successful results.json, or a results.json with ``status: failed``."""
    roots = _roots(dirs)
    out = []
    for f in _files(roots, FAILED_NAME):
        res = f.parent / RESULTS_NAME
        data = _read_json(res) if res.is_file() else None
        if data is not None and not _failed(data):
            continue   # failed once, succeeded later (e.g. a resumed job)
        side = _read_json(f.parent / PROTOCOL_NAME) if (f.parent / PROTOCOL_NAME).is_file() else {}
        if (side or {}).get("phase") == "search" and not include_search:
            continue
        try:
            reason = _reason(f.read_text(errors="replace"))
        except OSError as e:
            reason = f"(failed.txt unreadable: {e})"
        out.append({"dir": str(f.parent), "reason": reason, **{k: v for k, v in (side or {}).items()
                                                             if k in ("name", "setting")}})
    for f in _files(roots, RESULTS_NAME):
        data = _read_json(f)
        if data is None or not _failed(data) or (f.parent / FAILED_NAME).is_file():
            continue
        if data.get("phase") == "search" and not include_search:
            continue
        reason = data.get("error") or data.get("reason") or data.get("message") or "status: failed"
        out.append({"dir": str(f.parent), "reason": _reason(str(reason))})
    return sorted(out, key=lambda d: _natural_key(Path(d["dir"])))


def val_curve_from_csv(path: str | Path, column: str | Sequence[str] = "val/acc") -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) from a Lightning CSVLogger ``metrics.csv`` (sparse rows; NaN/empty cells
    dropped; the last row of an epoch wins). ``column`` may list candidates: the first present."""
    candidates = [column] if isinstance(column, str) else list(column)
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError):
        return np.array([], dtype=int), np.array([], dtype=float)
    col = next((c for c in candidates if c in frame.columns), None)
    if col is None or "epoch" not in frame.columns:
        return np.array([], dtype=int), np.array([], dtype=float)
    frame = frame[["epoch", col]].apply(pd.to_numeric, errors="coerce").dropna()
    last = frame.groupby(frame["epoch"].astype(int))[col].last()
    return last.index.to_numpy(dtype=int), last.to_numpy(dtype=float)


def _find_metrics_csv(r: dict) -> Path | None:
    base = Path(r.get("_dir", "."))
    if r.get("metrics_csv"):
        p = Path(r["metrics_csv"])
        p = p if p.is_absolute() else base / p
        if p.is_file():
            return p
    found = sorted(base.rglob("metrics.csv"), key=_natural_key) if base.is_dir() else []
    return found[-1] if found else None


def read_val_curve(r: dict) -> tuple[np.ndarray, np.ndarray]:
    """The validation curve of one run (fractions), or empty arrays when none is on disk."""
    p = _find_metrics_csv(r)
    if p is None:
        return np.array([], dtype=int), np.array([], dtype=float)
    tm = str(r.get("test_metric", "acc"))
    return val_curve_from_csv(p, [f"val/{tm}", "val/acc", f"val_{tm}", "val_acc"])


def mean_curve(curves: Sequence[tuple[Sequence[int], Sequence[float]]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Average curves of possibly different lengths epoch by epoch: (epochs, mean, sample std (NaN
    where fewer than two curves), count)."""
    frame = pd.concat([pd.Series(np.asarray(v, dtype=float), index=np.asarray(e, dtype=int))
                       for e, v in curves] or [pd.Series(dtype=float)], axis=1)
    stats = frame.agg(["mean", "std", "count"], axis=1).dropna(subset=["mean"]).sort_index()
    return (stats.index.to_numpy(dtype=int), stats["mean"].to_numpy(), stats["std"].to_numpy(),
            stats["count"].to_numpy(dtype=int))
