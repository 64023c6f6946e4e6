"""What SSKT's own model costs: a training step of the target alone vs the target with its
auxiliary heads, in bare PyTorch (no harness, no sources, no data loading), side by side.

A warm soft-label cache removes the sources' cost; what remains of SSKT beyond scratch is the
heads it trains. This measures that floor: ResNet-20 (4 classes, 32 px, batch 64) with 0, 1 or 2
heads for 1000-class sources - the transfer module (one Conv1x1-BN-ReLU / Conv3x3-s2-BN-ReLU /
Conv1x1-BN-ReLU branch per stage, o=64, m=32) or a linear head on the pooled feature - forward,
backward and an SGD step, eager and with torch.compile (target and heads compiled in place).

    python experiments/throughput/heads.py [--repeats 7] [--steps 5] [--threads 1] [--batch 64]

Each case is timed over --steps steps, --repeats times, the cases interleaved; the ratio of a case
is the median over repeats of (scratch step time / its step time) within one repeat, against the
scratch step of the same mode (eager or compiled). Appends its record to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def build(heads: int, kind: str, compiled: bool, batch: int, source_classes: int):
    import sskt_lightning.nets  # noqa: F401  (registers the CIFAR nets)
    from sskt_lightning.heads import LinearHead, TransferModule
    from sskt_lightning.nets.factory import TappedNet, create_network

    torch.manual_seed(0)
    net = TappedNet(create_network("cifar_resnet20", 4), tap_pooled=kind == "linear",
                    tap_stages=kind == "transfer_module")
    head_list = torch.nn.ModuleList(
        TransferModule(net.stage_channels, source_classes, 64, 32) if kind == "transfer_module"
        else LinearHead(net.num_features, source_classes) for _ in range(heads))
    if compiled:
        net.compile()
        for h in head_list:
            h.compile()
    opt = torch.optim.SGD([*net.parameters(), *head_list.parameters()], lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 4, (batch,))
    soft = torch.softmax(torch.randn(batch, source_classes), 1)

    def step():
        out = net(x)
        loss = F.cross_entropy(out.logits, y)
        for h in head_list:
            loss = loss - (soft * F.log_softmax(h(out), 1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--source-classes", type=int, default=1000)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "heads_results.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = [False] if args.no_compile else [False, True]
    cases = {}
    for compiled in modes:
        for heads, kind in [(0, "none"), (1, "transfer_module"), (2, "transfer_module"), (1, "linear"), (2, "linear")]:
            name = ("scratch" if heads == 0 else f"{heads} {kind} head{'s' * (heads > 1)}") + (", compiled" * compiled)
            t = time.perf_counter()
            cases[name] = build(heads, kind, compiled, args.batch, args.source_classes)
            for _ in range(3):      # warm-up (and compilation)
                cases[name]()
            print(f"  {name}: ready in {time.perf_counter() - t:.1f} s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in cases}
    for _ in range(args.repeats):
        for name, step in cases.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t) / args.steps)
    rows = []
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"batch {args.batch}, {args.source_classes}-class sources, {args.repeats} repeats x {args.steps} steps")
    print("| case | ms/step (median) | vs scratch (same mode) |\n|---|---|---|")
    for name, ts in times.items():
        base = "scratch, compiled" if name.endswith("compiled") else "scratch"
        ratio = statistics.median(b / t for b, t in zip(times[base], ts))
        rows.append({"case": name, "ms_per_step": 1000 * statistics.median(ts), "ratio_vs_scratch": ratio})
        print(f"| {name} | {1000 * statistics.median(ts):.1f} | {ratio:.2f}x |")
    eager, comp = statistics.median(times["scratch"]), statistics.median(times.get("scratch, compiled", [float("nan")]))
    print(f"compiled vs eager scratch: {eager / comp:.2f}x")
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "settings": vars(args) | {"out": str(args.out)},
              "rows": rows}
    history = json.loads(args.out.read_text()) if args.out.is_file() else []
    from sskt_lightning.atomic import atomic_write_text
    atomic_write_text(args.out, json.dumps([*history, record], indent=2))   # a crash keeps the old records


if __name__ == "__main__":
    main()
