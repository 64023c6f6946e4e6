"""Sweeps of DDP jobs on one node, and sweeps that spread jobs over a node's GPUs (issue #23).

Inside ``-m`` a job that needs several processes (``trainer=ddp_cpu``: 2 gloo processes) or its own
GPUs runs as a single run in a process of its own (sskt_lightning.ddp_launch), so its other ranks get
the job's configuration, not the sweep's command line. GPU slots (sskt_lightning.device_slots) are
tested with a simulated GPU count (``SSKT_FAKE_GPU_COUNT``; ``CUDA_VISIBLE_DEVICES`` in a CPU run is
harmless). Every run keeps the default callbacks and progress bar (what users get)."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sskt_lightning.device_slots import DeviceSlots, SlotError, assignment, detect_devices

TESTS = Path(__file__).parent
SMALL = ["data=cifar10", "model=resnet20", "method=scratch", "data.batch_size=8", "data.val_size=16",
         "data.num_workers=0", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
         "+callbacks.digest._target_=sskt_lightning.callbacks.WeightsDigest"]   # one callback more, none off


# ---------------------------------------------------------------------------- slots (fast)
def test_slots_are_disjoint_groups_of_the_visible_devices():
    slots = DeviceSlots(per_job=2, available=[0, 1, 2, 3, 4])
    assert slots.capacity == 2 and slots.slots == [(0, 1), (2, 3)]
    a, b = slots.acquire(), slots.acquire()
    assert {a, b} == {(0, 1), (2, 3)}
    assert slots.env((2, 3)) == {"CUDA_VISIBLE_DEVICES": "2,3", "SSKT_DEVICE_SLOT": "1"}
    with pytest.raises(TimeoutError):
        slots.acquire(timeout=0.2)
    slots.release(a)
    assert slots.acquire(timeout=1) == a                    # given back, handed out again
    assert assignment({"CUDA_VISIBLE_DEVICES": "2,3", "SSKT_DEVICE_SLOT": "1"}) == {"visible": "2,3", "slot": 1}
    assert assignment({}) == {"visible": None, "slot": None}


def test_detected_devices_follow_the_fake_count_and_the_parents_visible_devices(monkeypatch):
    assert detect_devices({"SSKT_FAKE_GPU_COUNT": "3"}) == [0, 1, 2]
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert detect_devices({"CUDA_VISIBLE_DEVICES": "4,6"}) == [4, 6]     # a job's set is a subset of these
    assert detect_devices({}) == [0, 1]


def test_over_subscription_is_an_error_naming_the_numbers_and_the_fix():
    with pytest.raises(SlotError, match=r"asks for 3 GPU\(s\) but this node has 2 .*at most 2 per job"):
        DeviceSlots(per_job=3, available=[0, 1])
    slots = DeviceSlots(per_job=2, available=list(range(8)))
    slots.check_concurrency(4)
    with pytest.raises(SlotError, match=r"5 jobs at once x 2 GPU\(s\) each = 10 GPUs, but this node has 8.*"
                                        r"hydra.launcher.n_jobs=4"):
        slots.check_concurrency(5)


def test_threads_never_share_a_slot():
    slots = DeviceSlots(per_job=1, available=[0, 1], poll_s=0.01)
    held, clash, lock = set(), [], threading.Lock()

    def job():
        for _ in range(20):
            devs = slots.acquire()
            with lock:
                clash.extend([devs] if devs in held else [])
                held.add(devs)
            time.sleep(0.001)
            with lock:
                held.discard(devs)
            slots.release(devs)

    threads = [threading.Thread(target=job) for _ in range(4)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert not clash and not held


HOLDER = ("import sys, time; from sskt_lightning.device_slots import DeviceSlots; "
          "s = DeviceSlots(1, available=[0, 1], lock_dir=sys.argv[1]); print(s.acquire(), flush=True); time.sleep(120)")


def test_processes_share_slots_through_the_lock_dir_and_a_killed_holder_frees_its_slot(tmp_path):
    """Across processes (joblib workers): a slot held by another process is not handed out; when that
    process is killed (no release), its slot is free at once (the kernel drops its flock)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        taken = holder.stdout.readline().strip()
        assert taken == "(0,)"
        mine = DeviceSlots(1, available=[0, 1], lock_dir=tmp_path, poll_s=0.05)
        assert mine.acquire(timeout=5) == (1,)
        with pytest.raises(TimeoutError):
            mine.acquire(timeout=0.3)
        holder.kill()
        holder.wait(10)
        assert mine.acquire(timeout=5) == (0,)              # the dead holder's slot
    finally:
        holder.kill()
        holder.wait(10)


# ---------------------------------------------------------------------------- sweeps (slow)
def sweep(tmp_path, data_dir, *overrides, returncode=0, env=None):
    """``-m`` run from ``tmp_path`` (so stray directories would show there)."""
    cmd = [sys.executable, "-m", "sskt_lightning.train", "-m", *SMALL, f"paths.data_dir={data_dir}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [full_env.get("PYTHONPATH")])])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=full_env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == returncode, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return tmp_path / "sweep", proc


def ranks_agree(job: Path) -> dict:
    """Both ranks' digests (config and weights) agree; returns rank 0's."""
    digests = [json.loads((job / f"weights_digest_rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["world_size"] for d in digests] == [2, 2]
    assert digests[0]["config"] == digests[1]["config"], "the ranks trained different configurations"
    assert digests[0]["parameters"] == digests[1]["parameters"], "the ranks' weights diverged"
    return digests[0]


def no_stray_output(tmp_path, sweep_dir, jobs, extra=("multirun.yaml",)):
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "data") == ["sweep"]   # no outputs/, multirun/
    assert sorted(p.name for p in sweep_dir.iterdir()) == sorted([*map(str, range(jobs)), *extra])


@pytest.mark.slow
def test_a_multirun_of_ddp_jobs(tmp_path, cifar_dir):
    """``-m trainer=ddp_cpu seed=0,1``: two jobs of two processes each; one results.json per job with
    its seed, both ranks of each job trained that job's config (same config and weights digests,
    the seed in it the job's), no other output directories."""
    sweep_dir, _ = sweep(tmp_path, cifar_dir, "trainer=ddp_cpu", "seed=0,1")
    no_stray_output(tmp_path, sweep_dir, 2)
    configs = []
    for job, seed in ((0, 0), (1, 1)):
        results = json.loads((sweep_dir / str(job) / "results.json").read_text())
        assert results["status"] == "ok" and results["seed"] == seed and f"seed={seed}" in results["overrides"]
        assert results["devices"] == {"visible": None, "slot": None}   # the basic launcher: no GPU slots
        digest = ranks_agree(sweep_dir / str(job))
        assert digest["seed"] == seed
        assert (sweep_dir / str(job) / "train_ddp_process_1.log").is_file()   # rank 1 wrote in the job's dir
        configs.append(digest["config"])
    assert configs[0] != configs[1]


@pytest.mark.slow
@pytest.mark.optuna_sweeper
def test_the_optuna_sweeper_with_ddp_jobs(tmp_path, cifar_dir):
    """``hparams_search=scratch`` with 2-process jobs: each trial's two ranks train the trial's sampled
    values (rank 1 composes them from the job's overrides, not by sampling again)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir, _ = sweep(tmp_path, cifar_dir, "trainer=ddp_cpu", "hparams_search=scratch", "hydra.sweeper.n_trials=2",
                         "hydra.sweeper.sampler.n_startup_trials=2")
    no_stray_output(tmp_path, sweep_dir, 2, extra=["optimization_results.yaml"])   # (no multirun.yaml)
    lrs = []
    for job in (0, 1):
        results = json.loads((sweep_dir / str(job) / "results.json").read_text())
        lr = [o for o in results["overrides"] if o.startswith("optim.optimizer.lr=")]
        assert results["status"] == "ok" and len(lr) == 1
        import yaml
        used = yaml.safe_load((sweep_dir / str(job) / "config.yaml").read_text())["optim"]["optimizer"]["lr"]
        assert used == pytest.approx(float(lr[0].split("=", 1)[1]))    # rank 0 trained the sampled value ...
        ranks_agree(sweep_dir / str(job))                              # ... and rank 1 the same config
        lrs.append(used)
    assert lrs[0] != lrs[1]


@pytest.mark.slow
def test_joblib_jobs_each_on_their_own_gpus(tmp_path, cifar_dir):
    """``hydra/launcher=joblib hydra.launcher.n_jobs=2 trainer.devices=2`` on a (simulated) 4-GPU node:
    two DDP jobs at once, each on its own slot, recorded in results.json."""
    sweep_dir, _ = sweep(tmp_path, cifar_dir, "trainer=ddp_cpu", "trainer.devices=2", "hydra/launcher=joblib",
                         "hydra.launcher.n_jobs=2", "seed=0,1", env={"SSKT_FAKE_GPU_COUNT": "4"})
    no_stray_output(tmp_path, sweep_dir, 2, extra=["multirun.yaml", ".device_slots"])
    devices = [json.loads((sweep_dir / str(j) / "results.json").read_text())["devices"] for j in (0, 1)]
    for d in devices:
        assert d == {"visible": {0: "0,1", 1: "2,3"}[d["slot"]], "slot": d["slot"]}
    for j in (0, 1):
        ranks_agree(sweep_dir / str(j))


def test_more_gpus_than_the_node_has_stops_before_any_job(tmp_path, cifar_dir):
    for over in (["trainer.devices=3"], ["trainer.devices=1", "hydra.launcher.n_jobs=3"]):
        sweep_dir, proc = sweep(tmp_path, cifar_dir, "trainer=cpu", "hydra/launcher=joblib", "seed=0,1", *over,
                                returncode=2, env={"SSKT_FAKE_GPU_COUNT": "2"})
        assert "this node has 2" in proc.stderr
        assert not sweep_dir.exists() or not any(p.name.isdigit() for p in sweep_dir.iterdir())


@pytest.mark.slow
def test_a_job_whose_gpus_do_not_fit_fails_alone(tmp_path, cifar_dir):
    """``trainer.devices`` swept past the node (the check before the sweep sees only the unswept value):
    that job fails with the slot error recorded, the other trains, the sweep exits 1 naming it."""
    sweep_dir, proc = sweep(tmp_path, cifar_dir, "trainer=cpu", "hydra/launcher=joblib", "hydra.launcher.n_jobs=1",
                            "trainer.devices=1,3", returncode=1, env={"SSKT_FAKE_GPU_COUNT": "2"})
    assert json.loads((sweep_dir / "0" / "results.json").read_text())["devices"] == {"visible": "0", "slot": 0}
    assert (sweep_dir / "1" / "failed.txt").read_text().startswith("SlotError: each job asks for 3 GPU(s)")
    assert "1 of 2 jobs failed" in proc.stderr and "  job 1: SlotError:" in proc.stderr


@pytest.mark.slow
def test_a_job_killed_mid_sweep(tmp_path, cifar_dir):
    """Job 0's rank 0 is SIGKILLed at its second batch (nothing recorded by it): its rank 1 is ended,
    job 1 trains to the end, the sweep exits 1 naming job 0."""
    sweep_dir, proc = sweep(tmp_path, cifar_dir, "trainer=ddp_cpu", "+callbacks.kill._target_=ddp_sweep_helpers.KillAt",
                            "+callbacks.kill.rank=0,-1", returncode=1)
    assert json.loads((sweep_dir / "1" / "results.json").read_text())["status"] == "ok"
    failed = json.loads((sweep_dir / "0" / "results.json").read_text())
    assert failed["status"] == "failed" and "signal 9" in failed["error"]
    assert "1 of 2 jobs failed" in proc.stderr and "  job 0: RuntimeError: the job's process ended with signal 9" \
        in proc.stderr
    assert "job 1:" not in proc.stderr


@pytest.mark.slow
def test_the_protocol_with_ddp_runs_on_gpu_slots(tmp_path, cifar_dir):
    """``python -m sskt_lightning.protocol ... trainer=ddp_cpu --gpus-per-job 2``: every run (a search
    trial, a final seed) trains as 2 processes on its slot, recorded in its results.json; --jobs x
    --gpus-per-job beyond the node is refused before any run."""
    out = tmp_path / "proto"
    base = [sys.executable, "-m", "sskt_lightning.protocol", "--out", str(out), "--methods", "scratch", "--trials", "1",
            "--seeds", "0", "--threads", "1", "--gpus-per-job", "2"]
    setting = ["data=cifar10", f"paths.data_dir={cifar_dir}", "model=resnet20", "trainer=ddp_cpu", "trainer.max_epochs=1",
               "data.batch_size=8", "data.num_workers=0", "data.val_size=16", "data.steps_per_epoch=2",
               "+callbacks.digest._target_=sskt_lightning.callbacks.WeightsDigest"]
    env = {**os.environ, "SSKT_FAKE_GPU_COUNT": "2"}
    refused = subprocess.run([*base, "--jobs", "2", *setting], capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "this node has 2" in refused.stderr
    assert not out.exists()                       # nothing written: the same --out takes the fixed command
    proc = subprocess.run([*base, "--jobs", "1", *setting], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in (out / "scratch" / "search" / "trial_000", out / "scratch" / "final" / "seed_0"):
        results = json.loads((run / "results.json").read_text())
        assert results["status"] == "ok" and results["devices"] == {"visible": "0,1", "slot": 0}
        ranks_agree(run)


# ---------------------------------------------------------------------------- the job's command (fast)
def _hydra_cfg(out):
    from omegaconf import OmegaConf
    return OmegaConf.create({
        "overrides": {"task": ["hparams_search=scratch", "optim.optimizer.lr=0.0123", "seed=1"],
                      "hydra": ["hydra.sweep.dir=/s", "hydra/launcher=joblib"]},
        "runtime": {"output_dir": str(out), "cwd": "/where/it/started",
                    "choices": {"hydra/job_logging": "sskt", "hydra/hydra_logging": "default"}},
        "job": {"name": "train", "chdir": False, "num": 3}})


def test_a_jobs_command_is_its_overrides_as_a_single_run_in_its_directory(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sskt_lightning.ddp_launch import job_command
    out = tmp_path / "a sweep, with 'quotes'" / "3"
    cmd, cwd = job_command(_hydra_cfg(out))
    assert cmd[1:3] == ["-m", "sskt_lightning.train"] and cwd == "/where/it/started"
    assert cmd[3:6] == ["hparams_search=scratch", "optim.optimizer.lr=0.0123", "seed=1"]   # the job's, sampled included
    assert "hydra.mode=RUN" in cmd                # hparams_search sets MULTIRUN: the job must not sweep again
    assert not any(c.startswith(("hydra.sweep", "hydra/launcher", "hydra.launcher")) for c in cmd)   # the sweep's own
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(cmd[6:])}
    assert parsed["hydra.run.dir"] == str(out)    # quoted so that any path survives Hydra's parser
    assert parsed["hydra/job_logging"] == "sskt" and parsed["hydra.output_subdir"] is None


@pytest.mark.parametrize("left", ['[{"status": "ok"}]', '{"status": "ok", "best_val_acc": 0.5', None])
def test_a_job_that_exits_0_without_a_readable_results_object_is_a_failed_job(tmp_path, monkeypatch, left):
    """The job's process says 0 but its results.json is a list, cut short or absent (another tool's file,
    a full disk): one failed job (NaN, failed.txt, results.json status failed), not an error that ends
    the sweep."""
    from omegaconf import OmegaConf

    from sskt_lightning import ddp_launch

    out = tmp_path / "3"

    class ExitsZero:                       # the job's process: writes what it left, exits 0
        def __init__(self, cmd, **kwargs):
            self.pid = os.getpid()
            if left is not None:
                (out / "results.json").write_text(left)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(ddp_launch.subprocess, "Popen", ExitsZero)
    monkeypatch.setattr(ddp_launch, "_end_group", lambda proc, sig=None: None)    # pid is this test's own
    cfg = OmegaConf.create({"seed": 1, "method": {"name": "scratch"}, "paths": {"output_dir": str(out)}})
    value = ddp_launch.run_job_in_subprocess(cfg, _hydra_cfg(out), per_job=None)
    assert value != value                                     # NaN: the sweeper sees a failed trial
    assert (out / "failed.txt").read_text().startswith(
        "RuntimeError: the job's process exited with code 0 but left no readable results.json")
    assert json.loads((out / "results.json").read_text())["status"] == "failed"


def test_a_rank_that_composed_another_config_is_refused():
    from omegaconf import OmegaConf

    from sskt_lightning.ddp_launch import check_digest, config_digest
    from sskt_lightning.errors import ConfigError
    cfg = OmegaConf.create({"seed": 1, "optim": {"lr": 0.1}})
    check_digest(cfg, env={"SSKT_JOB_CONFIG_DIGEST": config_digest(cfg)})
    check_digest(cfg, env={})                     # not a sweep job's process: nothing to compare
    other = OmegaConf.create({"seed": 0, "optim": {"lr": 0.1}})
    with pytest.raises(ConfigError, match="another configuration than its sweep job's"):
        check_digest(other, env={"SSKT_JOB_CONFIG_DIGEST": config_digest(cfg)})
