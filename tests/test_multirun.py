"""Hydra multirun through the real command line: every method runs a few steps, each job in its own
directory, a failing job does not end the sweep, and the report reads the sweep."""
import json
import subprocess
import sys

import pytest

from sskt_lightning.report import main as report_main

from method_contract import method_class, packaged_methods, requires_unlabeled

pytestmark = pytest.mark.slow   # every test here runs sweeps through subprocesses

SMALL_SOURCE = ["source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.num_classes=10",
                "source.timm.pretrained=false"]


def multirun(tmp_path, data_dir, *overrides, returncode=0):
    cmd = [sys.executable, "-m", "sskt_lightning.train", "-m", "data=cifar10", "model=resnet20",
           "trainer=smoke", "data.batch_size=8", "data.num_workers=0", f"paths.data_dir={data_dir}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", *SMALL_SOURCE, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return tmp_path / "sweep", proc


def test_every_method_runs_in_one_multirun(tmp_path, cifar_dir):
    # every conf/method/*.yaml: scratch, kd, dml, maxl, sskt, ...; those that cannot train without the
    # unlabeled stream (FixMatch: its sweep over the policies is in tests/test_fixmatch.py) need data
    # settings the others do not take
    names = [n for n in packaged_methods() if not requires_unlabeled(method_class(n))]
    assert len(names) >= 5
    sweep, _ = multirun(tmp_path, cifar_dir, "data.val_size=16", f"method={','.join(names)}")
    methods = sorted(json.loads((sweep / str(n) / "results.json").read_text())["method"] for n in range(len(names)))
    assert methods == sorted(names)
    assert report_main([str(sweep), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    assert "sskt" in (tmp_path / "report" / "report.md").read_text()


def test_a_failing_job_does_not_end_the_sweep_but_fails_it(tmp_path, cifar_dir):
    # the second job asks for more validation images than the data has: a ConfigError; the sweep
    # goes on, then exits non-zero with one line per failed job
    sweep, proc = multirun(tmp_path, cifar_dir, "method=scratch", "data.val_size=16,100000", returncode=1)
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "ok"
    failed = json.loads((sweep / "1" / "results.json").read_text())
    assert failed["status"] == "failed" and "test_acc" not in failed
    assert (sweep / "1" / "failed.txt").read_text().startswith("ConfigError: ")
    assert "1 of 2 jobs failed" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("  job 1: ConfigError: ")]
    assert "job 0:" not in proc.stderr


def test_submitit_local_launcher_runs_each_job_in_its_own_process(tmp_path, cifar_dir):
    """hydra/launcher=submitit_local: the submitit launcher (the SLURM one's local variant) runs
    a 2-job sweep here, each job a process of its own with its own log under .submitit/."""
    sweep, _ = multirun(tmp_path, cifar_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                        "data.val_size=16", "method=scratch", "seed=0,1")
    results = [json.loads((sweep / str(n) / "results.json").read_text()) for n in range(2)]
    assert [(r["status"], r["seed"]) for r in results] == [("ok", 0), ("ok", 1)]
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and len({p.parent.name for p in logs}) == 2   # two submitit jobs
