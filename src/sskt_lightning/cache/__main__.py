"""``python -m sskt_lightning.cache build|info|clear [options] [hydra overrides]``

    # every view of every image, for each source of the config (Hydra overrides as for train)
    python -m sskt_lightning.cache build data=cifar100 source=[imagenet_resnet50,places365_resnet50]
    python -m sskt_lightning.cache info                          # the stores under paths.cache_dir
    python -m sskt_lightning.cache info --check data=cifar100 source=[imagenet_resnet50]
    python -m sskt_lightning.cache clear [--key <store>]         # remove all stores, or some

``build`` composes the same config as ``python -m sskt_lightning.train`` (data, sources, their
input adapters, ``data.augment_*``, ``trainer.precision``, ``method.cache_budget_gb`` /
``cache_topk``), so a run with the same overrides and ``method.cache=read_write`` (or
``read_only``) finds what it built, if it trains on the same kind of device: a store's key
records the device type it is computed on (``--device``, default from ``trainer.accelerator``) and,
on CUDA, the TF32 settings. It computes only what is missing, commits every few thousand entries,
and can be interrupted and started again.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sskt_lightning.cache.store import (
    TMP_PREFIX,
    SoftLabelStore,
    disk_usage,
    human_bytes,
    list_store_dirs,
    read_meta,
)

USAGE = __doc__


def _compose(overrides: list[str]):
    from sskt_lightning.compose import compose_config
    return compose_config(overrides, Path(tempfile.gettempdir()) / "sskt_cache_cli")


def _cache_dir(cfg) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(cfg.paths.cache_dir))))


# ---------------------------------------------------------------------------------------- build
def _precision_context(precision: str, device):
    import contextlib

    import torch
    if precision.endswith("-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return torch.autocast(device.type, dtype=dtype), None
    dtype = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "64-true": torch.float64}.get(precision)
    return contextlib.nullcontext(), dtype


def _device(cfg, device_name: str | None):
    """``--device``, else the device ``trainer.accelerator`` gives a run (auto: cuda, then mps,
    then cpu). A store's key records the device type it is computed on."""
    import torch
    if device_name:
        return torch.device(device_name)
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accel in ("auto", "gpu", "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _open_run_stores(cfg, mode: str, device):
    """The data module, the source bank and its stores for a composed config: built exactly as
    ``train.run`` builds them (same seed, same order), so even random-weight sources match;
    keyed for computing on ``device`` with this process's TF32 settings."""
    import lightning as L
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    from sskt_lightning.cache.keys import cache_mode, current_compute, data_streams, open_stores
    from sskt_lightning.errors import ConfigError
    from sskt_lightning.module import TransferModule
    from sskt_lightning.data.datamodule import data_info_of

    cache_mode(mode, cfg.method.get("source_bn", "eval"))       # refuses source_bn=train
    method_cls = get_class(cfg.method._target_)
    if not getattr(method_cls, "soft_label_cache", False) or not cfg.get("source"):
        from sskt_lightning.methods import Method
        served = " or ".join(f"method={n}" for n, c in sorted(Method.registry.items()) if c.soft_label_cache)
        raise ConfigError(f"the cache holds the soft labels of the sources of {served} "
                          f"(got method={cfg.method.name} with source={list(cfg.get('source') or [])}): give "
                          "e.g. method=sskt source=[imagenet_resnet50] (source.<name>.weights=... offline).")
    L.seed_everything(cfg.seed, verbose=False)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = TransferModule(OmegaConf.to_container(cfg, resolve=True), data_info_of(dm))
    bank = module.sources
    streams = data_streams(dm)
    stores = open_stores(bank, streams, dm.augment, cfg.trainer.get("precision", "32-true"), _cache_dir(cfg),
                         mode, float(cfg.method.get("cache_budget_gb", 16.0)), cfg.method.get("cache_topk"),
                         compute=current_compute(device))
    return dm, bank, streams, stores


def build(overrides: list[str], batch_size: int, task_only: bool, device_name: str | None) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from sskt_lightning.cache.keys import precision_name
    from sskt_lightning.data.augment import normalize
    from sskt_lightning.errors import CacheError

    cfg = _compose(overrides)
    precision = precision_name(cfg.trainer.get("precision", "32-true"))
    device = _device(cfg, device_name)
    dm, bank, streams, stores = _open_run_stores(cfg, "read_write", device)
    context, true_dtype = _precision_context(precision, device)
    wanted = {"labeled": dm.train_indices if task_only else None,
              "unlabeled": dm.unlabeled_indices if task_only else None}
    jobs = {}   # store dir -> (source, store, images, image subset)
    for stream, per_source in stores.items():
        images = streams[stream].images
        for source, store in zip(bank.sources.values(), per_source):
            subset = wanted[stream]
            if store.path.name in jobs and subset is not None:
                old = jobs[store.path.name][3]
                subset = torch.unique(torch.cat([torch.as_tensor(old), torch.as_tensor(subset)]))
            jobs[store.path.name] = (source, store, images, None if subset is None else np.asarray(subset))
    total_done, start = 0, time.perf_counter()
    for name, (source, store, images, subset) in jobs.items():
        source.to(device)
        if true_dtype is not None:
            source.to(true_dtype)
        todo = store.missing(subset)
        label = f"{store.meta['labels'].get('source')} on {store.meta['labels'].get('dataset')}/" \
                f"{store.meta['labels'].get('split')}"
        n_img = store.num_images if subset is None else len(subset)
        print(f"{label}: store {name} on {device.type}, {store.layout.kind}"
              f"{f' k={store.layout.k}' if store.layout.k else ''}, {n_img} images x {store.num_views} views; "
              f"{len(todo)} entries to compute", flush=True)
        t0 = time.perf_counter()
        try:
            with tqdm(total=len(todo), unit="view", unit_scale=True, desc=label, file=sys.stdout) as bar, \
                    torch.inference_mode():
                for a in range(0, len(todo), batch_size):
                    pairs = todo[a:a + batch_size]
                    idx, view = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
                    x = dm.augment.apply(images[idx].to(device), view.to(device))
                    x = normalize(x, dm.mean, dm.std)
                    if true_dtype is not None:
                        x = x.to(true_dtype)
                    with context:
                        logits = source(x)
                    store.put(pairs[:, 0], pairs[:, 1], store.layout.encode(logits))
                    if store.write_stopped:
                        break
                    bar.update(len(pairs))
        finally:
            store.close()         # commits every finished entry, also when interrupted
        if store.write_stopped:
            raise CacheError(f"cache build: {store.write_stopped} while writing {label} to {store.path}; what "
                             "was committed before stays. Free space (python -m sskt_lightning.cache clear), "
                             "or build into paths.cache_dir=/a/larger/disk, or lower method.cache_budget_gb.")
        seconds = time.perf_counter() - t0
        if len(todo):
            print(f"{label}: {len(todo)} image-views in {seconds:.1f} s = {len(todo) / seconds:.1f} image-views/s "
                  f"on {device.type}", flush=True)
        total_done += len(todo)
    print(f"done: {total_done} image-views computed in {time.perf_counter() - start:.1f} s; "
          f"cache at {_cache_dir(cfg)}")
    return 0


# ---------------------------------------------------------------------------------------- info
def _describe(path: Path) -> dict:
    import numpy as np

    from sskt_lightning.errors import CacheError
    try:
        meta = read_meta(path)
        SoftLabelStore(path, writable=False).close()       # the files' sizes fit the meta
    except CacheError as err:
        return {"store": path.name, "damaged": str(err), "disk": disk_usage(path)}
    n, v = int(meta["num_images"]), int(meta["num_views"])
    filled = int(np.count_nonzero(np.memmap(path / "filled.bin", np.uint8, "r"))) if n * v else 0
    layout = meta["layout"]
    lab = meta.get("labels") or {}
    return {"store": path.name, "source": lab.get("source"), "architecture": (lab.get("architecture") or "").split(".")[-1],
            "data": f"{lab.get('dataset')}/{lab.get('split')}", "precision": lab.get("precision"),
            "device": (meta["key"].get("compute") or {}).get("device"),
            "layout": layout["kind"] + (f" k={layout['k']}" if layout.get("k") else "") + f" K={layout['num_classes']}",
            "images": n, "views": v, "filled": filled, "percent": 100.0 * filled / (n * v) if n * v else 0.0,
            "disk": disk_usage(path), "created": meta.get("created")}


def info(overrides: list[str], check: bool) -> int:
    cfg = _compose(overrides)
    root = _cache_dir(cfg)
    rows = [_describe(p) for p in list_store_dirs(root)]
    print(f"cache dir: {root}" + ("" if root.is_dir() else " (does not exist yet)"))
    if rows:
        print(f"{'store':24}  {'source':20} {'arch':10} {'data':22} {'precision':10} {'device':6} {'layout':18} "
              f"{'filled':>22}  {'on disk':>10}")
        for r in rows:
            if "damaged" in r:
                print(f"{r['store']:24}  damaged: {r['damaged']}")
                continue
            print(f"{r['store']:24}  {str(r['source']):20} {r['architecture'][:10]:10} {r['data']:22} "
                  f"{str(r['precision']):10} {str(r['device']):6} {r['layout']:18} "
                  f"{r['filled']:>10}/{r['images'] * r['views']:<9} "
                  f"{r['percent']:5.1f}%  {human_bytes(r['disk']):>10}")
        print(f"{len(rows)} store(s), {human_bytes(sum(r['disk'] for r in rows))} on disk")
    else:
        print("no stores")
    temps = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)] if root.is_dir() else []
    if temps:
        print(f"{len(temps)} leftover temporary entr(ies) from interrupted writers ({TMP_PREFIX}*): "
              "removed by `clear`")
    if check:
        _, bank, _, stores = _open_run_stores(cfg, "read_only", _device(cfg, None))
        print("this config's stores:")
        for stream, per_source in stores.items():
            for key, store in zip(bank.sources, per_source):
                where = getattr(store, "path", None)
                if where is None:
                    print(f"  {stream:10} {key:20} missing (build it: python -m sskt_lightning.cache build ...)")
                else:
                    n = store.num_images * store.num_views
                    print(f"  {stream:10} {key:20} {where.name}: {store.count_filled()}/{n} "
                          f"({100.0 * store.count_filled() / n:.1f}%)")
    return 0


# ---------------------------------------------------------------------------------------- clear
def clear(overrides: list[str], keys: list[str]) -> int:
    cfg = _compose(overrides)
    root = _cache_dir(cfg)
    if not root.is_dir():
        print(f"nothing to clear: {root} does not exist")
        return 0
    stores = {p.name: p for p in list_store_dirs(root)}
    if keys:
        unknown = [k for k in keys if k not in stores]
        if unknown:
            print(f"error: no store named {unknown} under {root} (see: python -m sskt_lightning.cache info)",
                  file=sys.stderr)
            return 2
        targets = [stores[k] for k in keys]
    else:
        targets = list(stores.values()) + [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
    freed = 0
    for path in targets:
        freed += disk_usage(path) if path.is_dir() else path.stat().st_blocks * 512
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        print(f"removed {path}")
    print(f"{len(targets)} removed, {human_bytes(freed)} freed")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m sskt_lightning.cache", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compute every missing (image, view) entry of the config's sources")
    b.add_argument("--batch-size", type=int, default=256, help="image-views per source forward (default 256)")
    b.add_argument("--task-only", action="store_true",
                   help="only the images the config's task uses (default: every image of each array)")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: from trainer.accelerator)")
    i = sub.add_parser("info", help="list the stores under paths.cache_dir")
    i.add_argument("--check", action="store_true", help="also say how complete this config's stores are")
    c = sub.add_parser("clear", help="remove every store under paths.cache_dir (or those given by --key)")
    c.add_argument("--key", action="append", default=[], help="a store's name, as `info` lists it (repeatable)")
    for sp in (b, i, c):
        sp.epilog = "Any other argument is a Hydra override, as for python -m sskt_lightning.train."
    args, args.overrides = p.parse_known_args(argv)
    flags = [a for a in args.overrides if a.startswith("-")]
    if flags:
        p.error(f"unknown option(s) {flags} for `{args.command}` (see --help)")
    from sskt_lightning.errors import SSKTError
    try:
        if args.command == "build":
            return build(args.overrides, args.batch_size, args.task_only, args.device)
        if args.command == "info":
            return info(args.overrides, args.check)
        return clear(args.overrides, args.key)
    except SSKTError as err:
        print(f"\nerror: {err}\n", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: what was committed stays; run the same command again to go on.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
