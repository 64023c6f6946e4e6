"""The protocol's jobs forked from a server holding the imports (sskt_lightning.workers, --launch fork)
against a subprocess per run (--launch subprocess): the same results bit for bit, and a killed job
or a killed server never takes the protocol down (issue #20)."""
import json
import os
import signal
import threading
import time

import pytest
import torch

from sskt_lightning import protocol as P
from sskt_lightning import workers

pytestmark = pytest.mark.skipif(workers.default_launch() != "fork", reason="no forkserver on this platform")


def setting(cifar_dir, epochs=2):
    return ["data=cifar10", f"paths.data_dir={cifar_dir}", "model=resnet20", "trainer=smoke",
            f"trainer.max_epochs={epochs}", "data.batch_size=8", "data.num_workers=0", "data.val_size=16",
            "optim=sgd_cosine"]


def run_one(proto: P.Protocol, job: P.Job) -> tuple[int, float]:
    runner = P.Runner(proto, log=lambda *_: None)
    runner.launch(job)
    proc = runner.running[0][1]
    while not runner.reap():
        time.sleep(0.2)
    return proc.returncode, json.loads((job.run_dir / "protocol.json").read_text())["elapsed_s"]


def test_a_forked_run_is_bit_identical_to_a_subprocess_run(tmp_path, cifar_dir):
    method = P.method_spec("scratch")
    runs = {}
    for launch in ("subprocess", "fork", "fork"):     # twice forked: nothing carried from one job to the next
        out = tmp_path / f"{launch}_{len(runs)}"
        proto = P.Protocol(out=out, setting=setting(cifar_dir), methods=[method], threads=1, launch=launch,
                           pruner="none")
        job = P.Job(method, "final", out / "run", 0, {"optim.optimizer.lr": 0.05})
        code, _ = run_one(proto, job)
        assert code == 0, (job.run_dir / "train.log").read_text()[-3000:]
        res = json.loads((job.run_dir / "results.json").read_text())
        weights = torch.load(job.run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                             weights_only=False)["state_dict"]
        runs[len(runs)] = (res, weights, (job.run_dir / "train.log").read_text())
    (r0, w0, log0) = runs[0]
    for k in (1, 2):
        r, w, log = runs[k]
        for key in ("test_acc", "best_val_acc", "last_val_acc", "epochs", "num_train", "group", "overrides"):
            assert r[key] == r0[key], (k, key)
        assert w.keys() == w0.keys() and all(torch.equal(w[n], w0[n]) for n in w0), k
        assert f"results: test acc {r0['test_acc']:.4f}" in log and str(tmp_path / f"fork_{k}" / "run") in log


def test_a_killed_job_fails_alone_and_a_killed_server_is_replaced(tmp_path, cifar_dir):
    """Trial 0's process is SIGKILLed while it starts: it is recorded failed (exit code -9), the fork server
    is then killed too; trial 1 and the final run still run (in a new server) and the protocol completes."""
    proto = P.Protocol(out=tmp_path / "proto", setting=setting(cifar_dir), methods=[P.method_spec("scratch")],
                       trials=2, seeds=[0], jobs=1, threads=1, batch=1, pruner="none", launch="fork")
    launch = P.Runner.launch
    killed = {}

    def launch_and_kill(self, job):
        launch(self, job)
        if job.trial == 0:
            proc = self.running[-1][1]

            def kill():
                while not (job.run_dir / "config.yaml").exists() and proc.poll() is None:
                    time.sleep(0.05)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                killed["server"] = workers.server_pid()
                os.kill(killed["server"], signal.SIGKILL)
            t = threading.Thread(target=kill)
            t.start()
            t.join(120)

    P.Runner.launch = launch_and_kill
    try:
        lines = []
        selected = P.run_protocol(proto, log=lines.append)
    finally:
        P.Runner.launch = launch
    t0, t1 = proto.out / "scratch" / "search" / "trial_000", proto.out / "scratch" / "search" / "trial_001"
    assert P.run_state(t0) == "failed" and "exit code -9" in (t0 / "failed.txt").read_text()
    assert P.run_state(t1) == "done" and selected["scratch"]["trial"] == 1
    assert json.loads((proto.out / "scratch" / "final" / "seed_0" / "results.json").read_text())["status"] == "ok"
    assert workers.server_pid() not in (None, killed["server"])      # a new server took over
    assert any("FAILED" in ln for ln in lines)


def test_a_forked_job_never_reruns_the_callers_unguarded_script(tmp_path):
    """A script that starts a forked job at its top level, without ``if __name__ == "__main__"``: the job
    runs the training command (here its --help) and the script's own code runs once, in the script."""
    import subprocess
    import sys
    script = tmp_path / "unguarded.py"
    log = tmp_path / "job.log"
    script.write_text("import os\nfrom sskt_lightning.workers import ForkedJob\nprint('SCRIPT RAN', flush=True)\n"
                      f"job = ForkedJob(['--help'], dict(os.environ), {str(log)!r}, 1)\n"
                      "print('EXIT', job.wait(300), flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.stdout.count("SCRIPT RAN") == 1 and "EXIT 0" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "Powered by Hydra" in log.read_text() and "SCRIPT RAN" not in log.read_text()


def test_the_servers_preload_imports_only():
    """What the fork server imports initialises no CUDA (a fork after CUDA's start is unusable): every job
    chooses its own devices (CUDA_VISIBLE_DEVICES in its environment) and threads."""
    import subprocess
    import sys
    code = ("import sskt_lightning._worker_preload, torch, sys; "
            "print(torch.cuda.is_initialized(), all(m in sys.modules for m in ('lightning', 'sskt_lightning.module', "
            "'sskt_lightning.methods', 'sskt_lightning.data.datamodule')), 'sskt_lightning.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    # the heavy imports done; the entry point itself not (nothing in the package imports it: a job runs it)
    assert out.stdout.split() == ["False", "True", "False"], out.stderr[-2000:]


def test_runs_that_compose_to_several_processes_get_their_own_interpreter(tmp_path):
    """The decision reads the composed config, not the overrides' text: an experiment file that
    switches the trainer to DDP is seen (a fork of the server would re-run the server's command line
    for the other ranks), and a strategy that composes to one device stays a fork."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "two_ranks.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /trainer: ddp_cpu\n")
    cmd = ["python", "-m", "sskt_lightning.train", "data=cifar10", "model=resnet20", "seed=0",
           f"hydra.run.dir={tmp_path / 'run'}"]
    assert not P.several_processes(cmd)
    assert P.several_processes([*cmd, f"hydra.searchpath=[file://{tmp_path}]", "experiment=two_ranks"])
    assert P.several_processes([*cmd, "trainer=ddp_cpu"])
    assert P.several_processes([*cmd, "trainer.num_nodes=2"])
    assert not P.several_processes([*cmd, "+trainer.strategy=ddp"])           # one device: no ranks
    assert not P.several_processes([*cmd, "trainer.devices=[0]"])
    # a config that does not compose runs in its own interpreter, which records why it cannot start
    assert P.several_processes([*cmd, "model=no_such_model"])
