"""Runs that reuse what they load: the protocol's training jobs forked from one process that has
already imported torch, Lightning, Hydra and this package (Python's ``forkserver``).

Each job of ``python -m sskt_lightning.protocol`` used to be ``python -m sskt_lightning.train ...`` in
a fresh interpreter, which imports torch and Lightning again for every run (see
experiments/protocol_cost/where_time_goes.py for the measured share). With ``--launch fork`` (the
default on Linux) a fork server is started once with those imports done and NOTHING run (no
tensor op, no CUDA, no thread pool), and every job is a fresh fork of it that runs the same entry
point (``sskt_lightning.train.main`` with the same command-line arguments), its stdout and stderr in
the run's ``train.log``. What subprocesses gave is kept, because every job is still its own process:

  * a failed, killed (SIGKILL, the OOM killer) or interrupted job ends only that process; the
    protocol sees its exit code (a signal: negative) exactly as a subprocess's and records it;
    a dead fork server is started again at the next job (``multiprocessing.forkserver.ensure_running``);
  * nothing leaks between jobs: each fork starts from the pristine server (random state, Hydra's
    global state, logging handlers, torch's thread settings are those of a process that never ran
    a job), and sets the job's environment and torch threads before it runs;
  * the run's records (train.log, results.json, checkpoints) are written by the same code; results
    are bit-identical to a subprocess run of the same command (tests/test_protocol_workers.py).

The server's own environment (OMP_NUM_THREADS & co.) is the protocol's job environment, set while
it starts, so torch initialises alike in both launch modes.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

PRELOAD = "sskt_lightning._worker_preload"
LAUNCHES = ("fork", "subprocess")


def default_launch() -> str:
    return "fork" if "forkserver" in multiprocessing.get_all_start_methods() else "subprocess"


def _job(argv: list[str], env: dict, log_path: str, threads: int) -> None:
    """The job, inside a fresh fork of the server: its environment, torch's threads, stdout/stderr
    into the log, then the training command's own entry point."""
    os.setpgrp() if hasattr(os, "setpgrp") else None     # its own process group, as a subprocess would
    signal.signal(signal.SIGINT, signal.SIG_DFL)          # the parent's Ctrl-C handling is not the job's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)   # Hydra's log handler appends to it too
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    import torch
    torch.set_num_threads(threads)
    import runpy                           # as `python -m sskt_lightning.train <argv>` runs it
    sys.argv = ["-m", *argv]               # (runpy puts the module's file in argv[0])
    runpy.run_module("sskt_lightning.train", run_name="__main__", alter_sys=True)


class ForkedJob:
    """A job forked from the server, with the part of ``subprocess.Popen``'s interface the Runner uses."""

    def __init__(self, argv: list[str], env: dict, log_path: Path, threads: int) -> None:
        ctx = multiprocessing.get_context("forkserver")
        _start_server(env)
        self.proc = ctx.Process(target=_job, args=(argv, env, str(log_path), threads), daemon=False)
        from multiprocessing import spawn
        prepare = spawn.get_preparation_data

        def without_main(name):      # the job needs the server's imports only: never re-import the caller's
            data = prepare(name)     # __main__ (a script that calls run_protocol unguarded would run again)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data
        spawn.get_preparation_data = without_main
        try:
            self.proc.start()
        finally:
            spawn.get_preparation_data = prepare
        self.pid = self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode

    def poll(self) -> int | None:
        if self.proc.exitcode is None and not self.proc.is_alive():
            self.proc.join(0)
        return self.proc.exitcode

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        self.proc.join(timeout)
        return self.proc.exitcode


def _start_server(env: dict) -> None:
    """Start the fork server (or again, when it died) with the jobs' environment and the imports
    preloaded; a no-op while it runs."""
    from multiprocessing import forkserver
    multiprocessing.get_context("forkserver").set_forkserver_preload([PRELOAD])
    saved = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in env.items()
                           if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTHONUNBUFFERED")})
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def server_pid() -> int | None:
    from multiprocessing import forkserver
    return getattr(forkserver._forkserver, "_forkserver_pid", None)
