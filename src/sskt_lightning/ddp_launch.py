"""A multirun job on one node that trains in a process of its own: DDP jobs and jobs on GPU slots.

Lightning's DDP launcher (``_SubprocessScriptLauncher``) starts the other ranks by running the
process's command line again. Inside ``-m`` that command line is the whole sweep (and with the
Optuna sweeper each rank would sample values of its own). So a sweep job that needs several
processes, or its own GPUs, is run as a **single run in a subprocess**:

    python -m sskt_lightning.train <the job's task overrides> hydra.run.dir=<the job's directory>
        hydra.mode=RUN hydra.output_subdir=null ...

The task overrides are Hydra's for that job (the swept values, the Optuna sweeper's sampled ones),
so the subprocess composes exactly the job's configuration; it checks so (the job's resolved config's
SHA-256 travels in ``SSKT_JOB_CONFIG_DIGEST`` and every rank compares its own: a mismatch is a
ConfigError). In that single run, Lightning's own launcher starts the other ranks with the single
run's command line, the path tested for plain DDP runs, with a master port of its own (the sweep's
``MASTER_PORT`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` are not passed on).

Why a process per job rather than a launcher that starts ranks 1.. from the sweep's process:
``CUDA_VISIBLE_DEVICES`` cannot change in a process once CUDA is initialised (a joblib worker runs
several jobs), Lightning's child-process observer SIGKILLs its main process when a rank dies (that
would be the whole sweep), and a process group and DDP environment variables would outlive each job.
Here a job that fails, or whose process is killed, is one failed job: its directory gets ``failed.txt``
and the sweep goes on (:class:`sskt_lightning.sweep.FailedJobsSummary` ends it non-zero, naming it).
The job's process runs in a session of its own, so its ranks can be ended together.

Under SLURM / torchrun (the processes are started by the cluster) nothing of this applies.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sskt_lightning.errors import ConfigError
from sskt_lightning.jsonfile import read_object

log = logging.getLogger("sskt_lightning")

DIGEST_ENV = "SSKT_JOB_CONFIG_DIGEST"
# what the sweep's process may carry that must not reach a job's ranks (Lightning reads them to
# decide who starts processes and where they meet)
_DDP_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "PL_GLOBAL_SEED", "TORCHELASTIC_RUN_ID")


def config_digest(cfg: DictConfig) -> str:
    """SHA-256 of the resolved config (the hydra node left out): what every rank must agree on."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def check_digest(cfg: DictConfig, env=os.environ) -> None:
    """In a job's process (and each of its ranks): the config composed here is the sweep job's."""
    expected = env.get(DIGEST_ENV)
    if expected and config_digest(cfg) != expected:
        raise ConfigError("this process composed another configuration than its sweep job's (config digest "
                          f"{config_digest(cfg)[:12]} != {expected[:12]}): the job's task overrides do not "
                          "reproduce its config. Report this, with the sweep's command line.")


def devices_count(devices) -> int | None:
    """``trainer.devices`` as a count: an int, ``-1`` / ``"auto"`` -> None (all), a list or
    ``"0,1"`` -> its length; 0 for no devices."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return None if devices == -1 else devices
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return None
        if text.isdigit():
            return int(text)
        return len([d for d in text.split(",") if d.strip()])
    try:
        return len(list(devices))
    except TypeError:
        return None


def several_processes(cfg: DictConfig) -> bool:
    """Whether Lightning would start processes for this job (several nodes; DDP / automatic strategy,
    not one device)."""
    trainer = cfg.get("trainer") or {}
    if int(trainer.get("num_nodes", 1) or 1) > 1:
        return True
    strategy = trainer.get("strategy", "auto")
    if not isinstance(strategy, str) or strategy not in ("ddp", "auto"):
        return False   # ddp_spawn, fsdp, ... (not handled: see launch_problem's refusal)
    n = devices_count(trainer.get("devices", 1))
    return n is None or n > 1   # the automatic strategy with several devices is Lightning's "ddp" (CPU too)


def slot_plan(cfg: DictConfig, launcher_target: str, env=os.environ) -> int | None:
    """GPUs per job when the sweep spreads jobs over the node's GPUs, else None.

    Slots are used with Hydra's joblib launcher (jobs at once, each gets its own GPUs) when the jobs
    run on GPUs (accelerator auto / gpu / cuda and GPUs present; ``SSKT_FAKE_GPU_COUNT`` simulates
    them) and ``trainer.devices`` is a count (an int, or ``auto`` / -1: every GPU). Not with a list of
    device ids (those stay the user's), the basic launcher (one job at a time) or submitit (it places
    jobs itself)."""
    from sskt_lightning.device_slots import detect_devices, fake_gpu_count
    if "joblib" not in (launcher_target or ""):
        return None
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and not devices.strip() in ("auto", "-1") and not devices.strip().isdigit():
        return None
    if not isinstance(devices, (int, str)) or isinstance(devices, bool):
        return None
    fake = fake_gpu_count(env)
    if fake is None and str(trainer.get("accelerator", "auto")) not in ("auto", "gpu", "cuda"):
        return None
    available = detect_devices(env)
    if not available and fake is None:
        return None
    n = devices_count(devices)
    return len(available) if n is None else n


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_command(hydra_cfg) -> tuple[list[str], str]:
    """``(command, cwd)`` of the job as a single run: its task overrides, its run directory."""
    choices = hydra_cfg.runtime.choices
    cmd = [sys.executable, "-m", "sskt_lightning.train", *hydra_cfg.overrides.task,
           f"hydra.run.dir={_quote(str(hydra_cfg.runtime.output_dir))}",
           "hydra.mode=RUN",              # an hparams_search config sets MULTIRUN: this run is one job
           "hydra.output_subdir=null",    # the job's .hydra/ is the sweep's (config, overrides)
           f"hydra.job.name={hydra_cfg.job.name}", f"hydra.job.chdir={str(bool(hydra_cfg.job.chdir)).lower()}"]
    for group in ("hydra/job_logging", "hydra/hydra_logging"):
        if choices.get(group):
            cmd.append(f"{group}={choices[group]}")
    return cmd, str(hydra_cfg.runtime.cwd)


def job_env(cfg: DictConfig, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DDP_ENV}
    env[DIGEST_ENV] = config_digest(cfg)
    env.update(extra or {})
    return env


def _end_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """End what is left of the job's session (ranks of a job whose rank 0 died)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_job_in_subprocess(cfg: DictConfig, hydra_cfg, per_job: int | None) -> float:
    """Run this multirun job as a single run in its own process (on a GPU slot when ``per_job``);
    return the value the sweeper optimises. A failed or killed job is recorded and returns NaN."""
    from sskt_lightning.records import FAILED, RESULTS, optimized_value, record_failure
    out = Path(hydra_cfg.runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (FAILED, RESULTS):
        (out / name).unlink(missing_ok=True)
    cmd, cwd = job_command(hydra_cfg)
    slots = devs = None
    extra: dict = {}
    if per_job is not None:
        from sskt_lightning.device_slots import DeviceSlots
        sweep_dir = Path(hydra_cfg.runtime.cwd) / str(hydra_cfg.sweep.dir)
        slots = DeviceSlots(per_job, lock_dir=sweep_dir / ".device_slots")
        devs = slots.acquire()
        extra = slots.env(devs)
    try:
        where = f" on GPU slot {extra['SSKT_DEVICE_SLOT']} (CUDA_VISIBLE_DEVICES={extra['CUDA_VISIBLE_DEVICES']})" \
            if extra else ""
        log.info("job %s runs in its own process%s: %s", hydra_cfg.job.num, where, out)
        pass_fds = (slots.fd(devs),) if slots is not None and slots.fd(devs) is not None else ()
        proc = subprocess.Popen(cmd, cwd=cwd, env=job_env(cfg, extra), start_new_session=True, pass_fds=pass_fds)
        try:
            code = proc.wait()
        except BaseException as stop:  # Ctrl-C / SIGTERM of the sweep: end the job's ranks too, then stop
            # (the job runs in a session of its own: the terminal's Ctrl-C does not reach it)
            _end_group(proc, signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            _end_group(proc)
            raise
        _end_group(proc)               # ranks left behind by a rank 0 that died
    finally:
        if slots is not None:
            slots.release(devs)
    results = read_object(out / RESULTS)
    if code == 0 and results and results.get("status") == "ok":
        return optimized_value(cfg, results)
    if not (out / FAILED).is_file():   # killed (no chance to record it), or died before recording
        if code == 0:
            why = "the job's process exited with code 0 but left no readable results.json (a JSON object)"
        else:
            how = f"signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit code {code}"
            why = f"the job's process ended with {how} before it finished"
        record_failure(cfg, RuntimeError(why))
    first = (out / FAILED).read_text(errors="replace").splitlines()[:1] if (out / FAILED).is_file() else []
    log.error("job %s failed (%s); the sweep goes on. Details: %s", hydra_cfg.job.num,
              first[0] if first else f"exit code {code}", out / FAILED)
    return math.nan
