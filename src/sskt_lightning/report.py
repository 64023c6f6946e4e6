"""Summarise finished runs: mean ± std over seeds, paired gains over a baseline, failures, plots.

    python -m sskt_lightning.report DIR [DIR ...] [--out OUT] [--metric test_acc]
                                    [--baseline method=scratch] [--no-plots] [--include-search]

Reads every ``results.json`` below the directories (Hydra's ``multirun/<date>/<time>/<job>/``
layout, or a protocol directory) and writes into ``--out`` (default: the first directory)
``report.md`` (also printed), ``report.csv`` (one row per group, raw numbers), ``runs.csv`` (one row
per run), ``<metric>.png`` (per group: seeds and mean ± std), ``gains.png`` (paired gains with their
95 % intervals) and ``val_curves.png``. pandas does the grouping, statistics, CSV and markdown
(``to_markdown``, through tabulate); matplotlib the figures. What is this project's own:

* **Which number.** The test number is the one a run reports at the end of training, the LAST
  epoch's model; nothing is selected on the test set. "best val" is the best validation score over
  epochs: a validation number. Accuracies/mAP are fractions in results.json, percent here.
* **Groups and names.** Runs aggregate by their ``group`` (the experiment without the seed). A
  group's *setting* is what it shares with the methods it is compared with (data, model and every
  override that is not about the method: label budget, steps, epochs ...); its *name* is the method
  plus the overrides that tell it apart from other groups of the same method in the same setting
  (``sskt method.alpha=1.0``), so no two rows look alike. A protocol run's ``protocol.json`` beside
  its results.json gives both explicitly.
* **Paired gains.** Every group is compared with the baseline group of its setting (``--baseline``:
  ``method=scratch`` by default; ``name=<name>`` or ``key=value`` of an override also work) seed by
  seed: a seed fixes the labelled subset, the validation subset and the target's initialisation for
  every method, so ``gain_s = metric(group, s) - metric(baseline, s)`` over the seeds both have.
  Reported: mean gain, its sample std (ddof=1), the 95 % confidence interval
  ``mean ± t(0.975, n-1) · std / sqrt(n)`` (t quantiles from a table, no scipy) and the number of
  seeds where the group beats the baseline.
* **Failures are shown, not dropped.** A job directory with ``failed.txt`` and no results, or a
  results.json whose ``status`` is ``failed``, is listed beside the table with its reason.

Search trials of the protocol (``protocol.json`` phase ``search``) are left out unless
``--include-search``: they are selection runs, not results.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sskt_lightning.errors import SSKTError
from sskt_lightning.loggers import NOT_IN_GROUP

__all__ = ["ReportError", "METHOD_ORDER", "load_results", "load_failures", "runs_frame", "summarise",
           "paired_gain", "t_quantile_975", "to_markdown", "to_csv", "read_val_curve", "val_curve_from_csv",
           "mean_curve", "plot_test_acc", "plot_gains", "plot_val_curves", "write_report", "main"]

METHOD_ORDER = ("scratch", "kd", "dml", "maxl", "sskt")
RESULTS_NAME, FAILED_NAME, PROTOCOL_NAME = "results.json", "failed.txt", "protocol.json"
DASH = "–"  # an undefined std (one seed) or a missing number
DEFAULT_BASELINE = "method=scratch"

# overrides that say which method (variant) runs, not in which setting: not part of the setting
_VARIANT_PREFIXES = ("method=", "method.", "source=", "source.", "sources=", "optim", "data.unlabeled",
                     "hparams_search")
_IDENTITY = ("data=", "model=", "method=", "sources=")

# two-sided 95 %: t(0.975, df) for df = 1..30, then 40, 60, 120, infinity (interpolated in 1/df)
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]
_T975_TAIL = [(30, 2.0423), (40, 2.0211), (60, 2.0003), (120, 1.9799), (math.inf, 1.9600)]


class ReportError(SSKTError, ValueError):
    """The runs cannot be summarised as asked (none found, inconsistent metrics, bad arguments)."""


# --------------------------------------------------------------------------------------------
# loading


def _natural_key(p: Path) -> list:
    """Sort ``.../10/results.json`` after ``.../9/results.json``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in p.parts]


def _roots(dirs: Sequence[str | Path] | str | Path) -> list[Path]:
    dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
    roots = [Path(d) for d in dirs]
    for root in roots:
        if not root.exists():
            raise ReportError(f"report: directory not found: {root}")
    return roots


def _files(roots: list[Path], name: str) -> list[Path]:
    seen, out = set(), []
    for root in roots:
        found = [root] if root.is_file() and root.name == name else sorted(root.rglob(name), key=_natural_key)
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                out.append(f)
    return out


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:     # ValueError: JSONDecodeError, UnicodeDecodeError
        print(f"report: warning: skipping unreadable {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    if not isinstance(data, dict):
        print(f"report: warning: skipping {path}: not a JSON object", file=sys.stderr)
        return None
    return data


def _failed(r: dict) -> bool:
    return str(r.get("status", "")).lower() in ("failed", "failure", "error")


def load_results(dirs: Sequence[str | Path] | str | Path, include_search: bool = False) -> list[dict]:
    """Every successful run's results.json under ``dirs`` (recursively), in a stable order.

    Each dict is the file's content plus ``_path`` and ``_dir``, merged with the run's
    ``protocol.json`` when there is one (keys ``name``, ``setting``, ``phase``, ``params``). Failed
    runs (``status: failed``) and, unless ``include_search``, protocol search trials are left out.
    """
    out = []
    for f in _files(_roots(dirs), RESULTS_NAME):
        data = _read_json(f)
        if data is None or _failed(data):
            continue
        side = f.parent / PROTOCOL_NAME
        if side.is_file():
            data.update(_read_json(side) or {})
        if data.get("phase") == "search" and not include_search:
            continue
        data["_path"], data["_dir"] = str(f), str(f.parent)
        out.append(data)
    return out


def _reason(text: str) -> str:
    """The last meaningful line of a traceback or message (the exception and its message)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no reason recorded)"


def load_failures(dirs: Sequence[str | Path] | str | Path, include_search: bool = False) -> list[dict]:
    """Failed jobs under ``dirs``: ``{"dir", "reason"}`` for each directory holding ``failed.txt``
    without a successful results.json, or a results.json with ``status: failed``."""
    roots = _roots(dirs)
    out = []
    for f in _files(roots, FAILED_NAME):
        res = f.parent / RESULTS_NAME
        data = _read_json(res) if res.is_file() else None
        if data is not None and not _failed(data):
            continue   # failed once, succeeded later (e.g. a resumed job)
        side = _read_json(f.parent / PROTOCOL_NAME) if (f.parent / PROTOCOL_NAME).is_file() else {}
        if (side or {}).get("phase") == "search" and not include_search:
            continue
        try:
            reason = _reason(f.read_text(errors="replace"))
        except OSError as e:
            reason = f"(failed.txt unreadable: {e})"
        out.append({"dir": str(f.parent), "reason": reason, **{k: v for k, v in (side or {}).items()
                                                             if k in ("name", "setting")}})
    for f in _files(roots, RESULTS_NAME):
        data = _read_json(f)
        if data is None or not _failed(data) or (f.parent / FAILED_NAME).is_file():
            continue
        if data.get("phase") == "search" and not include_search:
            continue
        reason = data.get("error") or data.get("reason") or data.get("message") or "status: failed"
        out.append({"dir": str(f.parent), "reason": _reason(str(reason))})
    return sorted(out, key=lambda d: _natural_key(Path(d["dir"])))


# --------------------------------------------------------------------------------------------
# one row per run


def _sources_str(r: dict) -> str:
    s = r.get("sources")
    if s is None:
        return ""
    if isinstance(s, str):
        return s
    return "+".join(str(k) for k in s)   # a list, or a mapping name -> config


def group_key(r: dict) -> str:
    """The aggregation key of one run: a protocol run's (setting, name); else its ``group`` string
    (the experiment without the seed), or one built from its identity."""
    if r.get("phase") and r.get("name"):   # protocol.json: per-seed overrides (a KD teacher) stay one group
        return f"protocol {r.get('phase')}: {r.get('setting', '')} :: {r.get('data', '')} {r.get('model', '')} :: {r['name']}"
    if r.get("group"):
        return str(r["group"])
    return " ".join(f"{k}={_sources_str(r) if k == 'sources' else r.get(k, '')}"
                    for k in ("data", "model", "method", "sources"))


def _tokens(r: dict) -> list[str]:
    """The run's overrides that define its experiment (not seed, paths, devices ...)."""
    if isinstance(r.get("overrides"), list):
        toks = [str(o).lstrip("+~") for o in r["overrides"]]
    else:
        toks = group_key(r).split()
    return [t for t in toks if not t.startswith(NOT_IN_GROUP)]   # as train.py's group leaves them out


def _setting_of(r: dict) -> str:
    if r.get("setting") is not None:
        return str(r["setting"])
    return " ".join(sorted(t for t in _tokens(r) if not t.startswith(_VARIANT_PREFIXES + _IDENTITY)))


def _variant_tokens(r: dict) -> frozenset:
    return frozenset(t for t in _tokens(r) if t.startswith(_VARIANT_PREFIXES) and not t.startswith("method="))


def _is_fraction_metric(name: str) -> bool:
    return "acc" in name.lower() or "map" in name.lower()


def _num(x: Any) -> float:
    if isinstance(x, bool) or x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _lookup(r: dict, key: str) -> Any:
    """``key`` at the top level, then in ``extra``; ``extra.x`` addresses extra explicitly."""
    if key.startswith("extra."):
        return (r.get("extra") or {}).get(key[len("extra."):])
    return r[key] if key in r else (r.get("extra") or {}).get(key)


def _test_value(r: dict, metric: str) -> float:
    v = _num(_lookup(r, metric))
    if math.isnan(v) and metric == "test_acc":   # multi-label runs may name it after their metric
        v = _num(r.get(f"test_{r.get('test_metric', 'acc')}"))
    return v


def _val_value(r: dict, metric: str) -> float:
    """The validation counterpart of ``metric`` (best over epochs); NaN when there is none."""
    if not metric.startswith("test_"):
        return math.nan
    for k in (f"best_val_{metric[len('test_'):]}", f"best_val_{r.get('test_metric', 'acc')}", "best_val_acc"):
        if not math.isnan(_num(r.get(k))):
            return _num(r.get(k))
    return math.nan


def runs_frame(results: Sequence[dict], metric: str = "test_acc") -> pd.DataFrame:
    """One row per run: identity, group, setting, name, seed and the numbers (percent where
    accuracy-like). Names are made unique within each (data, model, setting) as described above."""
    scale = 100.0 if _is_fraction_metric(metric) else 1.0
    rows = []
    for r in results:
        rows.append({
            "data": str(r.get("data", "")), "model": str(r.get("model", "")),
            "method": str(r.get("method", "")), "sources": _sources_str(r), "group": group_key(r),
            "setting": _setting_of(r), "given_name": r.get("name"), "variant": _variant_tokens(r),
            "seed": r.get("seed"), "test_metric": str(r.get("test_metric", "acc")),
            "test": _test_value(r, metric) * scale, "val": _val_value(r, metric) * scale,
            "wall_time_s": _num(r.get("wall_time_s")), "train_images_per_s": _num(r.get("train_images_per_s")),
            "num_train": _num(r.get("num_train")), "num_val": _num(r.get("num_val")),
            "num_unlabeled": _num(r.get("num_unlabeled")),
            "params": _params_str(r.get("params")), "extra": r.get("extra") or {},
            "path": r.get("_path", ""), "dir": r.get("_dir", ""),
        })
    df = pd.DataFrame(rows, columns=["data", "model", "method", "sources", "group", "setting", "given_name",
                                     "variant", "seed", "test_metric", "test", "val", "wall_time_s",
                                     "train_images_per_s", "num_train", "num_val", "num_unlabeled", "params",
                                     "extra", "path", "dir"])
    df["name"] = _names(df)
    if scale != 1.0 and ((df["test"] > 100).any() or (df["val"] > 100).any()):
        print(f"report: warning: '{metric}' values above 1; expected fractions in [0, 1]", file=sys.stderr)
    return df.drop(columns=["given_name", "variant"])


def _params_str(params: Any) -> str:
    if not params:
        return ""
    if isinstance(params, dict):
        return " ".join(f"{k}={_short(v)}" for k, v in params.items())
    return str(params)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _names(df: pd.DataFrame) -> list[str]:
    """A protocol's name, else the method plus the overrides that tell it apart from the other
    groups of the same method in the same (data, model, setting)."""
    names = {}
    for _, part in df.groupby(["data", "model", "setting", "method"], sort=False, dropna=False):
        groups = part.drop_duplicates("group")
        sets = list(groups["variant"])
        common = frozenset.intersection(*sets) if sets else frozenset()
        for _, g in groups.iterrows():
            if isinstance(g["given_name"], str) and g["given_name"]:
                names[g["group"]] = g["given_name"]
            else:
                differ = sorted(g["variant"] - common)
                names[g["group"]] = " ".join([g["method"], *differ]) if len(groups) > 1 else g["method"]
    out = [names[g] for g in df["group"]]
    # still equal (e.g. groups that differ only in something outside the overrides): number them
    seen: dict[tuple, list[str]] = {}
    for (key, name, group) in zip(zip(df["data"], df["model"], df["setting"]), out, df["group"]):
        lst = seen.setdefault((key, name), [])
        if group not in lst:
            lst.append(group)
    return [name if len(seen[(k, name)]) == 1 else f"{name} #{seen[(k, name)].index(g) + 1}"
            for k, name, g in zip(zip(df["data"], df["model"], df["setting"]), out, df["group"])]


# --------------------------------------------------------------------------------------------
# statistics


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        return math.nan
    if df <= 30:
        return _T975[df - 1]
    for (d0, t0), (d1, t1) in zip(_T975_TAIL, _T975_TAIL[1:]):
        if d0 <= df <= d1:
            x0, x1, x = 1 / d0, (0.0 if math.isinf(d1) else 1 / d1), 1 / df
            return t0 + (t1 - t0) * (x0 - x) / (x0 - x1)
    return _T975_TAIL[-1][1]


def paired_gain(values: pd.Series, baseline: pd.Series) -> dict:
    """Seed-paired difference ``values - baseline`` (both indexed by seed): n, mean, std (ddof=1),
    the 95 % t interval and the number of seeds with a positive gain."""
    both = pd.concat({"v": values, "b": baseline}, axis=1).dropna()
    d = (both["v"] - both["b"]).to_numpy(dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    std = float(d.std(ddof=1)) if n > 1 else math.nan
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n_paired": n, "gain_mean": mean, "gain_std": std, "gain_ci_low": mean - half,
            "gain_ci_high": mean + half, "wins": int((d > 0).sum()), "gains": d.tolist(),
            "paired_seeds": [_seed_label(s) for s in both.index]}


def _seed_label(s: Any) -> Any:
    return int(s) if isinstance(s, (int, np.integer)) or (isinstance(s, float) and s.is_integer()) else s


def _matches(spec: str, row: pd.Series) -> bool:
    """Does a group (a row of the summary) match a ``--baseline`` spec: ``name``, ``key=value`` of a
    column (method, name, sources ...) or an override token of the group?"""
    if "=" not in spec:
        return row["name"] == spec
    key, value = spec.split("=", 1)
    if key in ("method", "name", "data", "model", "sources", "group"):
        return str(row[key]) == value
    return spec in row["group"].split()


def _method_rank(method: str) -> tuple:
    m = (method or "").lower()
    return (METHOD_ORDER.index(m), "") if m in METHOD_ORDER else (len(METHOD_ORDER), m)


def summarise(results: Sequence[dict], metric: str = "test_acc", baseline: str = DEFAULT_BASELINE) -> pd.DataFrame:
    """One row per group: identity, setting, name, n, seeds, mean ± std of ``metric`` and of best
    val, the paired gain over the setting's baseline group, sizes and costs (see the module doc).

    Raises :class:`ReportError` when a group mixes ``test_metric`` values.
    """
    runs = runs_frame(results, metric)
    rows = []
    for group, g in runs.groupby("group", sort=False):
        kinds = sorted(set(g["test_metric"]))
        if len(kinds) > 1:
            detail = ", ".join(f"{p}: {k}" for p, k in zip(g["path"], g["test_metric"]))
            raise ReportError(f"report: runs of group '{group}' mix test_metric values {kinds}; they cannot be "
                              f"averaged together. Runs: {detail}")
        twice = g[g["seed"].duplicated(keep=False)]
        if len(twice):
            raise ReportError(f"report: group '{group}' holds seed(s) {sorted(set(twice['seed']), key=str)} more than "
                              f"once ({', '.join(twice['path'])}): the same experiment run twice, or two reports' "
                              f"directories that overlap. Pass the directories of one run per seed (or move the "
                              f"others away); its mean, std and paired gain would count one seed twice.")
        missing = g[g["test"].isna()]
        if len(missing):
            print(f"report: warning: {len(missing)} run(s) of group '{group}' lack '{metric}' (not in its n, seeds, "
                  f"mean or gain): {', '.join(missing['path'])}", file=sys.stderr)
        tested = g[g["test"].notna()]
        first = g.iloc[0]
        extra = pd.DataFrame(list(g["extra"])).apply(pd.to_numeric, errors="coerce")
        rows.append({
            "data": first["data"], "model": first["model"], "setting": first["setting"], "name": first["name"],
            "method": first["method"], "sources": first["sources"], "group": group,
            "test_metric": kinds[0], "metric": metric, "unit": "%" if _is_fraction_metric(metric) else "",
            "n": len(tested), "seeds": [_seed_label(s) for s in tested["seed"]],
            "test_mean": g["test"].mean(), "test_std": g["test"].std(ddof=1),
            "val_mean": g["val"].mean(), "val_std": g["val"].std(ddof=1),
            "num_train": g["num_train"].median(), "num_val": g["num_val"].median(),
            "num_unlabeled": g["num_unlabeled"].median(), "params": first["params"],
            "wall_time_s_mean": g["wall_time_s"].mean(), "train_images_per_s_mean": g["train_images_per_s"].mean(),
            "test_values": tested["test"].tolist(), "by_seed": tested.set_index("seed")["test"],
            "extra": {k: _extra_stats(k, col) for k, col in extra.items() if col.notna().any()},
        })
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    summary = summary.iloc[sorted(range(len(summary)), key=lambda i: (
        summary["data"][i], summary["model"][i], summary["setting"][i], _method_rank(summary["method"][i]),
        summary["name"][i]))].reset_index(drop=True)
    return _add_gains(summary, baseline)


def _extra_stats(key: str, col: pd.Series) -> dict:
    """mean ± std of one extra number; accuracy-like fractions in percent."""
    col = col.dropna()
    pct = _is_fraction_metric(key) and col.between(0, 1).all()
    col = col * 100 if pct else col
    return {"mean": col.mean(), "std": col.std(ddof=1), "n": len(col), "unit": "%" if pct else ""}


def _add_gains(summary: pd.DataFrame, baseline: str) -> pd.DataFrame:
    cols = {k: [] for k in ("baseline", "n_paired", "gain_mean", "gain_std", "gain_ci_low", "gain_ci_high",
                            "wins", "gains", "paired_seeds", "baseline_note", "baseline_issue")}
    for _, row in summary.iterrows():
        same = summary[(summary["data"] == row["data"]) & (summary["model"] == row["model"])
                       & (summary["setting"] == row["setting"])]
        base = same[[_matches(baseline, b) for _, b in same.iterrows()]]
        gain = {"n_paired": 0, "gain_mean": math.nan, "gain_std": math.nan, "gain_ci_low": math.nan,
                "gain_ci_high": math.nan, "wins": math.nan, "gains": [], "paired_seeds": []}
        note, name, issue = "", "", ""   # issue: why this row has no pair (no_common_seed | none | ambiguous)
        if len(base) == 1 and base.index[0] != row.name:
            name = base.iloc[0]["name"]
            gain = paired_gain(row["by_seed"], base.iloc[0]["by_seed"])
            if gain["n_paired"] == 0:
                note, issue, gain["wins"] = f"no seed in common with {name}", "no_common_seed", math.nan
        elif len(base) == 1:
            note = "baseline"
        elif len(base) == 0:
            note, issue = f"no baseline ({baseline}) in this setting", "none"
        else:
            note, issue = f"{len(base)} groups match --baseline {baseline}: {', '.join(base['name'])}", "ambiguous"
        cols["baseline"].append(name)
        cols["baseline_note"].append(note)
        cols["baseline_issue"].append(issue)
        for k, v in gain.items():
            cols[k].append(v)
    for k, v in cols.items():
        summary[k] = v
    return summary


# --------------------------------------------------------------------------------------------
# markdown and CSV

_METRIC_LABEL = {"acc": "acc", "map": "mAP"}


def _fmt(x: Any, digits: int = 2) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(mean: float, std: float, digits: int = 2) -> str:
    return DASH if math.isnan(mean) else f"{mean:.{digits}f} ± {_fmt(std, digits)}"


def _count(x: float) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else str(int(x))


def _seeds_str(seeds: Sequence) -> str:
    return ",".join("?" if s is None else str(s) for s in seeds)


def _metric_title(summary: pd.DataFrame) -> str:
    kinds = sorted(set(summary["test_metric"])) if len(summary) else ["acc"]
    metric = summary["metric"].iloc[0] if len(summary) else "test_acc"
    unit = f" ({summary['unit'].iloc[0]})" if len(summary) and summary["unit"].iloc[0] else ""
    if metric != "test_acc":
        return f"{metric}{unit}, last epoch"
    return f"test {'/'.join(_METRIC_LABEL.get(k, k) for k in kinds)}{unit}, last epoch"


def _setting_title(data: str, model: str, setting: str) -> str:
    return f"{data} · {model}" + (f" · {setting}" if setting else "")


def _table(part: pd.DataFrame, title: str) -> pd.DataFrame:
    has_gain = part["n_paired"].gt(0).any()
    table = pd.DataFrame({
        "method": part["name"],
        "sources": part["sources"].replace("", DASH),
        "n": part["n"], "seeds": part["seeds"].map(_seeds_str),
        title: [_pm(m, s) for m, s in zip(part["test_mean"], part["test_std"])],
        "best val (selected on validation)": [_pm(m, s) for m, s in zip(part["val_mean"], part["val_std"])],
    })
    if has_gain:
        base = next(b for b in part["baseline"] if b)
        unit = " (points)" if part["unit"].iloc[0] == "%" else ""
        table[f"gain over {base}{unit}"] = [
            note if note else (DASH if math.isnan(m) else f"{m:+.2f} ± {_fmt(s)}")
            for m, s, note in zip(part["gain_mean"], part["gain_std"], part["baseline_note"])]
        table["95 % CI"] = [DASH if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"
                            for lo, hi in zip(part["gain_ci_low"], part["gain_ci_high"])]
        table["wins"] = [DASH if n == 0 else f"{int(w)}/{n}" for w, n in zip(part["wins"], part["n_paired"])]
    if part["params"].astype(bool).any():
        table["selected on validation"] = [_short_params(p) or DASH for p in part["params"]]
    table["train / val / unlabeled"] = [" / ".join(_count(x) for x in t)
                                        for t in zip(part["num_train"], part["num_val"], part["num_unlabeled"])]
    table["wall time (s)"] = part["wall_time_s_mean"].map(lambda x: _fmt(x, 0))
    table["train img/s"] = part["train_images_per_s_mean"].map(lambda x: _fmt(x, 0))
    return table


def _short_params(params: str) -> str:
    """``optim.optimizer.lr=0.1 method.alpha=1`` -> ``lr=0.1 alpha=1`` (the table's short form)."""
    return " ".join(t.removeprefix("optim.optimizer.").removeprefix("method.").removeprefix("data.")
                    for t in params.split())


def _failures_md(failures: Sequence[dict]) -> list[str]:
    if not failures:
        return []
    lines = ["", f"## Failed jobs ({len(failures)})", "",
             "Not in the table above; each job's directory holds failed.txt (or results.json) with the details.", ""]
    frame = pd.DataFrame({"job": [f["dir"] for f in failures], "reason": [f["reason"] for f in failures]})
    return lines + [frame.to_markdown(index=False)]


def _no_gains_reason(part: pd.DataFrame, baseline: str) -> str:
    """Why a setting's table has no paired gain at all ("" when it has one, or holds only its baseline)."""
    if part["n_paired"].gt(0).any():
        return ""
    issues = [(i, n) for i, n in zip(part["baseline_issue"], part["baseline_note"]) if i]
    if not issues:
        return ""
    issue, note = issues[0]
    if issue == "none":
        return f"no baseline group ({baseline}) in this setting."
    if issue == "ambiguous":
        return f"{note}; name one with --baseline name=<method column>."
    return f"{note} (the baseline); the seeds: " + "; ".join(
        f"{n} {_seeds_str(s)}" for n, s in zip(part["name"], part["seeds"])) + "."


def baseline_warnings(summary: pd.DataFrame, baseline: str) -> list[str]:
    """One line per setting whose groups cannot be paired with the baseline, for stderr."""
    if summary.empty:
        return []
    return [f"report: warning: {_setting_title(d, m, s)}: no paired gains: {why}"
            for (d, m, s), part in summary.groupby(["data", "model", "setting"], sort=False)
            if (why := _no_gains_reason(part, baseline))]


def to_markdown(summary: pd.DataFrame, title: str | None = "Results", failures: Sequence[dict] = (),
                baseline: str = DEFAULT_BASELINE) -> str:
    """The report as markdown: the conventions, one table per setting, extras, failed jobs."""
    head = _metric_title(summary)
    lines = [f"# {title}", ""] if title else []
    lines += [
        "- **The test number is the LAST epoch's** (the model at the end of training, tested once); "
        "nothing is selected on the test set.",
        "- \"best val (selected on validation)\" is the best validation score over epochs: a validation "
        "number, not a test number. \"selected on validation\" lists hyper-parameters a search chose on "
        "validation.",
        "- mean ± std over seeds; std is the sample standard deviation (ddof=1), "
        f"\"{DASH}\" with a single seed (an empty cell in report.csv).",
        f"- gain: seed-paired difference to the baseline group of the same setting ({baseline}); "
        "mean ± std over the seeds both have, 95 % CI = mean ± t(0.975, n-1)·std/√n, wins = seeds "
        "where the method beats the baseline.",
        "- Accuracies and mAP in percent; train / val / unlabeled are the split sizes; wall time is the "
        "mean per run.",
    ]
    for (data, model, setting), part in summary.groupby(["data", "model", "setting"], sort=False):
        lines += ["", f"## {_setting_title(data, model, setting)}", ""]
        why = _no_gains_reason(part, baseline)
        if why:
            lines += [f"No paired gains: {why}", ""]
        lines += [_table(part, head).to_markdown(index=False)]
    extra = [(r["name"], r["data"], r["model"], r["setting"], k, e) for _, r in summary.iterrows()
             for k, e in r["extra"].items()]
    if extra:
        frame = pd.DataFrame({
            "setting": [_setting_title(d, m, s) for _, d, m, s, _, _ in extra],
            "method": [n for n, *_ in extra], "number": [k for *_, k, _ in extra],
            "n": [e["n"] for *_, e in extra],
            "mean ± std": [_pm(e["mean"], e["std"], 2 if e["unit"] else 4) + (f" {e['unit']}" if e["unit"] else "")
                           for *_, e in extra]})
        lines += ["", "## Extra numbers", "", "Other numbers the runs reported (e.g. a DML peer's test accuracy, "
                  "the test loss); mean ± std over the seeds that reported them.", "",
                  frame.to_markdown(index=False)]
    lines += _failures_md(failures)
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["data", "model", "setting", "name", "method", "sources", "n", "seeds", "test_metric", "metric", "unit",
               "test_mean", "test_std", "best_val_mean", "best_val_std", "baseline", "n_paired", "gain_mean",
               "gain_std", "gain_ci_low", "gain_ci_high", "wins", "params", "num_train", "num_val", "num_unlabeled",
               "wall_time_s_mean", "train_images_per_s_mean", "group"]


def to_csv(summary: pd.DataFrame) -> str:
    """The summary as CSV: raw (unrounded) numbers, mean and std in separate columns, empty cells
    for undefined numbers; extras add ``extra:<name>_mean`` / ``_std`` columns."""
    out = summary.rename(columns={"val_mean": "best_val_mean", "val_std": "best_val_std"}).reindex(columns=CSV_COLUMNS)
    out["seeds"] = out["seeds"].map(_seeds_str)
    out["wins"] = pd.to_numeric(out["wins"], errors="coerce").astype("Int64")
    for k in sorted({k for e in summary.get("extra", []) for k in e}):
        for stat in ("mean", "std"):
            out[f"extra:{k}_{stat}"] = [e.get(k, {}).get(stat, math.nan) for e in summary["extra"]]
    return out.to_csv(index=False, lineterminator="\n")


# --------------------------------------------------------------------------------------------
# validation curves


def val_curve_from_csv(path: str | Path, column: str | Sequence[str] = "val/acc") -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) from a Lightning CSVLogger ``metrics.csv`` (sparse rows; NaN/empty cells
    dropped; the last row of an epoch wins). ``column`` may list candidates: the first present."""
    candidates = [column] if isinstance(column, str) else list(column)
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError):
        return np.array([], dtype=int), np.array([], dtype=float)
    col = next((c for c in candidates if c in frame.columns), None)
    if col is None or "epoch" not in frame.columns:
        return np.array([], dtype=int), np.array([], dtype=float)
    frame = frame[["epoch", col]].apply(pd.to_numeric, errors="coerce").dropna()
    last = frame.groupby(frame["epoch"].astype(int))[col].last()
    return last.index.to_numpy(dtype=int), last.to_numpy(dtype=float)


def _find_metrics_csv(r: dict) -> Path | None:
    base = Path(r.get("_dir", "."))
    if r.get("metrics_csv"):
        p = Path(r["metrics_csv"])
        p = p if p.is_absolute() else base / p
        if p.is_file():
            return p
    found = sorted(base.rglob("metrics.csv"), key=_natural_key) if base.is_dir() else []
    return found[-1] if found else None


def read_val_curve(r: dict) -> tuple[np.ndarray, np.ndarray]:
    """The validation curve of one run (fractions), or empty arrays when none is on disk."""
    p = _find_metrics_csv(r)
    if p is None:
        return np.array([], dtype=int), np.array([], dtype=float)
    tm = str(r.get("test_metric", "acc"))
    return val_curve_from_csv(p, [f"val/{tm}", "val/acc", f"val_{tm}", "val_acc"])


def mean_curve(curves: Sequence[tuple[Sequence[int], Sequence[float]]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Average curves of possibly different lengths epoch by epoch: (epochs, mean, sample std (NaN
    where fewer than two curves), count)."""
    frame = pd.concat([pd.Series(np.asarray(v, dtype=float), index=np.asarray(e, dtype=int))
                       for e, v in curves] or [pd.Series(dtype=float)], axis=1)
    stats = frame.agg(["mean", "std", "count"], axis=1).dropna(subset=["mean"]).sort_index()
    return (stats.index.to_numpy(dtype=int), stats["mean"].to_numpy(), stats["std"].to_numpy(),
            stats["count"].to_numpy(dtype=int))


# --------------------------------------------------------------------------------------------
# figures (matplotlib's object API on an Agg canvas: no pyplot, no display)


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """The PNG, written atomically (a reader never sees half a figure)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _write(path, buf.getvalue())


def _empty_figure(path: Path, text: str) -> Path:
    fig = _new_figure(6, 2)
    fig.text(0.5, 0.5, text, ha="center", va="center")
    return _save(fig, path)


def _method_colors(methods: Iterable[str]) -> dict[str, Any]:
    """The known methods keep one colour in every figure; others follow alphabetically."""
    from matplotlib import colormaps

    cmap, methods = colormaps["tab10"], set(methods)
    known = {m: i for i, m in enumerate(METHOD_ORDER)}
    others = sorted(m for m in methods if m.lower() not in known)
    colors = {m: cmap(known[m.lower()]) for m in methods if m.lower() in known}
    colors.update({m: cmap((len(METHOD_ORDER) + i) % 10) for i, m in enumerate(others)})
    return colors


_MARKERS = ("D", "s", "^", "v", "P", "X")


def _markers(part: pd.DataFrame) -> list[str]:
    """One marker per variant of a method within a panel (colour = method, marker = variant)."""
    seen: dict[str, int] = {}
    out = []
    for method in part["method"]:
        out.append(_MARKERS[seen.get(method, 0) % len(_MARKERS)])
        seen[method] = seen.get(method, 0) + 1
    return out


def _wrap(text: str, width: int = 38) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _zoom(values: Sequence[float], unit: str, floor: float = 2.0) -> tuple[float, float]:
    """An axis range that shows the differences: the values' span plus a margin, never past 100 %."""
    vals = [v for v in values if not math.isnan(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    span = max(hi - lo, floor if unit == "%" else 1e-3)
    lo, hi = lo - 0.12 * span, hi + 0.12 * span
    if unit == "%":
        lo, hi = max(lo, 0.0), min(hi, 100.0)
    return lo, hi


def _panels(summary: pd.DataFrame) -> list[tuple[tuple[str, str, str], pd.DataFrame]]:
    return [(key, part) for key, part in summary.groupby(["data", "model", "setting"], sort=False)]


def _panel_figure(summary: pd.DataFrame, min_height: float):
    """A figure with one row of axes per (data, model, setting) panel, each as tall as its groups."""
    panels = _panels(summary)
    heights = [max(min_height, 0.45 * len(part) + 1.0) for _, part in panels]
    fig = _new_figure(7.0, sum(heights))
    return fig, fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0], panels


def plot_test_acc(summary: pd.DataFrame, path: str | Path) -> Path:
    """Per group: every seed as a dot, the mean ± std as a diamond with an error bar; one panel per
    (data, model, setting), rows labelled by name; the axis zoomed to the values, never past 100 %."""
    path = Path(path)
    if summary.empty:
        return _empty_figure(path, "no results")
    fig, axes, panels = _panel_figure(summary, min_height=1.5)
    colors = _method_colors(summary["method"])
    unit = summary["unit"].iloc[0]
    for ax, ((data, model, setting), part) in zip(axes, panels):
        y = np.arange(len(part))[::-1]
        stds = part["test_std"].fillna(0.0)
        for yi, (_, r), s, mk in zip(y, part.iterrows(), stds, _markers(part)):
            c = colors[r["method"]]
            ax.plot(r["test_values"], [yi] * len(r["test_values"]), "o", ms=3.5, color=c, alpha=0.5, mec="none")
            if not math.isnan(r["test_mean"]):
                ax.errorbar(r["test_mean"], yi, xerr=s if r["n"] > 1 else None, fmt=mk, ms=6, color=c,
                            mec="black", mew=0.5, capsize=4, elinewidth=1.4, zorder=3)
        lo, hi = _zoom([v for vs in part["test_values"] for v in vs]
                       + list(part["test_mean"] - stds) + list(part["test_mean"] + stds), unit)
        ax.set_xlim(lo, hi)
        ax.set_ylim(-0.6, len(part) - 0.4)
        ax.set_yticks(y, [_wrap(n) for n in part["name"]], fontsize=8)
        ax.set_title(_wrap(_setting_title(data, model, setting), 70), fontsize=9)
        ax.set_xlabel(f"{_metric_title(summary)}: mean ± std; dots = seeds", fontsize=8.5)
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_gains(summary: pd.DataFrame, path: str | Path) -> Path:
    """Per group and setting: the seed-paired gains over the baseline (dots) and their mean with
    the 95 % t interval; a line at zero. Groups without a baseline are left out."""
    path = Path(path)
    part_all = summary[summary["n_paired"] > 0] if "n_paired" in summary else summary.iloc[:0]
    if part_all.empty:
        return _empty_figure(path, "no paired gains (no baseline group with common seeds)")
    fig, axes, panels = _panel_figure(part_all, min_height=1.4)
    colors = _method_colors(summary["method"])
    for ax, ((data, model, setting), part) in zip(axes, panels):
        y = np.arange(len(part))[::-1]
        ends = [0.0]
        for yi, (_, r), mk in zip(y, part.iterrows(), _markers(part)):
            c = colors[r["method"]]
            ax.plot(r["gains"], [yi] * len(r["gains"]), "o", ms=3.5, color=c, alpha=0.5, mec="none")
            lo, hi = r["gain_ci_low"], r["gain_ci_high"]
            xerr = None if math.isnan(lo) else [[r["gain_mean"] - lo], [hi - r["gain_mean"]]]
            ax.errorbar(r["gain_mean"], yi, xerr=xerr, fmt=mk, ms=6, color=c, mec="black", mew=0.5, capsize=4,
                        elinewidth=1.4, zorder=3)
            ends += [*r["gains"], *(v for v in (lo, hi) if not math.isnan(v))]
        lo, hi = _zoom(ends, "")
        pad = 0.05 * (hi - lo)
        ax.set_xlim(lo - pad, hi + pad)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_ylim(-0.6, len(part) - 0.4)
        ax.set_yticks(y, [_wrap(n) for n in part["name"]], fontsize=8)
        ax.set_title(_wrap(_setting_title(data, model, setting), 70), fontsize=9)
        base = next(b for b in part["baseline"] if b)
        ax.set_xlabel(f"gain over {base} ({'points' if summary['unit'].iloc[0] else 'units'}): mean, 95 % t "
                      f"interval; dots = seeds", fontsize=8.5)
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_val_curves(results: Sequence[dict], path: str | Path, summary: pd.DataFrame | None = None) -> Path:
    """Validation score vs epoch: per group the mean over seeds with a ±std band; one column of
    two axes per (data, model, setting): the whole run, and its second half zoomed in."""
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    runs = runs_frame(results)
    if runs.empty:
        return _empty_figure(path, "no validation curves found (no metrics.csv with val/acc)")
    by_path = {r.get("_path", ""): r for r in results}
    curves = {}
    for (data, model, setting, name, method), g in runs.groupby(["data", "model", "setting", "name", "method"],
                                                                sort=False):
        cs = [c for c in (read_val_curve(by_path[p]) for p in g["path"]) if len(c[0])]
        if cs:
            curves.setdefault((data, model, setting), []).append((name, method, cs))
    if not curves:
        return _empty_figure(path, "no validation curves found (no metrics.csv with val/acc)")
    colors = _method_colors(runs["method"])
    styles = ["-", "--", ":", "-."]
    ncol = len(curves)
    fig = _new_figure(5.2 * ncol, 6.4)
    grid = fig.subplots(2, ncol, squeeze=False, height_ratios=[1.0, 0.8])
    for i, ((data, model, setting), groups) in enumerate(curves.items()):
        seen: dict[str, int] = {}
        stats = []
        for name, method, cs in groups:
            ep, mean, std, _ = mean_curve(cs)
            style = styles[seen.get(method, 0) % len(styles)]
            seen[method] = seen.get(method, 0) + 1
            stats.append((ep, mean * 100, std * 100, style, colors[method], f"{name} (n={len(cs)})"))
        last = max(int(ep.max()) for ep, *_ in stats)
        start = last // 2
        for ax, zoom in ((grid[0, i], False), (grid[1, i], True)):
            values = []
            for ep, mean, std, style, c, label in stats:
                keep = ep >= start if zoom else np.ones_like(ep, dtype=bool)
                if not keep.any():
                    continue
                e, m, sd = ep[keep], mean[keep], np.nan_to_num(std[keep])
                ax.plot(e, m, style, color=c, lw=1.5, label=label, marker="o" if len(e) <= 15 else None, ms=3)
                ax.fill_between(e, np.maximum(m - sd, 0), np.minimum(m + sd, 100), color=c, alpha=0.15, lw=0)
                values += [*(m - sd), *(m + sd)]
            if zoom:
                ax.set_ylim(*_zoom(values, "%", floor=0.5))
            else:
                ax.set_ylim(top=min(100.0, max(values, default=100.0) + 2))
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("validation (%)")
            ax.grid(alpha=0.3)
        grid[0, i].set_title(_wrap(_setting_title(data, model, setting), 60), fontsize=9)
        grid[1, i].set_title(f"epochs {start}–{last}, zoomed", fontsize=8.5)
        grid[0, i].legend(fontsize=7, loc="lower right")
    fig.suptitle("Validation curves: mean over seeds, band = ±1 std", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# CLI


def write_report(results: Sequence[dict], out_dir: str | Path, metric: str = "test_acc", plots: bool = True,
                 baseline: str = DEFAULT_BASELINE, failures: Sequence[dict] = (),
                 title: str | None = "Results", appendix: str = "") -> dict[str, Path]:
    """Write report.md (``appendix`` at its end), report.csv, runs.csv and (unless ``plots`` is false)
    the PNGs into ``out_dir``, each atomically.

    Returns name -> path. Raises :class:`ReportError` on empty ``results`` (naming the failures when
    every job failed) or a group that mixes ``test_metric``.
    """
    if not results:
        raise ReportError(_nothing_message(failures, []))
    out = Path(out_dir)
    summary = summarise(results, metric=metric, baseline=baseline)
    for line in baseline_warnings(summary, baseline):
        print(line, file=sys.stderr)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "runs_csv": out / "runs.csv"}
    _write(paths["md"], to_markdown(summary, title=title, failures=failures, baseline=baseline) + appendix)
    _write(paths["csv"], to_csv(summary))
    _write(paths["runs_csv"], runs_frame(results, metric).drop(columns=["extra"]).to_csv(index=False,
                                                                                          lineterminator="\n"))
    if plots:
        paths["test_png"] = plot_test_acc(summary, out / f"{_safe_name(metric)}.png")
        paths["gains_png"] = plot_gains(summary, out / "gains.png")
        paths["val_png"] = plot_val_curves(results, out / "val_curves.png")
    return paths


def _write(path: Path, data: str | bytes) -> Path:
    """``path`` replaced atomically; an unwritable ``--out`` is a :class:`ReportError` naming the fix."""
    from sskt_lightning.atomic import atomic_write_bytes
    try:
        return atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as err:                                   # atomic's OutputError is one
        cause = err.__cause__ or err.__context__ or err     # the OSError behind atomic's OutputError
        raise ReportError(f"report: cannot write {path} ({getattr(cause, 'strerror', None) or err}); choose a "
                          f"writable directory with --out DIR.") from None


def _nothing_message(failures: Sequence[dict], dirs: Sequence[str]) -> str:
    if failures:
        lines = [f"report: all {len(failures)} jobs failed; no results to summarise:"]
        lines += [f"  {f['dir']}: {f['reason']}" for f in failures]
        return "\n".join(lines)
    searched = ", ".join(str(Path(d)) for d in dirs) or "(no directories)"
    return (f"report: no {RESULTS_NAME} found under: {searched}\n"
            "  Each finished training run writes results.json into its output directory "
            "(e.g. multirun/<date>/<time>/<job_num>/results.json). Check the path, or wait for the runs to finish.")


def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sskt_lightning.report",
                                description="Mean ± std over seeds and seed-paired gains over a baseline of every "
                                            "results.json under the given directories.")
    p.add_argument("dirs", nargs="+", help="directories searched recursively for results.json")
    p.add_argument("--out", default=None, help="output directory (default: the first dir)")
    p.add_argument("--metric", default="test_acc",
                   help="results.json key summarised as the test number (default test_acc; keys under 'extra' too)")
    p.add_argument("--baseline", default=DEFAULT_BASELINE,
                   help="the group each group is paired with, per setting: method=<m>, name=<name> or an "
                        "override key=value (default method=scratch)")
    p.add_argument("--include-search", action="store_true", help="also count protocol search trials")
    p.add_argument("--no-plots", action="store_true", help="write only report.md, report.csv and runs.csv")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point. Returns 0 on success, 2 on a user error (message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        results = load_results(args.dirs, include_search=args.include_search)
        failures = load_failures(args.dirs, include_search=args.include_search)
        if not results:
            raise ReportError(_nothing_message(failures, args.dirs))
        out = Path(args.out) if args.out else Path(args.dirs[0])
        out = out.parent if out.is_file() else out
        paths = write_report(results, out, metric=args.metric, plots=not args.no_plots, baseline=args.baseline,
                             failures=failures)
    except ReportError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(paths["md"].read_text(), end="")
    if failures:
        print(f"report: {len(failures)} failed job(s) listed in {paths['md']}", file=sys.stderr)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
