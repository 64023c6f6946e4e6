"""The end of a Hydra multirun: a sweep in which any job failed says so and exits non-zero.

Registered in ``conf/train.yaml`` (``hydra.callbacks.failed_jobs``). Each failed job wrote
``failed.txt`` (first line: the error on one line) into its directory; :class:`FailedJobsSummary`
lists them, one line each, and ends the process with exit code 1. Stdlib + Hydra only.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

FAILED = "failed.txt"


def failed_jobs(sweep_dir: str | Path) -> list[tuple[str, str]]:
    """``(job directory relative to the sweep, first line of its failed.txt)`` for each failed job."""
    root = Path(sweep_dir)
    out = []
    for f in sorted(root.rglob(FAILED), key=lambda p: [int(x) if x.isdigit() else x for x in p.parts]):
        try:
            first = f.read_text().splitlines()[0] if f.stat().st_size else "(empty failed.txt)"
        except OSError as err:
            first = f"(unreadable failed.txt: {err})"
        out.append((str(f.parent.relative_to(root)), first))
    return out


def count_jobs(sweep_dir: str | Path) -> int:
    return sum(1 for p in Path(sweep_dir).rglob(".hydra") if p.is_dir())


class FailedJobsSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failed_jobs(sweep_dir)
        if not failed:
            return
        total = max(count_jobs(sweep_dir), len(failed))
        lines = [f"\nerror: {len(failed)} of {total} jobs failed in {sweep_dir}:"]
        lines += [f"  job {job}: {why}" for job, why in failed]
        lines.append(f"(details: <job dir>/{FAILED}; the other jobs' results.json are complete)\n")
        print("\n".join(lines), file=sys.stderr)
        sys.exit(1)
