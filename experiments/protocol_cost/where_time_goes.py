"""Where a short protocol run's wall time goes (issue #20): the benchmark's 5-labels/class Fashion-MNIST
setting (experiments/fashion_transfer/two_stage.py target_overrides: 15 epochs x 20 steps = 300
steps, validation every epoch), one run per method, each in a fresh process as the protocol starts
them, split into: interpreter + imports, config composition, run-directory start, data (build +
setup: decoding the files, the split), module (networks + source loading), trainer build, training,
validation, checkpoint writing, test, results writing, and the rest (process exit).

    python experiments/protocol_cost/where_time_goes.py [--out DIR] [--methods scratch sskt] [--epochs 15]

sskt needs a source: a scratch run of this script (its last.ckpt, a ResNet-20 on the target's data)
stands in for the stage-1 source - the cost of loading a ResNet-20 checkpoint is the same.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def child(out: Path, overrides: list[str], t_spawn: float) -> None:
    times: dict[str, float] = {}
    t = time.time()
    times["interpreter start"] = t - t_spawn
    import torch  # noqa: F401
    import lightning  # noqa: F401
    from sskt_lightning import train
    times["imports (torch, lightning, sskt_lightning.train)"] = time.time() - t
    from sskt_lightning.compose import compose_config

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.time()
            try:
                return fn(*a, **k)
            finally:
                times[name] = times.get(name, 0.0) + time.time() - t0
        return wrapper

    t = time.time()
    cfg = compose_config([*overrides, f"hydra.run.dir={out}"], out)
    times["config composition (Hydra)"] = time.time() - t
    from lightning.pytorch import Trainer
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop

    from sskt_lightning.data.datamodule import ImageDataModule
    train.start_run = timed("run-directory start", train.start_run)
    train.build_data = timed("data: build", train.build_data)
    ImageDataModule.setup = timed("data: setup (decode, split)", ImageDataModule.setup)
    train.build_module = timed("module: networks + sources", train.build_module)
    train.build_trainer = timed("trainer build", train.build_trainer)
    train.fit_and_test = timed("_fit_and_test", train.fit_and_test)
    train.build_results = timed("results: build", train.build_results)
    train.publish_results = timed("results: write", train.publish_results)
    Trainer.save_checkpoint = timed("checkpoints: write", Trainer.save_checkpoint)
    real_run = _EvaluationLoop.run

    def eval_run(self, *a, **k):
        name = "test" if self.trainer.testing else "validation"
        return timed(name, real_run)(self, *a, **k)
    _EvaluationLoop.run = eval_run
    t = time.time()
    train.run(cfg)
    times["_run total"] = time.time() - t
    # training = fit_and_test minus what ran inside it
    inside = ["validation", "test", "checkpoints: write", "data: setup (decode, split)"]
    times["training (fit minus the above)"] = times.pop("_fit_and_test") - sum(times.get(k, 0) for k in inside)
    (out / "timing.json").write_text(json.dumps({**times, "t_end": time.time()}, indent=2))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/protocol_cost_timing"))
    p.add_argument("--methods", nargs="+", default=["scratch", "sskt"])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(Path(args.child[0]), args.child[2:], float(args.child[1]))
        return
    sys.path.insert(0, str(HERE.parent / "fashion_transfer"))
    from two_stage import target_overrides
    setting = [*target_overrides(args.epochs, "resnet20", 0, 5), f"paths.data_dir={FMNIST}", "test=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    rows = {}
    for method in args.methods:
        run_dir = (args.out / method).resolve()
        extra = ["method=scratch"] if method == "scratch" else [
            "method=sskt", "source=[checkpoint]", f"source.checkpoint.weights={(args.out / 'scratch').resolve()}"
                                                  "/checkpoints/last.ckpt"]
        t0 = time.time()
        subprocess.run([sys.executable, __file__, "--child", str(run_dir), repr(t0), *setting, *extra],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        times = json.loads((run_dir / "timing.json").read_text())
        times["process exit"] = t0 + wall - times.pop("t_end")
        times.pop("_run total")
        rows[method] = (wall, times)
    lines = [f"# Where a {args.epochs * 20}-step run's wall time goes ({time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} cores, OMP_NUM_THREADS=1)", ""]
    for method, (wall, times) in rows.items():
        lines += [f"## {method}: {wall:.1f} s wall", "", "| part | s | % |", "|---|---:|---:|"]
        for k, v in sorted(times.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {k} | {v:.2f} | {100 * v / wall:.1f} |")
        lines.append(f"| (unaccounted) | {wall - sum(times.values()):.2f} | |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    (args.out / "timing.md").write_text(text)


if __name__ == "__main__":
    main()
