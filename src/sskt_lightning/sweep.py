"""The start and end of a Hydra multirun: GPUs checked before any job starts; a sweep in which any
job failed says so and exits non-zero.

:class:`GpuSlotsCheck` (``hydra.callbacks.gpu_slots``): a sweep that spreads its jobs over the node's
GPUs (``hydra/launcher=joblib``, :func:`sskt_lightning.ddp_launch.slot_plan`) and asks for more GPUs than
the node has (per job, or ``hydra.launcher.n_jobs`` jobs at once) stops before any job starts, exit 2.

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


class GpuSlotsCheck(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        from sskt_lightning.ddp_launch import slot_plan
        from sskt_lightning.device_slots import DeviceSlots
        from sskt_lightning.errors import SSKTError
        from sskt_lightning.extras import cluster_launch
        if cluster_launch() is not None:
            return
        try:
            per_job = slot_plan(config, str(OmegaConf.select(config, "hydra.launcher._target_", default="") or ""))
            if per_job is None:
                return
            slots = DeviceSlots(per_job)
            n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs", default=None)
            if isinstance(n_jobs, int) and n_jobs > 0:   # -1 (joblib's default, "every core"): as many as fit
                slots.check_concurrency(n_jobs, "jobs at once (hydra.launcher.n_jobs)")
        except SSKTError as err:
            print(f"\nerror: {err}\n", file=sys.stderr)
            sys.exit(2)


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
