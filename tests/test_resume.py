"""Resume continues the same run (that a run killed with SIGKILL mid-epoch and resumed from its
last.ckpt ends with the same results, log and bit-identical weights as an uninterrupted run is
checked for every method in test_method_contract.py, with the helpers here): the non-finite guard
counts steps as the whole run does; last.ckpt is the last epoch even when the best validation epoch
is earlier; a resume into a fresh directory works; bad resume files are refused."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sskt_lightning.compose import compose_config
from sskt_lightning.errors import ResumeError
from sskt_lightning.train import run

from reliability_helpers import sigkilled_at_exit

TESTS = Path(__file__).parent
# 80 train images: 16 for validation, 8 batches of 8 per epoch, 3 epochs; validation every epoch
COMMON = ["data=cifar10", "model=resnet20", "trainer=cpu", "trainer.max_epochs=3", "trainer.deterministic=true",
          "trainer.log_every_n_steps=2", "data.batch_size=8",
          "data.val_size=16", "data.num_workers=0"]
SCRATCH = ["method=scratch"]
# every method (and its variants) is killed and resumed in test_method_contract.py, with these helpers
COMPARED = ("test_acc", "best_val_acc", "best_val_epoch", "last_val_acc", "epochs", "extra", "status")


@pytest.fixture(autouse=True)
def _restore_deterministic_flag():
    """trainer.deterministic=true switches torch's global flag on; leave it as found."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def _run(out, data_dir, *overrides):
    return run(compose_config([*COMMON, f"paths.data_dir={data_dir}", *overrides], out))


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _killed_run(out: Path, data_dir, method: list[str]) -> None:
    """The command line run, stopped by SIGKILL in the middle of epoch 1 (epoch 0's checkpoint on disk)."""
    ready, log = out.parent / f"{out.name}.ready", out.parent / f"{out.name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    # a W&B service an earlier in-process test started would otherwise serve the child too and keep
    # its killed run "in use" (a requeued job starts in a fresh process tree, with its own service)
    env.pop("WANDB_SERVICE", None)
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sskt_lightning.train", *COMMON, *method, f"paths.data_dir={data_dir}",
             f"hydra.run.dir={out}", "+callbacks.stall._target_=reliability_helpers.Stall",
             f"+callbacks.stall.ready={ready}"], env=env, stdout=subprocess.DEVNULL, stderr=err)
        with sigkilled_at_exit(proc):   # waits for the Stall's file, however slow the machine
            while not ready.exists():       # (hang guard: pytest-timeout's, pyproject.toml)
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.1)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_resumed_run_names_its_non_finite_step_as_the_whole_run_counts(tmp_path, cifar_dir, monkeypatch):
    """Killed in epoch 1, resumed from epoch 0's checkpoint, a loss gone NaN at the first resumed
    step is step (epoch 0's steps + 1) of the run, not step 1 (the guard's count restarted)."""
    from sskt_lightning.errors import NonFiniteError
    out = tmp_path / "killed"
    _killed_run(out, cifar_dir, SCRATCH)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    done = ckpt["global_step"]
    assert done > 0 and ckpt["guard_step"] == done                  # scratch: one optimizer step per batch
    import sskt_lightning.module as module_mod
    real = module_mod.task_loss
    monkeypatch.setattr(module_mod, "task_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(NonFiniteError, match=rf"at training step {done + 1} \(epoch 1\)"):
        _run(out, cifar_dir, *SCRATCH, f"resume={out / 'checkpoints' / 'last.ckpt'}")


@pytest.mark.slow
def test_last_ckpt_is_the_last_epoch_when_the_best_is_earlier(tmp_path, cifar_dir):
    """Lightning's save_last writes `last` only with a new best; here the best is epoch 0."""
    from small_trainer import small_trainer
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sskt_lightning.module import TransferModule
    from sskt_lightning.train import data_info_of
    res = _run(tmp_path, cifar_dir, "method=scratch",
               "+callbacks.fake_val._target_=reliability_helpers.DecreasingValAcc")
    assert res["best_val_epoch"] == 0 and res["epochs"] == 3
    assert res["best_val_acc"] == 1.0                        # the replaced score, not the real one
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2                                # the end of the last epoch (0-based)
    assert res["checkpoints"] == {"last": "checkpoints/last.ckpt", "best": res["checkpoints"]["best"]}
    assert "epoch000" in res["checkpoints"]["best"]
    # the weights test_acc was measured on are on disk: loading last.ckpt gives the same test number
    cfg = compose_config([*COMMON, f"paths.data_dir={cifar_dir}", "method=scratch"], tmp_path / "eval")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = TransferModule(OmegaConf.to_container(cfg, resolve=True), data_info_of(dm))
    module.load_state_dict(ckpt["state_dict"])
    trainer = small_trainer(tmp_path)
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert tested["test/acc"] == res["test_acc"]


@pytest.mark.slow
def test_resume_into_a_fresh_directory_writes_complete_results(tmp_path, cifar_dir):
    """Also: a run may be extended (a larger trainer.max_epochs) when its learning-rate schedule does
    not depend on the number of epochs (optim=maxl: x0.5 every 50 epochs)."""
    first = _run(tmp_path / "a", cifar_dir, "method=scratch", "optim=maxl", "trainer.max_epochs=2")
    second = _run(tmp_path / "b", cifar_dir, "method=scratch", "optim=maxl", "trainer.max_epochs=3",
                  f"resume={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}")
    assert second["status"] == "ok" and second["epochs"] == 3
    assert second["best_val_acc"] >= first["best_val_acc"]     # the best score survived the move
    assert json.loads((tmp_path / "b" / "results.json").read_text()) == second
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2
    rows = _csv_rows(tmp_path / "b" / "csv" / "metrics.csv")
    assert {float(r["epoch"]) for r in rows if r.get("epoch") and not r.get("test/acc")} == {2.0}  # trained here


# ---------------------------------------------------------------------------- refused resume files
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch scratch run on its own data (module scope: shared by the refusal tests)."""
    from data_fixtures import write_cifar10
    root = tmp_path_factory.mktemp("resume_src")
    write_cifar10(root / "data", n_train=80, n_test=24)
    res = run(compose_config([*COMMON, f"paths.data_dir={root / 'data'}", "method=scratch", "trainer.max_epochs=1",
                              "trainer.deterministic=false"], root / "run"))
    return root, root / "run" / res["checkpoints"]["last"]


def _refused(tmp_path, data_dir, resume, *overrides) -> str:
    with pytest.raises(ResumeError) as info:
        method = [] if any(o.startswith("method=") for o in overrides) else ["method=scratch"]
        _run(tmp_path, data_dir, *method, f"resume={resume}", *overrides)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()   # stopped before training
    return str(info.value)


@pytest.mark.slow
def test_missing_truncated_empty_and_foreign_resume_files_are_refused(tmp_path, trained):
    root, ckpt = trained
    data = root / "data"
    msg = _refused(tmp_path / "1", data, tmp_path / "nonexistent.ckpt")
    assert "no such file" in msg and "nonexistent.ckpt" in msg
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    msg = _refused(tmp_path / "2", data, truncated)
    assert "truncated" in msg and str(truncated) in msg
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert "empty" in _refused(tmp_path / "3", data, empty)
    foreign = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(3)}, foreign)
    msg = _refused(tmp_path / "4", data, foreign)
    assert "not a training checkpoint of this project" in msg and str(foreign) in msg


@pytest.mark.slow
def test_mismatched_resume_names_what_differs(tmp_path, trained):
    root, ckpt = trained
    data = root / "data"
    msg = _refused(tmp_path / "arch", data, ckpt, "model=resnet32")
    assert "architecture: checkpoint 'cifar_resnet20' vs this run 'cifar_resnet32'" in msg and str(ckpt) in msg
    msg = _refused(tmp_path / "method", data, ckpt, "method=dml")
    assert "method: checkpoint 'scratch' vs this run 'dml'" in msg
    msg = _refused(tmp_path / "classes", data, ckpt, "data.classes=[0,1,2]")
    assert "number of classes: checkpoint 10 vs this run 3" in msg


# ---------------------------------------------------------------------------- another experiment
TRAINED = ["method=scratch", "trainer.max_epochs=1", "trainer.deterministic=false"]   # as `trained` ran


@pytest.mark.slow
def test_resume_with_another_config_is_refused_naming_every_key(tmp_path, trained):
    """seed, the split and the learning rate are the experiment: a resume must not change them (the
    split would validate on trained images, the lr override would be ignored by the restored
    optimizer while config.yaml claimed it). Harmless keys (workers, tags, progress bar, logging,
    kernels' determinism) may differ and are not named."""
    from sskt_lightning.errors import ConfigError
    root, ckpt = trained
    harmless = ["data.num_workers=2", "tags=[again]",
                "trainer.enable_progress_bar=false",   # switched off on purpose: a harmless change to resume with
                "trainer.log_every_n_steps=1", "trainer.deterministic=true", "extras.header=false"]
    with pytest.raises(ConfigError) as info:
        _run(tmp_path, root / "data", *TRAINED, f"resume={ckpt}", "seed=7", "data.val_size=30",
             "optim.optimizer.lr=0.5", "callbacks=early_stopping", *harmless)
    msg = str(info.value)
    assert isinstance(info.value, ResumeError)          # callers that catch resume problems still do
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()   # refused before training
    for line in ("seed: 0 -> 7", "data.seed: 0 -> 7", "data.val_size: 16 -> 30", "optim.optimizer.lr: 0.1 -> 0.5",
                 "callbacks.early_stopping: (absent) -> {"):
        assert line in msg, msg
    assert str(ckpt) in msg and "config.yaml" in msg and "without resume=" in msg
    for key in ("num_workers", "tags", "enable_progress_bar", "log_every_n_steps", "deterministic", "extras",
                "paths.", "logger", "model_checkpoint", "max_epochs"):
        assert key not in msg, msg


@pytest.mark.slow
def test_refused_resume_in_its_own_directory_keeps_its_config_yaml(tmp_path, trained):
    """The run directory's config.yaml is what the refusal tells the user to resume with: a refused
    resume into that directory must not overwrite it with the refused config."""
    import shutil

    from sskt_lightning.errors import ConfigError
    root, ckpt = trained
    run_dir = tmp_path / "run"
    shutil.copytree(ckpt.parent.parent, run_dir)
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="optim.optimizer.lr: 0.1 -> 0.5"):
        _run(run_dir, root / "data", *TRAINED, f"resume={run_dir / 'checkpoints' / 'last.ckpt'}",
             "optim.optimizer.lr=0.5")
    assert (run_dir / "config.yaml").read_text() == before


@pytest.mark.slow
def test_longer_run_is_refused_when_the_schedule_depends_on_max_epochs(tmp_path, trained):
    """optim=sgd decays at fractions of trainer.max_epochs: a larger max_epochs moves the decays."""
    from sskt_lightning.errors import ConfigError
    root, ckpt = trained
    with pytest.raises(ConfigError) as info:
        _run(tmp_path, root / "data", *TRAINED, f"resume={ckpt}", "trainer.max_epochs=3")
    msg = str(info.value)
    assert "trainer.max_epochs: 1 -> 3" in msg and "optim.scheduler.max_epochs: 1 -> 3" in msg, msg
    assert "step_decay" in msg      # says when a run may be extended
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()



@pytest.mark.slow
def test_resumed_run_logs_into_the_same_wandb_run(tmp_path, cifar_dir, monkeypatch):
    """Killed and resumed: one W&B run (the id is kept in the checkpoint), not two."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    method = [*SCRATCH, "logger=wandb"]
    out = tmp_path / "killed"
    _killed_run(out, cifar_dir, method)
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    res = _run(out, cifar_dir, *method, f"resume={out / 'checkpoints' / 'last.ckpt'}")
    assert res["status"] == "ok" and res["epochs"] == 3
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs                          # two sessions (offline: one directory each) ...
    ids = {r.rsplit("-", 1)[1] for r in runs}
    assert len(ids) == 1, runs                           # ... of one W&B run
    final = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["RunState"]
    assert final["wandb_run_id"] == ids.pop()
    import wandb
    assert wandb.run is None


# ------------------------------------------------------------------ checkpoints older than an option
ADDED_SINCE = {"model": ["weights", "freeze", "ema", "ema_warmup", "ema_bn", "ema_bn_images"],
               "method": ["consistency", "threshold", "tau", "lambda_u", "threshold_ema", "fairness_weight",
                          "flex_warmup", "loss", "unlabeled"]}


def _config(*overrides) -> dict:
    from omegaconf import OmegaConf
    cfg = compose_config(["data=cifar10", *overrides], output_dir=".")
    return OmegaConf.to_container(cfg, resolve=False)


def _as_written_before_the_options_existed(cfg: dict) -> dict:
    import copy
    old = copy.deepcopy(cfg)
    for group, keys in ADDED_SINCE.items():
        for key in keys:
            old[group].pop(key, None)
    return old


@pytest.mark.parametrize("method", ["sskt", "kd", "dml", "scratch"])
def test_a_checkpoint_written_before_an_option_existed_resumes_with_its_default(method):
    """model.weights/freeze/ema/ema_warmup/ema_bn/ema_bn_images, SSKT's consistency options, KD's loss and KD/DML's
    unlabeled came after checkpoints were written: a checkpoint without them ran as their defaults
    say, so resuming it with the defaults is no difference; setting one is, and is named."""
    from sskt_lightning.checkpoints import config_differences
    ours = _config(f"method={method}")
    theirs = _as_written_before_the_options_existed(ours)
    assert any(k not in theirs["method"] for k in ADDED_SINCE["method"] if k in ours["method"]) or method == "scratch"
    assert config_differences(theirs, ours) == []
    changed = config_differences(theirs, _config(f"method={method}", "model.ema=0.99"))
    assert [(k, a, b) for k, a, b in changed] == [("model.ema", None, 0.99)]
    changed = config_differences(theirs, _config(f"method={method}", "model.ema=0.99", "model.ema_bn=recompute"))
    assert [(k, a, b) for k, a, b in changed] == [("model.ema", None, 0.99), ("model.ema_bn", "average", "recompute")]
    if method == "sskt":
        changed = config_differences(theirs, _config("method=sskt", "method.consistency=fixmatch"))
        assert [(k, a, b) for k, a, b in changed] == [("method.consistency", "none", "fixmatch")]
    if method == "kd":
        changed = config_differences(theirs, _config("method=kd", "method.loss=dist"))
        assert [(k, a, b) for k, a, b in changed] == [("method.loss", "kd", "dist")]


def assert_resume_equals_uninterrupted(tmp_path, data_dir, overrides) -> dict:
    """Train ``overrides`` for 3 epochs uninterrupted, and again SIGKILLed mid-epoch 1 then resumed:
    the results, every checkpointed tensor and the metrics log must be identical. Returns the
    uninterrupted run's checkpoint tensors (the method contract and the FixMatch tests use it)."""
    ref = _run(tmp_path / "ref", data_dir, *overrides)
    assert ref["epochs"] == 3 and ref["status"] == "ok"
    out = tmp_path / "killed"
    _killed_run(out, data_dir, overrides)
    resumed = _run(out, data_dir, *overrides, f"resume={out / 'checkpoints' / 'last.ckpt'}")
    assert {k: resumed[k] for k in COMPARED} == {k: ref[k] for k in COMPARED}
    a, b = _weights(tmp_path / "ref" / "checkpoints" / "last.ckpt"), _weights(out / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"
    # the log continues: the rows of epoch 0 written before the kill, then epochs 1-2, as uninterrupted
    assert _csv_rows(out / "csv" / "metrics.csv") == _csv_rows(tmp_path / "ref" / "csv" / "metrics.csv")
    return a
