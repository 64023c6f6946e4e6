"""``source=[auto,<a>,<b>,...] rank.top_k=K``: rank the listed candidates before training, train with the top K.

``conf/source/auto.yaml`` adds the ``rank`` block (``conf/ranking/default.yaml`` plus ``top_k``) to a
training config; its presence is what turns this on. Before the data module of the run is built,
:func:`choose_sources`

* scores every listed candidate with :func:`sskt_lightning.rank.rank` (LEEP / NCE / LogME on the
  target's labelled training images, or ``rank.split=val``; never test), through the source bank
  and, with ``method.cache`` on, the soft-label cache the run then reads;
* writes ``ranking.json`` / ``.csv`` / ``.png`` in the run directory (atomically; rank 0 only);
* keeps the top K by ``rank.score`` in ``cfg.source`` (in rank order) and returns what
  ``results.json`` records as ``source_ranking``.

The record is also what makes the choice the same everywhere: a resumed run, and the other
processes of a DDP run (started by Lightning after rank 0 has ranked, or by SLURM at the same
time), read ``ranking.json`` back when its fingerprint (candidates, their files, data, options)
matches, and only rank 0 ever ranks; so every rank trains with the same sources.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from sskt_lightning.errors import ConfigError
from sskt_lightning.jsonfile import read_object

RECORD = "ranking.json"
WAIT_S = float(os.environ.get("SSKT_RANK_WAIT_S", 3600))   # how long a rank > 0 waits for rank 0's ranking


def is_auto(cfg: DictConfig) -> bool:
    """Whether ``source=[auto,...]`` is in the config (the ``rank`` block with ``top_k``)."""
    r = cfg.get("rank")
    return r is not None and "top_k" in r


def _top_k(cfg: DictConfig, candidates: list[str]) -> int:
    k = cfg.rank.top_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"rank.top_k={k!r}: the number of sources to keep must be a whole number >= 1.")
    if not candidates:
        raise ConfigError("source=[auto] has no candidates to rank: list them after it, e.g. "
                          "source=[auto,imagenet_resnet18,imagenet_resnet50,checkpoint] rank.top_k=1.")
    if k > len(candidates):
        raise ConfigError(f"rank.top_k={k} but only {len(candidates)} candidate(s) are listed ({candidates}): "
                          f"list more after auto in source=[auto,...], or lower rank.top_k.")
    return k


def _file_stamp(value) -> list | None:
    """(size, mtime) of a candidate's local weights file, so a replaced file is ranked again."""
    if isinstance(value, str) and value and Path(value).is_file():
        st = Path(value).stat()
        return [st.st_size, st.st_mtime_ns]
    return None


def fingerprint(cfg: DictConfig) -> str:
    """What the ranking depends on: the candidates (configs and local files), the data, the seed and
    the ranking options (top_k aside: the ranking is the same for any K)."""
    sources = OmegaConf.to_container(cfg.source, resolve=True)
    files = {k: _file_stamp((v or {}).get("weights")) for k, v in sources.items()}
    what = {"source": sources, "files": files, "data": OmegaConf.to_container(cfg.data, resolve=True),
            "seed": cfg.seed,
            "rank": {k: v for k, v in OmegaConf.to_container(cfg.rank, resolve=True).items() if k != "top_k"}}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _matching(path: Path, fp: str) -> dict | None:
    result = read_object(path)
    return result if result is not None and result.get("fingerprint") == fp else None


def _wait_for(path: Path, fp: str) -> dict:
    """A rank > 0: rank 0's ranking, read when it is on disk (never computed here)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = _matching(path, fp)
        if found is not None:
            return found
        time.sleep(1.0)
    raise ConfigError(f"source=[auto,...]: rank 0 wrote no ranking to {path} within {WAIT_S:.0f} s (this process "
                      "waits for it so that every rank trains with the same sources). See rank 0's log for why; "
                      "SSKT_RANK_WAIT_S sets the wait.")


def choose_sources(cfg: DictConfig, output_dir: Path) -> dict | None:
    """Rank ``cfg.source``'s candidates and keep the top ``rank.top_k`` in ``cfg.source`` (in place);
    ``None`` when ``source=[auto,...]`` is not in the config. Returns ``results.json``'s ``source_ranking``."""
    if not is_auto(cfg):
        return None
    from sskt_lightning.extras import rank_from_env
    from sskt_lightning.validate import _method_class
    method_cls = _method_class(cfg)
    if not getattr(method_cls, "needs_sources", True):
        raise ConfigError(f"source=[auto,...] ranks sources for a method that trains with them (method=sskt, kd); "
                          f"method={cfg.method.name} uses none. Leave auto out, or pick such a method.")
    candidates = list((cfg.get("source") or {}).keys())   # source=[auto] alone: no source node at all
    k = _top_k(cfg, candidates)
    fp = fingerprint(cfg)
    path = Path(output_dir) / RECORD
    rank_zero = rank_from_env() == 0
    result = _matching(path, fp)
    reused = result is not None or not rank_zero       # a rank > 0 always reads rank 0's record
    if result is None and not rank_zero:
        result = _wait_for(path, fp)
    elif result is None:
        from sskt_lightning.rank import rank
        result = rank(cfg, out_dir=Path(output_dir), record={"fingerprint": fp, "top_k": k})
    rows = result["ranking"]
    if len(rows) < k:
        left_out = "; ".join(f"{f['candidate']}: {f['reason']}" for f in result.get("failed", []))
        raise ConfigError(f"rank.top_k={k} but only {len(rows)} candidate(s) could be scored (left out: {left_out}). "
                          "Fix those candidates (source.<name>.weights=<local file> offline) or lower rank.top_k.")
    chosen = [row["candidate"] for row in rows[:k]]
    with open_dict(cfg):
        cfg.source = OmegaConf.create({name: cfg.source[name] for name in chosen})
    score = result["score"]
    return {"score": score, "split": result["split"], "top_k": k, "candidates": candidates, "chosen": chosen,
            "scores": {row["candidate"]: {s: row[s]["value"] for s in ("leep", "nce", "logme")} for row in rows},
            "failed": [f["candidate"] for f in result.get("failed", [])], "record": RECORD,
            "reused_record": reused}
