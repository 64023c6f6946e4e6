"""Rank candidate sources: ``python -m sskt_lightning.rank data=<target> source=[a,b,...]``.

For every candidate of ``source`` (the same config group as training: any timm / torchvision name,
a local file, a checkpoint of this project) on the target's labelled images of ``rank.split``
(``train`` or ``val``; never ``test``), in their identity view (no crop, no flip):

* the source's logits through :class:`~sskt_lightning.sources.SourceBank` (the seam training uses;
  with ``rank.cache=read_write`` they come from / go to the soft-label cache, keyed as a training
  run's labelled stream with the same ``rank.precision`` / ``cache_budget_gb`` / ``cache_topk``);
* its penultimate features: the input of its final linear classifier, caught by a forward hook
  on the same pass (with the cache attached the network runs once more, for the features);
* LEEP, NCE (from the softmax / argmax of the logits) and LogME (from the features), each with a
  seeded bootstrap 95 % interval (:mod:`sskt_lightning.ranking.scores`); its parameter count and
  forward time per image at its input size.

Writes ``ranking.json``, ``ranking.csv`` (atomically) and ``ranking.png`` in the run directory and
prints the table sorted by ``rank.score``. A candidate that cannot be built (offline without its
weights, a bad file) or that gives a non-finite score is named with the reason and left out; the
others still rank.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sskt_lightning.compose import CONFIG_DIR
from sskt_lightning.errors import ConfigError, SSKTError

SCORES = ("leep", "nce", "logme")
SPLITS = ("train", "val")
CSV_COLUMNS = ["rank", "candidate", "name", "leep", "leep_low", "leep_high", "nce", "nce_low", "nce_high",
               "logme", "logme_low", "logme_high", "num_classes", "feature_dim", "params", "ms_per_image",
               "input_size"]


def check_options(cfg: DictConfig) -> DictConfig:
    r = cfg.rank
    if r.score not in SCORES:
        raise ConfigError(f"rank.score={r.score!r}: choose one of {list(SCORES)}.")
    if r.split == "test":
        raise ConfigError("rank.split=test is refused: choosing sources on the test split would leak it into "
                          "the choice of the model that is then tested on it. Use rank.split=train (the "
                          "labelled training images) or rank.split=val.")
    if r.split not in SPLITS:
        raise ConfigError(f"rank.split={r.split!r}: choose one of {list(SPLITS)}.")
    for key in ("bootstrap", "logme_bootstrap", "batch_size"):
        value = r.get(key)
        if key == "logme_bootstrap" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "batch_size" else 0):
            raise ConfigError(f"rank.{key}={value!r}: must be a whole number >= {1 if key == 'batch_size' else 0}.")
    if not cfg.get("source"):
        raise ConfigError("no candidates: give them with source=[a,b,...] (conf/source/; a timm model by name: "
                          "source=[timm] source.timm.name=<model>).")
    return r


def _device(name: str):
    import torch
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():     # a DDP process's own GPU (training's source=[auto,...] on rank 0: cuda:0)
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def labelled_images(dm, split: str):
    """``(indices into the train array, labels)`` of the split's labelled images, and a refusal
    when a class has fewer than 2 of them."""
    import numpy as np
    task = dm.task
    if dm.multi_label:
        raise ConfigError(f"{dm.name} is multi-label: LEEP, NCE and LogME here score single-label targets.")
    indices = task.train if split == "train" else task.val
    y = task.train_labels[indices].numpy().astype(np.int64)      # val images come from the train split too
    counts = np.bincount(y, minlength=dm.num_classes)
    few = [dm.class_names[c] for c in np.flatnonzero(counts < 2)]
    if few:
        raise ConfigError(
            f"the {split} split of {dm.name} has fewer than 2 labelled images in class(es) {few[:10]} "
            f"(counts {counts.tolist()[:20]}): LEEP, NCE and LogME estimate how a source's outputs predict "
            "the labels and are not meaningful from one labelled image per class or fewer. Use more labels "
            "(data.labels_per_class, data.val_per_class / data.val_size) or the other split (rank.split).")
    return indices, y


def _forward(source, bank, dm, indices, labels, batch_size: int, device, context, true_dtype):
    """Logits through the bank and the classifier's input (the features) for every image, and the
    seconds the network pass that gave the features took."""
    import torch

    from sskt_lightning.nets.factory import _classifier
    caught: list = []
    hook = _classifier(source.net).register_forward_hook(lambda m, inp, out: caught.append(inp[0].detach()))
    logits, feats, seconds = [], [], 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        with torch.inference_mode():
            idx_all = torch.as_tensor(indices, dtype=torch.int64)
            y_all = torch.as_tensor(labels, dtype=torch.int64)
            x, _, _ = _batch(dm, idx_all[:2], y_all[:2], device, true_dtype)
            with context:
                source(x)            # a warm-up pass outside the timing (kernel selection, allocation)
            caught.clear()
            for a in range(0, len(idx_all), batch_size):
                x, index, view = _batch(dm, idx_all[a:a + batch_size], y_all[a:a + batch_size], device, true_dtype)
                sync()
                t0 = time.perf_counter()
                with context:
                    out = bank(x, index, view, "labeled")[0]
                sync()
                ran = bool(caught) and caught[-1].shape[0] == len(x)
                if not ran:                               # answered (in part) by the cache: features need a pass
                    caught.clear()
                    t0 = time.perf_counter()
                    with context:
                        source(x)
                    sync()
                seconds += time.perf_counter() - t0
                f = caught[-1]
                if f.ndim > 2:                            # a classifier applied per position/token: pool
                    f = f.reshape(f.shape[0], -1, f.shape[-1]).mean(1)
                logits.append(out.double().cpu())
                feats.append(f.double().cpu())
                caught.clear()
    finally:
        hook.remove()
    return torch.cat(logits), torch.cat(feats), seconds


def _batch(dm, idx, y, device, dtype):
    """The images ``idx`` of the train array as the data module hands them to a method for
    evaluation: normalised, in the identity view, with their sample indices and view ids."""
    batch = (y.to(device), idx.to(device)) if dm.on_device else (dm.train_arrays.images[idx], y, idx)
    x, _, index, view = dm.prepare_batch(batch, augment=False, split="train")
    x = x.to(device)
    return (x if dtype is None else x.to(dtype)), index.to(device), view.to(device)


def _interval(score, n, resamples, seed, estimate) -> dict:
    from sskt_lightning.ranking.scores import bootstrap_interval
    none = {"low": None, "high": None, "shift": None}
    return bootstrap_interval(score, n, resamples, seed, estimate=estimate) or none


def score_candidate(key: str, logits, feats, y, num_classes: int, r) -> dict:
    """The three scores with their intervals; a ConfigError naming the candidate when one is not finite."""
    import numpy as np
    import torch

    from sskt_lightning.ranking.scores import leep, logme, nce
    if not torch.isfinite(logits).all() or not torch.isfinite(feats).all():
        raise ConfigError(f"candidate {key!r}: its logits or features hold NaN / inf on these images; its scores "
                          "are refused, not ranked.")
    probs = torch.softmax(logits, 1).numpy()
    pred = logits.argmax(1).numpy()
    f = feats.numpy()
    n = len(y)
    out = {}
    counts = lambda i: np.bincount(i, minlength=n)  # noqa: E731  (a resample as weights: no n x Z copy)
    fns = {"leep": lambda i: leep(probs, y, num_classes, weights=counts(i)),
           "nce": lambda i: nce(pred, y, num_classes, weights=counts(i)),
           "logme": lambda i: logme(f[i], y[i], num_classes)}
    resamples = {"leep": r.bootstrap, "nce": r.bootstrap,
                 "logme": r.bootstrap if r.get("logme_bootstrap") is None else r.logme_bootstrap}
    for name, fn in fns.items():
        value = fn(np.arange(n))
        if not math.isfinite(value):
            raise ConfigError(f"candidate {key!r}: its {name.upper()} is {value} on these images; refused, not ranked.")
        out[name] = {"value": value, **_interval(fn, n, int(resamples[name]), int(r.seed), value)}
    return out


def rank(cfg: DictConfig, out_dir: Path | None = None, record: dict | None = None) -> dict:
    """Score every candidate of ``cfg.source``; write (in ``out_dir``, by default the run directory)
    and return ``ranking.json``'s content, with ``record``'s keys added (training's ``source=[auto,...]``:
    its fingerprint and top_k)."""
    import lightning as L
    from hydra.utils import instantiate

    from sskt_lightning.cache.__main__ import _precision_context
    from sskt_lightning.cache.keys import cache_mode, current_compute, data_streams, open_stores, precision_name
    from sskt_lightning.data.datamodule import data_info_of
    from sskt_lightning.sources import SourceBank, SourceSpec, build_source

    r = check_options(cfg)
    mode = cache_mode(r.get("cache"))
    precision = precision_name(r.precision)
    out_dir = Path(cfg.paths.output_dir) if out_dir is None else out_dir
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    indices, y = labelled_images(dm, r.split)
    info = data_info_of(dm)
    device = _device(str(r.device))
    context, true_dtype = _precision_context(precision, device)
    rows, failed = [], []
    sources = OmegaConf.to_container(cfg.source, resolve=True)
    print(f"ranking {len(sources)} candidate(s) on {dm.name}/{r.split}: {len(y)} labelled images, "
          f"{dm.num_classes} classes, on {device.type}", flush=True)
    for key, options in sources.items():
        missing = [opt for opt in cfg.source[key] if OmegaConf.is_missing(cfg.source[key], opt)]
        if missing:
            reason = f"source.{key}.{missing[0]} is required: set source.{key}.{missing[0]}=<value>."
            failed.append({"candidate": key, "reason": reason})
            print(f"candidate {key!r} left out: {reason}", flush=True)
            continue
        try:
            spec = SourceSpec.from_config(key, options)
            source = build_source(spec, info, "eval")
        except SSKTError as err:
            failed.append({"candidate": key, "reason": str(err)})
            print(f"candidate {key!r} cannot be loaded, left out: {err}", flush=True)
            continue
        source.to(device)
        if true_dtype is not None:
            source.to(true_dtype)
        bank = SourceBank([source])
        cache_stats = None
        if mode != "off":
            if not cfg.paths.get("cache_dir"):
                raise ConfigError("rank.cache is on but paths.cache_dir is not set (conf/paths/default.yaml).")
            streams = {"labeled": data_streams(dm)["labeled"]}
            stores = open_stores(bank, streams, dm.augment, precision, cfg.paths.cache_dir, mode,
                                 float(r.cache_budget_gb), r.get("cache_topk"), compute=current_compute(device))
            bank.attach_cache(stores, write=mode == "read_write")
        try:
            logits, feats, seconds = _forward(source, bank, dm, indices, y, int(r.batch_size), device, context,
                                              true_dtype)
        finally:
            if bank.cached:
                cache_stats = bank.detach_cache().get(key, [None])[0]
        try:
            scores = score_candidate(key, logits, feats, y, dm.num_classes, r)
        except ConfigError as err:
            failed.append({"candidate": key, "reason": str(err)})
            print(f"{err}", flush=True)
            continue
        adapter = source.adapter
        rows.append({"candidate": key, "name": spec.name or spec.weights, **scores,
                     "num_classes": int(source.num_classes), "feature_dim": int(feats.shape[1]),
                     "params": int(sum(p.numel() for p in source.net.parameters())),
                     "ms_per_image": 1000.0 * seconds / len(y),
                     "input_size": getattr(adapter, "size", None), "cache": cache_stats})
        print(f"  {key}: LEEP {scores['leep']['value']:.4f}, NCE {scores['nce']['value']:.4f}, "
              f"LogME {scores['logme']['value']:.4f}", flush=True)
        source.to("cpu")
    if not rows:
        raise ConfigError("no candidate could be scored: " + "; ".join(f"{f['candidate']}: {f['reason']}"
                                                                      for f in failed))
    rows.sort(key=lambda row: row[r.score]["value"], reverse=True)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    result = {"data": dm.name, "split": r.split, "num_images": int(len(y)), "num_classes": int(dm.num_classes),
              "score": r.score, "bootstrap": int(r.bootstrap),
              "logme_bootstrap": int(r.bootstrap if r.get("logme_bootstrap") is None else r.logme_bootstrap),
              "level": 0.95, "seed": int(r.seed), "device": device.type, "precision": precision,
              "cache": mode, "ranking": rows, "failed": failed, **(record or {})}
    write_outputs(out_dir, result)
    print(table(result))
    print(f"-> {out_dir / 'ranking.json'}, ranking.csv, ranking.png")
    for f in failed:
        print(f"left out: {f['candidate']}: {f['reason']}")
    return result


def _fmt(score: dict) -> str:
    if score["low"] is None:
        return f"{score['value']:.4f}"
    return f"{score['value']:.4f} [{score['low']:.4f}, {score['high']:.4f}]"


def table(result: dict) -> str:
    head = f"{'rank':>4}  {'candidate':24} {'LEEP [95% CI]':>28} {'NCE [95% CI]':>28} {'LogME [95% CI]':>28} " \
           f"{'params':>10} {'ms/img':>8}"
    lines = [f"sorted by {result['score'].upper()} ({result['data']}/{result['split']}, "
             f"{result['num_images']} images)", head]
    for row in result["ranking"]:
        lines.append(f"{row['rank']:>4}  {row['candidate'][:24]:24} {_fmt(row['leep']):>28} {_fmt(row['nce']):>28} "
                     f"{_fmt(row['logme']):>28} {row['params'] / 1e6:>9.2f}M {row['ms_per_image']:>8.3f}")
    return "\n".join(lines)


def csv_text(result: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in result["ranking"]:
        flat = {k: row[k] for k in CSV_COLUMNS if k in row and not isinstance(row[k], dict)}
        for s in SCORES:
            flat.update({s: row[s]["value"], f"{s}_low": row[s]["low"], f"{s}_high": row[s]["high"]})
        writer.writerow(flat)
    return buf.getvalue()


def figure_png(result: dict) -> bytes:
    """One panel per score, the candidates in rank order, the 95 % intervals as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["ranking"]
    fig = Figure(figsize=(11, 1.2 + 0.35 * len(rows)), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharey=True)
    names = [row["candidate"] for row in rows][::-1]
    for ax, s in zip(axes, SCORES):
        values = [row[s]["value"] for row in rows][::-1]
        lows = [row[s]["low"] if row[s]["low"] is not None else row[s]["value"] for row in rows][::-1]
        highs = [row[s]["high"] if row[s]["high"] is not None else row[s]["value"] for row in rows][::-1]
        span = max(max(highs) - min(lows), 1e-3)
        base = min(lows) - 0.15 * span        # the axis starts near the values: longer bar = higher score
        err = [[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]]
        color = "tab:blue" if s == result["score"] else "tab:gray"
        ax.barh(names, [v - base for v in values], left=base, xerr=err, color=color, capsize=3)
        ax.set_xlim(base, max(highs) + 0.15 * span)
        title = {"leep": "LEEP", "nce": "NCE", "logme": "LogME"}[s]
        ax.set_title(title + (" (sort key)" if s == result["score"] else ""))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Which source? {result['data']}/{result['split']}, {result['num_images']} images "
                 f"(95 % bootstrap intervals; each axis starts near its values)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_outputs(out_dir: Path, result: dict) -> None:
    from sskt_lightning.atomic import atomic_write_bytes, atomic_write_text
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "ranking.json", json.dumps(result, indent=2))
    atomic_write_text(out_dir / "ranking.csv", csv_text(result))
    atomic_write_bytes(out_dir / "ranking.png", figure_png(result))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="rank")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        result = rank(cfg)
    except SSKTError as err:
        print(f"\nerror: {err}\n", file=sys.stderr)
        sys.exit(2)
    return result["ranking"][0][result["score"]]["value"]


def main():
    """The command line: unknown source configs named first (as for training), then Hydra."""
    from sskt_lightning.validate import command_line
    return command_line(_hydra_main)


if __name__ == "__main__":
    main()
