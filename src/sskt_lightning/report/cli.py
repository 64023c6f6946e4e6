"""Writing a report and the command line (``python -m sskt_lightning.report``, ``sskt-report``)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sskt_lightning.report.common import DEFAULT_BASELINE, RESULTS_NAME, ReportError, _write
from sskt_lightning.report.loading import load_failures, load_results
from sskt_lightning.report.statistics import runs_frame, summarise
from sskt_lightning.report.tables import baseline_warnings, to_csv, to_markdown
from sskt_lightning.report.figures import plot_gains, plot_test_acc, plot_val_curves


def write_report(results: Sequence[dict], out_dir: str | Path, metric: str = "test_acc", plots: bool = True,
                 baseline: str = DEFAULT_BASELINE, failures: Sequence[dict] = (),
                 title: str | None = "Results", appendix: str = "", header: Sequence[str] = ()) -> dict[str, Path]:
    """Write report.md (``appendix`` at its end), report.csv, runs.csv and (unless ``plots`` is false)
    the PNGs into ``out_dir``, each atomically; ``header``: lines added to the conventions at the top.

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
    _write(paths["md"], to_markdown(summary, title=title, failures=failures, baseline=baseline,
                                         header=header) + appendix)
    _write(paths["csv"], to_csv(summary))
    _write(paths["runs_csv"], runs_frame(results, metric).drop(columns=["extra"]).to_csv(index=False,
                                                                                          lineterminator="\n"))
    if plots:
        paths["test_png"] = plot_test_acc(summary, out / f"{_safe_name(metric)}.png")
        paths["gains_png"] = plot_gains(summary, out / "gains.png")
        paths["val_png"] = plot_val_curves(results, out / "val_curves.png")
    return paths


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
