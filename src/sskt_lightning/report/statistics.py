"""Runs as a table and their statistics: one row per run (group, setting and name), mean ± std over
seeds per group, and seed-paired gains over the baseline with their 95 % intervals."""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from sskt_lightning.loggers import NOT_IN_GROUP
from sskt_lightning.report.common import DEFAULT_BASELINE, METHOD_ORDER, ReportError


# overrides that say which method (variant) runs, not in which setting: not part of the setting
_VARIANT_PREFIXES = ("method=", "method.", "source=", "source.", "sources=", "optim", "data.unlabeled",
                     "hparams_search", "model.weights", "model.freeze")   # (fine-tuning: a method variant)
_IDENTITY = ("data=", "model=", "method=", "sources=")


# two-sided 95 %: t(0.975, df) for df = 1..30, then 40, 60, 120, infinity (interpolated in 1/df)
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]
_T975_TAIL = [(30, 2.0423), (40, 2.0211), (60, 2.0003), (120, 1.9799), (math.inf, 1.9600)]


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


def _uses_unlabeled(r: dict) -> bool:
    """Does the run train on the setting's unlabeled images? A protocol run's ``unlabeled`` (its
    protocol.json), else its overrides (the last ``data.unlabeled=`` wins)."""
    if isinstance(r.get("unlabeled"), bool):
        return r["unlabeled"]
    values = [t.split("=", 1)[1].lower() for t in _tokens(r) if t.startswith("data.unlabeled=")]
    return bool(values) and values[-1] in ("true", "1", "yes", "on")


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
            "unlabeled": _uses_unlabeled(r), "reference": r.get("reference") is True,
            "path": r.get("_path", ""), "dir": r.get("_dir", ""),
        })
    df = pd.DataFrame(rows, columns=["data", "model", "method", "sources", "group", "setting", "given_name",
                                     "variant", "seed", "test_metric", "test", "val", "wall_time_s",
                                     "train_images_per_s", "num_train", "num_val", "num_unlabeled", "params",
                                     "extra", "unlabeled", "reference", "path", "dir"])
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
            "unlabeled": bool(g["unlabeled"].any()), "reference": bool(g["reference"].any()),
            "wall_time_s_mean": g["wall_time_s"].mean(), "train_images_per_s_mean": g["train_images_per_s"].mean(),
            "test_values": tested["test"].tolist(), "by_seed": tested.set_index("seed")["test"],
            "extra": {k: _extra_stats(k, col) for k, col in extra.items() if col.notna().any()},
        })
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    summary = summary.iloc[sorted(range(len(summary)), key=lambda i: (
        summary["data"][i], summary["model"][i], summary["setting"][i], bool(summary["reference"][i]),
        _method_rank(summary["method"][i]), summary["name"][i]))].reset_index(drop=True)
    return _add_same_unlabeled_gains(_add_gains(summary, baseline))


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
        base = same[[_matches(baseline, b) and not b["reference"] for _, b in same.iterrows()]]   # never a reference
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


SAME_UNLABELED_COLUMNS = ("same_unl_best", "same_unl_best_val", "same_unl_n_paired", "same_unl_gain_mean",
                          "same_unl_gain_std", "same_unl_gain_ci_low", "same_unl_gain_ci_high", "same_unl_wins")


def best_same_unlabeled(part: pd.DataFrame, exclude: Any = None) -> Any:
    """The index of the best method that uses the setting's unlabeled images, chosen WITHOUT the test
    split: the highest mean validation score (``val_mean``, best val over the final seeds) among the
    groups of ``part`` that use unlabeled images and are not references, ``exclude`` (a row index)
    left out; ties: the earlier row. None when there is no candidate with a validation score."""
    pool = part[part["unlabeled"] & ~part["reference"] & part["val_mean"].notna()]
    pool = pool.drop(index=exclude, errors="ignore") if exclude is not None else pool
    if pool.empty:
        return None
    return pool["val_mean"].idxmax()     # the first of equal maxima


def _add_same_unlabeled_gains(summary: pd.DataFrame) -> pd.DataFrame:
    """Per group, the seed-paired gain over the best OTHER method that uses the same unlabeled images
    (:func:`best_same_unlabeled`: selected on validation, references excluded)."""
    cols = {k: [] for k in SAME_UNLABELED_COLUMNS}
    for i, row in summary.iterrows():
        same = summary[(summary["data"] == row["data"]) & (summary["model"] == row["model"])
                       & (summary["setting"] == row["setting"])]
        best = best_same_unlabeled(same, exclude=i)
        gain = {"n_paired": 0, "gain_mean": math.nan, "gain_std": math.nan, "gain_ci_low": math.nan,
                "gain_ci_high": math.nan, "wins": math.nan}
        if best is not None:
            gain.update(paired_gain(row["by_seed"], summary.loc[best, "by_seed"]))
            if gain["n_paired"] == 0:
                gain["wins"] = math.nan
        cols["same_unl_best"].append("" if best is None else summary.loc[best, "name"])
        cols["same_unl_best_val"].append(math.nan if best is None else summary.loc[best, "val_mean"])
        for k in ("n_paired", "gain_mean", "gain_std", "gain_ci_low", "gain_ci_high", "wins"):
            cols[f"same_unl_{k}"].append(gain[k])
    for k, v in cols.items():
        summary[k] = v
    return summary
