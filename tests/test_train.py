"""End to end: configs compose, scratch and SSKT train a few steps on files in the real formats and
write results.json, checkpoints and metrics; sources stay bit-identical; offline errors are clear."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sskt_lightning.compose import compose_config
from sskt_lightning.train import CONFIG_DIR, run

CONF = Path(CONFIG_DIR)
SMOKE = ["trainer=smoke", "data.batch_size=8", "data.val_size=16", "data.num_workers=0"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def file_values(group, option):
    """The leaf values conf/<group>/<option>.yaml sets, read with OmegaConf alone (not Hydra): its
    defaults' values first (same group), then its own (which win)."""
    from omegaconf import OmegaConf
    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
    values = {}
    for parent in raw.pop("defaults", []):
        if parent != "_self_":
            values.update(file_values(group, parent))
    values.update(_flat(raw))
    return values


GROUPS = ("model", "data", "method", "trainer", "logger")


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_option_composes(group, option, tmp_path):
    from omegaconf import OmegaConf
    cfg = compose_config([f"{group}={option}"], tmp_path)
    # the composed group is exactly what the picked file says (not the group's default, not another
    # option), and that differs from every other option of the group, so the check can tell them apart
    expected = file_values(group, option)
    assert _flat(OmegaConf.to_container(cfg[group], resolve=False)) == expected
    assert all(file_values(group, other) != expected for other in options(group) if other != option)


def test_canonical_call_composes_with_both_paper_sources(tmp_path):
    cfg = compose_config(["model=resnet18", "data=cifar10", "method=sskt",
                          "source=[imagenet_resnet50,places365_resnet50]",
                          "source.places365_resnet50.pretrained=false"], tmp_path)
    assert list(cfg.source) == ["imagenet_resnet50", "places365_resnet50"]
    assert cfg.source.places365_resnet50.pretrained is False
    assert cfg.source.imagenet_resnet50.pretrained is True
    assert cfg.method.aux_head == "transfer_module" and cfg.method.alpha == 0.1


def train(tmp_path, data_dir, *overrides):
    cfg = compose_config(["data=cifar10", f"paths.data_dir={data_dir}", "model=resnet20", *SMOKE,
                          *overrides], tmp_path)
    return run(cfg), tmp_path


def check_run_dir(results, out):
    for key in ("method", "model", "data", "sources", "seed", "epochs", "test_acc", "best_val_acc",
                "wall_time_s", "train_images_per_s"):
        assert key in results, key
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "checkpoints").glob("best-*.ckpt"))
    assert (out / "csv" / "metrics.csv").is_file() and (out / "config.yaml").is_file()
    assert 0.0 <= results["test_acc"] <= 1.0


@pytest.mark.slow
def test_scratch_trains_and_writes_its_run_dir(tmp_path, cifar_dir):
    results, out = train(tmp_path, cifar_dir, "method=scratch")
    check_run_dir(results, out)
    assert results["method"] == "scratch" and results["sources"] == [] and results["model"] == "cifar_resnet20"
    assert results["train_images_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("aux_head,aux_loss", [("transfer_module", "ce"), ("linear", "kd")])
def test_sskt_with_a_checkpoint_of_this_project_as_source(tmp_path, cifar_dir, aux_head, aux_loss):
    first, src_dir = train(tmp_path / "src", cifar_dir, "method=scratch", "model=resnet32")
    ckpt = src_dir / first["checkpoints"]["last"]
    results, out = train(tmp_path / "sskt", cifar_dir, "method=sskt", "source=[checkpoint]",
                         f"source.checkpoint.weights={ckpt}", f"method.aux_head={aux_head}",
                         f"method.aux_loss={aux_loss}")
    check_run_dir(results, out)
    assert results["sources"] == ["checkpoint"]
    ckpt_keys = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("sources.") for k in ckpt_keys)   # frozen sources are not saved
    assert any(k.startswith("method.heads.0.") for k in ckpt_keys)


@pytest.mark.slow
@pytest.mark.parametrize("precision,dtype", [("64-true", torch.float64), ("bf16-true", torch.bfloat16)])
def test_true_precisions_feed_every_network_its_own_dtype(tmp_path, cifar_dir, precision, dtype):
    """trainer.precision=*-true converts the module (target, heads, sources) to ``dtype``; the images
    the data module normalises on the device must follow (they were float32: a dtype error from the
    first conv). The whole run, SSKT with a source, trains and tests at that precision."""
    results, out = train(tmp_path, cifar_dir, "method=sskt", "source=[timm]", "source.timm.name=cifar_resnet20",
                         "source.timm.num_classes=10", "source.timm.pretrained=false", f"trainer.precision={precision}")
    check_run_dir(results, out)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {v.dtype for k, v in state.items() if v.is_floating_point()} == {dtype}


@pytest.mark.slow
def test_images_kept_on_the_device_train_exactly_as_loaded_batches(tmp_path, cifar_dir):
    """data.on_device=true (the images gathered on the device from their indices): the same run,
    bit for bit, as the default path, with SSKT's unlabeled stream too."""
    args = [f"paths.data_dir={cifar_dir}", "data=cifar10", "model=resnet20", *SMOKE, "trainer.max_epochs=2",
            "method=sskt", "source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.pretrained=false",
            "source.timm.num_classes=10", "data.labels_per_class=3", "data.unlabeled=true",
            "method.unlabeled=true"]
    res = [run(compose_config([*args, f"data.on_device={flag}"], tmp_path / flag)) for flag in ("false", "true")]
    assert res[0]["test_acc"] == res[1]["test_acc"] and res[0]["best_val_acc"] == res[1]["best_val_acc"]
    curves = [(tmp_path / flag / "csv" / "metrics.csv").read_text() for flag in ("false", "true")]
    assert "train/loss" in curves[0] and curves[0] == curves[1]


@pytest.mark.slow
def test_sources_bit_identical_after_training_and_heads_learn(tmp_path, cifar_dir):
    from sskt_lightning.module import TransferModule
    from small_trainer import small_trainer
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from sskt_lightning.train import data_info_of
    cfg = compose_config(["data=cifar10", f"paths.data_dir={cifar_dir}", *SMOKE, "method=sskt",
                          "source=[timm,imagenet_resnet18]", "source.timm.name=cifar_resnet20",
                          "source.timm.pretrained=false", "source.imagenet_resnet18.pretrained=false",
                          "source.imagenet_resnet18.input_size=40"], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = TransferModule(OmegaConf.to_container(cfg, resolve=True), data_info_of(dm))
    before = {k: v.clone() for k, v in module.sources.state_dict().items()}
    heads_before = {k: v.clone() for k, v in module.method.heads.state_dict().items()}
    target_before = {k: v.clone() for k, v in module.target.state_dict().items()}
    trainer = small_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    after = module.sources.state_dict()
    assert before.keys() == after.keys() and any("running_mean" in k for k in after)
    for k in before:
        assert torch.equal(before[k], after[k]), f"source tensor {k} changed"
    assert all(not p.requires_grad for p in module.sources.parameters())
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in module.sources.parameters()}
    assert any(not torch.equal(heads_before[k], v) for k, v in module.method.heads.state_dict().items())
    assert any(not torch.equal(target_before[k], v) for k, v in module.target.state_dict().items())


def test_sskt_without_sources_is_refused(tmp_path, cifar_dir):
    from sskt_lightning.errors import ConfigError
    with pytest.raises(ConfigError, match="at least one source"):
        train(tmp_path, cifar_dir, "method=sskt", "source=[]")


@pytest.mark.slow
def test_canonical_call_offline_stops_fast_with_the_fix(tmp_path):
    # "fast" as events, not seconds (a wall-clock limit fails on a loaded machine, or where a failed DNS
    # lookup takes long): the run stops at the missing data, before it builds a source or fetches its
    # weights - the error is the data's, not the weights' (offline, building the source first fails with
    # "Could not fetch pretrained weights"); no 'source ...' line in train.log; nothing in the (empty)
    # torch/HF caches (online, a source built first would download ResNet-50 there). The hang guard is
    # pytest-timeout's (pyproject.toml). Start-up speed itself is not a test's business.
    caches = {"TORCH_HOME": tmp_path / "torch", "HF_HOME": tmp_path / "hf"}
    proc = subprocess.run([sys.executable, "-m", "sskt_lightning.train", "model=resnet18", "data=cifar10",
                           "method=sskt", f"paths.data_dir={tmp_path / 'none'}",
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env={**os.environ, **{k: str(v) for k, v in caches.items()}})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not [str(p) for c in caches.values() if c.exists() for p in c.rglob("*")], "a source was fetched"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "sskt-train: method=sskt sources=imagenet_resnet50" in log and "source imagenet_resnet50:" not in log
    err = proc.stderr
    assert "CIFAR-10" in err or "cifar10" in err.lower()
    assert str(tmp_path / "none") in err and "paths.data_dir" in err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["stl10", "imagefolder", "fashion_mnist"])
def test_scratch_and_sskt_on_every_on_disk_format(tmp_path, fmt):
    import data_fixtures as fx
    data_dir = tmp_path / "data"
    if fmt == "stl10":
        fx.write_stl10(data_dir, n_train=40, n_test=16, n_unlabeled=8)
        extra = ["data=stl10", "data.val_size=8"]
    elif fmt == "imagefolder":
        fx.write_imagefolder(data_dir, n_per_class=10, size=20)
        extra = ["data=imagefolder", "data.val_size=6", "data.image_size=16"]
    else:
        fx.write_fashion_mnist(data_dir / "FashionMNIST" / "raw", n_train=60, n_test=20)
        extra = ["data=fashion_mnist", "data.val_size=12"]
    common = [f"paths.data_dir={data_dir}", f"data.data_dir={data_dir}", "trainer=smoke", "data.batch_size=8",
              "data.num_workers=0", "model=resnet20", *extra]
    for method in (["method=scratch"], ["method=sskt", "source=[timm]", "source.timm.name=resnet18",
                                         "source.timm.pretrained=false", "source.timm.input_size=48"]):
        out = tmp_path / method[0].split("=")[1]
        with pytest.warns(UserWarning, match=r"source 'timm' \(resnet18\) has RANDOM weights") \
                if method[0] == "method=sskt" else _nothing():
            results = run(compose_config([*common, *method], out))
        check_run_dir(results, out)
        assert results["data"] == fmt


def _nothing():
    import contextlib
    return contextlib.nullcontext()


@pytest.mark.slow
def test_wandb_offline_run_keeps_its_metrics_in_the_run_dir(tmp_path, cifar_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    results, out = train(tmp_path, cifar_dir, "method=scratch", "logger=wandb", "logger.wandb.tags=[test]")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert results["group"].startswith("data=cifar10 model=resnet20 method=scratch")
    import wandb
    assert wandb.run is None   # finished after the job
