"""Does the ranking predict SSKT's gain? (issue #24) Nine candidate sources for the offline benchmark's
Fashion-MNIST target, their LEEP / NCE / LogME, and SSKT's seed-paired gain over scratch with each.

Target (as experiments/fashion_transfer/benchmark.py's coarse setting): the 4 coarse classes of the
SECOND half of the training images, 5 labels per class, 20 validation images per class, the
protocol's step budget (20 steps x 15 epochs of 64 labelled images, sgd_cosine), ResNet-20, the
default SSKT recipe on the labelled images (no search: the question is which source, not which
setting), seeds 0..4; scratch with the same seeds is the baseline. Every run of the table uses the
same numerics (model.ema 0.999, bf16-mixed, channels-last: the re-run's).

Candidates (all trained here from scratch on data disjoint from the target's images, except the last):
  all10        ResNet-20, the 10 fine classes of the FIRST half, 3 epochs (the benchmark's source)
  all10_weak   the same, one tenth of one epoch (weak)
  all10_strong the same, 10 epochs (strong)
  wrn_all10    WRN-16-2 (another architecture), the 10 classes, 3 epochs
  cls0_4       ResNet-20 on classes 0-4 only (T-shirt, trouser, pullover, dress, coat), 3 epochs
  cls5_9       ResNet-20 on classes 5-9 only (sandal, shirt, sneaker, bag, ankle boot), 3 epochs
  cls0_1       ResNet-20 on two classes (T-shirt, trouser), 3 epochs
  digits       ResNet-20 on scikit-learn's handwritten digits (other data: 8x8 scans, upscaled), 30 epochs
  random       ResNet-20, randomly initialised (all10's checkpoint with fresh weights)

For each candidate and seed the scores come from ``sskt_lightning.rank`` on that seed's 20 labelled
training images (never validation or test), with 1000 bootstrap resamples. The table: per
candidate its mean scores over seeds, SSKT's mean test accuracy and its paired gain over scratch
(95 % t interval); then, per score, Kendall's tau-b and Spearman's rho between the mean score and
the mean gain across candidates, with 95 % bootstrap intervals (resampling candidates, and within
each candidate its seeds: both sources of noise), and the regret of choosing the top-ranked
candidate (the best candidate's gain minus the chosen one's, with its interval).

Every run whose results.json exists is skipped (sources, targets, rankings), so it resumes across
sessions. Two single-threaded jobs at a time.

    python experiments/source_ranking/benchmark.py --plan
    python experiments/source_ranking/benchmark.py                      # about 1.5 h of compute
    python experiments/source_ranking/benchmark.py --tiny --out /tmp/rb --results /tmp/rb/results
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fashion_transfer"))
from two_stage import source_overrides, target_overrides  # noqa: E402

NUMERICS = ["model.ema=0.999", "trainer.precision=bf16-mixed", "channels_last=true"]
LABELS, VAL_PER_CLASS, STEPS, EPOCHS = 5, 20, 20, 15
SCORES = ("leep", "nce", "logme")


def candidates(tiny: bool) -> dict[str, list[str]]:
    """name -> the overrides of its source training run (``random`` and ``digits`` are special)."""
    e = 1 if tiny else 3
    limit = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=2"] if tiny else []
    fmn = lambda epochs, classes=None, model="resnet20": [*source_overrides(epochs, model, 0, classes), *limit]  # noqa: E731
    return {
        "all10": fmn(e),
        "all10_weak": [*fmn(1), "trainer.limit_train_batches=0.1", *limit],
        "all10_strong": fmn(1 if tiny else 10),
        "wrn_all10": fmn(e, model="wrn16_2"),
        "cls0_4": fmn(e, [0, 1, 2, 3, 4]),
        "cls5_9": fmn(e, [5, 6, 7, 8, 9]),
        "cls0_1": fmn(e, [0, 1]),
        "digits": ["data=imagefolder", "data.in_chans=1", "data.image_size=28", "data.augment_pad=2",
                   "data.val_size=0.1", "model=resnet20", "method=scratch", "trainer=cpu",
                   f"trainer.max_epochs={1 if tiny else 30}", "seed=0", "data.num_workers=0",
                   "trainer.enable_progress_bar=false", *limit],
        "random": [],
    }


def _done(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def train(run_dir: Path, overrides: list[str], log) -> None:
    """One ``python -m sskt_lightning.train`` run into ``run_dir`` (skipped when it finished before)."""
    if _done(run_dir):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "sskt_lightning.train", *overrides, f"hydra.run.dir={run_dir.resolve()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, check=False)
    state = "done" if proc.returncode == 0 and _done(run_dir) else f"FAILED (exit {proc.returncode})"
    log(f"  {run_dir.relative_to(run_dir.parents[1])}: {state}, {time.perf_counter() - t0:.0f} s")


def write_digits(root: Path) -> Path:
    """scikit-learn's 1797 digits as an ImageFolder tree (train/ 80 %, test/ 20 %, seeded), 8x8
    scans scaled to 0-255 and upscaled to 28 px as PNG: another data set for a source."""
    from PIL import Image
    from sklearn.datasets import load_digits
    folder = root / "digits_imagefolder"
    if (folder / "done").is_file():
        return folder
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    for rank, i in enumerate(order):
        split = "train" if rank < int(0.8 * len(order)) else "test"
        px = (d.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        out = folder / split / str(d.target[i]) / f"{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(px, mode="L").resize((28, 28), Image.BILINEAR).save(out)
    (folder / "done").write_text("ok\n")
    return folder


def make_random(src: Path, dst: Path) -> None:
    """``all10``'s checkpoint with every network weight freshly initialised (seed 0): a source of the
    same architecture, classes and input statistics that knows nothing."""
    import torch

    from sskt_lightning.nets.factory import create_network
    if (dst / "results.json").is_file():
        return
    ckpt = torch.load(src, weights_only=True)
    torch.manual_seed(0)
    net = create_network(ckpt["hyper_parameters"]["model_name"], 10, 1).state_dict()
    state = ckpt["state_dict"]
    fresh = {k: net[k[len("target.net."):]] for k in state if k.startswith("target.net.")}
    assert fresh, "no target.net.* tensors in the all10 checkpoint"
    state.update(fresh)
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst / "checkpoints" / "last.ckpt")
    (dst / "results.json").write_text(json.dumps({"status": "ok", "made_from": str(src), "reinitialised": len(fresh)}))


def target(seed: int, tiny: bool) -> list[str]:
    over = [*target_overrides(1 if tiny else EPOCHS, "resnet20", seed, LABELS, 2 if tiny else STEPS, VAL_PER_CLASS),
            *NUMERICS]
    return over + (["trainer.limit_val_batches=1", "trainer.limit_test_batches=2"] if tiny else [])


def sskt(ckpt: Path) -> list[str]:
    return ["method=sskt", "source=[checkpoint]", f"source.checkpoint.weights={ckpt.resolve()}"]


def rank_scores(ckpt: Path, seed: int, out: Path, tiny: bool, split: str = "train") -> dict:
    """The three scores (and intervals) of one candidate on seed ``seed``'s labelled training images
    (``split="val"``: its validation images) (cached)."""
    path = out / "ranking.json"
    if path.is_file():
        return json.loads(path.read_text())
    from sskt_lightning.compose import compose_config
    from sskt_lightning.rank import rank
    data = [o for o in target(seed, tiny) if o.startswith(("data", "seed"))]
    boot = 50 if tiny else 1000
    cfg = compose_config([*data, *sskt(ckpt)[1:], f"rank.bootstrap={boot}", f"rank.logme_bootstrap={boot // 10}",
                          "rank.device=cpu", f"rank.split={split}"], out, config_name="rank")
    return rank(cfg)


def _t95(n: int) -> float:
    from scipy import stats
    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def analyse(table: dict, scratch: dict, seeds: list[int], resamples: int = 10000, seed: int = 0) -> dict:
    """``table``: candidate -> {"acc": {seed: test acc}, "scores": {seed: {score: value}}};
    ``scratch``: {seed: test acc}. Gains, correlations and regret with their bootstrap intervals."""
    from scipy import stats
    names = sorted(table)
    gains = np.array([[table[c]["acc"][s] - scratch[s] for s in seeds] for c in names])          # C x S
    score = {k: np.array([[table[c]["scores"][s][k] for s in seeds] for c in names]) for k in SCORES}
    mean_gain = gains.mean(1)
    rows = []
    for i, c in enumerate(names):
        d = gains[i]
        half = _t95(len(d)) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        rows.append({"candidate": c, "test_acc": float(np.mean([table[c]["acc"][s] for s in seeds])),
                     "gain": float(d.mean()), "gain_low": float(d.mean() - half), "gain_high": float(d.mean() + half),
                     "wins": int((d > 0).sum()),
                     **{k: float(score[k][i].mean()) for k in SCORES}})
    rng = np.random.default_rng(seed)
    out = {"candidates": rows, "scratch_acc": float(np.mean([scratch[s] for s in seeds])), "seeds": seeds,
           "resamples": resamples, "correlation": {}}
    n_c, n_s = gains.shape
    best = mean_gain.max()
    for k in SCORES:
        m = score[k].mean(1)
        tau = stats.kendalltau(m, mean_gain).statistic
        rho = stats.spearmanr(m, mean_gain).statistic
        regret = float(best - mean_gain[int(np.argmax(m))])
        taus, rhos, regrets = [], [], []
        for _ in range(resamples):
            ci = rng.integers(0, n_c, n_c)                   # candidates
            si = rng.integers(0, n_s, (n_c, n_s))            # each candidate's seeds
            g = np.take_along_axis(gains[ci], si, 1).mean(1)
            sc = np.take_along_axis(score[k][ci], si, 1).mean(1)
            if np.ptp(g) == 0 or np.ptp(sc) == 0:
                continue
            taus.append(stats.kendalltau(sc, g).statistic)
            rhos.append(stats.spearmanr(sc, g).statistic)
            regrets.append(g.max() - g[int(np.argmax(sc))])
        q = lambda xs: [float(np.nanpercentile(xs, 2.5)), float(np.nanpercentile(xs, 97.5))]  # noqa: E731
        out["correlation"][k] = {"kendall_tau": float(tau), "tau_ci": q(taus), "spearman_rho": float(rho),
                                 "rho_ci": q(rhos), "top_ranked": names[int(np.argmax(m))],
                                 "regret": regret, "regret_ci": q(regrets), "valid_resamples": len(taus)}
    out["best_candidate"] = names[int(np.argmax(mean_gain))]
    return out


def report(result: dict, compute_s: float, when: str) -> str:
    """The markdown table (the scores on the labelled training images; the same correlations with
    the scores on the validation images below it)."""
    pts = lambda x: f"{100 * x:+.2f}"  # noqa: E731
    lines = [f"# Does the ranking predict SSKT's gain? ({when})", "",
             f"Fashion-MNIST, 4 coarse classes, {LABELS} labels/class, ResNet-20 target, default SSKT recipe, "
             f"seeds {result['seeds']}, {STEPS * EPOCHS} steps, {' '.join(NUMERICS)}; scratch "
             f"{100 * result['scratch_acc']:.2f} %. Scores on each seed's labelled training images, averaged "
             f"over seeds. Compute: {compute_s / 60:.0f} min (sum over runs).", "",
             "| candidate | LEEP | NCE | LogME | SSKT test acc | gain over scratch (95 % CI) | wins |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(result["candidates"], key=lambda r: -r["gain"]):
        lines.append(f"| {r['candidate']} | {r['leep']:.4f} | {r['nce']:.4f} | {r['logme']:.4f} | "
                     f"{100 * r['test_acc']:.2f} | {pts(r['gain'])} [{pts(r['gain_low'])}, {pts(r['gain_high'])}] | "
                     f"{r['wins']}/{len(result['seeds'])} |")
    lines += ["", f"Best candidate by gain: {result['best_candidate']}. Intervals: {result['resamples']} bootstrap "
              "resamples of the candidates and, within each, of its seeds.", "",
              "| score | Kendall tau (95 % CI) | Spearman rho (95 % CI) | top-ranked | regret, points (95 % CI) |",
              "|---|---:|---:|---|---:|"]
    for k, c in result["correlation"].items():
        lines.append(f"| {k.upper() if k != 'logme' else 'LogME'} | {c['kendall_tau']:+.2f} [{c['tau_ci'][0]:+.2f}, "
                     f"{c['tau_ci'][1]:+.2f}] | {c['spearman_rho']:+.2f} [{c['rho_ci'][0]:+.2f}, {c['rho_ci'][1]:+.2f}] "
                     f"| {c['top_ranked']} | {100 * c['regret']:.2f} [{100 * c['regret_ci'][0]:.2f}, "
                     f"{100 * c['regret_ci'][1]:.2f}] |")
    val = result.get("on_validation_images")
    if val:
        lines += ["", f"The same with the scores on each seed's {VAL_PER_CLASS} validation images per class "
                  "(not used by any choice above):", "", "| score | Kendall tau (95 % CI) | Spearman rho (95 % CI) "
                  "| top-ranked | regret, points (95 % CI) |", "|---|---:|---:|---|---:|"]
        for k, c in val["correlation"].items():
            lines.append(f"| {k} | {c['kendall_tau']:+.2f} [{c['tau_ci'][0]:+.2f}, {c['tau_ci'][1]:+.2f}] | "
                         f"{c['spearman_rho']:+.2f} [{c['rho_ci'][0]:+.2f}, {c['rho_ci'][1]:+.2f}] | {c['top_ranked']} | "
                         f"{100 * c['regret']:.2f} [{100 * c['regret_ci'][0]:.2f}, {100 * c['regret_ci'][1]:.2f}] |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "benchmark_runs")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a few steps everywhere: checks the pipeline, not the answer")
    p.add_argument("--plan", action="store_true", help="print what would run; run nothing")
    args = p.parse_args(argv)
    cands = candidates(args.tiny)
    src_dir, tgt_dir, rank_dir = args.out / "sources", args.out / "targets", args.out / "rankings"
    runs = [(src_dir / c, None) for c in cands] + [(tgt_dir / "scratch" / f"seed_{s}", None) for s in args.seeds] + \
        [(tgt_dir / c / f"seed_{s}", None) for c in cands for s in args.seeds]
    if args.plan:
        todo = [str(r.relative_to(args.out)) for r, _ in runs if not _done(r)]
        print(f"{len(todo)} of {len(runs)} runs to do (sources ~2-8 min, targets ~1 min each single-threaded "
              f"on this machine's Xeon with bf16): " + ", ".join(todo[:12]) + (" ..." if len(todo) > 12 else ""))
        return 0
    log = lambda line: print(line, flush=True)  # noqa: E731
    digits = write_digits(args.out)
    log(f"sources ({len(cands)})")
    jobs = []
    for c, over in cands.items():
        if c == "random":
            continue
        if c == "digits":
            over = [*over, f"paths.data_dir={digits}"]
        jobs.append((src_dir / c, over))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: train(j[0], j[1], log), jobs))
    make_random(src_dir / "all10" / "checkpoints" / "last.ckpt", src_dir / "random")
    ckpts = {c: src_dir / c / "checkpoints" / "last.ckpt" for c in cands}
    missing = [c for c, k in ckpts.items() if not k.is_file()]
    if missing:
        sys.exit(f"error: source(s) {missing} did not finish; see {src_dir}/<name>/train.log, fix, run again.")
    log("targets: scratch and SSKT with each candidate")
    jobs = [(tgt_dir / "scratch" / f"seed_{s}", [*target(s, args.tiny), "method=scratch"]) for s in args.seeds]
    jobs += [(tgt_dir / c / f"seed_{s}", [*target(s, args.tiny), *sskt(ckpts[c])]) for s in args.seeds for c in cands]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: train(j[0], j[1], log), jobs))
    failed = [str(r) for r, _ in jobs if not _done(r)]
    if failed:
        sys.exit("error: runs failed:\n  " + "\n  ".join(failed) + "\nSee their train.log; delete them and run again.")
    log("rankings")
    table, val_table, compute = {}, {}, 0.0
    for c in cands:
        table[c], val_table[c] = {"acc": {}, "scores": {}}, {"acc": {}, "scores": {}}
        for s in args.seeds:
            res = json.loads((tgt_dir / c / f"seed_{s}" / "results.json").read_text())
            table[c]["acc"][s] = val_table[c]["acc"][s] = res["test_acc"]
            compute += res["wall_time_s"]
            for split, into in (("train", table), ("val", val_table)):
                r = rank_scores(ckpts[c], s, rank_dir / c / f"seed_{s}" / split, args.tiny, split)["ranking"][0]
                into[c]["scores"][s] = {k: r[k]["value"] for k in SCORES}
    scratch = {}
    for s in args.seeds:
        res = json.loads((tgt_dir / "scratch" / f"seed_{s}" / "results.json").read_text())
        scratch[s], compute = res["test_acc"], compute + res["wall_time_s"]
    for c in cands:
        if c != "random":
            compute += json.loads((src_dir / c / "results.json").read_text()).get("wall_time_s", 0.0)
    result = analyse(table, scratch, args.seeds)
    when = time.strftime("%Y-%m-%d", time.gmtime())
    result.update({"date": when, "compute_s": compute, "table": table, "scratch": scratch,
                   "on_validation_images": analyse(val_table, scratch, args.seeds)})
    args.results.mkdir(parents=True, exist_ok=True)
    from sskt_lightning.atomic import atomic_write_text
    atomic_write_text(args.results / "ranking_benchmark.json", json.dumps(result, indent=2))
    atomic_write_text(args.results / "ranking_benchmark.md", report(result, compute, when))
    print(report(result, compute, when))
    return 0


if __name__ == "__main__":
    sys.exit(main())
