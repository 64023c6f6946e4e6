"""The offline comparison on real Fashion-MNIST: scratch, KD, DML, MAXL, SSKT and SSKT with
unlabeled images, at 5 and 100 labels per class, 3 seeds each, one recipe.

Setting (as `make train`): a source trained from scratch on the 10 fine classes from the first half
of the training images; targets on the 4 coarse classes from the second half.
  * scratch: the target alone;
  * kd:      teacher = that seed's scratch target (a net trained on the target's own labeled images);
  * dml:     the target plus one ResNet-20 peer, sequential updates;
  * maxl:    psi = 5 auxiliary classes per coarse class, second-order meta step, per-step alternation;
  * sskt:    the stage-1 source, transfer-module head, CE aux loss, T = 3, alpha = 0.1;
  * sskt+unlabeled: as sskt, the aux loss also on the second half's unlabeled images (ratio 1).
Every method: the same net (ResNet-20), optimizer (SGD 0.1, wd 5e-4, decay x0.2 at 30/60/80 %),
batch 64, augmentation and epochs (60 at 5 labels/class, 20 at 100: one and seven steps per epoch). Reported: last-epoch test accuracy on the 10k test images.

    python experiments/fashion_transfer/benchmark.py            # full: writes results/ beside this file
    python experiments/fashion_transfer/benchmark.py --epochs 5:2 --seeds 0 --labels 5 --out /tmp/b  # smoke

Runs whose results.json exists are skipped, so an interrupted benchmark resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from two_stage import sskt_overrides, target_overrides, train_source  # noqa: E402

from sskt_lightning.compose import compose_config  # noqa: E402
from sskt_lightning.report import load_results, summarise, to_markdown, write_report  # noqa: E402
from sskt_lightning.train import run  # noqa: E402

HERE = Path(__file__).parent


def method_overrides(method: str, out: Path, seed_dir: Path, source_ckpt: Path) -> list[str]:
    if method == "scratch":
        return ["method=scratch"]
    if method == "kd":
        teacher = seed_dir / "scratch" / "checkpoints" / "last.ckpt"
        return ["method=kd", "source=[checkpoint]", f"source.checkpoint.weights={teacher}"]
    if method == "dml":
        return ["method=dml"]
    if method == "maxl":
        return ["method=maxl"]
    if method == "sskt":
        return sskt_overrides(source_ckpt)
    if method == "sskt_unlabeled":
        return [*sskt_overrides(source_ckpt), "method.unlabeled=true", "data.unlabeled=true",
                "data.unlabeled_ratio=1.0"]
    raise ValueError(method)


METHODS = ["scratch", "kd", "dml", "maxl", "sskt", "sskt_unlabeled"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/fashion_benchmark"))
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the table and plots go")
    p.add_argument("--epochs", nargs="+", default=["5:60", "100:20"],
                   help="target epochs per labels-per-class setting, LABELS:EPOCHS (the same for every "
                        "method; fewer labels -> fewer steps per epoch -> more epochs)")
    p.add_argument("--source-epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--labels", type=int, nargs="+", default=[5, 100])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--model", default="resnet20")
    args = p.parse_args(argv)

    epochs = dict(tuple(int(v) for v in e.split(":")) for e in args.epochs)
    start = time.perf_counter()
    source_ckpt = train_source(args.out / "source", args.source_epochs, args.model, seed=0)
    for labels in args.labels:
        for seed in args.seeds:
            seed_dir = args.out / f"labels{labels}" / f"seed{seed}"
            for method in args.methods:
                out = seed_dir / method
                if (out / "results.json").is_file():
                    continue
                t0 = time.perf_counter()
                base = target_overrides(epochs[labels], args.model, seed, labels)
                results = run(compose_config([*base, *method_overrides(method, out, seed_dir, source_ckpt)], out))
                if method == "sskt_unlabeled":  # its own row in the table
                    results["method"] = "sskt+unlabeled"
                    results["group"] = results["group"].replace("method=sskt", "method=sskt+unlabeled")
                results["labels_per_class"] = labels
                results["group"] = f"labels/class={labels:>3} " + results["group"]
                (out / "results.json").write_text(json.dumps(results, indent=2))
                print(f"[{(time.perf_counter() - start) / 60:5.1f} min] labels {labels} seed {seed} {method}: "
                      f"test {100 * results['test_acc']:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
    minutes = (time.perf_counter() - start) / 60

    args.results.mkdir(parents=True, exist_ok=True)
    results = [r for r in load_results([args.out]) if "labels_per_class" in r]
    for r in results:  # the label budget as part of the data column of the table
        r["data"] = f"{r['data']} ({r['labels_per_class']} labels/class)"
    paths = write_report(results, args.results)
    rows = summarise(results)
    note = (f"\nFashion-MNIST 4 coarse classes, {args.model}, target epochs per labels/class {epochs}, source "
            f"{args.source_epochs} epochs, seeds {args.seeds}; {minutes:.1f} min on this machine.\n")
    (args.results / "README.md").write_text(note + "\n" + to_markdown(rows, title="Fashion-MNIST transfer benchmark"))
    print(to_markdown(rows, title="Fashion-MNIST transfer benchmark") + note)
    return paths


if __name__ == "__main__":
    main()
