"""The offline comparison on real Fashion-MNIST, with the protocol (python -m sskt_lightning.protocol):
every method on the same labels, the same unlabeled images and the same step budget, at 5 and 1
labels per class (--labels 5 1 100 adds 100), in two target settings.

Settings (--setting; ResNet-20 everywhere, the source trained from scratch on the FIRST half of the
training images, the targets from the disjoint SECOND half):
  * coarse (as `make train`): source on the 10 fine classes; targets on the 4 coarse classes (unions
    of fine ones): the target's task is built from the source's own classes (the easiest case);
  * disjoint: source on classes 0-4 (T-shirt, trouser, pullover, dress, coat); targets on classes 5-9
    (sandal, shirt, sneaker, bag, ankle boot): classes the source never saw.
For every label budget and setting, the same for every method:
  * training length: a step budget, data.steps_per_epoch=20 x 15 epochs = 300 steps of 64 labelled
    images (the labelled images cycle), optim=sgd_cosine (5 % warm-up, cosine), validation each epoch;
  * validation: data.val_per_class images per class from the second half (20 at 1 and 5 labels/class,
    100 at 100), disjoint from the labelled and unlabeled images, fixed by the seed;
  * unlabeled images (the methods that use them): the rest of the second half, the same for all;
  * search: --trials TPE trials per method on validation (last epoch's accuracy, seed 100) over its
    conf/hparams_search/<space>.yaml (SPACES below; the unlabeled stream's knobs - data.unlabeled_ratio,
    method.tau, method.lambda_u - are in the space of every method that uses it); trial 0 = the default
    recipe;
  * final: the selected configuration with seeds 0..4, tested once at the end (last epoch);
  * --ema DECAY: model.ema=DECAY for EVERY run (teachers, fine-tunes, trials, finals) alike; off by
    default; recorded in the report's header and in the output directories' names; --ema-bn recompute
    adds model.ema_bn=recompute (BatchNorm statistics recomputed for the averaged weights) to every
    run alike (directory suffix _bnrc; the recorded re-run averaged them, the default);
  * --precision bf16-mixed --channels-last: the same two numerics switches for EVERY run alike (about
    2x less compute on CPUs with AMX); recorded like --ema (directory suffix _bf16_cl);
  * report: mean ± std, seed-paired gain over scratch AND over the best other method on the same
    unlabeled images (the highest mean validation among them, never test), 95 % t intervals, wins.
Methods (the protocol's names; see method_overrides):
  scratch; kd (teacher: that seed's born-again scratch target, default recipe, trained first); dml (a
  ResNet-20 peer); maxl; sskt (the stage-1 source); sskt_unlabeled (its aux loss also on the unlabeled
  images); fixmatch (FixMatch's fixed threshold); freematch / flexmatch / softmatch (FixMatch with
  FreeMatch's, FlexMatch's, SoftMatch's pseudo-label policy: method.threshold=free|flex|soft);
  kd_unlabeled (KD on labeled + unlabeled images from that seed's FINE-TUNED SOURCE: the stage-1
  source fine-tuned on the target's labels, default recipe, trained first); dml_unlabeled (DML, both
  streams); sskt_fixmatch (sskt_unlabeled + FixMatch's pseudo-label term with the policy that won on
  validation); finetuned_source (reference row: the source network fine-tuned on the target's labels,
  searched like the others; other training data, so never "best"); linear_probe (reference, only with
  --methods: the source frozen, its classifier trained).
The policies in two steps: the searches of the four (6 trials each) first; then finals for fixmatch
(issue #18's baseline), freematch (issue #22's) and the policy with the best selected validation
score (ties: freematch, then fixmatch, flexmatch, softmatch), and sskt_fixmatch with that policy.

    python experiments/fashion_transfer/benchmark.py --plan           # what would run, how much, nothing run
    python experiments/fashion_transfer/benchmark.py --labels 5 1 --setting coarse disjoint   # resumable, hours
    python experiments/fashion_transfer/benchmark.py --labels 5 --trials 2 --seeds 0 1 --epochs 2 \\
        --out /tmp/bench --results /tmp/bench/results                 # a small check

Every run whose results.json exists is skipped (sources, teachers, fine-tunes, trials, finals), so an
interrupted benchmark resumes across sessions; a method may be added to an existing benchmark
directory (the others' runs are kept); the compute time is summed from the runs on disk.
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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from two_stage import target_overrides, train_source  # noqa: E402

from sskt_lightning import protocol as P  # noqa: E402
from sskt_lightning.jsonfile import read_object  # noqa: E402

HERE = Path(__file__).parent
VAL_PER_CLASS = {1: 20, 5: 20, 100: 100}
POLICIES = {"freematch": "free", "fixmatch": "fixed", "flexmatch": "flex", "softmatch": "soft"}  # tie order
ALWAYS_FINAL = ("fixmatch", "freematch")     # the other policies: finals only when they win on validation
METHODS = ["scratch", "kd", "dml", "maxl", "sskt", "sskt_unlabeled", "fixmatch", "freematch", "flexmatch",
           "softmatch", "kd_unlabeled", "dml_unlabeled", "sskt_fixmatch", "finetuned_source"]
OPTIONAL = ["linear_probe"]
REFERENCES = ("finetuned_source", "linear_probe")
# the search space of each method (conf/hparams_search/<space>.yaml)
SPACES = {"scratch": "scratch", "kd": "kd", "dml": "dml", "maxl": "maxl", "sskt": "sskt",
          "sskt_unlabeled": "sskt_unlabeled", **{p: "fixmatch" for p in POLICIES},
          "kd_unlabeled": "kd_unlabeled", "dml_unlabeled": "dml_unlabeled", "sskt_fixmatch": "sskt_fixmatch",
          "finetuned_source": "scratch", "linear_probe": "scratch"}
# single-thread seconds per run for --plan: the 2026-11-25 benchmark's means at 5 labels/class where
# measured (scratch ... sskt_unlabeled), else guesses from the images each step processes (marked "~")
COST_S = {"scratch": 60, "kd": 70, "dml": 123, "maxl": 309, "sskt": 93, "sskt_unlabeled": 312,
          "fixmatch": 250, "freematch": 250, "flexmatch": 250, "softmatch": 250, "kd_unlabeled": 200,
          "dml_unlabeled": 300, "sskt_fixmatch": 450, "finetuned_source": 60, "linear_probe": 40,
          "teacher": 60, "finetune": 60, "source": 150}
MEASURED = ("scratch", "kd", "dml", "maxl", "sskt", "sskt_unlabeled")


@dataclass(frozen=True)
class Setting:
    name: str
    source_classes: list[int] | None      # None: all 10
    target_classes: list[int] | None      # None: the 4 coarse classes
    source_dir: str
    suffix: str                           # of labels<N><suffix>


SETTINGS = {
    "coarse": Setting("coarse", None, None, "source", ""),
    "disjoint": Setting("disjoint", [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], "source_disjoint", "_disjoint"),
}


def method_overrides(name: str, source_ckpt: Path, teachers: Path, finetuned: Path | None = None,
                     policy: str = "free") -> list[str]:
    """The overrides of one method (``{seed}``: the run's seed). ``policy``: sskt_fixmatch's."""
    sskt = ["method=sskt", "source=[checkpoint]", f"source.checkpoint.weights={source_ckpt}"]
    unl = ["data.unlabeled=true"]
    finetuned = finetuned if finetuned is not None else teachers.parent / "finetuned"
    table = {
        "scratch": ["method=scratch"],
        "kd": ["method=kd", "source=[checkpoint]",
               f"source.checkpoint.weights={teachers}/seed_{{seed}}/checkpoints/last.ckpt"],
        "dml": ["method=dml"],
        "maxl": ["method=maxl"],
        "sskt": sskt,
        "sskt_unlabeled": [*sskt, "method.unlabeled=true", *unl],
        **{p: ["method=fixmatch", f"method.threshold={t}", *unl] for p, t in POLICIES.items()},
        "kd_unlabeled": ["method=kd", "method.unlabeled=true", *unl, "source=[checkpoint]",
                         f"source.checkpoint.weights={finetuned}/seed_{{seed}}/checkpoints/last.ckpt"],
        "dml_unlabeled": ["method=dml", "method.unlabeled=true", *unl],
        "sskt_fixmatch": [*sskt, "method.unlabeled=true", *unl, "method.consistency=fixmatch",
                          f"method.threshold={policy}"],
        "finetuned_source": ["method=scratch", f"model.weights={source_ckpt}"],
        "linear_probe": ["method=scratch", f"model.weights={source_ckpt}", "model.freeze=backbone"],
    }
    return table[name]


def missing_spaces(methods: list[str]) -> list[str]:
    """Methods whose search space file does not exist (yet), as lines naming the file."""
    search = P.config_dir() / "hparams_search"
    return [f"{m}: conf/hparams_search/{SPACES[m]}.yaml" for m in methods
            if not (search / f"{SPACES[m]}.yaml").is_file()]


def specs(methods: list[str], source_ckpt: Path, teachers: Path, finetuned: Path, policy: str,
          winner: str | None) -> list[P.MethodSpec]:
    """The protocol's methods; a policy other than fixmatch / freematch / the winner is search only."""
    out = []
    for m in methods:
        final = m not in POLICIES or m in ALWAYS_FINAL or m == winner
        out.append(P.method_spec(m, method_overrides(m, source_ckpt, teachers, finetuned, policy), space=SPACES[m],
                                 reference=m in REFERENCES, final=final))
    return out


def policy_winner(proto_out: Path, policies: list[str]) -> str | None:
    """The policy whose selected trial has the best validation score (selected.json; ties in POLICIES'
    order); None while any of ``policies`` has no selection yet (its search is not finished), so a
    half-finished search never names a winner."""
    best = None
    for name in [p for p in POLICIES if p in policies]:
        sel = read_object(proto_out / name / P.SELECTED_FILE)
        if sel is None or sel.get("value") is None:
            return None
        if best is None or sel["value"] > best[1]:
            best = (name, float(sel["value"]))
    return best[0] if best else None


def train_stage(setting: list[str], out_dir: Path, extra: list[str], seeds: list[int], jobs: int, what: str,
                log=print) -> None:
    """One default-recipe training run per seed into ``out_dir/seed_S`` (finished ones skipped): KD's
    born-again teachers (``method=scratch``) or the fine-tuned sources (``model.weights=<source>``)."""
    todo = [s for s in seeds if P.run_state(out_dir / f"seed_{s}") != "done"]

    def one(seed: int) -> None:
        out = out_dir / f"seed_{seed}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [sys.executable, "-m", "sskt_lightning.train", *setting, *extra, f"seed={seed}",
               f"hydra.run.dir={out.resolve()}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(out / "train.log", "w") as logf:
            subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, check=False)
        log(f"  {what} seed {seed}: {P.run_state(out)}")

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


def train_teachers(setting: list[str], teachers: Path, seeds: list[int], jobs: int) -> None:
    """KD's born-again teachers: scratch with the default recipe, one per seed (skipped when done)."""
    train_stage(setting, teachers, ["method=scratch"], seeds, jobs, "teacher")


@dataclass
class Cell:
    """One (setting, label budget): its directories and overrides."""
    setting: Setting
    labels: int
    root: Path            # <out>/labels<N><suffix>[_ema<d>]
    target: list[str]
    source_ckpt: Path

    @property
    def teachers(self) -> Path:
        return (self.root / "teachers").resolve()

    @property
    def finetuned(self) -> Path:
        return (self.root / "finetuned").resolve()

    @property
    def proto_out(self) -> Path:
        return self.root / "protocol"


def speed_overrides(args) -> tuple[list[str], str]:
    """(--precision / --channels-last as overrides for every run alike, their directory suffix)."""
    over, suffix = [], ""
    if args.precision != "32-true":
        over.append(f"trainer.precision={args.precision}")
        suffix += "_" + args.precision.replace("-mixed", "").replace("-true", "")
    if args.channels_last:
        over.append("channels_last=true")
        suffix += "_cl"
    return over, suffix


def recompute_bn(args) -> bool:
    """--ema-bn recompute (absent from older argument sets: the default, average)."""
    return getattr(args, "ema_bn", "average") == "recompute"


def cells(args) -> list[Cell]:
    ema = [f"model.ema={args.ema}"] if args.ema is not None else []
    recompute = recompute_bn(args)
    if recompute:
        ema.append("model.ema_bn=recompute")
    speed, speed_suffix = speed_overrides(args)
    out = []
    for name in args.setting:
        s = SETTINGS[name]
        ckpt = (args.out / s.source_dir / "checkpoints" / "last.ckpt").resolve()
        for labels in args.labels:
            target = [*target_overrides(args.epochs, args.model, None, labels, args.steps_per_epoch,
                                        VAL_PER_CLASS.get(labels, 20), s.target_classes), *ema, *speed]
            suffix = s.suffix + (f"_ema{args.ema}" if args.ema is not None else "") \
                + ("_bnrc" if recompute else "") + speed_suffix
            out.append(Cell(s, labels, args.out / f"labels{labels}{suffix}", target, ckpt))
    return out


def protocol(args, cell: Cell, methods: list[str], policy: str, winner: str | None) -> P.Protocol:
    s = cell.setting
    what = ("4 coarse classes (unions of the source's 10)" if s.target_classes is None
            else f"classes {s.target_classes} (the source saw only {s.source_classes})")
    notes = [f"Setting: {s.name}: targets on {what}; source: ResNet-20 on the first half of the training images.",
             f"EMA of the weights: {'model.ema=' + str(args.ema) if args.ema is not None else 'off'}"
             + (", model.ema_bn=recompute" if recompute_bn(args) else "")
             + ", the same for every method.",
             f"Numerics: trainer.precision={args.precision}, channels_last={str(args.channels_last).lower()}, "
             "the same for every run (teachers, fine-tunes, trials, finals)."]
    if "sskt_fixmatch" in methods:
        notes.append(f"sskt_fixmatch's pseudo-label policy: {policy} ("
                     + ("the searched policy with the best validation score)." if args.sskt_policy == "auto"
                        else "--sskt-policy)."))
    if any(m in POLICIES for m in methods):
        notes.append("FixMatch's policies: searched alike; final runs for fixmatch, freematch and the one with the "
                     f"best selected validation score ({winner or 'not known yet'}); the others: search only.")
    return P.Protocol(
        out=cell.proto_out, setting=cell.target,
        methods=specs(methods, cell.source_ckpt, cell.teachers, cell.finetuned, policy, winner),
        trials=args.trials, seeds=args.seeds, search_seed=args.search_seed, jobs=args.jobs, threads=1, batch=1,
        setting_name=f"{s.name}, {cell.labels} labels/class, {args.steps_per_epoch * args.epochs} steps"
                     + (f", EMA {args.ema}" if args.ema is not None else "")
                     + (" (BN recomputed)" if recompute_bn(args) else "")
                     + (f", {args.precision}" if args.precision != "32-true" else "")
                     + (", channels-last" if args.channels_last else ""),
        baseline="scratch" if "scratch" in methods else "", notes=notes,
        pruner=getattr(args, "pruner", "none"))   # none: the recorded benchmark (from before pruning) resumes


def fixed_policy(args, methods: list[str], cell: Cell) -> tuple[str, str | None]:
    """(sskt_fixmatch's policy, the winning policy method or None while the policies' search runs)."""
    if args.sskt_policy != "auto":
        return args.sskt_policy, None
    policies = [m for m in methods if m in POLICIES]
    if not policies:
        return "free", None
    winner = policy_winner(cell.proto_out, policies)
    return (POLICIES[winner] if winner else "free"), winner


def conflicts(cell: Cell, methods: list[str], policy: str) -> list[str]:
    """Why the protocol directory already on disk would refuse this benchmark (another setting, or a
    method's overrides changed: e.g. records made under another checkout path); [] when it resumes."""
    saved = read_object(cell.proto_out / P.PROTOCOL_FILE)
    if saved is None:
        return []
    out = [] if saved.get("setting") == cell.target else ["its setting differs"]
    for m in methods:
        old = (saved.get("methods") or {}).get(m)
        if old is not None and old.get("overrides") != method_overrides(m, cell.source_ckpt, cell.teachers,
                                                                         cell.finetuned, policy):
            out.append(f"method {m}'s overrides differ")
    return out


def plan(args, methods: list[str]) -> int:
    """Print what a run would do (runs to do / on disk per stage and method) and the compute; 0 runs nothing."""
    total_runs, total_s = 0, 0.0
    sources_seen = set()
    n_final, n_trials = len(args.seeds), args.trials
    stage_seeds = [args.search_seed, *args.seeds]
    print(f"benchmark plan: methods {' '.join(methods)}; {n_trials} trials, seeds {args.seeds}, "
          f"EMA {args.ema if args.ema is not None else 'off'}, precision {args.precision}, "
          f"channels_last {str(args.channels_last).lower()}")
    for cell in cells(args):
        lines, cell_runs, cell_s = [], 0, 0.0
        src = cell.setting.source_dir
        if src not in sources_seen:
            sources_seen.add(src)
            todo = 0 if cell.source_ckpt.is_file() else 1
            cell_runs, cell_s = cell_runs + todo, cell_s + todo * COST_S["source"]
            lines.append(f"  source ({src}): {'done' if not todo else '1 run to do'}")
        for stage, needed_by, d in (("teacher", "kd", cell.teachers), ("finetune", "kd_unlabeled", cell.finetuned)):
            if needed_by in methods:
                todo = sum(P.run_state(d / f"seed_{s}") != "done" for s in stage_seeds)
                cell_runs, cell_s = cell_runs + todo, cell_s + todo * COST_S[stage]
                lines.append(f"  {stage}s for {needed_by}: {todo} of {len(stage_seeds)} to do")
        winner = policy_winner(cell.proto_out, [m for m in methods if m in POLICIES])
        for m in methods:
            trials_done = sum(P.run_state(cell.proto_out / m / "search" / f"trial_{k:03d}") != "todo"
                              for k in range(n_trials))
            final = m not in POLICIES or m in ALWAYS_FINAL or m == winner
            pending_winner = m in POLICIES and not final and winner is None
            finals_done = sum(P.run_state(cell.proto_out / m / "final" / f"seed_{s}") != "todo" for s in args.seeds)
            finals_todo = (n_final - finals_done) if final else 0
            runs = n_trials - trials_done + finals_todo
            cost = COST_S[m]
            cell_runs, cell_s = cell_runs + runs, cell_s + runs * cost
            note = (" (+5 finals if it wins the policy selection)" if pending_winner else
                    " (search only: lost the policy selection)" if m in POLICIES and not final else "")
            lines.append(f"  {m:17s} search {n_trials - trials_done}/{n_trials} to do, finals "
                         f"{finals_todo}/{n_final if final else 0} to do{note}; "
                         f"{'' if m in MEASURED else '~'}{cost / 60:.1f} min/run")
        if any(m in POLICIES for m in methods) and winner is None:
            extra = n_final if any(m in POLICIES and m not in ALWAYS_FINAL for m in methods) else 0
            lines.append(f"  + up to {extra} finals of the winning policy (when flexmatch or softmatch wins)")
            cell_runs, cell_s = cell_runs + extra, cell_s + extra * COST_S["fixmatch"]
        print(f"\n{cell.setting.name}, {cell.labels} labels/class -> {cell.root}: {cell_runs} runs to do, "
              f"~{cell_s / 3600:.1f} h of single-thread compute")
        refused = conflicts(cell, methods, POLICIES[winner] if winner else "free")
        if refused:
            print(f"  WARNING: {cell.proto_out / P.PROTOCOL_FILE} holds another protocol ({'; '.join(refused)}): "
                  "the run would refuse it; use another --out (or fix the recorded paths)")
        print("\n".join(lines))
        total_runs, total_s = total_runs + cell_runs, total_s + cell_s
    print(f"\nin all: {total_runs} training runs to do, ~{total_s / 3600:.1f} h of single-thread compute, "
          f"~{total_s / 3600 / args.jobs:.1f} h wall with --jobs {args.jobs} on as many free cores "
          f"(min/run: the 2026-11-25 benchmark's means at 5 labels/class; '~': a guess for a method not measured)")
    absent = missing_spaces(methods)
    if absent:
        print("\nmissing search spaces (the benchmark refuses to start without them):\n  " + "\n  ".join(absent))
    return total_runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/fashion_benchmark"))
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the reports go")
    p.add_argument("--labels", type=int, nargs="+", default=[5, 1],
                   help="labels per class (default 5 1; 100 too where the compute allows: see --plan)")
    p.add_argument("--setting", nargs="+", choices=sorted(SETTINGS), default=["coarse", "disjoint"],
                   help="coarse: the target's classes are unions of the source's; disjoint: classes it never saw")
    p.add_argument("--methods", nargs="+", choices=METHODS + OPTIONAL, default=METHODS, metavar="METHOD",
                   help=f"default: {' '.join(METHODS)}; also: {' '.join(OPTIONAL)}")
    p.add_argument("--sskt-policy", choices=["auto", "fixed", "flex", "free", "soft"], default="auto",
                   help="sskt_fixmatch's pseudo-label policy (auto: the searched policy best on validation)")
    p.add_argument("--ema", type=float, default=None, help="model.ema=DECAY for every run alike (default: off)")
    p.add_argument("--ema-bn", choices=["average", "recompute"], default="average",
                   help="model.ema_bn for every run alike (default average, as the recorded re-run; needs --ema)")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"],
                   help="trainer.precision for every run alike (bf16-mixed: about 2x faster on CPUs with AMX, "
                        "e.g. Sapphire Rapids Xeons; see docs/results.md)")
    p.add_argument("--channels-last", action="store_true", help="channels_last=true for every run alike")
    p.add_argument("--trials", type=int, default=6, help="search trials per method (the same for all)")
    p.add_argument("--pruner", choices=["none", "median", "halving"], default="none",
                   help="the protocol's pruning of search trials (default none: the recorded runs predate it; "
                        "experiments/protocol_cost/benchmark.py measures what median pruning saves)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--search-seed", type=int, default=100)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--source-epochs", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--plan", action="store_true", help="print the runs it would do and their compute; run nothing")
    args = p.parse_args(argv)
    if args.ema_bn == "recompute" and args.ema is None:
        p.error("--ema-bn recompute recomputes the statistics of the weight average: add --ema DECAY")
    methods = list(dict.fromkeys(args.methods))

    if args.plan:
        plan(args, methods)
        return
    absent = missing_spaces(methods)
    if absent:
        sys.exit("error: no search space for:\n  " + "\n  ".join(absent) + "\nAdd the file(s), or leave those "
                 "methods out with --methods.")
    start = time.perf_counter()
    log = lambda line: print(line, flush=True)  # noqa: E731
    reports, incomplete = [], []
    for cell in cells(args):
        s = cell.setting
        ckpt = train_source(args.out / s.source_dir, args.source_epochs, args.model, seed=0,
                            classes=s.source_classes).resolve()      # == cell.source_ckpt
        where = f"{s.name}, labels/class {cell.labels}"
        stage_seeds = [args.search_seed, *args.seeds]
        if "kd" in methods:
            log(f"{where}: KD teachers (born-again)")
            train_stage(cell.target, cell.teachers, ["method=scratch"], stage_seeds, args.jobs, "teacher", log)
        if "kd_unlabeled" in methods:
            log(f"{where}: the source fine-tuned on the target's labels (kd_unlabeled's teachers)")
            train_stage(cell.target, cell.finetuned, ["method=scratch", f"model.weights={ckpt}"], stage_seeds,
                        args.jobs, "fine-tuned source", log)
        # step 1: everything but sskt_fixmatch (which takes the winning policy); the policies search
        first = [m for m in methods if m != "sskt_fixmatch" or args.sskt_policy != "auto"]
        policy, winner = fixed_policy(args, methods, cell)
        log(f"{where}: protocol in {cell.proto_out}")
        selected = P.run_protocol(protocol(args, cell, first, policy, winner), log=log)
        # step 2: the winning policy's finals and sskt_fixmatch with it
        policy, winner = fixed_policy(args, methods, cell)
        if set(methods) != set(first) or (winner and winner not in ALWAYS_FINAL):
            log(f"{where}: policy selected on validation: {winner} ({policy}); its finals and sskt_fixmatch")
            proto = protocol(args, cell, methods, policy, winner)
            selected = P.run_protocol(proto, log=log)
        else:
            proto = protocol(args, cell, first, policy, winner)
        incomplete += [f"{where}: {line}" for line in P.missing(proto, selected)]
        dest = args.results / cell.root.name
        shutil.copytree(cell.proto_out / "report", dest, dirs_exist_ok=True)
        reports.append((where, dest, P.compute_seconds(cell.proto_out)))
    minutes = (time.perf_counter() - start) / 60
    print(f"\nthis session: {minutes:.1f} min wall on this machine")
    for where, dest, compute in reports:
        print(f"{where}: search {compute['search'] / 60:.1f} min, final {compute['final'] / 60:.1f} "
              f"min of compute (summed over runs, all sessions); report {dest / 'report.md'}")
    if incomplete:
        sys.exit("\nerror: the benchmark is incomplete; its reports lack:\n  " + "\n  ".join(incomplete) +
                 "\nFix the cause, delete those run directories and run the same command again.")


if __name__ == "__main__":
    main()
