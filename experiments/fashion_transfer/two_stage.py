"""`make train`: a real two-stage transfer on Fashion-MNIST, offline, on the CPU.

1. source: trained from scratch on the 10 fine classes, first half of the training images;
2. target: the 4 coarse classes (tops, trousers, footwear, bags) from the second half, 100 labels
   per class; once with method=scratch, once with method=sskt using the stage-1 checkpoint;
3. both test accuracies side by side.

    python experiments/fashion_transfer/two_stage.py [--out DIR] [--source-epochs N] [--target-epochs N]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sskt_lightning.compose import compose_config
from sskt_lightning.train import run

# fine class -> coarse class: 0 T-shirt, 2 pullover, 3 dress, 4 coat, 6 shirt -> tops;
# 1 trouser -> trousers; 5 sandal, 7 sneaker, 9 ankle boot -> footwear; 8 bag -> bags
COARSE_MAP = [0, 1, 0, 0, 0, 2, 0, 2, 3, 2]
COARSE_NAMES = ["tops", "trousers", "footwear", "bags"]


def source_overrides(epochs: int, model: str, seed: int) -> list[str]:
    return ["data=fashion_mnist", "data.train_part=[0,2]", "data.val_size=2000", f"model={model}",
            "method=scratch", "trainer=cpu", f"trainer.max_epochs={epochs}", f"seed={seed}",
            "data.num_workers=0", "trainer.enable_progress_bar=false"]


def target_overrides(epochs: int, model: str, seed: int, labels_per_class: int) -> list[str]:
    return ["data=fashion_mnist", "data.train_part=[1,2]", f"data.label_map={COARSE_MAP}",
            f"data.class_names=[{','.join(COARSE_NAMES)}]", f"data.labels_per_class={labels_per_class}",
            "data.val_size=2000", "data.batch_size=64", f"model={model}", "trainer=cpu",
            f"trainer.max_epochs={epochs}", f"seed={seed}", "data.num_workers=0",
            "trainer.enable_progress_bar=false", "trainer.check_val_every_n_epoch=5"]


def sskt_overrides(source_ckpt: Path) -> list[str]:
    return ["method=sskt", "source=[checkpoint]", f"source.checkpoint.weights={source_ckpt}"]


def train_source(out: Path, epochs: int, model: str, seed: int = 0) -> Path:
    """Stage 1 (reused when its checkpoint already exists); returns the checkpoint path."""
    ckpt = out / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        run(compose_config(source_overrides(epochs, model, seed), out))
    return ckpt


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/fashion_two_stage"))
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--source-epochs", type=int, default=3)
    parser.add_argument("--target-epochs", type=int, default=30)
    parser.add_argument("--labels-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    ckpt = train_source(args.out / "source", args.source_epochs, args.model, args.seed)
    source = json.loads((args.out / "source" / "results.json").read_text())
    base = target_overrides(args.target_epochs, args.model, args.seed, args.labels_per_class)
    scratch = run(compose_config([*base, "method=scratch"], args.out / "target_scratch"))
    sskt = run(compose_config([*base, *sskt_overrides(ckpt)], args.out / "target_sskt"))
    minutes = (time.perf_counter() - start) / 60

    print(f"\nFashion-MNIST two-stage transfer ({args.model}, seed {args.seed}, {minutes:.1f} min in all)")
    print(f"source: 10 fine classes, first half of train, {args.source_epochs} epochs: "
          f"test acc {100 * source['test_acc']:.2f}%")
    print(f"target: 4 coarse classes, second half, {args.labels_per_class} labels/class, "
          f"{args.target_epochs} epochs (test accuracy, last epoch):")
    print(f"  {'method':8s} {'test acc':>9s} {'best val':>9s} {'img/s':>7s}")
    for r in (scratch, sskt):
        print(f"  {r['method']:8s} {100 * r['test_acc']:8.2f}% {100 * (r['best_val_acc'] or 0):8.2f}% "
              f"{r['train_images_per_s'] or 0:7.0f}")
    summary = {"source": source, "scratch": scratch, "sskt": sskt, "minutes": minutes}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
