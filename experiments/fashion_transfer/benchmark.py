"""The offline comparison on real Fashion-MNIST, with the protocol (python -m sskt_lightning.protocol):
scratch, KD, DML, MAXL, SSKT and SSKT with unlabeled images at 1, 5 and 100 labels per class.

Setting (as `make train`): a ResNet-20 source trained from scratch on the 10 fine classes with the
first half of the training images; ResNet-20 targets on the 4 coarse classes (unions of fine ones)
from the disjoint second half. For every label budget, the same for every method:
  * training length: a step budget, data.steps_per_epoch=20 x 15 epochs = 300 steps of 64 labelled
    images (the labelled images cycle), optim=sgd_cosine (5 % warm-up, cosine), validation each epoch;
  * validation: data.val_per_class images per class from the second half (20 at 1 and 5 labels/class,
    100 at 100), disjoint from the labelled and unlabeled images, fixed by the seed;
  * search: --trials TPE trials per method on validation (last epoch's accuracy, seed 100), over
    conf/hparams_search/<method>.yaml (lr, weight decay; + alpha, T for KD; kl_warmup for DML; psi,
    generator lr for MAXL; alpha, T, aux loss (+ unlabeled ratio) for SSKT); trial 0 = the default recipe;
  * final: the selected configuration with seeds 0..4, tested once at the end (last epoch);
  * report: mean ± std, seed-paired gain over scratch with its 95 % t interval and wins.
Methods: scratch; kd (teacher: that seed's born-again scratch target, default recipe, trained first);
dml (target + a ResNet-20 peer, sequential); maxl; sskt (transfer module, the stage-1 source);
sskt_unlabeled (sskt, the aux loss also on the second half's unlabeled images).

    python experiments/fashion_transfer/benchmark.py                  # everything, resumable (hours on 2 cores)
    python experiments/fashion_transfer/benchmark.py --labels 5 --trials 2 --seeds 0 1 --epochs 2 \\
        --out /tmp/bench --results /tmp/bench/results                 # a small check

Every run whose results.json exists is skipped (source, teachers, trials, finals), so an interrupted
benchmark resumes across sessions; the compute time is summed from the runs on disk.
Two single-threaded jobs at a time (--jobs 2, OMP_NUM_THREADS=1 each): on 2 CPU cores this is far
faster than one job with two threads.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from two_stage import target_overrides, train_source  # noqa: E402

from sskt_lightning import protocol as P  # noqa: E402

HERE = Path(__file__).parent
METHODS = ["scratch", "kd", "dml", "maxl", "sskt", "sskt_unlabeled"]
VAL_PER_CLASS = {1: 20, 5: 20, 100: 100}


def method_overrides(name: str, source_ckpt: Path, teachers: Path) -> list[str]:
    sskt = ["method=sskt", "source=[checkpoint]", f"source.checkpoint.weights={source_ckpt}"]
    return {
        "scratch": ["method=scratch"],
        "kd": ["method=kd", "source=[checkpoint]",
               f"source.checkpoint.weights={teachers}/seed_{{seed}}/checkpoints/last.ckpt"],
        "dml": ["method=dml"],
        "maxl": ["method=maxl"],
        "sskt": sskt,
        "sskt_unlabeled": [*sskt, "method.unlabeled=true", "data.unlabeled=true"],
    }[name]


def train_teachers(setting: list[str], teachers: Path, seeds: list[int], jobs: int) -> None:
    """KD's born-again teachers: scratch with the default recipe, one per seed (skipped when done)."""
    todo = [s for s in seeds if P.run_state(teachers / f"seed_{s}") != "done"]

    def one(seed: int) -> None:
        out = teachers / f"seed_{seed}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [sys.executable, "-m", "sskt_lightning.train", *setting, "method=scratch", f"seed={seed}",
               f"hydra.run.dir={out.resolve()}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(out / "train.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        print(f"  teacher seed {seed}: {P.run_state(out)}", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/fashion_benchmark"))
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the reports go")
    p.add_argument("--labels", type=int, nargs="+", default=[5, 100, 1])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--trials", type=int, default=6, help="search trials per method (the same for all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--search-seed", type=int, default=100)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--source-epochs", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--model", default="resnet20")
    args = p.parse_args(argv)

    start = time.perf_counter()
    source_ckpt = train_source(args.out / "source", args.source_epochs, args.model, seed=0).resolve()
    reports, incomplete = [], []
    for labels in args.labels:
        setting = [*target_overrides(args.epochs, args.model, None, labels, args.steps_per_epoch,
                                     VAL_PER_CLASS.get(labels, 20))]
        teachers = (args.out / f"labels{labels}" / "teachers").resolve()
        if "kd" in args.methods:
            print(f"labels/class {labels}: KD teachers", flush=True)
            train_teachers(setting, teachers, [args.search_seed, *args.seeds], args.jobs)
        proto = P.Protocol(
            out=args.out / f"labels{labels}" / "protocol", setting=setting,
            methods=[P.method_spec(m, method_overrides(m, source_ckpt, teachers)) for m in args.methods],
            trials=args.trials, seeds=args.seeds, search_seed=args.search_seed, jobs=args.jobs, threads=1,
            batch=1, setting_name=f"{labels} labels/class, {args.steps_per_epoch * args.epochs} steps",
            baseline="scratch" if "scratch" in args.methods else "")
        print(f"labels/class {labels}: protocol in {proto.out}", flush=True)
        selected = P.run_protocol(proto, log=lambda line: print(line, flush=True))
        incomplete += [f"labels/class {labels}: {line}" for line in P.missing(proto, selected)]
        dest = args.results / f"labels{labels}"
        shutil.copytree(proto.out / "report", dest, dirs_exist_ok=True)
        compute = P.compute_seconds(proto.out)
        reports.append((labels, dest, compute))
    minutes = (time.perf_counter() - start) / 60
    print(f"\nthis session: {minutes:.1f} min wall on this machine")
    for labels, dest, compute in reports:
        print(f"labels/class {labels}: search {compute['search'] / 60:.1f} min, final {compute['final'] / 60:.1f} "
              f"min of compute (summed over runs, all sessions); report {dest / 'report.md'}")
    if incomplete:
        sys.exit("\nerror: the benchmark is incomplete; its reports lack:\n  " + "\n  ".join(incomplete) +
                 "\nFix the cause, delete those run directories and run the same command again.")


if __name__ == "__main__":
    main()
