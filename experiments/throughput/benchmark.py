"""Training throughput, side by side in one run: a bare PyTorch loop, `scratch` through the CLI, and
SSKT with 1 and 2 ResNet-50 sources online and from a warm soft-label cache; plus the cache-build
rate and after how many runs a full build pays for itself.

    python experiments/throughput/benchmark.py                  # the full measurement (see --help)
    python experiments/throughput/benchmark.py --quick          # a short smoke version

Every harness case is a real `python -m sskt_lightning.train` run (its own process, its Hydra run
directory, CSV logger, checkpoints, progress bar: the defaults) on a CIFAR-10-format dataset of
random images written to a temporary directory; sources get random weights (their cost does not
depend on the values) at the reference 74 px. The bare loop does the same work in plain PyTorch:
the same network, the same in-memory uint8 images, the same on-device augmentation and
normalisation, SGD with the same settings and schedule, the same batch size, epochs and
validation.

Measures (medians over --repeats, cases interleaved so that load changes hit all of them; each
ratio is the median of the ratios within one repeat):
  * harness vs bare loop: training+validation images/s over the whole fit (`wall_time_s` of
    results.json: `trainer.fit` only, start-up and the final test excluded) vs the bare loop's
    time for the same epochs;
  * SSKT vs scratch: steady-state training images/s (`train_images_per_s`: epochs after the
    first, validation excluded) of scratch, SSKT online (`method.cache=off`) and SSKT with a warm
    cache (`method.cache=read_write`, after one cold run with the same seed has filled exactly
    the (image, view) entries the warm run looks up);
  * compiled (`compile.target=true`: torch.compile of the target and its heads): scratch and the
    warm-cache SSKT cases again, paired with compiled scratch, and compiled vs eager scratch (the
    first epoch, which compiles, is not counted);
  * the cache build: `python -m sskt_lightning.cache build` on a few images, image-views/s.
Each figure comes twice: per wall-clock second and per CPU-second of the training process
(`cpu_meter.TimingMeter`; the bare loop times itself the same way). On a machine shared with other
work the CPU-time figures are the steadier ones; on a quiet machine the two agree (single thread).
The harness's data-loader worker processes (`data.num_workers`) are not in its CPU time; they
only index the in-memory uint8 arrays.

Threads: every process runs with --threads intra-op threads (OMP_NUM_THREADS / torch), 1 by default.
Prints a markdown table and appends the record to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------- data
def write_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random images in CIFAR-10's on-disk format (pickled batches), readable by data=cifar10."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    labels = (np.arange(n_train) % 10).tolist()
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": train[part], b"labels": [labels[j] for j in part]}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     b"labels": (np.arange(n_test) % 10).tolist()}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)


# ---------------------------------------------------------------------------------------- bare loop
def bare_loop(data_dir: str, val: int, batch: int, epochs: int, threads: int, device: str) -> dict:
    """The same work as `method=scratch` in plain PyTorch; returns the fit time (train + val)."""
    import torch
    import torch.nn.functional as F

    from sskt_lightning.data.augment import BatchAugment, normalize
    from sskt_lightning.data.specs import DATASET_STATS
    from sskt_lightning.data.formats import read_cifar10
    from sskt_lightning.nets.factory import create_network
    from sskt_lightning.optim import multistep_by_fraction

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    arrays = read_cifar10(data_dir, "train", False)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(arrays.labels), generator=g)
    val_idx, train_idx = perm[:val], perm[val:]
    x_train, y_train = arrays.images[train_idx].to(dev), arrays.labels[train_idx].to(dev)
    x_val, y_val = arrays.images[val_idx].to(dev), arrays.labels[val_idx].to(dev)
    mean, std = DATASET_STATS["cifar10"]
    augment = BatchAugment(4, True)
    net = create_network("cifar_resnet20", 10, 3).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)
    sched = multistep_by_fraction(opt, epochs)
    steps = len(x_train) // batch
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x_train), device=dev)
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            x = normalize(augment(x_train[idx]), mean, std)
            loss = F.cross_entropy(net(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        net.eval()
        correct = torch.zeros((), device=dev)
        with torch.no_grad():
            for a in range(0, len(x_val), 2 * batch):
                logits = net(normalize(x_val[a:a + 2 * batch], mean, std))
                correct += (logits.argmax(1) == y_val[a:a + 2 * batch]).sum()
        float(correct)                                   # the epoch's accuracy, on the host
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    images = (steps * batch + len(x_val)) * epochs
    return {"fit_seconds": seconds, "fit_cpu_seconds": cpu, "fit_images_per_s": images / seconds,
            "fit_images_per_cpu_s": images / cpu, "train_images": steps * batch, "val_images": len(x_val)}


# ---------------------------------------------------------------------------------------- harness
def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def run_cli(args, out: Path, overrides: list[str], env: dict) -> dict:
    out = out.with_name(slug(out.name))
    cmd = [sys.executable, "-m", "sskt_lightning.train", *overrides, f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    results["timing"] = json.loads((out / "timing.json").read_text())    # cpu_meter.TimingMeter
    return results


def source_overrides(n: int, size: int) -> list[str]:
    keys = ["imagenet_resnet50", "places365_resnet50"][:n]
    out = ["method=sskt", f"source=[{','.join(keys)}]"]
    for k in keys:
        out += [f"source.{k}.name=resnet50", f"source.{k}.pretrained=false", f"source.{k}.input_size={size}"]
    return out


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    return f"CPU ({cpu}, {os.cpu_count()} cores)"


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=6400, help="training images (scratch vs bare loop)")
    p.add_argument("--val", type=int, default=1280, help="validation images")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="epochs of the scratch vs bare-loop comparison")
    p.add_argument("--sskt-steps", type=int, default=25, help="training steps per epoch of the SSKT cases")
    p.add_argument("--sskt-epochs", type=int, default=2, help="SSKT epochs (the first is warm-up, not counted)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the cheap cases (medians)")
    p.add_argument("--online-repeats", type=int, default=1, help="repeats of the SSKT online cases")
    p.add_argument("--build-images", type=int, default=4, help="images (x 162 views) for the build rate")
    p.add_argument("--heads", nargs="+", default=["transfer_module", "linear"],
                   help="SSKT aux heads to measure (the default transfer_module first)")
    p.add_argument("--parts", nargs="+", default=["fit", "sskt", "compiled", "build"],
                   choices=["fit", "sskt", "compiled", "build"],
                   help="compiled: scratch and the warm-cache SSKT cases again with compile.target=true "
                        "(torch.compile of the target and its heads), paired with compiled scratch")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--source-size", type=int, default=74, help="source input px (reference: 74 for CIFAR)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every harness run")
    p.add_argument("--quick", action="store_true", help="a short smoke version of everything")
    p.add_argument("--keep", type=Path, default=None, help="keep the runs and data here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=REPO / "experiments/throughput/results.json")
    p.add_argument("--bare", nargs=6, metavar=("DATA", "VAL", "BATCH", "EPOCHS", "THREADS", "DEVICE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare:
        d, v, b, e, t, dev = args.bare
        print(json.dumps(bare_loop(d, int(v), int(b), int(e), int(t), dev)))
        return
    if args.quick:
        args.train, args.val, args.epochs, args.sskt_steps, args.repeats, args.build_images = 512, 128, 2, 3, 1, 1
        args.batch = min(args.batch, 64)
    load_start = load_average()
    work = args.keep or Path(tempfile.mkdtemp(prefix="sskt_throughput_"))
    data, cache = work / "data", work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    write_cifar10(data, args.train + args.val, 256)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore"}
    accel = "gpu" if args.device.startswith("cuda") else "cpu"
    common = ["data=cifar10", f"paths.data_dir={data}", f"paths.cache_dir={cache}", f"data.val_size={args.val}",
              f"data.batch_size={args.batch}", "model=resnet20", f"trainer.accelerator={accel}",
              "+callbacks.timing._target_=cpu_meter.TimingMeter", *args.extra]
    sskt_common = [f"trainer.max_epochs={args.sskt_epochs}", f"trainer.limit_train_batches={args.sskt_steps}",
                   "trainer.limit_val_batches=1"]
    sskt_cases = {}       # name -> overrides
    for head in args.heads:
        for n in (1, 2):
            src = [*source_overrides(n, args.source_size), f"method.aux_head={head}", *sskt_common]
            label = f"sskt ({head} heads), {n} ResNet-50 source{'s' * (n > 1)}"
            if head == args.heads[0]:
                sskt_cases[f"{label}, online"] = [*src, "method.cache=off"]
            sskt_cases[f"{label}, warm cache"] = [*src, "method.cache=read_write"]
    compiled_cases = {f"{name}, compiled": [*ov, "compile.target=true"]
                      for name, ov in sskt_cases.items() if name.endswith("warm cache")}
    results: dict[str, list[dict]] = {}
    t_all = time.perf_counter()

    def record(name, value):
        results.setdefault(name, []).append(value)
        print(f"  {name}: {json.dumps(value)}", flush=True)

    def steady(r: dict) -> dict:
        """A run's steady-state training speed (wall and CPU time) and its cache counts."""
        return {"train_images_per_s": r["train_images_per_s"],
                "train_images_per_cpu_s": r["timing"]["train_images_per_s_cpu"],
                "cache_stats": r["method_settings"].get("cache_stats")}

    if "sskt" in args.parts:   # cold runs fill exactly the entries the warm runs look up (same seed, same views)
        for name, ov in sskt_cases.items():
            if name.endswith("warm cache"):
                r = run_cli(args, work / "runs" / f"cold {name}", [*common, *ov], env)
                record(name.replace("warm cache", "cold cache (filling)"), steady(r))
    for rep in range(args.repeats):
        if "fit" in args.parts:
            out = subprocess.run([sys.executable, __file__, "--bare", str(data), str(args.val), str(args.batch),
                                  str(args.epochs), str(args.threads), args.device], env=env, capture_output=True,
                                 text=True, check=True)
            record("bare loop", json.loads(out.stdout.strip().splitlines()[-1]))
            r = run_cli(args, work / "runs" / f"fit {rep}", [*common, "method=scratch",
                                                            f"trainer.max_epochs={args.epochs}"], env)
            images = (r["num_train"] // args.batch * args.batch + r["num_val"]) * args.epochs
            fit = r["timing"]["fit"]
            record("scratch (CLI)", {"fit_seconds": r["wall_time_s"], "fit_images_per_s": images / r["wall_time_s"],
                                     "fit_cpu_seconds": fit["cpu"], "fit_images_per_cpu_s": images / fit["cpu"],
                                     "train_images_per_s": r["train_images_per_s"]})
        cases = {}
        if "sskt" in args.parts:
            cases["scratch"] = ["method=scratch", *sskt_common]
            cases.update((name, ov) for name, ov in sskt_cases.items()
                         if not (name.endswith("online") and rep >= args.online_repeats))
        if "compiled" in args.parts:   # the first epoch compiles (not counted: steady state only)
            cases.update({"scratch, compiled": ["method=scratch", *sskt_common, "compile.target=true"],
                          **compiled_cases})
        for name, ov in cases.items():
            record(name, steady(run_cli(args, work / "runs" / f"{name} {rep}", [*common, *ov], env)))
    if "build" in args.parts:   # the build rate: every view of a few images, one source
        build_data = work / "build_data"
        write_cifar10(build_data, args.build_images + 2, 10, seed=1)
        cmd = [sys.executable, "-m", "sskt_lightning.cache", "build", "--batch-size", "256", "data=cifar10",
               f"paths.data_dir={build_data}", f"paths.cache_dir={work / 'build_cache'}", "data.val_size=2",
               f"trainer.accelerator={accel}", *source_overrides(1, args.source_size)]
        shutil.rmtree(work / "build_cache", ignore_errors=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        match = re.search(r"= ([0-9.]+) image-views/s", proc.stdout)
        if proc.returncode or not match:
            raise SystemExit(f"build failed: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        record("cache build (1 ResNet-50)", {"image_views_per_s": float(match.group(1)),
                                             "image_views": (args.build_images + 2) * 162})

    def med(name, key):
        values = [v[key] for v in results.get(name, []) if v.get(key) is not None]
        return statistics.median(values) if values else None

    def paired(name, base, key):
        """Median over repeats of case / baseline, each pair from the same repeat (load drifts)."""
        pairs = [(v[key], b[key]) for v, b in zip(results.get(name, []), results.get(base, []))
                 if v.get(key) and b.get(key)]
        return statistics.median(a / b for a, b in pairs) if pairs else None

    rows = []      # (case, img/s wall, ratio wall, img/s cpu, ratio cpu, baseline)
    if "bare loop" in results:
        rows.append(("bare loop (fit: train + val)", med("bare loop", "fit_images_per_s"), 1.0,
                     med("bare loop", "fit_images_per_cpu_s"), 1.0, "bare loop"))
        rows.append(("scratch through the CLI (fit: train + val)", med("scratch (CLI)", "fit_images_per_s"),
                     paired("scratch (CLI)", "bare loop", "fit_images_per_s"),
                     med("scratch (CLI)", "fit_images_per_cpu_s"),
                     paired("scratch (CLI)", "bare loop", "fit_images_per_cpu_s"), "bare loop"))
    if "scratch" in results:
        rows.append(("scratch (training steps)", med("scratch", "train_images_per_s"), 1.0,
                     med("scratch", "train_images_per_cpu_s"), 1.0, "scratch"))
        for name in sskt_cases:
            for variant in (name.replace("warm cache", "cold cache (filling)"), name):
                if variant in results and variant not in [r[0] for r in rows]:
                    rows.append((variant, med(variant, "train_images_per_s"),
                                 paired(variant, "scratch", "train_images_per_s"),
                                 med(variant, "train_images_per_cpu_s"),
                                 paired(variant, "scratch", "train_images_per_cpu_s"), "scratch"))
    if "scratch, compiled" in results:
        for name in ["scratch, compiled", *compiled_cases]:
            if name in results:
                rows.append((name, med(name, "train_images_per_s"), paired(name, "scratch, compiled", "train_images_per_s"),
                             med(name, "train_images_per_cpu_s"),
                             paired(name, "scratch, compiled", "train_images_per_cpu_s"), "scratch, compiled"))
        rows.append(("scratch, compiled vs eager", med("scratch, compiled", "train_images_per_s"),
                     paired("scratch, compiled", "scratch", "train_images_per_s"),
                     med("scratch, compiled", "train_images_per_cpu_s"),
                     paired("scratch, compiled", "scratch", "train_images_per_cpu_s"), "scratch"))
    build_rate = med("cache build (1 ResNet-50)", "image_views_per_s")
    payoff = {}
    label0 = f"sskt ({args.heads[0]} heads)"
    for n in (1, 2):
        s = "s" * (n > 1)
        online = med(f"{label0}, {n} ResNet-50 source{s}, online", "train_images_per_s")
        warm = med(f"{label0}, {n} ResNet-50 source{s}, warm cache", "train_images_per_s")
        if not (online and warm and build_rate):
            continue
        # CIFAR recipe: a 50k-image training array (162 views each) built once; a run = 200 epochs x 45k
        build_s = n * 50_000 * 162 / build_rate
        payoff[n] = {"build_hours": build_s / 3600, "run_hours_online": 200 * 45_000 / online / 3600,
                     "run_hours_warm": 200 * 45_000 / warm / 3600,
                     "runs_to_pay_off": build_s / (200 * 45_000 * (1 / online - 1 / warm))}
    import torch
    dev = device_name(args.device)
    head = (f"{dev} | {args.threads} thread(s) per process | load average (1/5/15 min) at start: {load_start}, at "
            f"end: {load_average()} | resnet20 target, batch {args.batch} | sources at {args.source_size} px | "
            f"{args.repeats} repeat(s); medians, ratios paired within a repeat | {time.perf_counter() - t_all:.0f} s in all")
    print("\n" + head)
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    print("| case | images/s (wall) | ratio (wall) | images per CPU-second | ratio (CPU) | vs |\n|---|---|---|---|---|---|")
    for name, ips, ratio, cps, cratio, vs in rows:
        print(f"| {name} | {fmt(ips, '.1f')} | {fmt(ratio, '.2f')}x | {fmt(cps, '.1f')} | {fmt(cratio, '.2f')}x | {vs} |")
    if build_rate:
        print(f"| cache build, 1 ResNet-50 source | {build_rate:.1f} image-views/s | | | | |")
    for n, v in payoff.items():
        print(f"full build for {n} source(s) of a 50k-image CIFAR training array: {v['build_hours']:.1f} h; one "
              f"200-epoch run (45k images): {v['run_hours_online']:.1f} h online, {v['run_hours_warm']:.1f} h warm "
              f"-> the build pays for itself after {v['runs_to_pay_off']:.2f} runs")
    record_out = {"device": dev, "torch": torch.__version__, "threads": args.threads,
                  "load_average_start": load_start, "load_average_end": load_average(),
                  "date": time.strftime("%Y-%m-%d %H:%M"),
                  "settings": {k: str(v) for k, v in vars(args).items() if k not in ("bare",)},
                  "rows": [{"case": n, "images_per_s": i, "ratio": r, "images_per_cpu_s": c, "ratio_cpu": cr, "vs": vs}
                           for n, i, r, c, cr, vs in rows],
                  "cache_build_image_views_per_s": build_rate, "payoff": payoff, "raw": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(args.out.read_text()) if args.out.is_file() else []
    from sskt_lightning.atomic import atomic_write_text
    atomic_write_text(args.out, json.dumps([*history, record_out], indent=2))   # a crash keeps the old records
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
