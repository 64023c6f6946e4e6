"""A full disk is one clear error, exit 2: the directory, what was being written and how much space
it needed; the previous checkpoint intact; failed.txt written where possible, and the message says
when it could not be.

The end-to-end test runs the real command line with its run directory on a real 5 MiB file system
(tmpfs: needs the right to mount, which CI's root has; skipped, with the reason, elsewhere). The
in-process tests reproduce what torch.save really raises on a full disk: the write's OSError ENOSPC
hidden as the context of a RuntimeError ("inline_container.cc ... unexpected pos") from its zip
writer, which the old code let through as a raw traceback with exit 1."""
import errno
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import torch

from sskt_lightning.atomic import atomic_torch_save, os_error_in
from sskt_lightning.errors import OutputError

from reliability_helpers import main_in_process

SMOKE = ["trainer=smoke", "data.batch_size=8", "data.val_size=16", "data.num_workers=0", "data=cifar10",
         "model=resnet20"]


def _enospc_as_torch_raises_it(written: int = 5000):
    """A torch.save stand-in that fails as torch does on a full disk."""
    def save(obj, f, *args, **kwargs):
        try:
            f.write(b"x" * written)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 682112 vs 682008")
    return save


def test_torch_saves_wrapped_full_disk_is_an_output_error_with_the_space_needed(tmp_path, monkeypatch):
    path = tmp_path / "ckpts" / "last.ckpt"
    atomic_torch_save({"i": 1, "w": torch.ones(1000)}, path)
    monkeypatch.setattr(torch, "save", _enospc_as_torch_raises_it())
    state = {"i": 2, "w": torch.zeros(3 * 2**20 // 4)}             # 3 MiB of float32
    with pytest.raises(OutputError) as info:
        atomic_torch_save(state, path)
    message = str(info.value)
    assert f"saving the checkpoint {str(path)!r}" in message
    assert f"the disk is full ({str(path.parent)!r}, it needed about 3.0 MiB, " in message
    assert "free there now)" in message
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["i"] == 1           # the previous file, intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_an_error_that_is_not_the_file_systems_is_not_renamed(tmp_path, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        raise RuntimeError("a bug, not a disk")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug, not a disk"):
        atomic_torch_save({"w": torch.ones(3)}, tmp_path / "x.ckpt")
    assert os_error_in(RuntimeError("plain")) is None


def test_a_full_disk_in_a_run_whose_failure_cannot_be_recorded_says_so(tmp_path, cifar_dir, monkeypatch, capsys):
    """The disk stays full: failed.txt and results.json cannot be written either, and the one
    message the user gets says that the run directory holds no record."""
    import sskt_lightning.atomic as atomic
    real_write = atomic.atomic_write_text

    def full_for_the_records(path, text):
        if os.path.basename(path) in ("failed.txt", "results.json"):
            raise atomic.explain_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path, "writing")
        return real_write(path, text)

    monkeypatch.setattr(torch, "save", _enospc_as_torch_raises_it())
    monkeypatch.setattr(atomic, "atomic_write_text", full_for_the_records)
    out = tmp_path / "run"
    code, err = main_in_process(monkeypatch, capsys, *SMOKE, "method=scratch", f"paths.data_dir={cifar_dir}",
                                f"hydra.run.dir={out}")
    assert code == 2 and "Traceback" not in err
    assert "saving the checkpoint" in err and f"the disk is full ({str(out / 'checkpoints')!r}" in err
    assert "failed.txt and results.json could not be written either" in err
    assert not (out / "failed.txt").exists() and not (out / "results.json").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 5 MiB file system (tmpfs), unmounted afterwards."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5M", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 5 MiB tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_run_on_a_5_mib_disk_stops_with_one_message_and_exit_2(small_disk, cifar_dir):
    """Each checkpoint is ~2.1 MiB: epoch 0 writes best + last, epoch 1's last.ckpt does not fit."""
    out = small_disk / "run"
    cmd = [sys.executable, "-m", "sskt_lightning.train", "method=scratch", "model=resnet20", "data=cifar10",
           f"paths.data_dir={cifar_dir}", f"hydra.run.dir={out}", "trainer.max_epochs=3", "data.batch_size=16",
           "data.val_size=16", "trainer.limit_train_batches=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, proc.stderr[-3000:]
    assert "No space left on device" in error[0] and f"the disk is full ({str(out / 'checkpoints')!r}, it needed about 2." in error[0]
    assert "saving the checkpoint" in error[0] and "free there now)" in error[0]
    assert "hydra.run.dir=" in error[0]                                # the fix
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)   # the previous one, whole
    assert last["epoch"] == 0
    assert (out / "failed.txt").read_text().startswith("OutputError: Could not finish saving the checkpoint")
    assert json.loads((out / "results.json").read_text())["status"] == "failed"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]   # no temporary left
