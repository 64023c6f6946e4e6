"""The README's compact table of a benchmark cell, from the records on disk (no hand copying).

    python experiments/fashion_transfer/readme_table.py \\
        experiments/fashion_transfer/benchmark_runs/labels5_ema0.999_bf16_cl [more cells ...]

For each cell (one directory ``benchmark.py`` wrote: ``protocol/`` with its ``report/report.csv``,
``teachers/``, ``finetuned/``) one markdown table, a row per method in the report's order:

* test accuracy (%), mean ± std over the seeds (last epoch);
* the seed-paired gain over scratch, 95 % t interval, wins; bold where the interval excludes zero;
* the seed-paired gain over the best OTHER method on the same unlabeled images (the report's choice:
  highest mean validation, never test), named, with its interval and wins;
* EMA - raw: the mean paired difference between the averaged weights' test accuracy and the raw
  weights' (``extra.test_raw_acc`` of each final run; "–" without ``model.ema``);
* the settings selected on validation;
* compute in minutes: the method's search trials + its finals (``elapsed_s`` of each run's
  ``protocol.json``), plus the runs it needs first (KD's born-again teachers, kd_unlabeled's
  fine-tuned sources; ``wall_time_s`` of their ``results.json``). The stage-1 source, shared by every
  method that reads it, is counted once, below the table;
* below it, whether ranking the methods by the raw weights' test accuracy changes their order (the
  methods that move, named).

With ``--summary``, one table across the cells instead: a row per method, for each cell its test
accuracy and its seed-paired gain over scratch (the README's compact view; the full tables live in
docs/results.md). A column is named by ``label=directory`` or, without a label, the directory's name.

A cell whose report is missing (the benchmark has not finished it) is an error that names it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from sskt_lightning import protocol as P
from sskt_lightning.jsonfile import read_object
from sskt_lightning.report.tables import short_params

STAGES = {"kd": "teachers", "kd_unlabeled": "finetuned"}   # runs a method needs before its own
NAMES = {"scratch": "scratch", "kd": "KD (born-again teacher)", "dml": "DML", "maxl": "MAXL", "sskt": "SSKT",
         "sskt_unlabeled": "SSKT + unlabeled", "fixmatch": "FixMatch", "freematch": "FreeMatch",
         "flexmatch": "FlexMatch", "softmatch": "SoftMatch", "kd_unlabeled": "KD + unlabeled (fine-tuned source)",
         "dml_unlabeled": "DML + unlabeled", "sskt_fixmatch": "SSKT + FixMatch",
         "finetuned_source": "fine-tuned source (reference)", "linear_probe": "linear probe (reference)"}


def _read_json(path: Path) -> dict:
    """A record as a dict ({} when it is missing, unreadable or not a JSON object)."""
    return read_object(path) or {}


def _num(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _gain(mean, low, high, wins, n) -> str:
    mean, low, high = _num(mean), _num(low), _num(high)
    if mean is None:
        return "–"
    text = f"{mean:+.2f} [{low:+.2f}, {high:+.2f}], {int(_num(wins) or 0)}/{int(_num(n) or 0)}" \
        if low is not None and high is not None else f"{mean:+.2f}"
    return f"**{text}**" if low is not None and high is not None and (low > 0 or high < 0) else text


def compute_minutes(cell: Path, method: str) -> float:
    """Search + finals of ``method`` (protocol.json's elapsed_s) + the stage runs it needs."""
    seconds = sum(_num(_read_json(p).get("elapsed_s")) or 0.0
                  for p in (cell / "protocol" / method).glob("*/*/protocol.json"))
    if method in STAGES:
        seconds += sum(_num(_read_json(p).get("wall_time_s")) or 0.0
                       for p in (cell / STAGES[method]).glob("seed_*/results.json"))
    return seconds / 60


def final_accuracies(cell: Path, method: str) -> list[tuple[float | None, float | None]]:
    """(test acc, raw weights' test acc) of each final run (``test_acc``, ``extra.test_raw_acc``;
    None where missing: a run without ``model.ema`` has no raw accuracy)."""
    out = []
    for p in sorted((cell / "protocol" / method / "final").glob("seed_*/results.json")):
        res = _read_json(p)
        out.append((_num(res.get("test_acc")), _num((res.get("extra") or {}).get("test_raw_acc"))))
    return out


def ema_minus_raw(cell: Path, method: str) -> float | None:
    """Mean over the final runs of (EMA test acc - raw test acc), in points; None without EMA."""
    diffs = [100 * (acc - raw) for acc, raw in final_accuracies(cell, method) if acc is not None and raw is not None]
    return sum(diffs) / len(diffs) if diffs else None


def raw_mean(cell: Path, method: str) -> float | None:
    """Mean test accuracy (%) of the RAW weights over the final runs; None when a final run has
    none (no ``model.ema``)."""
    raws = [raw for _, raw in final_accuracies(cell, method)]
    return 100 * sum(raws) / len(raws) if raws and all(r is not None for r in raws) else None


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def ranking_with_raw_weights(cell: Path, rows: pd.DataFrame) -> str:
    """Whether ranking the methods by the raw weights' mean test accuracy instead of the average's
    changes the order: the methods whose rank moves, named; "" when a method has no raw accuracy."""
    ema = {str(r["name"]): float(r["test_mean"]) for _, r in rows.iterrows()}
    raw = {m: raw_mean(cell, m) for m in ema}
    if not ema or any(v is None for v in raw.values()):
        return ""
    by_ema = sorted(ema, key=lambda m: -ema[m])
    by_raw = sorted(raw, key=lambda m: -raw[m])
    moved = [f"{NAMES.get(m, m)} {_ordinal(by_raw.index(m) + 1)} ({raw[m]:.2f}; "
             f"{_ordinal(by_ema.index(m) + 1)} with the average)" for m in by_raw if by_raw.index(m) != by_ema.index(m)]
    if not moved:
        return "Ranked by the raw weights' test accuracy instead of the average's, the methods keep their order."
    return "Ranked by the raw weights' test accuracy instead of the average's: " + "; ".join(moved) + "."


def _report(cell: Path) -> pd.DataFrame:
    report = cell / "protocol" / "report" / "report.csv"
    if not report.is_file():
        raise FileNotFoundError(f"{report} does not exist: the benchmark has not finished this cell "
                                f"(run experiments/fashion_transfer/benchmark.py --plan with its options)")
    return pd.read_csv(report)


def table(cell: Path) -> str:
    rows = _report(cell)
    lines = ["| method | test acc (%) | gain over scratch [95 % CI], wins | gain over the best other method on "
             "the same unlabeled images [95 % CI], wins | EMA − raw | selected on validation | compute (min) |",
             "|---|---|---|---|---|---|---|"]
    minutes = {m: compute_minutes(cell, m) for m in map(str, rows["name"])}
    for _, r in rows.iterrows():
        name = str(r["name"])
        test = f"{r['test_mean']:.2f} ± {r['test_std']:.2f}" if _num(r.get("test_std")) is not None \
            else f"{r['test_mean']:.2f}"
        base = "baseline" if name == "scratch" else _gain(r.get("gain_mean"), r.get("gain_ci_low"),
                                                          r.get("gain_ci_high"), r.get("wins"), r.get("n_paired"))
        other = r.get("same_unl_best")
        same = "–" if not isinstance(other, str) or other == name else \
            f"vs {other}: " + _gain(r.get("same_unl_gain_mean"), r.get("same_unl_gain_ci_low"),
                                    r.get("same_unl_gain_ci_high"), r.get("same_unl_wins"),
                                    r.get("same_unl_n_paired"))
        if bool(r.get("reference")):
            same = "– (reference)"
        ema = ema_minus_raw(cell, name)
        params = short_params(r["params"]) if isinstance(r.get("params"), str) else "–"
        lines.append(f"| {NAMES.get(name, name)} | {test} | {base} | {same} | "
                     f"{'–' if ema is None else f'{ema:+.2f}'} | {params} | {minutes[name]:.1f} |")
    source = _num(_read_json(cell.parent / "source" / "results.json").get("wall_time_s"))
    total = sum(minutes.values())
    searched_only = sorted({p.parent.name for p in (cell / "protocol").glob("*/search")} - set(minutes))
    extra = sum(compute_minutes(cell, m) for m in searched_only)
    lines += ["", f"Compute: {total + extra:.1f} min summed over the runs of this cell"
              + (f" (of which {extra:.1f} min for the searches of {', '.join(searched_only)}, which had no finals)"
                 if searched_only else "")
              + (f"; the stage-1 source, shared by every cell: {source / 60:.1f} min" if source else "") + "."]
    ranking = ranking_with_raw_weights(cell, rows)
    if ranking:
        lines += ["", ranking]
    return "\n".join(lines)


def summary(cells: dict[str, Path]) -> str:
    """One row per method (the first cell's order; a method only a later cell has comes after the
    row it follows there), per cell: test acc and gain over scratch."""
    reports = {label: _report(cell).set_index("name") for label, cell in cells.items()}
    order: list[str] = []
    for rep in reports.values():
        previous = None
        for m in map(str, rep.index):
            if m not in order:
                order.insert(order.index(previous) + 1 if previous is not None else len(order), m)
            previous = m
    lines = ["| method | " + " | ".join(f"{label}: test acc (%) | gain over scratch [95 % CI], wins"
                                       for label in reports) + " |",
             "|---|" + "---|---|" * len(reports)]
    for name in order:
        cols = []
        for rep in reports.values():
            if name not in rep.index:
                cols += ["–", "–"]
                continue
            r = rep.loc[name]
            cols.append(f"{r['test_mean']:.2f} ± {r['test_std']:.2f}" if _num(r.get("test_std")) is not None
                        else f"{r['test_mean']:.2f}")
            cols.append("baseline" if name == "scratch" else _gain(r.get("gain_mean"), r.get("gain_ci_low"),
                                                                   r.get("gain_ci_high"), r.get("wins"),
                                                                   r.get("n_paired")))
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _labelled(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    return (label, Path(path)) if sep else (Path(spec).name, Path(spec))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cells", nargs="+", help="benchmark cell directories (benchmark_runs/labels...), "
                                            "with --summary optionally as label=directory")
    p.add_argument("--summary", action="store_true", help="one table across the cells (test acc, gain over scratch)")
    args = p.parse_args(argv)
    cells = dict(_labelled(c) for c in args.cells)
    try:
        if args.summary:
            print(summary(cells))
            return
        print("\n".join(f"### {cell.name}\n\n{table(cell)}\n" for cell in cells.values()))
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
