"""`make train`: a real two-stage transfer on Fashion-MNIST, offline, on the CPU, in minutes.

1. source: a ResNet-20 trained from scratch on the 10 fine classes, first half of the training images;
2. targets: the 4 coarse classes (tops, trousers, footwear, bags: unions of fine classes) from the
   disjoint second half, 5 labels per class, a step budget (data.steps_per_epoch=20 x 15 epochs =
   300 steps of 64 labelled images, optim=sgd_cosine), 50 validation images per class; five runs:
   scratch, SSKT (the stage-1 checkpoint as its source), SSKT with the unlabeled images of the
   second half in its auxiliary loss, and two semi-supervised baselines on the same unlabeled images:
   FixMatch (method=fixmatch) and FixMatch with FreeMatch's self-adaptive threshold
   (method.threshold=free); two single-threaded runs at a time;
3. their test accuracies side by side, beside what the source itself knows of the coarse classes.

One seed, so a difference of a few points is within seed noise; the benchmark (benchmark.py) has
five seeds, a search per method and paired intervals.

    python experiments/fashion_transfer/two_stage.py [--out DIR] [--labels-per-class N] [--seed S] ...
    python experiments/fashion_transfer/two_stage.py --dry-run          # the training commands, nothing run
    python experiments/fashion_transfer/two_stage.py --rows scratch sskt  # a subset of the rows
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

# fine class -> coarse class: 0 T-shirt, 2 pullover, 3 dress, 4 coat, 6 shirt -> tops;
# 1 trouser -> trousers; 5 sandal, 7 sneaker, 9 ankle boot -> footwear; 8 bag -> bags
COARSE_MAP = [0, 1, 0, 0, 0, 2, 0, 2, 3, 2]
COARSE_NAMES = ["tops", "trousers", "footwear", "bags"]


def _ints(xs) -> str:
    return f"[{','.join(map(str, xs))}]"


def source_overrides(epochs: int, model: str, seed: int, classes: list[int] | None = None) -> list[str]:
    """Stage 1: the first half of the training images; all 10 fine classes, or only ``classes``."""
    return ["data=fashion_mnist", "data.train_part=[0,2]", "data.val_size=2000", f"model={model}",
            *([f"data.classes={_ints(classes)}"] if classes is not None else []),
            "method=scratch", "trainer=cpu", f"trainer.max_epochs={epochs}", f"seed={seed}",
            "data.num_workers=0", "trainer.enable_progress_bar=false"]


def target_overrides(epochs: int, model: str, seed: int | None, labels_per_class: int, steps_per_epoch: int = 20,
                     val_per_class: int = 50, classes: list[int] | None = None) -> list[str]:
    """The target setting: second half, N labels per class, a step budget; the 4 coarse classes
    (unions of the source's fine ones), or with ``classes`` only those original classes (numbered in
    that order: a task the source never saw when it is trained on the others)."""
    task = ([f"data.label_map={_ints(COARSE_MAP)}", f"data.class_names=[{','.join(COARSE_NAMES)}]"]
            if classes is None else [f"data.classes={_ints(classes)}"])
    return ["data=fashion_mnist", "data.train_part=[1,2]", *task, f"data.labels_per_class={labels_per_class}",
            f"data.val_per_class={val_per_class}", f"data.steps_per_epoch={steps_per_epoch}", "data.batch_size=64",
            f"model={model}", "optim=sgd_cosine", "trainer=cpu", f"trainer.max_epochs={epochs}",
            "data.num_workers=0", "trainer.enable_progress_bar=false",
            *([f"seed={seed}"] if seed is not None else [])]


def sskt_overrides(source_ckpt: Path) -> list[str]:
    return ["method=sskt", "source=[checkpoint]", f"source.checkpoint.weights={source_ckpt}"]


# the rows of `make train`: name -> the overrides after the setting (longest first: two run at a time).
# fixmatch: the semi-supervised baseline on the same unlabeled images (#18); freematch: the strongest of
# its pseudo-label policies on the standard benchmark (#22: FixMatch with FreeMatch's self-adaptive threshold)
ROWS = ("scratch", "sskt", "sskt+unlabeled", "fixmatch", "freematch")


def row_overrides(name: str, source_ckpt: Path) -> list[str]:
    unl = ["data.unlabeled=true"]
    return {"sskt+unlabeled": [*sskt_overrides(source_ckpt), "method.unlabeled=true", *unl],
            "fixmatch": ["method=fixmatch", *unl],
            "freematch": ["method=fixmatch", "method.threshold=free", *unl],
            "sskt": sskt_overrides(source_ckpt), "scratch": ["method=scratch"]}[name]


def target_jobs(args, ckpt: Path) -> list[tuple[str, list[str], str]]:
    """(row, overrides, output directory) of every target run, the unlabeled-stream ones first."""
    base = target_overrides(args.target_epochs, args.model, args.seed, args.labels_per_class, args.steps_per_epoch,
                            args.val_per_class)
    order = ["fixmatch", "freematch", "sskt+unlabeled", "sskt", "scratch"]
    return [(name, [*base, *row_overrides(name, ckpt)],
             str((args.out / f"target_{name.replace('+', '_')}").resolve())) for name in order if name in args.rows]


def train_source(out: Path, epochs: int, model: str, seed: int = 0, classes: list[int] | None = None) -> Path:
    """Stage 1 (reused when its checkpoint already exists); returns the checkpoint path."""
    from sskt_lightning.compose import compose_config
    from sskt_lightning.train import run

    ckpt = out / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        run(compose_config(source_overrides(epochs, model, seed, classes), out))
    return ckpt


def source_coarse_accuracy(ckpt: Path) -> tuple[float, float]:
    """(fine, coarse) test accuracy of the source: its fine argmax mapped to the coarse classes -
    what the source knows of the target's task."""
    import torch

    from sskt_lightning.data import ImageDataModule
    from sskt_lightning.data.augment import normalize
    from sskt_lightning.nets.factory import create_network

    state = torch.load(ckpt, weights_only=True)
    net = create_network(state["hyper_parameters"]["model_name"], 10, 1)
    net.load_state_dict({k[len("target.net."):]: v for k, v in state["state_dict"].items()
                         if k.startswith("target.net.")})
    net.eval()
    dm = ImageDataModule("fashion_mnist", state["hyper_parameters"]["config"]["data"]["data_dir"], val_size=100)
    x, y = dm.test_arrays.images, dm.test_arrays.labels
    with torch.no_grad():
        pred = torch.cat([net(normalize(x[i:i + 1000], dm.mean, dm.std)).argmax(1) for i in range(0, len(x), 1000)])
    coarse = torch.tensor(COARSE_MAP)
    return (pred == y).float().mean().item(), (coarse[pred] == coarse[y]).float().mean().item()


def _target_run(job: tuple[str, list[str], str]) -> dict:
    """One target run in a fresh single-threaded process (spawned: no state shared with the parent)."""
    import torch

    from sskt_lightning.compose import compose_config
    from sskt_lightning.train import run

    torch.set_num_threads(1)
    name, overrides, out = job
    results_file = Path(out) / "results.json"
    if results_file.is_file():
        return json.loads(results_file.read_text())
    return run(compose_config(overrides, out))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/fashion_two_stage"))
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--source-epochs", type=int, default=3)
    parser.add_argument("--labels-per-class", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--target-epochs", type=int, default=15)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="target runs at a time, one thread each")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which target runs (default all)")
    parser.add_argument("--dry-run", action="store_true", help="print the training commands and exit")
    args = parser.parse_args(argv)

    if args.dry_run:
        ckpt = (args.out / "source" / "checkpoints" / "last.ckpt").resolve()
        print("python -m sskt_lightning.train " + " ".join(source_overrides(args.source_epochs, args.model,
                                                                           args.seed)) +
              f" hydra.run.dir={(args.out / 'source').resolve()}")
        for _, overrides, out in target_jobs(args, ckpt):
            print("python -m sskt_lightning.train " + " ".join(overrides) + f" hydra.run.dir={out}")
        return {}
    start = time.perf_counter()
    ckpt = train_source(args.out / "source", args.source_epochs, args.model, args.seed).resolve()
    source = json.loads((args.out / "source" / "results.json").read_text())
    jobs = target_jobs(args, ckpt)
    with mp.get_context("spawn").Pool(args.jobs) as pool:     # longest first
        results = dict(zip([j[0] for j in jobs], pool.map(_target_run, jobs, chunksize=1)))
    fine, coarse = source_coarse_accuracy(ckpt)
    minutes = (time.perf_counter() - start) / 60

    steps = args.steps_per_epoch * args.target_epochs
    first = results[next(r for r in ROWS if r in results)]
    print(f"\nFashion-MNIST two-stage transfer ({args.model}, seed {args.seed}, {minutes:.1f} min in all)")
    print(f"source: 10 fine classes, first half of train, {args.source_epochs} epochs: test acc {100 * fine:.2f}% "
          f"(its fine predictions mapped to the 4 coarse classes: {100 * coarse:.2f}%)")
    print(f"targets: 4 coarse classes, second half, {args.labels_per_class} labels/class "
          f"({first['num_train']} images), {steps} steps of {64}, "
          f"{first['num_val']} validation images; test accuracy of the last epoch:")
    print(f"  {'method':15s} {'test acc':>9s} {'vs scratch':>10s} {'best val':>9s} {'img/s':>7s}")
    for name in (r for r in ROWS if r in results):
        r = results[name]
        gain = (f"{100 * (r['test_acc'] - results['scratch']['test_acc']):+9.2f}" if "scratch" in results
                else f"{'–':>9s}")
        print(f"  {name:15s} {100 * r['test_acc']:8.2f}% {gain} {100 * (r['best_val_acc'] or 0):8.2f}% "
              f"{r['train_images_per_s'] or 0:7.0f}")
    summary = {"source": source, "source_coarse_acc": coarse, **results, "minutes": minutes}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
