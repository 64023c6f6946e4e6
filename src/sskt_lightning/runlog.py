"""The run's ``csv/metrics.csv``: Lightning's CSV logger, continued (not overwritten) on resume.

Lightning's :class:`~lightning.pytorch.loggers.CSVLogger` deletes an existing ``metrics.csv`` when
it starts. A run resumed in its own directory keeps the rows of the epochs its checkpoint covers
(``epoch <= resumed epoch``), drops the rows of the interrupted epoch (they are logged again), and
appends. Header rewrites (a new metric key) are atomic.
"""
from __future__ import annotations

import csv
import io
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from sskt_lightning.atomic import atomic_write_text


def _epoch_of(row: dict) -> float | None:
    try:
        return float(row.get("epoch") or "nan")
    except ValueError:
        return None


class _ContinuingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_through_epoch: int | None):
        self._keep = keep_through_epoch
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self._keep is None or not self._fs.isfile(self.metrics_file_path):
            return super()._check_log_dir_exists()   # a fresh run: Lightning's behaviour
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader
                    if (e := _epoch_of(r)) is not None and e <= self._keep
                    and not any(v for k, v in r.items() if k and k.startswith("test/"))]
        self.metrics_keys = sorted(header)
        self._write(header, rows)

    def _write(self, fieldnames, rows) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.metrics_file_path, buf.getvalue())

    def _rewrite_with_new_header(self, fieldnames) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._write(fieldnames, rows)


class RunCSVLogger(CSVLogger):
    """``CSVLogger(save_dir=<run dir>, name="csv", version="")`` that continues its file on resume.

    Args:
        keep_through_epoch: resuming from a checkpoint of this epoch: keep the existing rows of
            epochs up to it and append; None: a fresh run (an existing file is replaced).
    """

    def __init__(self, save_dir, keep_through_epoch: int | None = None, **kwargs):
        super().__init__(save_dir=save_dir, name="csv", version="", **kwargs)
        self._keep_through_epoch = keep_through_epoch

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._keep_through_epoch)
        return self._experiment
