"""Pruning a protocol's search trial from inside its own run.

The protocol (``sskt_lightning.protocol``) writes ``prune_context.json`` into a search trial's run
directory before it starts the run: the pruner's settings and, for every trial of the method's
EARLIER rounds (all finished before this round was asked), its per-validation accuracies and its
end (complete / pruned / failed). The run gets :class:`PruneCallback`
(``+callbacks.prune._target_=sskt_lightning.pruning.PruneCallback +callbacks.prune.run_dir=DIR``):
at every validation it appends the accuracy to ``intermediate.jsonl`` and asks the pruner, on an
in-memory Optuna study that replays the earlier trials then this one's values, whether to stop.
If so it writes ``pruned.json`` and stops the fit the way early stopping does (``trainer.should_stop``):
the run ends normally (last.ckpt, results.json), and the protocol marks its results.json
``status: pruned``.

Why the decision is made in the run, from a frozen context, rather than by the protocol process
signalling a running child (or both sharing a live storage): no message crosses the process boundary
while the run trains, so nothing can be lost or arrive an epoch late; the decision depends only on
this run's own accuracies and the earlier rounds' (never on the timing of other runs), so a
resumed protocol prunes exactly the trials an uninterrupted one did; and a killed protocol leaves
nothing half-told. The protocol keeps the study itself on disk (``<method>/study.journal``, Optuna's
journal file, rebuilt from the run directories after every trial) for Optuna's tools.

Pruners (``--pruner``; ``none``, every trial to its end, is the protocol's default): ``median``
(Optuna's MedianPruner, stop a trial whose accuracy
after the warm-up is below the median of the earlier complete trials at the same validation) and
``halving`` (SuccessiveHalvingPruner, reduction factor 3, first rung after the warm-up). Both never
prune the first ``n_startup`` trials (trial 0 is the method's own recipe) nor any validation before
the warm-up. Median is the one to choose of the two because a protocol's search is small (6-8 trials per method):
successive halving's rungs rank a trial among the few that reached the same rung (with 1-2
competitors, one below-top-third result prunes), whereas the median pruner compares with every
earlier complete trial at the same epoch and has an explicit start-up count - the behaviour the
Optuna docs describe for it (``MedianPruner(n_startup_trials, n_warmup_steps)``). Optuna's own
recommendation of Hyperband for TPE assumes budgets of tens of trials per bracket.
Why pruning is off by default: measured on the 5-labels/class protocol (README, 2026-12-06), median
pruning saved 13 % of the search and pruned SSKT + unlabeled's best trial, which rises late (55 %
validation after 6 of 15 epochs, 98.75 % at the end); set ``--prune-warmup`` past a method's ramp.
"""
from __future__ import annotations

import json
from pathlib import Path

CONTEXT_FILE, VALUES_FILE, PRUNED_FILE = "prune_context.json", "intermediate.jsonl", "pruned.json"
PRUNERS = ("none", "median", "halving")


def make_pruner(kind: str, warmup: int):
    import optuna
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=warmup)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, warmup), reduction_factor=3)
    from sskt_lightning.errors import ConfigError
    raise ConfigError(f"pruner {kind!r}: choose one of {list(PRUNERS)}.")


def _values(rec: dict) -> list[tuple[int, float]]:
    return sorted((int(k), float(v)) for k, v in (rec.get("values") or {}).items())


def should_prune(context: dict, values: dict[int, float]) -> bool:
    """Would the context's pruner stop this trial after ``values`` (validation index -> accuracy)?"""
    if context.get("pruner", "none") == "none" or int(context["trial"]) < int(context["n_startup"]):
        return False
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=make_pruner(context["pruner"], int(context["warmup"])))
    for rec in context.get("earlier", []):       # replayed in trial order (successive halving's rungs)
        trial = study.ask()
        for step, v in _values(rec):
            trial.report(v, step)
            trial.should_prune()
        if rec["state"] == "complete" and rec.get("value") is not None:
            study.tell(trial, float(rec["value"]))
        elif rec["state"] == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    trial, prune = study.ask(), False
    for step, v in sorted(values.items()):
        trial.report(float(v), int(step))
        prune = trial.should_prune()
    return prune


def read_values(run_dir: Path) -> dict[int, float]:
    """The per-validation accuracies a run recorded (``intermediate.jsonl``); {} when none."""
    out = {}
    try:
        lines = (Path(run_dir) / VALUES_FILE).read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
            out[int(rec["step"])] = float(rec["val_acc"])
        except (ValueError, KeyError, TypeError):
            continue      # a line cut by a kill
    return out


try:
    from lightning.pytorch.callbacks import Callback
except ImportError:          # the protocol's own process never needs the callback
    Callback = object


class PruneCallback(Callback):
    """Records every validation's accuracy and stops the run when the protocol's pruner says so."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)
        self.context = json.loads((self.run_dir / CONTEXT_FILE).read_text())
        self.values: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        acc = trainer.callback_metrics.get("val/acc")
        if acc is None:
            return
        step = len(self.values)
        self.values[step] = float(acc)
        if trainer.is_global_zero:
            with open(self.run_dir / VALUES_FILE, "a") as f:
                f.write(json.dumps({"step": step, "epoch": int(trainer.current_epoch),
                                    "global_step": int(trainer.global_step), "val_acc": float(acc)}) + "\n")
        if should_prune(self.context, self.values):      # every rank decides alike (the same numbers)
            if trainer.is_global_zero:
                from sskt_lightning.atomic import atomic_write_text
                atomic_write_text(self.run_dir / PRUNED_FILE, json.dumps(
                    {"step": step, "epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
                     "val_acc": float(acc), "pruner": self.context["pruner"],
                     "max_epochs": trainer.max_epochs}, indent=2))
            trainer.should_stop = True
