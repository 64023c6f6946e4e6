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
* **The same unlabeled images.** A run that trains on the setting's unlabeled images (its
  protocol.json's ``unlabeled``, else ``data.unlabeled=true`` among its overrides) is a candidate
  comparator: every group is also paired with the best OTHER such group of its setting, "best" being
  the highest mean best-val (validation, never test); rows marked ``reference`` (protocol.json: e.g.
  the fine-tuned source, other training data) are shown with "(reference)", never chosen as that
  comparator nor as the baseline.
* **Failures are shown, not dropped.** A job directory with ``failed.txt`` and no results, or a
  results.json whose ``status`` is ``failed``, is listed beside the table with its reason.

Search trials of the protocol (``protocol.json`` phase ``search``) are left out unless
``--include-search``: they are selection runs, not results.

The package's parts, each importing only those before it: :mod:`~sskt_lightning.report.common`
(the error, file names, atomic writing), :mod:`~sskt_lightning.report.loading` (results.json,
failures, validation curves), :mod:`~sskt_lightning.report.statistics` (runs, groups, mean ± std,
paired gains), :mod:`~sskt_lightning.report.tables` (markdown and CSV),
:mod:`~sskt_lightning.report.figures` (the PNGs) and :mod:`~sskt_lightning.report.cli`
(:func:`write_report`, the command line). Every name is importable from here as well.
"""
from sskt_lightning.report.common import (
    DASH,
    DEFAULT_BASELINE,
    FAILED_NAME,
    METHOD_ORDER,
    PROTOCOL_NAME,
    RESULTS_NAME,
    ReportError,
    _write,
)
from sskt_lightning.report.loading import load_failures, load_results, mean_curve, read_val_curve, val_curve_from_csv
from sskt_lightning.report.statistics import _params_str, group_key, paired_gain, runs_frame, summarise, t_quantile_975
from sskt_lightning.report.tables import CSV_COLUMNS, _fmt, baseline_warnings, to_csv, to_markdown
from sskt_lightning.report.figures import _method_colors, _zoom, plot_gains, plot_test_acc, plot_val_curves
from sskt_lightning.report.cli import _nothing_message, main, write_report

__all__ = ["ReportError", "METHOD_ORDER", "load_results", "load_failures", "runs_frame", "summarise",
           "paired_gain", "t_quantile_975", "to_markdown", "to_csv", "read_val_curve", "val_curve_from_csv",
           "mean_curve", "plot_test_acc", "plot_gains", "plot_val_curves", "write_report", "main"]
