"""Two CPU processes (gloo DDP) through the real command line: same results.json fields as one
process, identical target weights on both ranks, global batch size split and checked."""
import json
import subprocess
import sys

import pytest

from sskt_lightning.errors import ConfigError

RUN = [sys.executable, "-m", "sskt_lightning.train", "data=cifar10", "model=resnet20",
       "data.batch_size=8", "data.val_size=16", "data.num_workers=0", "trainer.max_epochs=1",
       "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
       "trainer.enable_progress_bar=false", "+callbacks.digest._target_=sskt_lightning.callbacks.WeightsDigest"]
METHODS = {
    "sskt": ["method=sskt", "source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.pretrained=false"],
    "dml": ["method=dml"],
}


def train(out, data_dir, trainer, method, extra=()):
    cmd = [*RUN, f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", f"trainer={trainer}", *METHODS[method], *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_process_ddp_matches_single_process_fields(tmp_path, cifar_dir, method):
    single = train(tmp_path / "single", cifar_dir, "cpu", method)
    ddp = train(tmp_path / "ddp", cifar_dir, "ddp_cpu", method)
    assert set(ddp) == set(single)
    assert ddp["num_test"] == single["num_test"] == 24
    assert 0 <= ddp["test_acc"] <= 1
    digests = [json.loads((tmp_path / "ddp" / f"weights_digest_rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["world_size"] for d in digests] == [2, 2]
    assert digests[0]["parameters"] == digests[1]["parameters"], "ranks' target weights diverged"
    assert digests[0]["buffers"] == digests[1]["buffers"], "ranks' BatchNorm statistics diverged"


def test_cache_counts_are_every_processs(tmp_path, cifar_dir):
    """Under DDP each process looks up its own shard of every batch: results.json's cache_stats sum
    them (they were rank 0's alone, half of the lookups)."""
    cache = ["method.cache=read_write"]
    single = train(tmp_path / "single", cifar_dir, "cpu", "sskt", cache + [f"paths.cache_dir={tmp_path / 'c1'}"])
    ddp = train(tmp_path / "ddp", cifar_dir, "ddp_cpu", "sskt", cache + [f"paths.cache_dir={tmp_path / 'c2'}"])
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
