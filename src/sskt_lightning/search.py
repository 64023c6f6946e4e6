"""The protocol's hyper-parameter search (``python -m sskt_lightning.protocol``): the search space
of ``conf/hparams_search/<space>.yaml`` as Optuna (4.x) distributions, the trials asked round by
round from a study rebuilt from the run directories, pruning (:mod:`sskt_lightning.pruning`), the
selection, and the study kept on disk (``<method>/study.journal``, Optuna's journal file).

The space is read from ``hydra.sweeper.params`` with Hydra's own override parser and the same
mapping hydra-optuna-sweeper uses (``interval`` -> float/int, ``tag(log, interval)`` -> log,
``choice`` -> categorical, ``range`` -> int/float with step), so the protocol searches exactly what
``hparams_search=<space>`` (Hydra's sweeper, the ``optuna-sweeper`` extra) searches, without
importing the sweeper (which caps optuna below 3).
"""
from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

from omegaconf import OmegaConf

from sskt_lightning.errors import ConfigError
from sskt_lightning.protocol import (SELECTED_FILE, TRIAL_FILE, Job, MethodSpec, Protocol, _format, _read, _write,
                                     config_dir, metric_value, run_state)
from sskt_lightning.pruning import PRUNED_FILE, read_values

STUDY_FILE = "study.journal"


def _optuna():
    try:
        import optuna
    except ImportError as err:
        raise ConfigError("protocol: the search needs optuna 4: pip install 'sskt_lightning[sweep]'.") from err
    if int(optuna.__version__.split(".")[0]) < 4:
        raise ConfigError(f"protocol: the search needs optuna >= 4 (found {optuna.__version__}; hydra-optuna-sweeper "
                          "caps it below 3: keep that in its own environment, the optuna-sweeper extra); "
                          "pip install 'sskt_lightning[sweep]'.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def parse_space(params: dict) -> tuple[dict, dict]:
    """(distributions, fixed values) of ``hydra.sweeper.params`` entries (``{key: sweep string}``)."""
    optuna = _optuna()
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Transformer
    D = optuna.distributions
    dists, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed[key] = override.value()
            continue
        value = override.value()
        if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
            dists[key] = D.CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
        elif override.is_range_sweep():      # as hydra-optuna-sweeper: high = stop
            if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
                dists[key] = D.FloatDistribution(value.start, value.stop, step=value.step)
            else:
                dists[key] = D.IntDistribution(int(value.start), int(value.stop), step=int(value.step))
        elif override.is_interval_sweep():
            log = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                dists[key] = D.IntDistribution(value.start, value.end, log=log)
            else:
                dists[key] = D.FloatDistribution(float(value.start), float(value.end), log=log)
        else:
            raise ConfigError(f"protocol: search parameter {key}={params[key]!r} is not an interval, range or "
                              "choice sweep.")
    return dists, fixed


def search_space(space: str) -> tuple[dict, dict, dict]:
    """(distributions, fixed values, sampler settings) of ``conf/hparams_search/<space>.yaml``."""
    path = config_dir() / "hparams_search" / f"{space}.yaml"
    if not path.is_file():
        raise ConfigError(f"protocol: search space {path} not found.")
    sweeper = OmegaConf.load(path).get("hydra", {}).get("sweeper", {})
    params = OmegaConf.to_container(sweeper.get("params") or {})
    if not params:
        raise ConfigError(f"protocol: {path} defines no hydra.sweeper.params.")
    dists, fixed = parse_space(params)
    sampler = OmegaConf.to_container(sweeper.get("sampler") or {})
    return dists, fixed, sampler


def trial_state(run_dir: Path) -> str:
    """``complete`` | ``pruned`` | ``failed`` | ``todo`` (see :func:`sskt_lightning.protocol.run_state`;
    a run that stopped on its pruner's word has ``pruned.json``)."""
    state = run_state(run_dir)
    if state == "done":
        return "pruned" if (run_dir / PRUNED_FILE).is_file() else "complete"
    return state


class Search:
    """One method's search: trials asked round by round from a study rebuilt from disk."""

    def __init__(self, proto: Protocol, method: MethodSpec) -> None:
        self.proto, self.method = proto, method
        self.dir = proto.out / method.name
        self.dists, self.fixed, sampler = search_space(method.space)
        self.n_startup = int(sampler.get("n_startup_trials", max(1, proto.trials // 3)))
        self.defaults, self.max_epochs = self._defaults()

    def _defaults(self) -> tuple[dict, int | None]:
        """The method's configured values of the searched keys (trial 0 tries them where they lie in
        the space, so the search never misses the recipe it starts from), and trainer.max_epochs."""
        from sskt_lightning.compose import compose_config
        cfg = compose_config([*self.proto.setting, *_format(self.method.overrides, self.proto.search_seed)],
                             self.proto.out / ".compose")
        out = {}
        for key, dist in self.dists.items():
            value = OmegaConf.select(cfg, key, default=None)
            try:
                if value is not None and dist._contains(dist.to_internal_repr(value)):
                    out[key] = value
            except (ValueError, TypeError):
                pass
        epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
        return out, (int(epochs) if epochs not in (None, -1) else None)

    def trial_dir(self, k: int) -> Path:
        return self.dir / "search" / f"trial_{k:03d}"

    def trials_on_disk(self) -> dict[int, dict]:
        out = {}
        for k in range(self.proto.trials):
            t = _read(self.trial_dir(k) / TRIAL_FILE)
            if t is not None:
                out[k] = t["params"]
        return out

    def record(self, k: int) -> dict:
        """Trial k as the study knows it: its end, final value, per-validation accuracies."""
        d = self.trial_dir(k)
        state = trial_state(d)
        value = metric_value(d, self.proto.metric) if state == "complete" else None
        if state == "complete" and value is None:
            state = "failed"
        return {"trial": k, "state": state, "value": value, "values": read_values(d)}

    def _study(self, finished: dict[int, dict], seed: int, storage=None):
        optuna = _optuna()
        S = optuna.trial.TrialState
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup)
        study = optuna.create_study(direction="maximize", sampler=sampler, storage=storage,
                                    study_name=self.method.name)
        for k in sorted(finished):
            params, rec = finished[k]["params"], finished[k]
            state = {"complete": S.COMPLETE, "pruned": S.PRUNED}.get(rec["state"], S.FAIL)
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions=self.dists, value=rec["value"] if state == S.COMPLETE else None,
                state=state, intermediate_values=rec["values"], user_attrs={"trial": k}))
        return study

    def _finished(self, before: int) -> dict[int, dict]:
        return {k: {**self.record(k), "params": p} for k, p in self.trials_on_disk().items()
                if k < before and trial_state(self.trial_dir(k)) != "todo"}

    def ask_round(self, r: int) -> None:
        """Write trial.json for every trial of round ``r`` that has none (deterministic)."""
        b = self.proto.batch
        numbers = [k for k in range(r * b, min((r + 1) * b, self.proto.trials))]
        if all((self.trial_dir(k) / TRIAL_FILE).is_file() for k in numbers):
            return
        seed = (self.proto.sampler_seed * 1_000_003 + zlib.crc32(self.method.name.encode()) + r) % 2**31
        study = self._study(self._finished(r * b), seed)
        for k in numbers:
            trial = study.ask(self.dists)
            params = dict(trial.params)
            if k == 0:
                params.update(self.defaults)
            params = {key: params[key] for key in self.dists}       # the space's order
            path = self.trial_dir(k) / TRIAL_FILE
            if not path.is_file():
                _write(path, {"trial": k, "params": params, "fixed": self.fixed, "round": r})

    def prune_context(self, k: int) -> dict:
        """What trial k's run needs to decide on pruning (written as its prune_context.json): the
        pruner and the trials of the earlier rounds, which all ended before k's round was asked."""
        return {"trial": k, "pruner": self.proto.pruner, "n_startup": self.proto.prune_startup,
                "warmup": self.warmup(), "metric": self.proto.metric,
                "earlier": [self.record(j) for j in sorted(self.trials_on_disk())
                            if j < (k // self.proto.batch) * self.proto.batch]}

    def warmup(self) -> int:
        """Validations never pruned: --prune-warmup, else a third of the epochs (at least 1)."""
        if self.proto.prune_warmup is not None:
            return int(self.proto.prune_warmup)
        return max(1, (self.max_epochs or 3) // 3)

    def next_jobs(self) -> tuple[list[Job], bool]:
        """(jobs to run now, finished?): the unfinished trials of the first incomplete round."""
        b = self.proto.batch
        for r in range(math.ceil(self.proto.trials / b)):
            numbers = range(r * b, min((r + 1) * b, self.proto.trials))
            self.ask_round(r)
            todo = [k for k in numbers if run_state(self.trial_dir(k)) == "todo"]
            if todo:
                params = self.trials_on_disk()
                return [Job(self.method, "search", self.trial_dir(k), self.proto.search_seed,
                            {**self.fixed, **params[k]}, trial=k,
                            prune=self.prune_context(k) if self.proto.pruner != "none" else None)
                        for k in todo], False
        return [], True

    def select(self) -> dict | None:
        """The best complete trial by the protocol's metric (ties: the earlier trial), or None. A
        pruned trial's numbers are those of a shortened run: never selected."""
        scored = []
        for k, params in sorted(self.trials_on_disk().items()):
            v = metric_value(self.trial_dir(k), self.proto.metric)
            if v is not None and trial_state(self.trial_dir(k)) == "complete":
                scored.append((v, -k, k, params))
        if not scored:
            return None
        value, _, k, params = max(scored)
        selected = {"method": self.method.name, "metric": self.proto.metric, "value": value, "trial": k,
                    "params": {**self.fixed, **params}, "trials": len(self.trials_on_disk()),
                    "trials_ok": len(scored), "trials_pruned": self.count("pruned")}
        _write(self.dir / SELECTED_FILE, selected)
        return selected

    def count(self, state: str) -> int:
        return sum(trial_state(self.trial_dir(k)) == state for k in self.trials_on_disk())

    def save_study(self) -> Path:
        """``<method>/study.journal``: the finished trials as an Optuna study (journal file), rebuilt
        from the run directories and swapped in atomically (the run directories stay the truth:
        a killed protocol leaves the last complete journal). Open it with
        ``optuna.load_study(study_name=<method>, storage=JournalStorage(JournalFileBackend(path)))``."""
        optuna = _optuna()
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        path = self.dir / STUDY_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        self._study(self._finished(self.proto.trials), 0, storage=JournalStorage(JournalFileBackend(str(tmp))))
        del optuna
        os.replace(tmp, path)
        return path
