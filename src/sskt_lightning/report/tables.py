"""The summary as text: ``report.md`` (markdown tables per setting, failures, baseline warnings) and
``report.csv``."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from sskt_lightning.report.common import DASH, DEFAULT_BASELINE


_METRIC_LABEL = {"acc": "acc", "map": "mAP"}
REFERENCE_MARK = "(reference)"
SAME_UNL_HEADER = "gain over the best other method on the same unlabeled images (points)"


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
        "method": [f"{n} {REFERENCE_MARK}" if ref else n for n, ref in zip(part["name"], part["reference"])],
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
    if part["unlabeled"].any():
        table["unlabeled images"] = ["yes" if u else "no" for u in part["unlabeled"]]
        table[SAME_UNL_HEADER] = [
            DASH if not best else (f"{best}: " + (DASH if math.isnan(m) else f"{m:+.2f} ± {_fmt(s)}"))
            for best, m, s in zip(part["same_unl_best"], part["same_unl_gain_mean"], part["same_unl_gain_std"])]
        table["95 % CI (same unlabeled)"] = [DASH if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"
                                             for lo, hi in zip(part["same_unl_gain_ci_low"],
                                                               part["same_unl_gain_ci_high"])]
        table["wins (same unlabeled)"] = [DASH if n == 0 else f"{int(w)}/{n}"
                                          for w, n in zip(part["same_unl_wins"], part["same_unl_n_paired"])]
    if part["params"].astype(bool).any():
        table["selected on validation"] = [short_params(p) or DASH for p in part["params"]]
    table["train / val / unlabeled"] = [" / ".join(_count(x) for x in t)
                                        for t in zip(part["num_train"], part["num_val"], part["num_unlabeled"])]
    table["wall time (s)"] = part["wall_time_s_mean"].map(lambda x: _fmt(x, 0))
    table["train img/s"] = part["train_images_per_s_mean"].map(lambda x: _fmt(x, 0))
    return table


def short_params(params: str) -> str:
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
                baseline: str = DEFAULT_BASELINE, header: Sequence[str] = ()) -> str:
    """The report as markdown: the conventions (plus the lines of ``header``, e.g. what every run
    shared), one table per setting, extras, failed jobs."""
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
    if len(summary) and summary["unlabeled"].any():
        lines.append(
            "- gain over the best other method on the same unlabeled images: seed-paired as above, against "
            "the method (named in the cell) with the highest mean best-val among the OTHER methods of the "
            "setting that train on its unlabeled images, references excluded: chosen on validation, never "
            "on test.")
    if len(summary) and summary["reference"].any():
        lines.append(f"- {REFERENCE_MARK}: a reference, not a comparable method (other training data or "
                     "architecture, e.g. the source network fine-tuned); never chosen as the best method.")
    lines += [f"- {h}" for h in header]
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
               "gain_std", "gain_ci_low", "gain_ci_high", "wins", "unlabeled", "reference", "same_unl_best",
               "same_unl_best_val", "same_unl_n_paired", "same_unl_gain_mean", "same_unl_gain_std",
               "same_unl_gain_ci_low", "same_unl_gain_ci_high", "same_unl_wins", "params", "num_train", "num_val",
               "num_unlabeled", "wall_time_s_mean", "train_images_per_s_mean", "group"]


def to_csv(summary: pd.DataFrame) -> str:
    """The summary as CSV: raw (unrounded) numbers, mean and std in separate columns, empty cells
    for undefined numbers; extras add ``extra:<name>_mean`` / ``_std`` columns."""
    out = summary.rename(columns={"val_mean": "best_val_mean", "val_std": "best_val_std"}).reindex(columns=CSV_COLUMNS)
    out["seeds"] = out["seeds"].map(_seeds_str)
    for col in ("wins", "same_unl_wins"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype("Int64")
    for k in sorted({k for e in summary.get("extra", []) for k in e}):
        for stat in ("mean", "std"):
            out[f"extra:{k}_{stat}"] = [e.get(k, {}).get(stat, math.nan) for e in summary["extra"]]
    return out.to_csv(index=False, lineterminator="\n")
