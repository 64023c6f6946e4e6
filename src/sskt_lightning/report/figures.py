"""The figures (matplotlib's object API on an Agg canvas: no pyplot, no display): the test number per
group, the paired gains, the validation curves."""
from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sskt_lightning.report.common import METHOD_ORDER, _write
from sskt_lightning.report.loading import mean_curve, read_val_curve
from sskt_lightning.report.statistics import runs_frame
from sskt_lightning.report.tables import _metric_title, _setting_title


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
