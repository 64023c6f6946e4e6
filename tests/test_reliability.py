"""Fault injection: atomic checkpoints under SIGKILL and a full disk, hostile checkpoints (local and
served over HTTP) never run code, non-finite losses stop the run (every method family), values
that cannot be right and environment problems are refused with one clear message, a sweep with a
failed job exits non-zero, and the command line answers --help / --cfg without importing torch."""
import csv
import errno
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from sskt_lightning import weights as W
from sskt_lightning.checkpoints import SafeCheckpointIO
from sskt_lightning.compose import compose_config
from sskt_lightning.errors import (
    ConfigError,
    DataNotFoundError,
    NonFiniteError,
    OutputError,
    ResumeError,
    WeightsError,
)
from sskt_lightning.train import run

from reliability_helpers import main_in_process, sigkilled_at_exit

SMOKE = ["trainer=smoke", "data.batch_size=8", "data.val_size=16", "data.num_workers=0", "data=cifar10",
         "model=resnet20"]
TIMM_SOURCE = ["source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.pretrained=false",
               "source.timm.num_classes=10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, cwd=None, timeout=None):   # no wall-clock limit: pytest-timeout (pyproject.toml) is the hang guard
    return subprocess.run([sys.executable, "-m", "sskt_lightning.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd)


def train(out, data_dir, *overrides):
    return run(compose_config([*SMOKE, f"paths.data_dir={data_dir}", *overrides], out))


# ---------------------------------------------------------------------------- atomic checkpoints
_WRITER = """
import sys, time, torch
from sskt_lightning.checkpoints import SafeCheckpointIO
real_save = torch.save


class PausingFile:
    # the real file object, passed through; once 1 MB of the third checkpoint is in it, says so and waits
    def __init__(self, f):
        self.f, self.n = f, 0

    def write(self, b):
        n = self.f.write(b)
        self.n += len(b)
        if self.n > (1 << 20):
            print("mid-write", flush=True)
            time.sleep(600)
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


io, path = SafeCheckpointIO(), sys.argv[1]
for i in range(3):
    torch.save = (lambda obj, f, *a, **k: real_save(obj, PausingFile(f), *a, **k)) if i == 2 else real_save
    print(f"writing {i}", flush=True)
    io.save_checkpoint({"i": i, "w": torch.full((1 << 24,), float(i))}, path)   # 64 MB each
"""


def _open_files_in(pid: int, directory: Path) -> list[int]:
    """Sizes of the files process ``pid`` holds open in ``directory`` (an O_TMPFILE has no name there)."""
    sizes = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(directory) + "/"):
                sizes.append(os.stat(fd).st_size)
        except OSError:
            pass
    return sizes


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_file_and_no_temp(tmp_path):
    """$TMPDIR on another file system (tmpfs) than the checkpoint: Lightning's own writer then copies
    across file systems and a kill leaves a truncated or empty last.ckpt. The writer pauses with over
    1 MB of its third checkpoint written and says so: the kill lands mid-write on any machine, with no
    sleep to guess."""
    path = tmp_path / "ckpts" / "last.ckpt"
    other_fs = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else tmp_path
    tmpdir = Path(tempfile.mkdtemp(dir=other_fs, prefix="sskt-test-"))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**ENV, "TMPDIR": str(tmpdir)})
    with proc.stdout, sigkilled_at_exit(proc):
        lines = []
        for line in proc.stdout:          # two complete writes, then kill while the third is written
            lines.append(line.strip())
            if lines[-1] == "mid-write":
                break
        assert lines == ["writing 0", "writing 1", "writing 2", "mid-write"], lines
        if Path(f"/proc/{proc.pid}/fd").is_dir():   # the half-written file is open, over 1 MB, unnamed
            assert [n for n in _open_files_in(proc.pid, path.parent) if n > (1 << 20)]
        os.kill(proc.pid, signal.SIGKILL)
    obj = torch.load(path, weights_only=True)
    assert obj["i"] == 1 and torch.equal(obj["w"], torch.full((1 << 24,), 1.0))   # the previous checkpoint
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]   # no stray temporary file
    leftovers = list(tmpdir.iterdir())
    shutil.rmtree(tmpdir, ignore_errors=True)
    assert not leftovers


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"i": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def half_then_enospc(obj, f, *args, **kwargs):
        f.write(b"x" * 5000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", half_then_enospc)
    with pytest.raises(OutputError, match="disk is full") as info:
        SafeCheckpointIO().save_checkpoint({"i": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert str(path) in str(info.value) and "previous version of the file is intact" in str(info.value)
    assert torch.load(path, weights_only=True)["i"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_full_disk_in_a_run_is_one_clear_message_and_exit_2(tmp_path, cifar_dir, monkeypatch, capsys):
    """Through the command line's own code path (in-process): no traceback, results.json says failed."""
    real_save = torch.save

    def enospc(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "state_dict" in obj:   # checkpoints only
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", enospc)
    out = tmp_path / "run"
    code, err = main_in_process(monkeypatch, capsys, *SMOKE, "method=scratch", f"paths.data_dir={cifar_dir}",
                                f"hydra.run.dir={out}")
    assert code == 2
    assert "disk is full" in err and ".ckpt'" in err and "Traceback" not in err
    failed = json.loads((out / "results.json").read_text())
    assert failed["status"] == "failed" and "disk is full" in failed["error"] and "test_acc" not in failed
    assert (out / "failed.txt").read_text().startswith("OutputError: ")


# ---------------------------------------------------------------------------- hostile checkpoints
class _Payload:
    """Unpickling this runs os.makedirs(marker): what an attacker's checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.fixture
def http_dir(tmp_path):
    """A directory served over HTTP on the loopback address: (directory, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hostile_checkpoint_served_over_http_never_runs(tmp_path, cifar_dir, http_dir, monkeypatch):
    served, url = http_dir
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {}, "epoch": 0, "payload": _Payload(marker)}, served / "evil.ckpt")
    with pytest.raises(ResumeError) as info:
        train(tmp_path / "run", cifar_dir, "method=scratch", f"resume={url}/evil.ckpt")
    assert not marker.exists()
    msg = str(info.value)
    assert "refused to load" in msg and "could run code" in msg and "resume=" in msg
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    # the payload is live: Lightning's own remote loader (weights_only=False for URLs) runs it
    from lightning.fabric.utilities.cloud_io import _load
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))   # not the user's hub cache
    _load(f"{url}/evil.ckpt")
    assert marker.exists()


@pytest.mark.slow
def test_hostile_local_files_never_run_as_resume_or_source(tmp_path, cifar_dir):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    torch.save({"payload": _Payload(marker)}, evil)
    with pytest.raises(ResumeError, match="refused to load"):
        train(tmp_path / "r", cifar_dir, "method=scratch", f"resume={evil}")
    with pytest.raises(WeightsError, match="source.checkpoint.weights=.*refused to load"):
        train(tmp_path / "s", cifar_dir, "method=sskt", "source=[checkpoint]", f"source.checkpoint.weights={evil}")
    with pytest.raises(ResumeError, match="Refusing to let Lightning load"):
        SafeCheckpointIO().load_checkpoint("http://127.0.0.1:9/x.ckpt")
    assert not marker.exists()


@pytest.mark.slow
def test_a_checkpoint_served_over_http_is_downloaded_checked_and_resumed(tmp_path, cifar_dir, http_dir):
    served, url = http_dir
    # optim=maxl: a schedule that does not depend on max_epochs, so the resume may extend the run
    first = train(tmp_path / "a", cifar_dir, "method=scratch", "optim=maxl")
    (served / "last.ckpt").write_bytes((tmp_path / "a" / first["checkpoints"]["last"]).read_bytes())
    res = train(tmp_path / "b", cifar_dir, "method=scratch", "optim=maxl", "trainer.max_epochs=2",
                f"resume={url}/last.ckpt")
    assert res["status"] == "ok" and res["epochs"] == 2
    download = tmp_path / "b" / "resume_download.ckpt"
    assert download.read_bytes() == (served / "last.ckpt").read_bytes()
    # resumed, not a fresh 2-epoch run: run b trained epoch 1 only (its metrics have no epoch-0 training
    # row), starting from the served checkpoint's step count
    rows = list(csv.DictReader(open(tmp_path / "b" / "csv" / "metrics.csv")))
    trained = sorted({r["epoch"] for r in rows if r.get("train/loss_epoch")})
    assert trained == ["1"], trained
    served_step = torch.load(served / "last.ckpt", weights_only=True)["global_step"]
    first_step = min(int(r["step"]) for r in rows if r.get("train/loss"))
    assert served_step > 0 and first_step >= served_step, (first_step, served_step)


# ---------------------------------------------------------------------------- non-finite losses
@pytest.mark.slow
@pytest.mark.parametrize("when", ["from_the_start", "after_epoch_0"])
def test_huge_learning_rate_stops_the_run_with_exit_2_and_a_failed_results_json(tmp_path, cifar_dir,
                                                                               monkeypatch, capsys, when):
    """from_the_start: the user's command (optim.optimizer.lr=1e6) dies in epoch 0, before any checkpoint.
    after_epoch_0: a good epoch 0, then lr 1e6 from epoch 1 (reliability_helpers.LearningRateFrom), with
    the guard checked only at epoch end and before saves (log_every_n_steps > the epoch's steps): epoch
    0's last.ckpt must be on disk, and neither it nor any other checkpoint may hold non-finite weights."""
    out = tmp_path / "run"
    lr = (["optim.optimizer.lr=1e6"] if when == "from_the_start" else
          ["+callbacks.blow._target_=reliability_helpers.LearningRateFrom", "+callbacks.blow.lr=1e6",
           "+callbacks.blow.epoch=1", "trainer.log_every_n_steps=50"])
    code, err = main_in_process(monkeypatch, capsys, *SMOKE, "method=scratch", f"paths.data_dir={cifar_dir}",
                                *lr, "trainer.max_epochs=3", "trainer.limit_train_batches=4",
                                f"hydra.run.dir={out}")
    assert code == 2, err[-3000:]
    assert "non-finite" in err and "optim.optimizer.lr" in err
    assert "Traceback" not in err
    failed = json.loads((out / "results.json").read_text())
    assert failed["status"] == "failed" and failed["error_type"] == "NonFiniteError" and "test_acc" not in failed
    ckpts = sorted((out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").exists() else []
    if when == "from_the_start":   # dead in epoch 0: nothing was saved, so nothing non-finite could be
        assert ckpts == [], ckpts
        assert "training step" in err
        return
    last = out / "checkpoints" / "last.ckpt"
    assert last in ckpts and torch.load(last, weights_only=True)["epoch"] == 0   # epoch 0's, not overwritten
    for ckpt in ckpts:
        sd = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), ckpt


def _nan_like(t):
    return t * float("nan")


@pytest.mark.slow
@pytest.mark.parametrize("method,patch,term", [
    ("sskt", "sskt", "aux_timm"),
    ("dml", "dml", "peer1_loss"),
    ("maxl", "maxl", "gen_loss"),
    ("kd", "kd", "kd_loss"),
])
def test_a_non_finite_term_is_named_with_its_step(tmp_path, cifar_dir, monkeypatch, method, patch, term):
    import sskt_lightning.methods.dml as dml_mod
    import sskt_lightning.methods.maxl as maxl_mod
    import sskt_lightning.methods.sskt as sskt_mod
    if patch == "sskt":          # the auxiliary term of the one source goes NaN from the first step
        real = sskt_mod.sskt_loss

        def sskt_nan(task, aux, targets, alpha, *args):
            loss, terms = real(task, aux, targets, alpha, *args)
            return loss + _nan_like(terms[0]), [_nan_like(t) for t in terms]
        monkeypatch.setattr(sskt_mod, "sskt_loss", sskt_nan)
    elif patch == "dml":         # peer 1's loss (every 2nd call: target, peer 1, target, ...)
        real, calls = dml_mod.dml_loss, []

        def dml_nan(*args, **kwargs):
            calls.append(1)
            loss, parts = real(*args, **kwargs)
            return (_nan_like(loss), parts) if len(calls) % 2 == 0 else (loss, parts)
        monkeypatch.setattr(dml_mod, "dml_loss", dml_nan)
    elif patch == "maxl":        # the generator's entropy term
        real = maxl_mod.neg_entropy_of_mean
        monkeypatch.setattr(maxl_mod, "neg_entropy_of_mean", lambda g: _nan_like(real(g)))
    else:                        # KD's distillation term (method.loss=kd: the KL of losses.KD_LOSSES)
        import sskt_lightning.losses as losses_mod
        real = losses_mod.KD_LOSSES["kd"]
        monkeypatch.setitem(losses_mod.KD_LOSSES, "kd", lambda *a: _nan_like(real(*a)))
    extra = TIMM_SOURCE if method in ("sskt", "kd") else []
    with pytest.raises(NonFiniteError) as info:
        train(tmp_path, cifar_dir, f"method={method}", *extra)
    msg = str(info.value)
    assert "training step 1" in msg and term in msg and "Usual causes" in msg
    described = {"aux_timm": "SSKT's auxiliary loss of source 'timm'", "peer1_loss": "DML peer 1's loss",
                 "gen_loss": "MAXL's label-generator loss", "kd_loss": "the KD term"}[term]
    assert f"{term} ({described})" in msg, msg         # the method's class describes its own terms
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_maxl_first_order_meta_objective_is_guarded_at_its_own_step(tmp_path, cifar_dir, monkeypatch):
    """meta=first_order steps the generator on a finite-difference objective that gen_loss does not
    contain: a NaN there was seen only a step later (through the NaN generator's labels)."""
    import sskt_lightning.methods.maxl as maxl_mod
    real = maxl_mod.MAXL.generator_objective

    def nan_objective(self, *args, **kwargs):
        objective, logs = real(self, *args, **kwargs)
        return _nan_like(objective), logs
    monkeypatch.setattr(maxl_mod.MAXL, "generator_objective", nan_objective)
    with pytest.raises(NonFiniteError, match=r"training step 1 .*meta_objective") as info:
        train(tmp_path, cifar_dir, "method=maxl", "method.meta=first_order", "trainer.log_every_n_steps=1")
    assert "gen_loss" in str(info.value).split("still finite then:")[1]


@pytest.mark.slow
def test_guard_stops_at_the_first_logging_interval_not_at_the_epochs_end(tmp_path, cifar_dir, monkeypatch):
    """A NaN from step 1 with log_every_n_steps=1 stops the run at step 1 of a 4-step epoch."""
    import sskt_lightning.methods.sskt as sskt_mod
    real = sskt_mod.sskt_loss

    def sskt_nan(task, aux, targets, alpha, *args):
        loss, terms = real(task, aux, targets, alpha, *args)
        return loss + _nan_like(terms[0]), [_nan_like(t) for t in terms]
    monkeypatch.setattr(sskt_mod, "sskt_loss", sskt_nan)
    with pytest.raises(NonFiniteError) as info:
        train(tmp_path, cifar_dir, "method=sskt", *TIMM_SOURCE, "trainer.limit_train_batches=4",
              "trainer.log_every_n_steps=1")
    msg = str(info.value)
    assert "Detected at step 1, at a logging interval" in msg and "aux_timm" in msg


@pytest.mark.slow
def test_non_finite_validation_outputs_stop_the_run(tmp_path, cifar_dir):
    """Finite weights but NaN eval-mode outputs: the accuracy of argmax(NaN logits) looked plausible
    and the run ended ok. It must stop with the cause and a failed results.json."""
    with pytest.raises(NonFiniteError, match=r"validation loss went non-finite.*at epoch 0.*weights are finite"):
        train(tmp_path, cifar_dir, "method=scratch", "+callbacks.badbn._target_=reliability_helpers.BreakBatchNormInEval")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["error_type"] == "NonFiniteError"


def test_guard_takes_host_scalars_beside_device_losses():
    """DML logs its KL weight (kl_warmup > 0) beside the peers' losses: on a GPU the weight was a
    CPU tensor and torch.stack refused the mix. The meta device stands in for the GPU here."""
    from sskt_lightning.guard import NonFiniteGuard
    guard = NonFiniteGuard()
    guard.update({"loss": torch.ones((), device="meta"), "kl_weight": torch.tensor(0.5)})
    (first,) = guard.first_bad.values()
    assert first.device.type == "meta" and first.shape == (2,)


def test_guard_names_the_first_step_and_term_across_changing_term_sets():
    from sskt_lightning.guard import NonFiniteGuard
    guard = NonFiniteGuard()
    ok = torch.tensor(1.0)
    guard.update({"loss": ok, "task_loss": ok, "aux_a": ok})
    guard.update({"loss": ok, "gen_loss": ok})                              # another set of terms
    guard.check("here")                                                     # all finite: silent
    guard.update({"loss": torch.tensor(float("inf")), "task_loss": ok, "aux_a": torch.tensor(float("nan"))})
    guard.update({"loss": torch.tensor(float("nan")), "gen_loss": torch.tensor(float("nan"))})
    with pytest.raises(NonFiniteError) as info:
        guard.check("at the test")
    msg = str(info.value)
    assert "at training step 3" in msg and "aux_a (SSKT's auxiliary loss of source 'a')" in msg
    assert "gen_loss" not in msg.split("still finite then")[0].split("in aux_a")[0]
    assert "still finite then: ['task_loss', 'gen_loss']" in msg and "Detected at step 4, at the test" in msg


def test_a_method_names_its_own_loss_terms_and_the_running_method_comes_first():
    """The guard asks the method class what a term is (Method.describe_term / loss_terms): a new
    method's terms are described with no edit to guard.py, and the running method is asked first
    ('aux_loss' is MAXL's in a MAXL run, a source's aux term in an SSKT run)."""
    from sskt_lightning.guard import NonFiniteGuard
    from sskt_lightning.methods import MAXL, SSKT, Method

    class Mine(Method):   # not registered (no name): known only to the guard it is given to
        loss_terms = {"x_loss": "my method's own term"}
    nan = torch.tensor(float("nan"))
    for method, key, expected in [(Mine, "x_loss", "x_loss (my method's own term)"),
                                  (MAXL, "aux_loss", "aux_loss (MAXL's auxiliary loss)"),
                                  (SSKT, "aux_loss", "aux_loss (SSKT's auxiliary loss of source 'loss')"),
                                  (None, "x_loss", "in x_loss. Detected")]:
        guard = NonFiniteGuard(method)
        guard.update({"loss": nan, key: nan})
        with pytest.raises(NonFiniteError) as info:
            guard.check("at the test")
        assert expected in str(info.value), str(info.value)      # (None: an unknown term, just its key)


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path, cifar_dir):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sskt_lightning.module import TransferModule
    from sskt_lightning.train import data_info_of
    cfg = compose_config([*SMOKE, f"paths.data_dir={cifar_dir}", "method=scratch"], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = TransferModule(OmegaConf.to_container(cfg, resolve=True), data_info_of(dm))
    with torch.no_grad():
        next(module.target.parameters())[0].fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="weights went non-finite.*refusing to save it"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})


# ---------------------------------------------------------------------------- refused before data
@pytest.mark.parametrize("overrides,expected", [
    (["method=sskt", "method.temperature=0"], "method.temperature=0: must be > 0"),
    (["method=kd", "method.temperature=-1"], "method.temperature=-1: must be > 0"),
    (["method=dml", "method.temperature=0"], "method.temperature=0: must be > 0"),
    (["method=sskt", "method.alpha=-0.1"], "method.alpha=-0.1: must lie in >= 0"),
    (["method=kd", "method.alpha=1.5"], r"method.alpha=1.5: must lie in \[0, 1\]"),
    (["method=scratch", "trainer.max_epochs=0"], "trainer.max_epochs=0: must be an integer >= 1"),
    (["method=scratch", "trainer.max_epochs=-1"], "trainer.max_epochs=-1: must be an integer >= 1"),
    (["method=scratch", "optim.optimizer.lr=0"], "optim.optimizer.lr=0: the learning rate must be a number > 0"),
    (["method=scratch", "optim.optimizer.lr=-0.1"], "optim.optimizer.lr=-0.1"),
    (["method=maxl", "method.generator_optim.lr=0"], "method.generator_optim.lr=0"),
    (["method=scratch", "seed=1.5"], "seed=1.5: must be an integer"),
    (["method=scratch", "seed=abc"], "seed='abc': must be an integer"),
    (["method=scratch", "++resum=x.ckpt"], "'resum' \\(did you mean 'resume'\\?\\)"),
    (["method=sskt", "source=[checkpoint]"], "source.checkpoint.weights is required"),
    (["method=scratch", "optimized_metric=test_acc"], "optimized_metric='test_acc'"),
])
def test_impossible_values_are_refused_before_any_data_is_read(tmp_path, overrides, expected):
    cfg = compose_config([*SMOKE, f"paths.data_dir={tmp_path / 'no_data_here'}", *overrides], tmp_path / "run")
    with pytest.raises(ConfigError, match=expected):
        run(cfg)


@pytest.mark.slow
def test_a_refused_rerun_keeps_the_finished_runs_results(tmp_path, cifar_dir):
    """A typo in a command re-run into a finished run's directory is refused before anything starts;
    it must not replace that run's results.json with a failure (it did)."""
    done = train(tmp_path, cifar_dir, "method=scratch")
    assert done["status"] == "ok"
    with pytest.raises(ConfigError, match="method.temperature"):
        train(tmp_path, cifar_dir, "method=kd", "method.temperature=-1", *TIMM_SOURCE)
    assert json.loads((tmp_path / "results.json").read_text()) == done
    assert "method.temperature" in (tmp_path / "failed.txt").read_text()


def test_a_step_budget_allows_max_epochs_minus_one(tmp_path):
    cfg = compose_config([*SMOKE, f"paths.data_dir={tmp_path / 'no_data_here'}", "method=scratch",
                          "trainer.max_epochs=-1", "+trainer.max_steps=4"], tmp_path / "run")
    with pytest.raises(DataNotFoundError):   # validation passed; the (absent) data is the next problem
        run(cfg)


@pytest.mark.parametrize("method", ["dml", "maxl"])
def test_a_step_budget_is_refused_for_methods_with_several_optimizers(tmp_path, cifar_dir, method):
    """Lightning counts each of DML's / MAXL's optimizer steps: max_steps=8 trained DML 4 batches and
    left its cosine schedule at half the learning rate. Refused before any data is read, from the
    command line and from Python, naming the budget in batches."""
    cfg = compose_config([*SMOKE, f"paths.data_dir={tmp_path / 'no_data_here'}", f"method={method}",
                          "+trainer.max_steps=8"], tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"trainer.max_steps=8 cannot budget method={method}.*data.steps_per_epoch"):
        run(cfg)
    from small_trainer import small_trainer

    from sskt_lightning import TransferModule, data_module
    dm = data_module("cifar10", data_dir=str(cifar_dir), batch_size=8, val_size=16, num_workers=0)
    module = TransferModule.from_options(data=dm, method=method)
    trainer = small_trainer(tmp_path, max_steps=8)
    with pytest.raises(ConfigError, match="cannot budget"):
        trainer.fit(module, datamodule=dm)


# ---------------------------------------------------------------------------- environment errors
@pytest.mark.slow
def test_unknown_source_lists_the_available_ones_without_a_traceback(tmp_path):
    proc = cli("source=[nosuch]", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "['nosuch']" in proc.stderr and "imagenet_resnet50" in proc.stderr and "checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_output_path_under_a_file_is_one_clear_message(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = cli(f"hydra.run.dir={afile / 'run'}")
    assert proc.returncode == 2 and "which is a file" in proc.stderr and "hydra.run.dir" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,how", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_stops_the_run_non_zero_with_a_failed_record(tmp_path, cifar_dir, sig, code, how):
    """SIGTERM (a scheduler's preemption or time limit) and Ctrl-C: Lightning stops after the batch;
    the command must not exit 0 (it did for SIGTERM) and the run directory must say what happened and
    how to resume (it held neither results.json nor failed.txt)."""
    out, ready = tmp_path / "run", tmp_path / "ready"
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sskt_lightning.train", *SMOKE, "method=scratch", f"paths.data_dir={cifar_dir}",
         f"hydra.run.dir={out}", "trainer.max_epochs=3", "+callbacks.stall._target_=reliability_helpers.Stall",
         f"+callbacks.stall.ready={ready}", "+callbacks.stall.epoch=1", "+callbacks.stall.batch=0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as a terminal delivers it, whoever started the tests: a suite run in the background by a
        # non-interactive shell (nohup, a CI runner) passes SIGINT down ignored, and the run would stall
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the run stalls at epoch 1 batch 0 until signalled (reliability_helpers.Stall): no window to hit and no
    # wall-clock limit; the hang guard is pytest-timeout's (pyproject.toml)
    with sigkilled_at_exit(proc):
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(sig)
        err = proc.communicate()[1]
    assert proc.returncode == code, err[-3000:]
    assert f"interrupted ({how}" in err and f"resume={out / 'checkpoints' / 'last.ckpt'}" in err
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and results["error_type"] == "Interrupted"
    assert (out / "failed.txt").read_text().startswith(f"Interrupted: the run was interrupted ({how}")
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0   # epoch 0's, intact


@pytest.mark.slow
def test_a_missing_resume_file_is_one_clear_message(tmp_path, cifar_dir, monkeypatch, capsys):
    code, err = main_in_process(monkeypatch, capsys, *SMOKE, "method=scratch", f"paths.data_dir={cifar_dir}",
                                "resume=/nonexistent/last.ckpt", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "resume=/nonexistent/last.ckpt: no such file" in err and "Traceback" not in err


@pytest.mark.slow
def test_read_only_output_directory_is_refused(tmp_path, monkeypatch):
    import tempfile

    from sskt_lightning import validate

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match="not writable \\(Read-only file system\\).*hydra.run.dir"):
        validate.preflight([f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(OutputError, match="Read-only file system"):
        validate.check_output_dir(tmp_path / "run2")


# ---------------------------------------------------------------------------- the command line
@pytest.mark.slow
def test_help_and_cfg_do_not_import_torch():
    probe = ("import atexit, sys, runpy; atexit.register(lambda: print('HEAVY', sorted(m for m in "
             "('torch', 'lightning', 'timm') if m in sys.modules))); sys.argv = ['train'] + sys.argv[1:]; "
             "runpy.run_module('sskt_lightning.train', run_name='__main__')")
    for flag in (["--cfg", "job"], ["--help"]):
        proc = subprocess.run([sys.executable, "-c", probe, *flag], capture_output=True, text=True,
                              env=ENV)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


def test_the_sweeper_gets_the_validation_number_never_test():
    from omegaconf import OmegaConf

    from sskt_lightning.train import CONFIG_DIR, optimized_value
    assert OmegaConf.load(Path(CONFIG_DIR) / "train.yaml").optimized_metric == "best_val_acc"
    cfg = OmegaConf.create({"optimized_metric": "best_val_acc"})
    assert optimized_value(cfg, {"test_acc": 0.9, "best_val_acc": 0.7}) == 0.7


def test_weights_reader_names_the_option_of_an_empty_file(tmp_path):
    empty = tmp_path / "w.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="method.peers\\[0\\].weights=.*empty"):
        W.read_file(empty, "method.peers[0].weights")
