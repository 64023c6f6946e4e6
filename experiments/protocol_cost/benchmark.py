"""The protocol's cost before and after issue #20, side by side: the 5-labels/class Fashion-MNIST
protocol (experiments/fashion_transfer/benchmark.py's coarse setting: 300 steps per run, validation
every epoch) with the same methods, seeds, search seed and trial budget, run twice AT THE SAME TIME
(two protocol commands, one job slot each, so both see the same machine load all along):

  * before: ``--pruner none --launch subprocess`` (every trial to its end, a new interpreter per run);
  * after:  ``--pruner median --launch fork``     (hopeless trials stopped, runs forked from a server
            that holds the imports; sskt_lightning/pruning.py, sskt_lightning/workers.py).

Reported (``<out>/comparison.md``): compute per variant (the runs' elapsed seconds summed, search and
final, and the wall time of each variant), the pruned trials per method with the compute they did
not spend, and per method the selected trial, its validation score and the finals' test mean - the
question being whether the cheaper protocol selects configurations as good as the full one.

    python experiments/protocol_cost/benchmark.py --plan       # what would run; nothing run
    python experiments/protocol_cost/benchmark.py              # hours; resumable (finished runs are skipped)
    python experiments/protocol_cost/benchmark.py --tiny --out /tmp/pcost   # a few minutes: the machinery
    python experiments/protocol_cost/benchmark.py --precision bf16-mixed --channels-last   # about half the time
                                                   # on CPUs with AMX (both variants alike; the levers stay #20's)

The source (sskt) and KD's teachers are trained once, shared by both variants and not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fashion_transfer"))
import importlib.util  # noqa: E402

_spec = importlib.util.spec_from_file_location("fashion_benchmark", HERE.parent / "fashion_transfer" / "benchmark.py")
FB = importlib.util.module_from_spec(_spec)      # experiments/fashion_transfer/benchmark.py (same file name as this)
sys.modules["fashion_benchmark"] = FB            # (dataclasses look their module up)
_spec.loader.exec_module(FB)
from two_stage import target_overrides, train_source  # noqa: E402

import yaml  # noqa: E402

from sskt_lightning import protocol as P  # noqa: E402
from sskt_lightning.jsonfile import read_object  # noqa: E402

METHODS = ["scratch", "kd", "dml", "maxl", "sskt", "sskt_unlabeled"]
VARIANTS = {"before": {"pruner": "none", "launch": "subprocess"}, "after": {"pruner": "median", "launch": "fork"}}
FMNIST = "/usr/share/datasets/fashion-mnist"


def settings(args) -> dict:
    if args.tiny:
        return {"epochs": 3, "steps": 4, "trials": 3, "seeds": [0], "source_epochs": 1}
    return {"epochs": 15, "steps": 20, "trials": args.trials, "seeds": args.seeds, "source_epochs": 3}


def build(args) -> tuple[dict[str, P.Protocol], list[str], Path, Path]:
    s = settings(args)
    numerics, _ = FB.speed_overrides(args)      # --precision / --channels-last: both variants alike
    target = [*target_overrides(s["epochs"], "resnet20", None, 5, s["steps"], FB.VAL_PER_CLASS[5]),
              f"paths.data_dir={FMNIST}", *numerics]
    source_dir = (args.out / "source").resolve()
    teachers = (args.out / "teachers").resolve()
    ckpt = source_dir / "checkpoints" / "last.ckpt"
    protos = {}
    for name, v in VARIANTS.items():
        methods = [P.method_spec(m, FB.method_overrides(m, ckpt, teachers), space=FB.SPACES[m]) for m in args.methods]
        protos[name] = P.Protocol(out=args.out / name, setting=target, methods=methods, trials=s["trials"],
                                  seeds=s["seeds"], search_seed=100, jobs=1, threads=1, batch=1,
                                  setting_name=f"coarse, 5 labels/class, {s['epochs'] * s['steps']} steps, "
                                               f"{args.precision}{', channels-last' if args.channels_last else ''} ({name})",
                                  baseline="scratch" if "scratch" in args.methods else "", **v)
    return protos, target, source_dir, teachers


def plan(args) -> None:
    protos, *_ = build(args)
    for name, proto in protos.items():
        runs = [(m.name, ph, d) for m in proto.methods
                for ph, d in [*[("search", proto.out / m.name / "search" / f"trial_{k:03d}") for k in range(proto.trials)],
                              *[("final", proto.out / m.name / "final" / f"seed_{s}") for s in proto.seeds]]]
        done = sum(P.run_state(d) != "todo" for *_, d in runs)
        est = sum(FB.COST_S[m] for m, *_ in runs)
        print(f"{name:6s} ({VARIANTS[name]}): {len(runs)} runs ({done} on disk), about {est / 60:.0f} min of "
              f"single-thread compute without pruning{' (full-length runs: tiny runs are far shorter)' if args.tiny else ''}, "
              f"in {proto.out}")
    print(f"both variants at once, one job each (2 cores); plus the source and {len(protos['before'].seeds) + 1} "
          "KD teachers once (not counted)")


def run(args) -> None:
    protos, target, source_dir, teachers = build(args)
    s = settings(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if any(m.startswith("sskt") or m == "finetuned_source" for m in args.methods):
        train_source(source_dir, s["source_epochs"], "resnet20", seed=0)
    if "kd" in args.methods:
        FB.train_stage(target, teachers, ["method=scratch"], [100, *s["seeds"]], 2, "teacher")
    # the two variants as two protocol commands at once (one job each): separate processes, so nothing
    # (Hydra's global state, the fork server) is shared between them
    procs = {}
    for name, proto in protos.items():
        spec = {"setting": proto.setting, "methods": {m.name: {"overrides": m.overrides, "space": m.space}
                                                      for m in proto.methods}}
        spec_path = args.out / f"{name}.spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        cmd = [sys.executable, "-m", "sskt_lightning.protocol", "--out", str(proto.out), "--spec", str(spec_path),
               "--trials", str(proto.trials), "--seeds", *map(str, proto.seeds), "--search-seed", str(proto.search_seed),
               "--jobs", "1", "--threads", "1", "--batch", "1", "--setting", proto.setting_name,
               "--pruner", proto.pruner, "--launch", proto.launch, *(["--baseline", proto.baseline] if proto.baseline else [])]
        logf = open(args.out / f"{name}.log", "a")
        procs[name] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"}), time.perf_counter(), logf)
        print(f"{name}: {' '.join(cmd)}\n  log: {args.out / f'{name}.log'}", flush=True)
    walls, codes = {}, {}
    while len(codes) < len(procs):        # each variant's own wall time (the first to finish is not kept waiting)
        for name, (proc, t0, logf) in procs.items():
            if name not in codes and proc.poll() is not None:
                codes[name], walls[name] = proc.returncode, time.perf_counter() - t0
                logf.close()
        time.sleep(1)
    state = read_object(args.out / "walls.json") or {}
    for n, w in walls.items():            # wall time of every session, summed (a resumed benchmark adds to it)
        state[n] = state.get(n, 0.0) + w
    P._write(args.out / "walls.json", state)
    text = comparison(protos, state)
    (args.out / "comparison.md").write_text(text)
    print(text)
    failed = {n: c for n, c in codes.items() if c != 0}
    if failed:
        sys.exit(f"error: protocol exit codes {failed}; see {args.out}/<variant>.log")


def comparison(protos: dict[str, P.Protocol], walls: dict) -> str:
    lines = [f"# Protocol cost before / after issue #20 ({time.strftime('%Y-%m-%d')})", "",
             f"Setting: {protos['before'].setting_name.removesuffix(' (before)')}; {protos['before'].trials} trials "
             f"per method, seeds {' '.join(map(str, protos['before'].seeds))}, search seed 100.", "",
             "| variant | pruner | launch | search compute (min) | final compute (min) | wall (min) | pruned trials |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, proto in protos.items():
        c = P.compute_seconds(proto.out)
        pruned = sum(len(P.pruned_trials(proto.out / m.name)) for m in proto.methods)
        lines.append(f"| {name} | {proto.pruner} | {proto.launch} | {c['search'] / 60:.1f} | {c['final'] / 60:.1f} | "
                     f"{walls.get(name, 0) / 60:.1f} | {pruned} |")
    lines += ["", "| method | " + " | ".join(f"{n}: selected trial, val (%), test mean (%), pruned (saved min)"
                                           for n in protos) + " |", "|---|" + "---|" * len(protos)]
    for m in protos["before"].methods:
        cells = []
        for proto in protos.values():
            sel = read_object(proto.out / m.name / P.SELECTED_FILE)
            tests = [r.get("test_acc") for r in (read_object(d / "results.json") or {} for d in
                                                 sorted((proto.out / m.name / "final").glob("seed_*")))]
            tests = [t for t in tests if isinstance(t, (int, float))]
            pr = P.pruned_trials(proto.out / m.name)
            cells.append(f"{sel['trial'] if sel else '–'}, {100 * sel['value']:.2f}" if sel else "–, –")
            cells[-1] += f", {100 * statistics.mean(tests):.2f}" if tests else ", –"
            cells[-1] += f", {len(pr)} ({sum(p['saved_s'] or 0 for p in pr) / 60:.1f})"
        lines.append(f"| {m.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/protocol_cost"))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=list(FB.SPACES))
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--tiny", action="store_true", help="3 epochs x 4 steps, 3 trials, seed 0: the machinery only")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                   help="trainer.precision for every run of both variants alike (KD's teachers too)")
    p.add_argument("--channels-last", action="store_true", help="channels_last=true for every run of both variants")
    p.add_argument("--plan", action="store_true", help="print what would run; run nothing")
    args = p.parse_args(argv)
    if args.tiny and args.methods == METHODS:
        args.methods = ["scratch", "dml"]
    plan(args) if args.plan else run(args)


if __name__ == "__main__":
    main()
