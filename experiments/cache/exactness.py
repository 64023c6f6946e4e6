"""How exact is the soft-label cache? KL between cached and online distributions, and the end
accuracy of a short real run with and without the cache.

    python experiments/cache/exactness.py [--out experiments/cache/results.json] [--skip-run]

Part 1 (KL). For each source, random (image, view) pairs of CIFAR-shaped random images (pad-4
crop + flip, as in training) go through the source online and through a real store
(encode -> write -> commit -> lookup -> decode); reported: KL(online || cached) of the softmax
at T = 1 and T = 3, mean and max over the pairs, for the fp16 layout (all logits) and for top-k
layouts. Sources: ResNet-50 (1000 classes, 74 px) with random weights in two regimes - timm's
default initialisation (zero-initialised last BatchNorm of each block: nearly flat logits) and
``zero_init_last=False`` (logits with a spread of about 11) - which bracket a pretrained net; a random
10-class CIFAR ResNet-20; and the 10-class Fashion-MNIST source trained in part 2, on real
Fashion-MNIST images.

Part 2 (end accuracy). Fashion-MNIST, as ``make train`` but shorter: a ResNet-20 source trained
for --source-epochs on the 10 fine classes (first half of the training images), then an SSKT
target on the 4 coarse classes (second half, 100 labels per class) for --target-epochs, three
times with the same seed: ``method.cache=off``, a cold ``read_write`` run (fills the cache) and a
warm one (every lookup hits). Reported: test accuracy and the largest difference between the
loss curves.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments" / "fashion_transfer"))


TEMPERATURES = (1.0, 2.0, 3.0)


def kl_stats(online: torch.Tensor, rows, layout) -> dict:
    """KL(online || cached) of softmax(z / T), the cached logits rebuilt for that T."""
    out = {}
    for T in TEMPERATURES:
        cached = layout.decode(rows, temperature=T)
        lp, lq = F.log_softmax(online.double() / T, 1), F.log_softmax(cached.double() / T, 1)
        kl = (lp.exp() * (lp - lq)).sum(1).clamp_min(0)
        out[f"T={T:g}"] = {"mean": float(kl.mean()), "max": float(kl.max())}
    return out


def through_store(logits: torch.Tensor, layout, root: Path):
    """Stored rows after a real round trip: encode, write, commit, look up."""
    from sskt_lightning.cache.store import SoftLabelStore
    n = logits.shape[0]
    store = SoftLabelStore.create_or_open(root, {"exactness": layout.describe(), "n": n}, n, 1, layout)
    store.put(np.arange(n), np.zeros(n, np.int64), layout.encode(logits))
    store.commit()
    hit, rows = store.lookup(np.arange(n), np.zeros(n, np.int64))
    assert hit.all()
    store.close()
    return rows


def kl_part(sources: dict, images: dict, pairs: int, root: Path) -> list[dict]:
    from sskt_lightning.cache.store import Layout
    from sskt_lightning.data.augment import BatchAugment, normalize
    rows = []
    aug = BatchAugment(4, True)
    g = torch.Generator().manual_seed(0)
    for name, (source, data_key) in sources.items():
        imgs, mean, std = images[data_key]
        idx = torch.randint(0, len(imgs), (pairs,), generator=g)
        view = torch.randint(0, aug.num_views, (pairs,), generator=g)
        x = normalize(aug.apply(imgs[idx], view), mean, std)
        with torch.no_grad():
            online = torch.cat([source(x[a:a + 128]) for a in range(0, pairs, 128)]).float()
        k_classes = online.shape[1]
        layouts = [Layout("fp16", k_classes)]
        layouts += [Layout("topk", k_classes, k) for k in ((10, 50, 263) if k_classes == 1000 else (3,))]
        for layout in layouts:
            rows_stored = through_store(online, layout, root)
            entry = {"source": name, "classes": k_classes, "layout": layout.kind + (f" k={layout.k}" if layout.k else ""),
                     "bytes_per_entry": layout.bytes_per_entry, "logit_std": float(online.std(1).mean()),
                     "max_prob": float(online.softmax(1).max(1).values.mean()),
                     **kl_stats(online, rows_stored, layout)}
            rows.append(entry)
            print(f"{name:48} {entry['layout']:10} " + " | ".join(
                f"T={T:g} mean {entry[f'T={T:g}']['mean']:.1e} max {entry[f'T={T:g}']['max']:.1e}" for T in TEMPERATURES),
                flush=True)
    return rows


def losses(out: Path) -> list[float]:
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "experiments/cache/results.json")
    p.add_argument("--work", type=Path, default=None, help="run directories (default: a temp dir)")
    p.add_argument("--pairs", type=int, default=256, help="(image, view) pairs per source for the KL")
    p.add_argument("--source-epochs", type=int, default=1)
    p.add_argument("--target-epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import timm
    from two_stage import COARSE_MAP, source_overrides, sskt_overrides, target_overrides

    from sskt_lightning.compose import compose_config
    from sskt_lightning.data.specs import DATASET_STATS, IMAGENET_MEAN, IMAGENET_STD
    from sskt_lightning.data.formats import read_fashion_mnist
    from sskt_lightning.sources import FrozenSource, InputAdapter, SourceSpec, build_source
    from sskt_lightning.train import run

    work = args.work or Path(tempfile.mkdtemp(prefix="sskt_exactness_"))
    start = time.perf_counter()
    # part 2 first: it trains the Fashion-MNIST source that part 1 also measures
    ckpt = work / "source" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        run(compose_config(source_overrides(args.source_epochs, "resnet20", 0), work / "source"))
    runs = {}
    plan = [(f"{name}-seed{seed}", mode, seed) for seed in args.seeds
            for name, mode in (("off", "off"), ("cold", "read_write"), ("warm", "read_write"))
            if name != "warm" or seed == args.seeds[0]]
    for name, mode, seed in plan:
        out = work / f"target_{name}"
        r = run(compose_config([*target_overrides(args.target_epochs, "resnet20", seed, 100), *sskt_overrides(ckpt),
                                f"method.cache={mode}", f"paths.cache_dir={work / 'cache'}",
                                "trainer.log_every_n_steps=1"], out))
        runs[name] = {"test_acc": r["test_acc"], "best_val_acc": r["best_val_acc"], "losses": losses(out),
                      "cache_stats": r["method_settings"].get("cache_stats")}
        print(f"target, cache {name}: test acc {r['test_acc']:.4f}", flush=True)
    s0 = args.seeds[0]
    diff = lambda a, b: max(abs(x - y) for x, y in zip(runs[a]["losses"], runs[b]["losses"]))  # noqa: E731
    first_diff = lambda a, b: next((i for i, (x, y) in enumerate(zip(runs[a]["losses"], runs[b]["losses"]))  # noqa: E731
                                    if abs(x - y) > 1e-3 * abs(x)), None)
    acc = lambda kind: [runs[f"{kind}-seed{s}"]["test_acc"] for s in args.seeds]  # noqa: E731
    end_accuracy = {"setting": f"Fashion-MNIST 4 coarse classes, 100 labels/class, resnet20, SSKT (source: resnet20 "
                               f"trained {args.source_epochs} epoch(s) on the 10 fine classes), {args.target_epochs} "
                               f"epochs, seeds {list(args.seeds)}",
                    "test_acc_off": acc("off"), "test_acc_cached": acc("cold"),
                    "test_acc_off_mean_std": [float(np.mean(acc("off"))), float(np.std(acc("off"), ddof=1))]
                    if len(args.seeds) > 1 else None,
                    "test_acc_cached_mean_std": [float(np.mean(acc("cold"))), float(np.std(acc("cold"), ddof=1))]
                    if len(args.seeds) > 1 else None,
                    "test_acc_warm_seed0": runs[f"warm-seed{s0}"]["test_acc"],
                    "max_loss_diff_cold_vs_warm": diff(f"cold-seed{s0}", f"warm-seed{s0}"),
                    "max_loss_diff_off_vs_cached": diff(f"off-seed{s0}", f"cold-seed{s0}"),
                    "first_step_off_vs_cached_differ_by_0.1pct": first_diff(f"off-seed{s0}", f"cold-seed{s0}"),
                    "steps": len(runs[f"off-seed{s0}"]["losses"]),
                    "warm_cache_stats": runs[f"warm-seed{s0}"]["cache_stats"]}

    torch.manual_seed(0)
    cifar = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    cifar_stats = DATASET_STATS["cifar10"]
    fashion = read_fashion_mnist("data", "train", False).images
    images = {"cifar": (cifar, *cifar_stats), "fashion": (fashion, *DATASET_STATS["fashion_mnist"])}

    def resnet50(**kw):
        torch.manual_seed(0)
        net = timm.create_model("resnet50", **kw)
        return FrozenSource("s", net, InputAdapter(*cifar_stats, IMAGENET_MEAN, IMAGENET_STD, 74))

    torch.manual_seed(0)
    r20 = FrozenSource("s", timm.create_model("cifar_resnet20", num_classes=10),
                       InputAdapter(*cifar_stats, cifar_stats[0], cifar_stats[1], None))
    fashion_info = {"name": "fashion_mnist", "mean": DATASET_STATS["fashion_mnist"][0],
                    "std": DATASET_STATS["fashion_mnist"][1]}
    trained = build_source(SourceSpec(key="fashion", weights=str(ckpt), pretrained=False), fashion_info)
    sources = {"resnet50 random (timm init: flat)": (resnet50(), "cifar"),
               "resnet50 random (zero_init_last=False: large logits)": (resnet50(zero_init_last=False), "cifar"),
               "cifar_resnet20 random, 10 classes": (r20, "cifar"),
               f"fashion source trained {args.source_epochs} ep, 10 classes": (trained, "fashion")}
    kl = kl_part(sources, images, args.pairs, work / "kl_store")
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "threads": args.threads,
              "pairs": args.pairs, "kl": kl, "end_accuracy": end_accuracy,
              "seconds": round(time.perf_counter() - start, 1), "coarse_map": COARSE_MAP}
    print(json.dumps(end_accuracy, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    import warnings
    warnings.filterwarnings("ignore", message=".*RANDOM weights")
    main()
