"""GPU slots: several jobs at once on one node, each on its own disjoint set of GPUs.

    slots = DeviceSlots(per_job=2)           # the node's GPUs (or SSKT_FAKE_GPU_COUNT=<n>), 2 per job
    devs = slots.acquire()                   # (0, 1): blocks until a slot is free
    env = {**os.environ, **slots.env(devs)}  # CUDA_VISIBLE_DEVICES=0,1 (SSKT_DEVICE_SLOT=0) for the job
    ...
    slots.release(devs)

Slot ``k`` is the ``k``-th group of ``per_job`` devices of ``available`` (the ids this process sees:
``CUDA_VISIBLE_DEVICES``' entries when it is set, else ``0 .. torch.cuda.device_count() - 1``), so the
job's ``CUDA_VISIBLE_DEVICES`` is always a subset of the parent's. Asking for more devices per job
than there are is a :class:`SlotError` at construction, before any job starts.

Two ways of sharing: in one process (the protocol's runner: threads, ``lock_dir=None``), or across
processes (a Hydra sweep's joblib workers: ``lock_dir=<sweep dir>/.device_slots``), where slot ``k`` is
held by an exclusive ``flock`` on ``slot<k>.lock``. The kernel drops such a lock when its holder dies,
so a slot held by a killed job is free again at once (no stale lock files to clean up). The lock's
file descriptor can be handed to the job's process (:meth:`DeviceSlots.fd`, ``pass_fds``): the slot
then stays taken while either process lives.

Tests simulate the device count with ``SSKT_FAKE_GPU_COUNT=<n>`` (devices 0 .. n-1); setting
``CUDA_VISIBLE_DEVICES`` in a CPU run is harmless. Stdlib only (torch only to count the GPUs).
"""
from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sskt_lightning.errors import ConfigError

FAKE_COUNT = "SSKT_FAKE_GPU_COUNT"   # tests: pretend the node has this many GPUs
SLOT_ENV = "SSKT_DEVICE_SLOT"        # set for a job that holds a slot: its index (results.json "devices")


class SlotError(ConfigError):
    """More devices asked for than the node has (per job, or for the jobs meant to run at once)."""


def fake_gpu_count(env: Mapping[str, str] = os.environ) -> int | None:
    value = env.get(FAKE_COUNT)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{FAKE_COUNT}={value!r}: must be an integer (the simulated GPU count).") from None


def detect_devices(env: Mapping[str, str] = os.environ) -> list:
    """The GPU ids this process may hand out: ``SSKT_FAKE_GPU_COUNT`` -> ``0..n-1``; else the entries of
    ``CUDA_VISIBLE_DEVICES`` (as ints where they are numbers; UUIDs stay strings) up to the number
    of GPUs torch sees, or ``0..count-1``."""
    fake = fake_gpu_count(env)
    if fake is not None:
        return list(range(fake))
    try:
        import torch
        count = torch.cuda.device_count()   # counts without initialising CUDA
    except Exception:                       # no torch / no driver: no GPUs
        count = 0
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        ids = [int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in visible.split(",") if v.strip()]
        return ids[:count]
    return list(range(count))


class DeviceSlots:
    """``capacity`` slots of ``per_job`` devices each; :meth:`acquire` / :meth:`release` (thread-safe;
    across processes with ``lock_dir``)."""

    def __init__(self, per_job: int, available: Sequence | None = None, lock_dir: str | Path | None = None,
                 poll_s: float = 0.5) -> None:
        if not isinstance(per_job, int) or isinstance(per_job, bool) or per_job < 1:
            raise SlotError(f"GPUs per job: {per_job!r}; give an integer >= 1.")
        self.available = list(detect_devices() if available is None else available)
        if per_job > len(self.available):
            have = len(self.available)
            raise SlotError(f"each job asks for {per_job} GPU(s) but this node has {have} "
                            f"({'none' if not have else 'ids ' + ','.join(map(str, self.available))}): "
                            f"ask for at most {have} per job (trainer.devices / --gpus-per-job), or run on a "
                            "node with more GPUs.")
        self.per_job = per_job
        self.slots = [tuple(self.available[k * per_job:(k + 1) * per_job])
                      for k in range(len(self.available) // per_job)]
        self.lock_dir = Path(lock_dir) if lock_dir is not None else None
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._held: dict[int, object] = {}   # slot -> its open lock file (lock_dir) or True

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def check_concurrency(self, jobs_at_once: int, what: str = "jobs at once") -> None:
        """:class:`SlotError` when ``jobs_at_once`` jobs cannot each hold a slot."""
        if jobs_at_once > self.capacity:
            raise SlotError(f"{jobs_at_once} {what} x {self.per_job} GPU(s) each = {jobs_at_once * self.per_job} "
                            f"GPUs, but this node has {len(self.available)}: at most {self.capacity} job(s) "
                            f"of {self.per_job} GPU(s) fit. Run {self.capacity} at once (hydra.launcher.n_jobs="
                            f"{self.capacity} / --jobs {self.capacity}) or give each job fewer GPUs.")

    def slot_of(self, devs: Sequence) -> int:
        try:
            return self.slots.index(tuple(devs))
        except ValueError:
            raise ValueError(f"{tuple(devs)} is not one of the slots {self.slots}") from None

    def _try(self, k: int) -> bool:
        """Take slot ``k`` if it is free (caller holds ``_cond``)."""
        if k in self._held:
            return False
        if self.lock_dir is None:
            self._held[k] = True
            return True
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_dir / f"slot{k}.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} devices {','.join(map(str, self.slots[k]))}\n")   # for a human looking
        f.flush()
        self._held[k] = f
        return True

    def acquire(self, timeout: float | None = None) -> tuple:
        """A free slot's devices; blocks until one is free (``TimeoutError`` after ``timeout`` s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                for k in range(self.capacity):
                    if self._try(k):
                        return self.slots[k]
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no free GPU slot within {timeout} s ({self.capacity} slot(s), all held)")
                # another thread's release wakes us; another process's only shows when we look again
                self._cond.wait(self.poll_s if left is None else min(self.poll_s, left))

    def fd(self, devs: Sequence) -> int | None:
        """The file descriptor holding ``devs``' slot (lock_dir only), to pass to the job's process."""
        f = self._held.get(self.slot_of(devs))
        return f.fileno() if hasattr(f, "fileno") else None

    def release(self, devs: Sequence) -> None:
        k = self.slot_of(devs)
        with self._cond:
            f = self._held.pop(k, None)
            if hasattr(f, "close"):
                try:
                    fcntl.flock(f, fcntl.LOCK_UN)
                finally:
                    f.close()
            self._cond.notify_all()

    def env(self, devs: Sequence) -> dict[str, str]:
        """What the job's process needs: ``CUDA_VISIBLE_DEVICES`` (and the slot's index, for results.json)."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, devs)), SLOT_ENV: str(self.slot_of(devs))}


def assignment(env: Mapping[str, str] = os.environ) -> dict:
    """results.json's ``devices``: ``{"visible": CUDA_VISIBLE_DEVICES or None, "slot": k or None}``."""
    slot = env.get(SLOT_ENV)
    return {"visible": env.get("CUDA_VISIBLE_DEVICES"),
            "slot": int(slot) if slot not in (None, "") and slot.isdigit() else None}
