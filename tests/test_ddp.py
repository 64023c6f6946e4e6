"""Two CPU processes (gloo DDP) through the real command line, with the default callbacks and
progress bar: cache counts summed over processes, the global batch size split and checked. Every
method's default run under DDP (fields, both ranks' weights, collectives in step) is in
tests/test_defaults.py."""
import json
import subprocess
import sys

import pytest

from sskt_lightning.errors import ConfigError

RUN = [sys.executable, "-m", "sskt_lightning.train", "data=cifar10", "model=resnet20",
       "data.batch_size=8", "data.val_size=16", "data.num_workers=0", "trainer.max_epochs=1",
       "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
       "method=sskt", "source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.pretrained=false"]


def train(out, data_dir, trainer, extra=()):
    cmd = [*RUN, f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", f"trainer={trainer}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_cache_counts_are_every_processs(tmp_path, cifar_dir):
    """Under DDP each process looks up its own shard of every batch: results.json's cache_stats sum
    them (they were rank 0's alone, half of the lookups)."""
    cache = ["method.cache=read_write"]
    single = train(tmp_path / "single", cifar_dir, "cpu", cache + [f"paths.cache_dir={tmp_path / 'c1'}"])
    ddp = train(tmp_path / "ddp", cifar_dir, "ddp_cpu", cache + [f"paths.cache_dir={tmp_path / 'c2'}"])
    (one,), (two,) = single["method_settings"]["cache_stats"]["timm"], ddp["method_settings"]["cache_stats"]["timm"]
    assert one["hits"] + one["misses"] == 3 * 8                     # 3 batches of 8 images, one source
    assert two["hits"] + two["misses"] == one["hits"] + one["misses"]
    assert two["written"] == one["written"] == one["misses"]        # a cold cache: every miss stored once


def test_global_batch_size_must_divide_by_the_world_size(cifar_dir):
    from sskt_lightning.data import ImageDataModule
    dm = ImageDataModule("cifar10", str(cifar_dir), batch_size=10, val_size=16, download=False)
    dm.split_batch_across(2)
    assert dm.batch_size == 5
    dm = ImageDataModule("cifar10", str(cifar_dir), batch_size=9, val_size=16, download=False)
    with pytest.raises(ConfigError, match="global batch size.*multiple of 2"):
        dm.split_batch_across(2)
