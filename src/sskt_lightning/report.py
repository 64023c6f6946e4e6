"""Summarise finished runs: mean ± std over seeds, a markdown/CSV table and two plots.

    python -m sskt_lightning.report multirun/2024-05-01/12-00-00 [more dirs] [--out DIR] [--metric test_acc]

Reads every ``results.json`` found recursively under the given directories (Hydra multirun layout
``multirun/<date>/<time>/<job_num>/results.json``) and writes into ``--out`` (default: the first
directory) ``report.md``, ``report.csv``, ``<metric>.png`` (``test_acc.png`` by default) and
``val_curves.png``; the markdown table is also printed to stdout.

Conventions (also stated in the markdown itself):

* The test number is the one the run reports at the end of training, i.e. the LAST epoch's model.
  Nothing is selected on the test set.
* "best val (selected on validation)" is the best validation score over epochs; it is a
  validation number, not a test number.
* ± is the sample standard deviation over seeds (``ddof=1``). With a single seed it is undefined:
  the markdown shows "–" and the CSV leaves the std cell empty.
* Accuracy-like numbers (names containing ``acc`` or ``map``) are stored as fractions in
  ``results.json`` and shown as percentages everywhere in the report (markdown, CSV, plots).

Runs aggregate by their ``group`` string; without one, by (data, model, method, sources).
A group whose runs disagree on ``test_metric`` (e.g. ``acc`` vs ``map``) is an error.

The functions below are pure (no global state, no display) so tests and scripts can call them:
:func:`load_results`, :func:`summarise`, :func:`to_markdown`, :func:`to_csv`,
:func:`plot_test_acc`, :func:`plot_val_curves`, :func:`read_val_curve`, :func:`mean_curve`,
:func:`write_report`, :func:`main`.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from sskt_lightning.errors import SSKTError

__all__ = [
    "ReportError",
    "METHOD_ORDER",
    "load_results",
    "group_key",
    "summarise",
    "to_markdown",
    "to_csv",
    "read_val_curve",
    "val_curve_from_csv",
    "mean_curve",
    "plot_test_acc",
    "plot_val_curves",
    "write_report",
    "main",
]

METHOD_ORDER = ("scratch", "kd", "dml", "maxl", "sskt")
RESULTS_NAME = "results.json"
DASH = "–"  # shown for an undefined std (one seed) and for missing numbers

# Keys the grouping/identity uses; everything else in a results.json is a measurement or extra.
_ID_KEYS = ("data", "model", "method", "sources")


class ReportError(SSKTError, ValueError):
    """The runs cannot be summarised as asked (none found, inconsistent metrics, bad arguments)."""


# --------------------------------------------------------------------------------------------
# loading


def load_results(dirs: Sequence[str | Path] | str | Path) -> list[dict]:
    """Read every ``results.json`` under ``dirs`` (recursively), in a stable order.

    Each returned dict is the file's content plus ``_path`` (the results.json) and ``_dir`` (its
    directory, against which ``metrics_csv`` is resolved). A file found through two overlapping
    directories is read once. Unreadable files are skipped with a warning on stderr.

    Raises :class:`ReportError` if a directory does not exist. An empty list is returned when the
    directories hold no results; :func:`main` turns that into a message and exit code 2.
    """
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    seen: set[Path] = set()
    out: list[dict] = []
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise ReportError(f"report: directory not found: {root}")
        files = [root] if root.is_file() and root.name == RESULTS_NAME else sorted(
            root.rglob(RESULTS_NAME), key=_natural_key
        )
        for f in files:
            rf = f.resolve()
            if rf in seen:
                continue
            seen.add(rf)
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                print(f"report: warning: skipping unreadable {f}: {e}", file=sys.stderr)
                continue
            if not isinstance(data, dict):
                print(f"report: warning: skipping {f}: not a JSON object", file=sys.stderr)
                continue
            data["_path"] = str(f)
            data["_dir"] = str(f.parent)
            out.append(data)
    return out


def _natural_key(p: Path) -> list:
    """Sort ``.../10/results.json`` after ``.../9/results.json``."""
    parts: list = []
    for part in p.parts:
        parts.append((0, int(part), "") if part.isdigit() else (1, 0, part))
    return parts


# --------------------------------------------------------------------------------------------
# grouping and statistics


def _sources_str(r: dict) -> str:
    s = r.get("sources")
    if s is None:
        return ""
    if isinstance(s, str):
        return s
    if isinstance(s, dict):  # a Hydra source group saved as a mapping name -> config
        return "+".join(str(k) for k in s)
    return "+".join(str(x) for x in s)


def group_key(r: dict) -> str:
    """The aggregation key of one run: its ``group`` string, or one built from its identity."""
    g = r.get("group")
    if g:
        return str(g)
    return " ".join(f"{k}={r.get(k, '') if k != 'sources' else _sources_str(r)}" for k in _ID_KEYS)


def _method_rank(method: str) -> tuple:
    m = (method or "").lower()
    return (METHOD_ORDER.index(m), "") if m in METHOD_ORDER else (len(METHOD_ORDER), m)


def _sort_key(data: str, model: str, method: str, sources: str, group: str) -> tuple:
    return (str(data), str(model), _method_rank(str(method)), str(sources), str(group))


def _group_results(results: Iterable[dict]) -> list[tuple[str, list[dict]]]:
    """Runs grouped by :func:`group_key`, groups sorted like the report rows."""
    groups: "OrderedDict[str, list[dict]]" = OrderedDict()
    for r in results:
        groups.setdefault(group_key(r), []).append(r)

    def key(item):
        g, runs = item
        r0 = runs[0]
        return _sort_key(r0.get("data", ""), r0.get("model", ""), r0.get("method", ""),
                         _sources_str(r0), g)

    return sorted(groups.items(), key=key)


def _is_fraction_metric(name: str) -> bool:
    n = name.lower()
    return "acc" in n or "map" in n


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std); std is NaN for fewer than two values, mean NaN for none."""
    if not values:
        return math.nan, math.nan
    a = np.asarray(values, dtype=float)
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else math.nan
    return mean, std


def _test_metric(runs: list[dict], group: str) -> str:
    kinds = sorted({str(r.get("test_metric", "acc")) for r in runs})
    if len(kinds) > 1:
        detail = ", ".join(f"{Path(r.get('_path', '?'))}: {r.get('test_metric', 'acc')}" for r in runs)
        raise ReportError(
            f"report: runs of group '{group}' mix test_metric values {kinds}; they cannot be "
            f"averaged together. Runs: {detail}"
        )
    return kinds[0]


def _lookup(r: dict, key: str) -> Any:
    """``key`` at the top level, then in ``extra``; ``extra.x`` addresses extra explicitly."""
    if key.startswith("extra."):
        return (r.get("extra") or {}).get(key[len("extra."):])
    if key in r:
        return r[key]
    return (r.get("extra") or {}).get(key)


def _test_value(r: dict, metric: str, test_metric: str) -> float | None:
    v = _num(_lookup(r, metric))
    if v is None and metric == "test_acc":  # multi-label runs may name it after their metric
        v = _num(r.get(f"test_{test_metric}"))
    return v


def _best_val_value(r: dict, metric: str, test_metric: str) -> float | None:
    """The validation counterpart of ``metric``; None when there is none (e.g. a peer's extra)."""
    if not metric.startswith("test_"):
        return None
    for k in dict.fromkeys([f"best_val_{metric[len('test_'):]}", f"best_val_{test_metric}",
                            "best_val_acc"]):
        v = _num(r.get(k))
        if v is not None:
            return v
    return None


def summarise(results: Sequence[dict], metric: str = "test_acc") -> list[dict]:
    """One row per group: identity, n, seeds, mean/std of ``metric`` and best val, costs.

    Row keys: ``data, model, method, sources, group, test_metric, metric, unit, n, seeds,
    test_values, test_mean, test_std, best_val_mean, best_val_std, wall_time_s_mean,
    train_images_per_s_mean, extra`` (``extra``: name -> {"mean", "std", "n"}), plus ``paths``.
    Accuracy-like numbers are in percent (``unit == "%"``); a std over one seed is NaN; a number no
    run reported is NaN. Rows are sorted by data, model, then method in the order
    scratch, kd, dml, maxl, sskt, then other methods alphabetically.

    Raises :class:`ReportError` when a group mixes ``test_metric`` values.
    """
    rows: list[dict] = []
    for g, runs in _group_results(results):
        r0 = runs[0]
        tm = _test_metric(runs, g)
        scale = 100.0 if _is_fraction_metric(metric) else 1.0
        tests = [v for r in runs if (v := _test_value(r, metric, tm)) is not None]
        vals = [v for r in runs if (v := _best_val_value(r, metric, tm)) is not None]
        walls = [v for r in runs if (v := _num(r.get("wall_time_s"))) is not None]
        ips = [v for r in runs if (v := _num(r.get("train_images_per_s"))) is not None]
        seeds = [r.get("seed") for r in runs]
        if len({repr(s) for s in seeds}) < len(seeds):
            print(f"report: warning: group '{g}' holds the same seed more than once: {seeds}",
                  file=sys.stderr)
        if len(tests) < len(runs):
            print(f"report: warning: {len(runs) - len(tests)} run(s) of group '{g}' lack "
                  f"'{metric}'", file=sys.stderr)
        if scale != 1.0 and any(v > 1.0 for v in tests + vals):
            print(f"report: warning: group '{g}' has '{metric}' values above 1; expected "
                  "fractions in [0, 1]", file=sys.stderr)
        tmean, tstd = _stats(tests)
        vmean, vstd = _stats(vals)
        extra: dict[str, dict] = {}
        for k in sorted({k for r in runs for k in (r.get("extra") or {})}):
            xs = [v for r in runs if (v := _num((r.get("extra") or {}).get(k))) is not None]
            if not xs:
                continue
            xscale = 100.0 if _is_fraction_metric(k) and all(0 <= x <= 1 for x in xs) else 1.0
            m, s = _stats([x * xscale for x in xs])
            extra[k] = {"mean": m, "std": s, "n": len(xs), "unit": "%" if xscale != 1 else ""}
        rows.append({
            "data": str(r0.get("data", "")),
            "model": str(r0.get("model", "")),
            "method": str(r0.get("method", "")),
            "sources": _sources_str(r0),
            "group": g,
            "test_metric": tm,
            "metric": metric,
            "unit": "%" if scale != 1.0 else "",
            "n": len(runs),
            "seeds": seeds,
            "test_values": [v * scale for v in tests],
            "test_mean": tmean * scale,
            "test_std": tstd * scale,
            "best_val_mean": vmean * scale,
            "best_val_std": vstd * scale,
            "wall_time_s_mean": _stats(walls)[0],
            "train_images_per_s_mean": _stats(ips)[0],
            "extra": extra,
            "paths": [r.get("_path", "") for r in runs],
        })
    return rows


# --------------------------------------------------------------------------------------------
# markdown and CSV

_METRIC_LABEL = {"acc": "acc", "map": "mAP"}


def _fmt(x: float, digits: int = 2) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return DASH
    return f"{mean:.{digits}f} ± {_fmt(std, digits)}"


def _md_cell(x: Any) -> str:
    return str(x).replace("|", r"\|")


def _seeds_str(seeds: Sequence) -> str:
    return ",".join("?" if s is None else str(s) for s in seeds)


def _metric_title(rows: Sequence[dict]) -> tuple[str, bool]:
    """Column title for the test number; second item: whether a per-row metric column is needed."""
    kinds = sorted({r["test_metric"] for r in rows})
    metric = rows[0]["metric"] if rows else "test_acc"
    unit = rows[0]["unit"] if rows else "%"
    u = f" ({unit})" if unit else ""
    if metric != "test_acc":
        return f"{metric}{u}, last epoch", len(kinds) > 1
    if len(kinds) == 1:
        return f"test {_METRIC_LABEL.get(kinds[0], kinds[0])}{u}, last epoch", False
    return f"test{u}, last epoch", True


def to_markdown(rows: Sequence[dict], title: str | None = "Results") -> str:
    """The report as markdown: notes, one table row per group, and extras when any."""
    head, per_row_metric = _metric_title(rows)
    kinds = sorted({r["test_metric"] for r in rows}) or ["acc"]
    val_label = "/".join(_METRIC_LABEL.get(k, k) for k in kinds)
    lines: list[str] = []
    if title:
        lines += [f"# {title}", ""]
    lines += [
        f"- **Test {val_label} is the LAST epoch's** (the model at the end of training); "
        "nothing is selected on the test set.",
        f"- \"best val (selected on validation)\" is the best validation {val_label} over epochs, "
        "a validation number, not a test number.",
        "- mean ± std over seeds; std is the sample standard deviation (ddof=1). "
        f"With a single seed (n = 1) std is undefined and shown as \"{DASH}\" "
        "(an empty cell in report.csv).",
        "- Accuracies and mAP in percent; wall time is the mean per run in seconds; "
        "images/s is the mean training throughput.",
        "",
    ]
    cols = ["data", "model", "method", "sources", "n", "seeds"]
    if per_row_metric:
        cols.append("metric")
    cols += [head, "best val (selected on validation)", "wall time (s)", "train images/s"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join(":---" if i < 4 else "---:" for i in range(len(cols))) + "|")
    for r in rows:
        cells = [r["data"], r["model"], r["method"], r["sources"] or DASH, r["n"],
                 _seeds_str(r["seeds"])]
        if per_row_metric:
            cells.append(_METRIC_LABEL.get(r["test_metric"], r["test_metric"]))
        cells += [_pm(r["test_mean"], r["test_std"]), _pm(r["best_val_mean"], r["best_val_std"]),
                  _fmt(r["wall_time_s_mean"], 0), _fmt(r["train_images_per_s_mean"], 0)]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    extra_rows = [(r, k, e) for r in rows for k, e in r["extra"].items()]
    if extra_rows:
        lines += ["", "## Extra numbers", "",
                  "Free-form numbers the runs reported (e.g. a DML peer's last-epoch test "
                  "accuracy); mean ± std over the seeds that reported them.", "",
                  "| data | model | method | sources | name | n | mean ± std |",
                  "|:---|:---|:---|:---|:---|---:|---:|"]
        for r, k, e in extra_rows:
            unit = f" {e['unit']}" if e["unit"] else ""
            cells = [r["data"], r["model"], r["method"], r["sources"] or DASH, k, e["n"],
                     _pm(e["mean"], e["std"], 2 if e["unit"] else 4) + unit]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = [
    "data", "model", "method", "sources", "n", "seeds", "test_metric", "metric", "unit",
    "test_mean", "test_std", "best_val_mean", "best_val_std",
    "wall_time_s_mean", "train_images_per_s_mean", "group",
]


def _csv_num(x: Any) -> str:
    v = _num(x)
    return "" if v is None else repr(v)


def to_csv(rows: Sequence[dict]) -> str:
    """The rows as CSV: raw (unrounded) numbers, mean and std in separate columns.

    ``unit`` says "%" when test/best-val numbers are percentages. An undefined std (one seed) or a
    number no run reported is an empty cell. Extras add ``extra:<name>_mean`` / ``_std`` columns.
    """
    extra_keys = sorted({k for r in rows for k in r["extra"]})
    cols = CSV_COLUMNS + [f"extra:{k}_{s}" for k in extra_keys for s in ("mean", "std")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        line = []
        for c in CSV_COLUMNS:
            v = r[c]
            if c == "seeds":
                line.append(_seeds_str(v))
            elif c in ("n",):
                line.append(str(v))
            elif c.endswith(("_mean", "_std")):
                line.append(_csv_num(v))
            else:
                line.append(str(v))
        for k in extra_keys:
            e = r["extra"].get(k)
            line += ["", ""] if e is None else [_csv_num(e["mean"]), _csv_num(e["std"])]
        w.writerow(line)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# validation curves


def val_curve_from_csv(path: str | Path, column: str | Sequence[str] = "val/acc"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) from a Lightning CSVLogger ``metrics.csv``.

    Rows are sparse: a row per logging event with the other columns empty. Rows whose value is
    empty/NaN are dropped; with several rows for one epoch the last one wins. ``column`` may be a
    list of candidates; the first present in the header is used. Returns empty arrays when none of
    them is present.
    """
    candidates = [column] if isinstance(column, str) else list(column)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        col = next((c for c in candidates if c in header), None)
        if col is None or "epoch" not in header:
            return np.array([], dtype=int), np.array([], dtype=float)
        by_epoch: dict[int, float] = {}
        for row in reader:
            v = _num((row.get(col) or "").strip() or None)
            e = _num((row.get("epoch") or "").strip() or None)
            if v is None or e is None:
                continue
            by_epoch[int(e)] = v
    epochs = np.array(sorted(by_epoch), dtype=int)
    return epochs, np.array([by_epoch[e] for e in epochs], dtype=float)


def _find_metrics_csv(r: dict) -> Path | None:
    base = Path(r.get("_dir", "."))
    rel = r.get("metrics_csv")
    if rel:
        p = Path(rel)
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
    """Average curves of possibly different lengths epoch by epoch.

    Returns (epochs, mean, std, count): every epoch any curve has; the mean over the curves that
    have that epoch; the sample std (ddof=1; NaN where fewer than two curves have it); the count.
    """
    by_epoch: dict[int, list[float]] = {}
    for ep, vals in curves:
        for e, v in zip(ep, vals):
            if v is not None and not math.isnan(float(v)):
                by_epoch.setdefault(int(e), []).append(float(v))
    epochs = np.array(sorted(by_epoch), dtype=int)
    mean = np.array([np.mean(by_epoch[e]) for e in epochs], dtype=float)
    std = np.array([np.std(by_epoch[e], ddof=1) if len(by_epoch[e]) > 1 else np.nan
                    for e in epochs], dtype=float)
    count = np.array([len(by_epoch[e]) for e in epochs], dtype=int)
    return epochs, mean, std, count


# --------------------------------------------------------------------------------------------
# plots (matplotlib's object API on an Agg canvas: no pyplot, no display, no global backend)


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _method_colors(methods: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    # the known methods keep one colour in every figure; others follow in alphabetical order
    methods = set(methods)
    cmap = colormaps["tab10"]
    known = {m: i for i, m in enumerate(METHOD_ORDER)}
    others = sorted(m for m in methods if m.lower() not in known)
    colors = {m: cmap(known[m.lower()]) for m in methods if m.lower() in known}
    colors.update({m: cmap((len(METHOD_ORDER) + i) % 10) for i, m in enumerate(others)})
    return colors


def _labels(items: Sequence[tuple[str, str, str]]) -> list[str]:
    """Readable labels "method / sources" from (method, sources, group); when two coincide, the
    group tokens that tell them apart are appended."""
    base = [f"{m}\n← {textwrap.shorten(s, 60)}" if s else m for m, s, _ in items]
    if len(set(base)) == len(base):
        return base
    skip = ("data=", "model=", "method=", "sources=", "source=")
    toks = [[t for t in g.split() if not t.startswith(skip)] for _, _, g in items]
    common = set.intersection(*(set(t) for t in toks)) if toks else set()
    out = []
    for b, t in zip(base, toks):
        dupe = base.count(b) > 1
        diff = " ".join(x for x in t if x not in common)
        out.append(f"{b}\n{textwrap.shorten(diff, 60)}" if dupe and diff else b)
    return out


def _panels(keys: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(keys))


def plot_test_acc(rows: Sequence[dict], path: str | Path) -> Path:
    """Mean test score per group as a point with an error bar (± std), seeds as small dots.

    One subplot per (data, model); one line per group, labelled with method and sources. Points
    rather than bars, because the axis is zoomed to the range of the scores and a bar's length
    would then mean nothing. Returns the written path.
    """
    path = Path(path)
    panels = _panels([(r["data"], r["model"]) for r in rows])
    if not rows:
        fig = _new_figure(6, 2)
        fig.text(0.5, 0.5, "no results", ha="center", va="center")
        fig.savefig(path)
        return path
    colors = _method_colors(r["method"] for r in rows)
    heights = [max(1.6, 0.55 * sum(1 for r in rows if (r["data"], r["model"]) == p) + 1.1)
               for p in panels]
    fig = _new_figure(8.5, sum(heights))
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    title, _ = _metric_title(rows)
    for ax, (data, model) in zip(axes, panels):
        pr = [r for r in rows if (r["data"], r["model"]) == (data, model)]
        y = np.arange(len(pr))[::-1]  # first row on top
        stds = [0.0 if math.isnan(r["test_std"]) else r["test_std"] for r in pr]
        for yi, r, s in zip(y, pr, stds):
            c = colors[r["method"]]
            if r["test_values"]:
                ax.plot(r["test_values"], [yi] * len(r["test_values"]), "o", ms=4, color=c,
                        alpha=0.45, mec="none", zorder=2)
            if not math.isnan(r["test_mean"]):
                ax.errorbar(r["test_mean"], yi, xerr=s if r["n"] > 1 else None, fmt="D", ms=7,
                            color=c, mec="black", mew=0.6, capsize=5, elinewidth=1.6, zorder=3)
        vals = [v for r in pr for v in r["test_values"]]
        ends = [(r["test_mean"] - s, r["test_mean"] + s) for r, s in zip(pr, stds)
                if not math.isnan(r["test_mean"])]
        lo = min([a for a, _ in ends] + vals, default=0.0)
        hi = max([b for _, b in ends] + vals, default=1.0)
        span = max(hi - lo, 2.0 if rows[0]["unit"] == "%" else 1e-3)
        ax.set_xlim(lo - 0.15 * span, hi + 0.55 * span)
        for yi, r, s in zip(y, pr, stds):
            if math.isnan(r["test_mean"]):
                continue
            right = max([r["test_mean"] + s] + r["test_values"])
            txt = f"{r['test_mean']:.2f}" + (f" ± {s:.2f}" if r["n"] > 1 else "") + \
                f"  (n={r['n']})"
            ax.text(right + 0.04 * span, yi, txt, va="center", fontsize=8.5)
        ax.set_ylim(-0.6, len(pr) - 0.4)
        ax.set_yticks(y, _labels([(r["method"], r["sources"], r["group"]) for r in pr]),
                      fontsize=8.5)
        ax.set_title(f"{data} · {model}", fontsize=10)
        ax.set_xlabel(title + " — ◆ mean ± std over seeds, dots = single seeds", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.grid(axis="y", alpha=0.12)
    fig.savefig(path)
    return path


def plot_val_curves(results: Sequence[dict], path: str | Path) -> Path:
    """Validation score vs epoch: per group the mean over seeds with a shaded ±std band.

    One subplot per (data, model). Curves of different lengths are averaged epoch by epoch over
    the seeds that reached that epoch. Runs without a metrics.csv are left out; if no run has one,
    the figure says so. Returns the written path.
    """
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    groups = []
    for g, runs in _group_results(results):
        curves = [c for c in (read_val_curve(r) for r in runs) if len(c[0])]
        if curves:
            groups.append((g, runs[0], curves))
    if not groups:
        fig = _new_figure(6, 2)
        fig.text(0.5, 0.5, "no validation curves found (no metrics.csv with val/acc)",
                 ha="center", va="center")
        fig.savefig(path)
        return path
    panels = _panels([(str(r0.get("data", "")), str(r0.get("model", ""))) for _, r0, _ in groups])
    colors = _method_colors(str(r0.get("method", "")) for _, r0, _ in groups)
    ncol = min(2, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    # per panel two axes: the whole run, and below it the second half zoomed in, where the
    # methods differ by a point or two and the full-range plot makes them overlap
    fig = _new_figure(6.5 * ncol, 6.6 * nrow)
    grid = fig.subplots(2 * nrow, ncol, squeeze=False, height_ratios=[1.0, 0.8] * nrow)
    linestyles = ["-", "--", ":", "-."]
    for i, (data, model) in enumerate(panels):
        ax_full, ax_zoom = grid[2 * (i // ncol), i % ncol], grid[2 * (i // ncol) + 1, i % ncol]
        pg = [x for x in groups if (str(x[1].get("data", "")), str(x[1].get("model", ""))) ==
              (data, model)]
        labels = _labels([(str(r0.get("method", "")), _sources_str(r0), g) for g, r0, _ in pg])
        seen_method: dict[str, int] = {}
        kinds = set()
        stats = []
        for (g, r0, curves), label in zip(pg, labels):
            method = str(r0.get("method", ""))
            kinds.add(str(r0.get("test_metric", "acc")))
            ls = linestyles[seen_method.get(method, 0) % len(linestyles)]
            seen_method[method] = seen_method.get(method, 0) + 1
            ep, mean, std, _ = mean_curve(curves)
            stats.append((ep, mean * 100, std * 100, ls, colors[method],
                          label.replace("\n", " ") + f" (n={len(curves)})"))
        last = max(int(ep.max()) for ep, *_ in stats)
        start = last // 2
        name = "/".join(_METRIC_LABEL.get(k, k) for k in sorted(kinds))
        for ax, zoom in ((ax_full, False), (ax_zoom, True)):
            lo, hi = math.inf, -math.inf
            for ep, mean, std, ls, c, label in stats:
                keep = ep >= start if zoom else np.ones_like(ep, dtype=bool)
                if not keep.any():
                    continue
                e, m, sd = ep[keep], mean[keep], std[keep]
                ax.plot(e, m, ls, color=c, lw=1.6, label=label,
                        marker="o" if len(e) <= 15 else None, ms=3)
                band = ~np.isnan(sd)
                sd0 = np.where(band, sd, 0.0)
                if band.any():
                    ax.fill_between(e, m - sd0, m + sd0, where=band, color=c, alpha=0.18, lw=0)
                lo, hi = min(lo, float(np.min(m - sd0))), max(hi, float(np.max(m + sd0)))
            if zoom and math.isfinite(lo):
                pad = max(hi - lo, 0.5) * 0.08
                ax.set_ylim(lo - pad, hi + pad)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(f"validation {name} (%)")
            ax.grid(alpha=0.3)
        ax_full.set_title(f"{data} · {model}", fontsize=10)
        ax_zoom.set_title(f"{data} · {model} — epochs {start}–{last}, zoomed", fontsize=9)
        ax_full.legend(fontsize=7.5, loc="lower right")
    for j in range(len(panels), nrow * ncol):
        grid[2 * (j // ncol), j % ncol].set_visible(False)
        grid[2 * (j // ncol) + 1, j % ncol].set_visible(False)
    fig.suptitle("Validation curves: mean over seeds, band = ±1 std (sample, where ≥ 2 seeds)",
                 fontsize=11)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------
# CLI


def write_report(results: Sequence[dict], out_dir: str | Path, metric: str = "test_acc",
                 plots: bool = True) -> dict[str, Path]:
    """Write report.md, report.csv and (unless ``plots`` is false) the two PNGs into ``out_dir``.

    Returns {"md", "csv", "test_png", "val_png"} -> paths (PNG keys only when plotted).
    Raises :class:`ReportError` on empty ``results`` or a group that mixes ``test_metric``.
    """
    if not results:
        raise ReportError("report: no results to summarise")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(results, metric=metric)
    paths = {"md": out / "report.md", "csv": out / "report.csv"}
    paths["md"].write_text(to_markdown(rows))
    paths["csv"].write_text(to_csv(rows))
    if plots:
        paths["test_png"] = plot_test_acc(rows, out / f"{_safe_name(metric)}.png")
        paths["val_png"] = plot_val_curves(results, out / "val_curves.png")
    return paths


def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sskt_lightning.report",
        description="Mean ± std over seeds of every results.json under the given directories, "
                    "as report.md, report.csv, <metric>.png and val_curves.png.",
    )
    p.add_argument("dirs", nargs="+", help="directories searched recursively for results.json "
                                           "(e.g. multirun/<date>/<time>)")
    p.add_argument("--out", default=None, help="output directory (default: the first dir)")
    p.add_argument("--metric", default="test_acc",
                   help="results.json key to summarise as the test number (default test_acc); "
                        "keys under 'extra' work too")
    p.add_argument("--no-plots", action="store_true", help="write only report.md and report.csv")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point. Returns 0 on success, 2 on a user error (message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        results = load_results(args.dirs)
        if not results:
            searched = ", ".join(str(Path(d)) for d in args.dirs)
            raise ReportError(
                f"report: no {RESULTS_NAME} found under: {searched}\n"
                "  Each finished training run writes results.json into its output directory "
                "(e.g. multirun/<date>/<time>/<job_num>/results.json). Check the path, or wait "
                "for the runs to finish."
            )
        out = Path(args.out) if args.out else Path(args.dirs[0])
        if out.is_file():
            out = out.parent
        paths = write_report(results, out, metric=args.metric, plots=not args.no_plots)
    except ReportError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(paths["md"].read_text(), end="")
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
