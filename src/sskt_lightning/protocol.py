"""The whole comparison protocol for one setting, in one resumable command.

    python -m sskt_lightning.protocol --out DIR [--spec SPEC.yaml] [--methods scratch sskt ...]
        [--trials 8] [--seeds 0 1 2 3 4] [--search-seed 100] [--jobs 2] [--threads 1]
        [--metric last_val_acc] [--setting NAME] [--pruner median|halving|none] [--prune-warmup N]
        [--launch fork|subprocess] -- <overrides of the setting ...>

Per method: a hyper-parameter search on the VALIDATION split with the same trial budget for every
method (Optuna's TPE over the search space of ``conf/hparams_search/<method>.yaml``), the best
trial's configuration re-run with every final seed (each run tests once, at its end, on its last
epoch's weights), then a report (``DIR/report/report.md``) with, per method, the selected
configuration, validation and test numbers and the seed-paired gain over the baseline method.

Layout (everything the protocol knows is on disk, so an interrupted protocol resumes where it
stopped; finished trials and runs are never repeated):

    DIR/protocol.json                       the protocol's settings (written once, checked on resume)
    DIR/<method>/search/trial_NNN/          one training run per trial (trial.json: its parameters)
    DIR/<method>/selected.json              the best trial (by --metric) and its parameters
    DIR/<method>/final/seed_S/              the selected configuration, seed S
    DIR/report/                             report.md/.csv, figures (python -m sskt_lightning.report)

Every run is ``python -m sskt_lightning.train <setting> <method overrides> <parameters> seed=S`` in
a process of its own (``--launch fork``, the default on Linux: a fork of a server that has done the
imports, sskt_lightning/workers.py; ``--launch subprocess``: a new interpreter) with ``OMP_NUM_THREADS=--threads`` (default: the cores divided by --jobs), --jobs of
them at a time (default 2: on a CPU machine two single-threaded jobs beat one two-threaded job by
far). Beside each run's results.json a ``protocol.json`` records its method name, setting, phase
(search / final), parameters and compute time; the report reads it.

The search (sskt_lightning/search.py, optuna 4): the study is rebuilt from the trials on disk each
round (``optuna.trial.create_trial``), with the sampler seeded by (method, round): the parameters of
trial k depend only on the finished trials before its round, so a resumed protocol asks exactly what
an uninterrupted one would; ``<method>/study.journal`` keeps it as an Optuna journal file. Search
trials may be pruned (``--pruner median|halving``, off by default, sskt_lightning/pruning.py): a pruned trial ends
cleanly (``pruned.json``, results.json ``status: pruned``), is never selected, and a resume knows it.
Why not Hydra's Optuna sweeper (``hparams_search=<method>``, the ``optuna-sweeper`` extra in its own
environment): it caps optuna below 3, whose SQL storage fails under SQLAlchemy 2 (an in-memory study:
an interrupted search starts again), and a sweep cannot chain search -> selection -> seeds -> report.

Method names in ``--methods`` / the spec: ``NAME`` runs ``method=NAME``; a spec maps a name to its
overrides (``sskt_unlabeled: [method=sskt, method.unlabeled=true, data.unlabeled=true, ...]``;
``{seed}`` in an override is replaced by the run's seed) and optionally its search space (``space:``,
default: ``hparams_search/<name>.yaml``, else ``hparams_search/<method>.yaml``) and flags for the
report: ``unlabeled`` (default: whether the overrides say ``data.unlabeled=true``; the report pairs each
method with the best OTHER method on the same unlabeled images, chosen on validation), ``reference``
(not a comparable method, e.g. the fine-tuned source: marked, never "best", never the baseline) and
``final: false`` (search only: the selection is made, no final seeds run). A method may join an existing
protocol directory (its identity records it); a method's overrides or search space may not change.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sskt_lightning.errors import ConfigError, SSKTError
from sskt_lightning.jsonfile import read_object as _read

PROTOCOL_FILE = "protocol.json"          # DIR/protocol.json (the protocol) and <run>/protocol.json (a run)
TRIAL_FILE, SELECTED_FILE = "trial.json", "selected.json"
DEFAULT_METRIC = "last_val_acc"
METRICS = ("last_val_acc", "best_val_acc")


# ------------------------------------------------------------------------------------------ the spec


@dataclass
class MethodSpec:
    name: str
    overrides: list[str]
    space: str            # the hparams_search config's name
    unlabeled: bool = False   # trains on the setting's unlabeled images (data.unlabeled=true): the report's
                              # "best method that uses the same unlabeled images" is chosen among these
    reference: bool = False   # not a comparable method (other training data or architecture, e.g. the
                              # fine-tuned source): shown and marked in the report, never chosen as "best"
    final: bool = True        # False: search only (selected.json, no final seeds; e.g. a policy that
                              # lost the selection on validation)


@dataclass
class Protocol:
    out: Path
    setting: list[str]                    # overrides every run shares
    methods: list[MethodSpec]
    trials: int = 8
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    search_seed: int = 100
    jobs: int = 2
    threads: int = 1
    metric: str = DEFAULT_METRIC
    sampler_seed: int = 0
    batch: int = 1                        # trials of one method asked (and run) together
    setting_name: str = ""
    baseline: str = "scratch"
    notes: list[str] = field(default_factory=list)    # lines for the report's header (e.g. EMA on/off)
    gpus_per_job: int = 0                 # >0: each run gets its own GPUs (device_slots; CUDA_VISIBLE_DEVICES)
    pruner: str = "none"                  # none | median | halving (sskt_lightning.pruning); none by default:
                                          # median pruning lost SSKT + unlabeled its best trial (a late riser)
                                          # in experiments/protocol_cost/ (README, 2026-12-06)
    prune_startup: int = 2                # trials 0 (the recipe) .. n-1 are never pruned
    prune_warmup: int | None = None       # validations never pruned (default: a third of the epochs)
    launch: str = field(default_factory=lambda: _default_launch())   # fork (a server holding the imports:
                                          # sskt_lightning.workers; where the platform has one) | subprocess

    def identity(self) -> dict:
        """What must not change when a protocol resumes (the rest - jobs, threads - may)."""
        return {"setting": self.setting, "methods": {m.name: {"overrides": m.overrides, "space": m.space}
                                                     for m in self.methods},     # (flags: report only)
                "trials": self.trials, "search_seed": self.search_seed, "metric": self.metric,
                "sampler_seed": self.sampler_seed, "batch": self.batch,
                # (a protocol from before pruning existed resumes with --pruner none)
                **({"pruner": {"kind": self.pruner, "startup": self.prune_startup, "warmup": self.prune_warmup}}
                   if self.pruner != "none" else {})}


PRUNE_CALLBACK = "sskt_lightning.pruning.PruneCallback"


def __getattr__(name: str):
    """The search (sskt_lightning.search) as before, from here: ``protocol.Search``, ``protocol.search_space``."""
    if name in ("Search", "search_space", "parse_space", "trial_state"):
        from sskt_lightning import search
        return getattr(search, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_dir() -> Path:
    from sskt_lightning.compose import CONFIG_DIR
    return Path(CONFIG_DIR)


def _space_name(name: str, overrides: list[str]) -> str:
    search = config_dir() / "hparams_search"
    if (search / f"{name}.yaml").is_file():
        return name
    method = next((o.split("=", 1)[1] for o in overrides if o.startswith("method=")), name)
    if (search / f"{method}.yaml").is_file():
        return method
    known = sorted(p.stem for p in search.glob("*.yaml"))
    raise ConfigError(f"protocol: no search space for method {name!r}: add conf/hparams_search/{name}.yaml "
                      f"(or name one with `space:` in the spec); available: {known}.")


SPEC_KEYS = ("overrides", "space", "unlabeled", "reference", "final")


def uses_unlabeled(overrides: list[str]) -> bool:
    """Do these overrides turn the unlabeled stream on (the last ``data.unlabeled=`` wins)?"""
    values = [o.split("=", 1)[1].strip().lower() for o in overrides if o.lstrip("+").startswith("data.unlabeled=")]
    return bool(values) and values[-1] in ("true", "1", "yes", "on")


def method_spec(name: str, value: Any = None, *, space: str | None = None, unlabeled: bool | None = None,
                reference: bool = False, final: bool = True) -> MethodSpec:
    """A method from the spec: ``name``, ``name: [overrides]`` or ``name: {overrides, space, unlabeled,
    reference, final}`` (keywords give the same from Python). ``unlabeled`` defaults to whether the
    overrides say ``data.unlabeled=true``; ``space`` to ``hparams_search/<name>.yaml``, else
    ``hparams_search/<method>.yaml``."""
    flags = {"space": space, "unlabeled": unlabeled, "reference": reference, "final": final}
    if value is None:
        overrides = [f"method={name}"]
    elif isinstance(value, (list, tuple)):
        overrides = [str(v) for v in value]
    elif isinstance(value, dict):
        unknown = set(value) - set(SPEC_KEYS)
        if unknown:
            raise ConfigError(f"protocol spec: method {name!r} has unknown keys {sorted(unknown)}; "
                              f"known: {', '.join(SPEC_KEYS)}.")
        overrides = [str(v) for v in value.get("overrides") or [f"method={name}"]]
        for key in ("unlabeled", "reference", "final"):
            if key in value and not isinstance(value[key], bool):
                raise ConfigError(f"protocol spec: method {name!r}: {key} must be true or false, got {value[key]!r}.")
        flags.update({k: value[k] for k in ("space", "unlabeled", "reference", "final") if value.get(k) is not None})
    else:
        raise ConfigError(f"protocol spec: method {name!r} must map to a list of overrides or "
                          f"{{overrides: [...], space: NAME, unlabeled: BOOL, reference: BOOL, final: BOOL}}, "
                          f"got {value!r}.")
    if not any(o.startswith("method=") for o in overrides):
        raise ConfigError(f"protocol spec: method {name!r} needs a method=... override among {overrides}.")
    space = flags["space"]
    if space is not None and not (config_dir() / "hparams_search" / f"{space}.yaml").is_file():
        known = sorted(p.stem for p in (config_dir() / "hparams_search").glob("*.yaml"))
        raise ConfigError(f"protocol: method {name!r} names search space {space!r}, but "
                          f"conf/hparams_search/{space}.yaml does not exist; available: {known}.")
    unl = uses_unlabeled(overrides) if flags["unlabeled"] is None else bool(flags["unlabeled"])
    return MethodSpec(name, overrides, space or _space_name(name, overrides), unlabeled=unl,
                      reference=bool(flags["reference"]), final=bool(flags["final"]))


# ------------------------------------------------------------------------------------------ runs on disk


def _write(path: Path, data: dict) -> None:
    from sskt_lightning.atomic import atomic_write_text
    atomic_write_text(path, json.dumps(data, indent=2))     # creates the directory too


def run_state(run_dir: Path) -> str:
    """``done`` (results.json, not failed), ``failed`` (failed.txt, or results.json status failed)
    or ``todo`` (nothing yet, or a run interrupted from outside - SIGTERM, Ctrl-C, e.g. by this
    protocol's own interruption: not an outcome of its configuration, so a resume runs it again)."""
    res = _read(run_dir / "results.json")
    if res is not None and str(res.get("status", "")).lower() != "failed":
        return "done"
    if res is not None and res.get("error_type") == "Interrupted":
        return "todo"
    if res is not None or (run_dir / "failed.txt").is_file():
        return "failed"
    return "todo"


def metric_value(run_dir: Path, metric: str) -> float | None:
    res = _read(run_dir / "results.json") or {}
    v = res.get(metric)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _format(overrides: list[str], seed: int) -> list[str]:
    return [o.replace("{seed}", str(seed)) for o in overrides]


def _param_overrides(params: dict) -> list[str]:
    return [f"{k}={_override_value(v)}" for k, v in params.items()]


def _override_value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if v is None:
        return "null"
    return str(v)


@dataclass
class Job:
    method: MethodSpec
    phase: str             # search | final
    run_dir: Path
    seed: int
    params: dict
    trial: int | None = None
    prune: dict | None = None    # a search trial's pruning context (prune_context.json), None: never pruned

    def command(self, proto: Protocol) -> list[str]:
        return [sys.executable, "-m", "sskt_lightning.train", *_format(proto.setting, self.seed),
                *_format(self.method.overrides, self.seed), *_param_overrides(self.params),
                f"seed={self.seed}", f"hydra.run.dir={self.run_dir.resolve()}", "trainer.enable_progress_bar=false",
                *(["test=false"] if self.phase == "search" else []),   # a search never reads the test split
                *([f"+callbacks.prune._target_={PRUNE_CALLBACK}", f"+callbacks.prune.run_dir={self.run_dir.resolve()}"]
                  if self.prune else [])]

    def sidecar(self, proto: Protocol, elapsed: float | None) -> dict:
        return {"name": self.method.name, "setting": proto.setting_name, "phase": self.phase, "trial": self.trial,
                "seed": self.seed, "params": self.params, "elapsed_s": elapsed,
                "unlabeled": self.method.unlabeled, "reference": self.method.reference}


# ------------------------------------------------------------------------------------------ the search


# ------------------------------------------------------------------------------------------ running


class Runner:
    """Keeps ``jobs`` training subprocesses busy, methods interleaved; everything resumable."""

    def __init__(self, proto: Protocol, log=print) -> None:
        self.proto, self.log = proto, log
        self.running: list[tuple[Job, subprocess.Popen, float, Any]] = []
        self.started = time.perf_counter()
        # GPU slots (issue #23): each run its own GPUs; more than the node has is refused here, before any run
        from sskt_lightning.device_slots import DeviceSlots
        self.slots = DeviceSlots(proto.gpus_per_job) if proto.gpus_per_job else None
        if self.slots is not None:
            self.slots.check_concurrency(proto.jobs, "runs at once (--jobs)")
        self.devices: dict[Path, tuple] = {}   # run dir -> its slot's devices (results.json "devices")

    def _env(self) -> dict:
        env = dict(os.environ)
        threads = str(self.proto.threads)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
                   PYTHONUNBUFFERED="1")
        return env

    def launch(self, job: Job) -> None:
        if job.run_dir.exists():               # an interrupted run: start it again, cleanly
            keep = _read(job.run_dir / TRIAL_FILE)
            shutil.rmtree(job.run_dir)
            if keep is not None:
                _write(job.run_dir / TRIAL_FILE, keep)
        job.run_dir.mkdir(parents=True, exist_ok=True)
        _write(job.run_dir / PROTOCOL_FILE, job.sidecar(self.proto, None))
        if job.prune is not None:
            from sskt_lightning.pruning import CONTEXT_FILE
            _write(job.run_dir / CONTEXT_FILE, job.prune)
        logf = open(job.run_dir / "train.log", "a")   # appending: Hydra's log handler writes into it too
        env = self._env()
        if self.slots is not None:
            self.devices[job.run_dir] = self.slots.acquire()
            env.update(self.slots.env(self.devices[job.run_dir]))
        command = job.command(self.proto)
        if self.proto.launch == "fork" and not several_processes(command):
            from sskt_lightning.workers import ForkedJob   # a fork of the server that holds the imports
            proc = ForkedJob(command[3:], env, job.run_dir / "train.log", self.proto.threads)
        else:   # (a DDP run's launcher starts its other ranks from the command line: a fresh interpreter)
            proc = subprocess.Popen(command, stdout=logf, stderr=subprocess.STDOUT, env=env)
        self.running.append((job, proc, time.perf_counter(), logf))

    def reap(self) -> list[Job]:
        done, still = [], []
        for job, proc, t0, logf in self.running:
            if proc.poll() is None:
                still.append((job, proc, t0, logf))
                continue
            logf.close()
            if job.run_dir in self.devices:
                self.slots.release(self.devices.pop(job.run_dir))
            elapsed = round(time.perf_counter() - t0, 1)
            _write(job.run_dir / PROTOCOL_FILE, job.sidecar(self.proto, elapsed))
            state = run_state(job.run_dir)
            pruned = _read(job.run_dir / "pruned.json") if state == "done" else None
            if pruned is not None:       # stopped by its pruner: a finished, shortened run, not a failure
                res = _read(job.run_dir / "results.json") or {}
                _write(job.run_dir / "results.json", {**res, "status": "pruned", "pruned": pruned})
                state = "pruned"
            if state not in ("done", "pruned") and not (job.run_dir / "failed.txt").is_file():
                tail = (job.run_dir / "train.log").read_text(errors="replace").splitlines()[-40:]
                (job.run_dir / "failed.txt").write_text(
                    f"exit code {proc.returncode}, no results.json; the log's last lines:\n" + "\n".join(tail) + "\n")
                state = "failed"
            what = f"trial {job.trial}" if job.phase == "search" else f"seed {job.seed}"
            value = metric_value(job.run_dir, self.proto.metric)
            shown = f"{self.proto.metric} {100 * value:.2f}" if value is not None else state.upper()
            if pruned is not None:
                shown = f"PRUNED at epoch {pruned['epoch'] + 1} (val_acc {100 * pruned['val_acc']:.2f})"
            self.log(f"[{(time.perf_counter() - self.started) / 60:6.1f} min] {job.method.name:16s} "
                     f"{job.phase:6s} {what:9s} {shown} ({elapsed:.0f} s)")
            done.append(job)
        self.running = still
        return done

    def busy(self, job_dir: Path) -> bool:
        return any(j.run_dir == job_dir for j, *_ in self.running)


def run_protocol(proto: Protocol, log=print) -> dict:
    """Run (or resume) the protocol; return {method: selected.json or None}, write the report."""
    proto.out.mkdir(parents=True, exist_ok=True)
    _check_identity(proto)
    from sskt_lightning.search import Search
    searches = {m.name: Search(proto, m) for m in proto.methods}
    runner = Runner(proto, log)
    selected: dict[str, dict | None] = {}
    queue: list[Job] = []
    try:
        while True:
            for name in {j.method.name for j in runner.reap() if j.phase == "search"}:
                searches[name].save_study()      # <method>/study.journal: the study on disk, as it stands
            for name, search in searches.items():
                if any(j.method.name == name for j in queue) or any(j.method.name == name and j.phase == "search"
                                                                   for j, *_ in runner.running):
                    continue     # one round at a time per method
                if name in selected:
                    continue
                jobs, finished = search.next_jobs()
                if not finished:
                    queue += [j for j in jobs if not runner.busy(j.run_dir)]
                    continue
                selected[name] = search.select()
                if selected[name] is None:
                    log(f"{name}: every search trial failed; no final runs (see {search.dir / 'search'})")
                    continue
                log(f"{name}: selected trial {selected[name]['trial']} ({proto.metric} "
                    f"{100 * selected[name]['value']:.2f}): {selected[name]['params']}")
                if not search.method.final:
                    continue     # search only: its selection is what is asked (e.g. the policy comparison)
                queue += [Job(search.method, "final", search.dir / "final" / f"seed_{s}", s, selected[name]["params"])
                          for s in proto.seeds if run_state(search.dir / "final" / f"seed_{s}") == "todo"]
            queue = _interleave(queue)
            while queue and len(runner.running) < proto.jobs:
                runner.launch(queue.pop(0))
            if not queue and not runner.running and len(selected) == len(searches):
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        for _, proc, *_ in runner.running:
            proc.terminate()
        raise
    write_protocol_report(proto, selected, log)
    return selected


def missing(proto: Protocol, selected: dict) -> list[str]:
    """What the report lacks, one line each: methods whose every search trial failed, final runs that
    failed (a failed run is kept as it is; a resume does not repeat it)."""
    lines = []
    for m in proto.methods:
        if selected.get(m.name) is None:
            lines.append(f"{m.name}: every search trial failed (their failed.txt: {proto.out / m.name / 'search'})")
            continue
        for s in (proto.seeds if m.final else []):
            run_dir = proto.out / m.name / "final" / f"seed_{s}"
            if run_state(run_dir) == "failed":
                why = (_read(run_dir / "results.json") or {}).get("error")
                if why is None and (run_dir / "failed.txt").is_file():
                    why = (run_dir / "failed.txt").read_text(errors="replace").splitlines()[0]
                lines.append(f"{m.name} seed {s}: {why or 'failed'} ({run_dir})")
    return lines


def _interleave(queue: list[Job]) -> list[Job]:
    """Final runs first (they finish methods), then round-robin over methods."""
    by_method: dict[str, list[Job]] = {}
    for job in sorted(queue, key=lambda j: j.phase != "final"):
        by_method.setdefault(job.method.name, []).append(job)
    out = []
    while any(by_method.values()):
        for jobs in by_method.values():
            if jobs:
                out.append(jobs.pop(0))
    return out


def _check_identity(proto: Protocol) -> None:
    path = proto.out / PROTOCOL_FILE
    saved = _read(path)
    ident = json.loads(json.dumps(proto.identity()))
    if saved is None and path.exists():     # never silently replaced: it is what makes a resume safe
        raise ConfigError(f"protocol: {path} is unreadable (not a JSON object), so {proto.out} cannot be checked "
                          "to hold this protocol. Restore the file, or use another --out (or delete "
                          f"{proto.out} to start this protocol afresh).")
    if saved is None:
        _write(path, {**ident, "seeds": proto.seeds, "setting_name": proto.setting_name})
        return
    differ = sorted(k for k in ident if k != "methods" and saved.get(k) != ident[k])
    saved_methods = saved.get("methods") if isinstance(saved.get("methods"), dict) else {}
    changed = sorted(n for n, m in ident["methods"].items() if n in saved_methods and saved_methods[n] != m)
    if changed:
        differ.append(f"overrides or search space of method(s) {', '.join(changed)}")
    if differ:
        hint = (" (it predates pruning: resume it with --pruner none)" if "pruner" in differ and "pruner" not in saved
                else "")
        raise ConfigError(f"protocol: {proto.out} holds a protocol with other {', '.join(differ)} "
                          f"(see {path}){hint}; resume it with the same settings or use another --out.")
    added = {n: m for n, m in ident["methods"].items() if n not in saved_methods}
    if saved.get("seeds") != proto.seeds or added:      # a method may join a protocol (e.g. after a selection)
        _write(path, {**saved, "methods": {**saved_methods, **added}, "seeds": proto.seeds})


def compute_seconds(out: Path) -> dict[str, float]:
    """Compute time spent per phase, summed over every run's protocol.json (across sessions)."""
    totals = {"search": 0.0, "final": 0.0}
    for side in out.glob("*/*/*/" + PROTOCOL_FILE):
        data = _read(side) or {}
        if data.get("elapsed_s") is not None and data.get("phase") in totals:
            totals[data["phase"]] += float(data["elapsed_s"])
    return totals


def pruned_trials(method_dir: Path) -> list[dict]:
    """The method's pruned search trials: trial, epoch stopped at, and the compute it did not spend
    (its remaining epochs at its own seconds per epoch; None where the run's length is unknown)."""
    out = []
    for d in sorted((method_dir / "search").glob("trial_*")):
        res = _read(d / "results.json") or {}
        info = _read(d / "pruned.json")
        if info is None or res.get("status") == "failed":
            continue
        ran, total = int(info.get("epoch", 0)) + 1, info.get("max_epochs")
        elapsed = (_read(d / PROTOCOL_FILE) or {}).get("elapsed_s")
        saved = (float(elapsed) * (int(total) - ran) / ran if elapsed is not None and total and int(total) > ran
                 else None)
        out.append({"trial": d.name, "epochs_run": ran, "max_epochs": total, "saved_s": saved})
    return out


def write_protocol_report(proto: Protocol, selected: dict, log=print) -> Path | None:
    """``DIR/report/``: the final runs' report (sskt_lightning.report), with the search summary appended."""
    import pandas as pd

    from sskt_lightning import report

    out = proto.out / "report"
    results = report.load_results([proto.out])
    failures = report.load_failures([proto.out])
    rows = []
    for m in proto.methods:
        sel = selected.get(m.name) or _read(proto.out / m.name / SELECTED_FILE)
        n_fail = sum(run_state(Path(d)) == "failed" for d in (proto.out / m.name / "search").glob("trial_*"))
        pruned = pruned_trials(proto.out / m.name)
        rows.append({"method": m.name + (" (reference)" if m.reference else "") +
                     ("" if m.final else " (search only)"), "search space": f"hparams_search/{m.space}.yaml",
                     "trials (failed, pruned)": f"{proto.trials} ({n_fail}, {len(pruned)})",
                     "pruning saved (est. min)": f"{sum(p['saved_s'] or 0 for p in pruned) / 60:.1f}" if pruned else "–",
                     f"selected: search {proto.metric} (%)": report._fmt(100 * sel["value"]) if sel else "–",
                     "trial": sel["trial"] if sel else "–",
                     "selected parameters": report._params_str(sel["params"]) if sel else "all trials failed"})
    compute = compute_seconds(proto.out)
    search_md = "\n".join([
        "", "## Search (validation only)", "",
        f"Every method: {proto.trials} trials of TPE on its search space, seed {proto.search_seed}, "
        f"pruner: {proto.pruner}" + (f" (never trials 0-{proto.prune_startup - 1} nor the first validations; a pruned "
                                     "trial is never selected; saved: the epochs it did not run, at its own pace)"
                                     if proto.pruner != "none" else "") + ", selected by "
        f"`{proto.metric}` (validation); the selected configuration then ran with seeds {proto.seeds}. "
        f"Compute: search {compute['search'] / 60:.1f} min, final runs {compute['final'] / 60:.1f} min "
        f"(sum over runs; {proto.jobs} at a time, {proto.threads} thread(s) each).", "",
        pd.DataFrame(rows).to_markdown(index=False), ""])
    if not results:
        report._write(out / "report.md", report._nothing_message(failures, [str(proto.out)]) + "\n" + search_md)
        log((out / "report.md").read_text())
        return None
    baseline = f"name={proto.baseline}" if proto.baseline else report.DEFAULT_BASELINE
    paths = report.write_report(results, out, baseline=baseline, failures=failures,
                                title=f"Protocol: {proto.setting_name or proto.out.name}", appendix=search_md,
                                header=proto.notes)
    log(paths["md"].read_text())
    return paths["md"]


# ------------------------------------------------------------------------------------------ CLI


def protocol_from_args(argv: list[str] | None = None) -> Protocol:
    p = argparse.ArgumentParser(prog="python -m sskt_lightning.protocol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the protocol's directory (resumes if it exists)")
    p.add_argument("--spec", type=Path, help="a YAML file: setting, methods, trials, seeds, ... (options override)")
    p.add_argument("--methods", nargs="+", help="method names (method=NAME), or names defined in the spec")
    p.add_argument("--trials", type=int, help="search trials per method, the same for every method (default 8)")
    p.add_argument("--seeds", type=int, nargs="+", help="final seeds (default 0 1 2 3 4)")
    p.add_argument("--search-seed", type=int, help="the seed of every search trial (default 100)")
    p.add_argument("--jobs", type=int, help="training runs at a time (default 2)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--gpus-per-job", type=int, help="GPUs of each run, its own (CUDA_VISIBLE_DEVICES); --jobs x this "
                                                    "must fit the node's GPUs (default 0: runs see every GPU)")
    p.add_argument("--metric", choices=METRICS, help=f"validation key of results.json to select on "
                                                     f"(default {DEFAULT_METRIC}: the last epoch's, as the test "
                                                     f"number is; best_val_acc: best over epochs)")
    p.add_argument("--batch", type=int, help="trials of one method asked and run together (default 1: methods run "
                                             "side by side; with a single method, --jobs)")
    p.add_argument("--setting", help="the setting's name in the report (default: the --out directory's name)")
    p.add_argument("--baseline", help="the method the others are paired with (default scratch, when run)")
    p.add_argument("--pruner", choices=("none", "median", "halving"),
                   help="stop hopeless search trials early (default none: every trial runs to its end; median / "
                        "halving: see sskt_lightning/pruning.py, finals are never pruned; measured in "
                        "experiments/protocol_cost/: median saved 13 %% of the search and pruned the trial "
                        "a full search selects for sskt + unlabeled, whose validation rises late)")
    p.add_argument("--prune-warmup", type=int, help="validations never pruned (default: a third of the epochs)")
    p.add_argument("--launch", choices=("fork", "subprocess"),
                   help="fork (default on Linux): every run a fresh fork of a server that has imported torch, "
                        "Lightning and this package once (sskt_lightning/workers.py); subprocess: a new "
                        "interpreter per run, as before. Both: one process per run, the same records and results")
    p.add_argument("overrides", nargs="*", help="the setting: overrides shared by every run")
    args = p.parse_args(argv)
    spec = OmegaConf.to_container(OmegaConf.load(args.spec)) if args.spec else {}
    unknown = set(spec) - {"setting", "methods", "trials", "seeds", "search_seed", "jobs", "threads", "metric",
                           "batch", "name", "baseline", "sampler_seed", "gpus_per_job", "pruner", "prune_warmup"}
    if unknown:
        raise ConfigError(f"protocol spec {args.spec}: unknown keys {sorted(unknown)}.")
    defined = spec.get("methods") or {}
    if isinstance(defined, list):
        defined = {name: None for name in defined}
    names = args.methods or list(defined) or ["scratch", "sskt"]
    methods = [method_spec(n, defined.get(n)) for n in names]
    jobs = args.jobs or int(spec.get("jobs", 2))
    metric = args.metric or spec.get("metric", DEFAULT_METRIC)
    if metric not in METRICS:
        raise ConfigError(f"protocol: metric {metric!r}; choose one of {list(METRICS)} (validation only).")
    trials = args.trials or int(spec.get("trials", 8))
    pruner = args.pruner or spec.get("pruner", "none")
    if pruner not in ("none", "median", "halving"):
        raise ConfigError(f"protocol: pruner {pruner!r}; choose none, median or halving.")
    if trials < 1 or jobs < 1:
        raise ConfigError("protocol: --trials and --jobs must be >= 1.")
    gpus_per_job = args.gpus_per_job if args.gpus_per_job is not None else int(spec.get("gpus_per_job", 0))
    if gpus_per_job:   # more GPUs than the node has: refused before protocol.json is written (Runner checks too)
        from sskt_lightning.device_slots import DeviceSlots
        DeviceSlots(gpus_per_job).check_concurrency(jobs, "runs at once (--jobs)")
    batch = args.batch or int(spec.get("batch", 0)) or (1 if len(methods) >= jobs else jobs)
    baseline = args.baseline or spec.get("baseline") or ("scratch" if "scratch" in names else "")
    return Protocol(out=args.out, setting=[*(spec.get("setting") or []), *args.overrides], methods=methods,
                    trials=trials, seeds=args.seeds or list(spec.get("seeds", [0, 1, 2, 3, 4])),
                    search_seed=args.search_seed if args.search_seed is not None else int(spec.get("search_seed", 100)),
                    jobs=jobs, threads=args.threads or int(spec.get("threads", 0)) or max(1, (os.cpu_count() or 1) // jobs),
                    metric=metric, sampler_seed=int(spec.get("sampler_seed", 0)), batch=batch,
                    setting_name=args.setting or spec.get("name") or args.out.name, baseline=baseline,
                    gpus_per_job=gpus_per_job, pruner=pruner, launch=args.launch or _default_launch(),
                    prune_warmup=args.prune_warmup if args.prune_warmup is not None else spec.get("prune_warmup"))


def _default_launch() -> str:
    from sskt_lightning.workers import default_launch
    return default_launch()


def several_processes(command: list[str]) -> bool:
    """Whether the run's composed config asks for more than one process (DDP: several devices or
    nodes, set on the command line or by any yaml the overrides compose, e.g. an experiment file).
    Those runs get their own interpreter, never a fork of the server: Lightning's launcher starts
    the other ranks by running the command line again."""
    from sskt_lightning.compose import compose_config
    from sskt_lightning.ddp_launch import several_processes as asks_for_ranks
    try:
        cfg = compose_config(command[3:], Path("."))
    except Exception:   # not a silent fallback: the run's own interpreter fails on it and records why
        return True
    return asks_for_ranks(cfg)


def main(argv: list[str] | None = None) -> int:
    try:
        proto = protocol_from_args(argv)
        start = time.perf_counter()
        selected = run_protocol(proto)
        print(f"\nprotocol: {(time.perf_counter() - start) / 60:.1f} min in this session; report in "
              f"{proto.out / 'report'}", file=sys.stderr)
    except SSKTError as err:
        print(f"\nerror: {err}\n", file=sys.stderr)
        return 2
    lacking = missing(proto, selected)
    if lacking:      # the report is written, but it is not the comparison that was asked for
        print("\nerror: the protocol is incomplete; its report lacks:\n  " + "\n  ".join(lacking) +
              "\nFix the cause, delete those run directories and run the same command again "
              "(finished runs are kept).\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
