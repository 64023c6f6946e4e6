"""The typed way in for library users: options dataclasses -> the config the command line composes,
clear errors for unknown options, and a module that trains, checkpoints (weights_only) and is
evaluated by sskt-eval like a command-line run."""
import dataclasses
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

import sskt_lightning
from sskt_lightning.compose import compose_config
from sskt_lightning.errors import ConfigError
from sskt_lightning.options import (
    DMLOptions,
    KDOptions,
    MAXLOptions,
    ModelOptions,
    OptimOptions,
    ScratchOptions,
    SourceOptions,
    SSKTOptions,
    build_config,
    data_module,
)

METHOD_OPTIONS = [ScratchOptions, SSKTOptions, KDOptions, DMLOptions, MAXLOptions]
KEYS = ("model", "method", "source", "optim")
TINY = dict(batch_size=8, val_size=16, num_workers=0)


def cli_config(overrides, tmp_path) -> dict:
    cfg = compose_config(overrides, tmp_path)
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if cfg.get(k) is not None else {} for k in KEYS}


@pytest.mark.parametrize("options", METHOD_OPTIONS, ids=lambda c: c.__name__)
def test_method_options_carry_the_packaged_defaults(options, tmp_path):
    packaged = cli_config([f"method={options.config}"], tmp_path)["method"]
    fields = {f.name for f in dataclasses.fields(options)}
    assert fields == set(packaged) - {"_target_", "name"}
    assert {k: v for k, v in packaged.items() if k not in ("_target_", "name")} == dataclasses.asdict(options())


def test_source_options_are_the_source_specs_fields():
    from sskt_lightning.sources import SourceSpec
    spec = {f.name for f in dataclasses.fields(SourceSpec)} - {"key"}
    assert {f.name for f in dataclasses.fields(SourceOptions)} - {"config"} == spec


def test_typed_options_build_the_command_lines_config(tmp_path):
    typed = build_config(
        model="resnet18", method=SSKTOptions(alpha=0.5, temperature=2.0, aux_loss="kd"),
        sources=["imagenet_resnet50", SourceOptions("places365_resnet50", pretrained=False)],
        optim=OptimOptions(lr=0.05, max_epochs=30))
    cli = cli_config(["model=resnet18", "method=sskt", "source=[imagenet_resnet50,places365_resnet50]",
                      "source.places365_resnet50.pretrained=false", "method.alpha=0.5", "method.temperature=2",
                      "method.aux_loss=kd", "optim.optimizer.lr=0.05", "trainer.max_epochs=30"], tmp_path)
    assert {k: typed[k] for k in KEYS} == cli
    assert typed["channels_last"] is False and "data" not in typed


def test_the_step_schedules_options_reach_its_config(tmp_path):
    """OptimOptions sets sgd_cosine's warm-up and floor as optim.scheduler.<key>= does; a schedule
    without them refuses them, naming what it takes."""
    typed = build_config(method="scratch", optim=OptimOptions("sgd_cosine", lr=0.05, warmup=0.1, min_lr_ratio=0.01))
    cli = cli_config(["method=scratch", "optim=sgd_cosine", "optim.optimizer.lr=0.05", "optim.scheduler.warmup=0.1",
                      "optim.scheduler.min_lr_ratio=0.01"], tmp_path)
    assert typed["optim"] == cli["optim"]
    assert typed["optim"]["scheduler"]["warmup"] == 0.1 and typed["optim"]["scheduler"]["min_lr_ratio"] == 0.01
    with pytest.raises(ConfigError, match=r"OptimOptions\('sgd'\) has no warmup: the 'sgd' schedule takes"):
        build_config(method="scratch", optim=OptimOptions("sgd", warmup=0.1))


def test_any_timm_name_kwargs_and_the_trainers_epochs(tmp_path):
    typed = build_config(model=ModelOptions("resnet50.tv_in1k", kwargs={"drop_rate": 0.1}),
                         method=DMLOptions(peers=[{"name": "resnet20"}], update="simultaneous"), optim="sgd")
    cli = cli_config(["model=timm", "model.name=resnet50.tv_in1k", "+model.kwargs.drop_rate=0.1", "method=dml",
                      "method.peers=[{name: resnet20}]", "method.update=simultaneous"], tmp_path)
    assert typed["model"] == cli["model"] and typed["method"] == cli["method"]
    assert typed["source"] == {}   # no sources for DML
    assert typed["optim"]["scheduler"]["max_epochs"] is None   # filled from the Trainer's max_epochs


@pytest.mark.parametrize("make,match", [
    (lambda: SSKTOptions(alpah=0.5), r"SSKTOptions: unknown option\(s\) 'alpah' \(did you mean 'alpha'\?\)"),
    (lambda: SourceOptions("timm", nmae="x"), r"SourceOptions: unknown option\(s\) 'nmae' \(did you mean 'name'\?\)"),
    (lambda: build_config(method="sskkt", sources=["timm"]), r"no method config 'sskkt'.*Did you mean sskt"),
    (lambda: build_config(method=SSKTOptions(), sources=["imagenet_resnet5"]), r"no source config 'imagenet_resnet5'"),
    (lambda: build_config(method=SSKTOptions()), r"method 'sskt' needs sources: e.g. sources=\[SourceOptions"),
    (lambda: build_config(method=ScratchOptions(), sources=["imagenet_resnet50"]), r"'scratch' uses no sources"),
    (lambda: build_config(method=KDOptions(), sources=["checkpoint"]), r"SourceOptions\('checkpoint'\) needs weights="),
    (lambda: build_config(method=SSKTOptions(temperature=0), sources=["imagenet_resnet50"]), r"method.temperature=0"),
    (lambda: build_config(method=KDOptions(alpha=1.5), sources=["imagenet_resnet50"]), r"method.alpha=1.5"),
    (lambda: build_config(method="scratch", optim=OptimOptions("maxl", fractions=[0.5])),
     r"OptimOptions\('maxl'\) has no fractions: the 'maxl' schedule takes step_size, gamma"),
    (lambda: build_config(method="scratch", optim=OptimOptions(lr=-1)), r"optim.optimizer.lr=-1"),
    (lambda: build_config(method="scratch", model=42), r"model= takes a ModelOptions"),
    (lambda: build_config(method={"alpha": 1}), r"method= takes SSKTOptions"),
    (lambda: data_module("cifar10", batchsize=8), r"unknown option\(s\) 'batchsize' \(did you mean 'batch_size'\?\)"),
    (lambda: data_module("cifar11"), r"no data config 'cifar11'"),
])
def test_unknown_or_invalid_options_name_the_fix(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


@pytest.mark.slow
def test_the_options_module_and_the_package_stay_light():
    code = ("import sys, sskt_lightning.options, sskt_lightning\n"
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'heavy import'\n"
            "print(sskt_lightning.SSKTOptions.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SSKTOptions"
    assert sskt_lightning.TransferModule.__module__ == "sskt_lightning.module"
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        sskt_lightning.nosuch  # noqa: B018


@pytest.mark.slow
def test_a_typed_module_trains_checkpoints_and_is_evaluated_like_a_cli_run(tmp_path, cifar_dir):
    from small_trainer import small_trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sskt_lightning import TransferModule
    from sskt_lightning.eval import build_target, data_config, read_checkpoint

    dm = data_module("cifar10", data_dir=str(cifar_dir), **TINY)
    module = TransferModule.from_options(data=dm, model=ModelOptions("resnet20", kwargs={"shortcut": "B"}),
                                         method=ScratchOptions(), optim=OptimOptions(lr=0.05))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = small_trainer(tmp_path, max_epochs=2, limit_train_batches=1, limit_val_batches=1, callbacks=[ckpt])
    trainer.fit(module, datamodule=dm)
    # the schedule spans the Trainer's 2 epochs (x0.2 at round(0.3*2)=1, round(0.6*2)=1, round(0.8*2)=2)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert [scheduler.lr_lambdas[0](e) for e in (0, 1, 2)] == pytest.approx([1.0, 0.04, 0.008])
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == 0.05

    obj = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = obj["hyper_parameters"]
    assert hp["config"]["model"]["kwargs"] == {"shortcut": "B"} and hp["model_name"] == "cifar_resnet20"
    assert hp["config"]["data"]["batch_size"] == 8 and hp["config"]["data"]["data_dir"] == str(cifar_dir)
    # sskt-eval's pieces: the checkpoint, its target network and the data it was trained on
    ckpt_obj = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    net = build_target(ckpt_obj)
    assert torch.equal(net.fc.weight, module.target.net.fc.weight.detach())
    data = data_config(OmegaConf.create({"data": None, "data_dir": None}), ckpt_obj)
    assert data["name"] == "cifar10" and data["val_size"] == 16


def test_a_step_budget_needs_the_schedules_epochs(tmp_path, cifar_dir):
    from small_trainer import small_trainer

    from sskt_lightning import TransferModule
    dm = data_module("cifar10", data_dir=str(cifar_dir), **TINY)
    module = TransferModule.from_options(data=dm, method="scratch")
    trainer = small_trainer(tmp_path, max_steps=1)
    with pytest.raises(ConfigError, match=r"OptimOptions\(max_epochs=N\)"):
        trainer.fit(module, datamodule=dm)


def test_channels_last_reaches_every_network_of_the_run(cifar_dir):
    """channels_last=true: the target, SSKT's transfer-module heads and the frozen source keep every
    4-D weight channels-last, and the step runs."""
    from sskt_lightning import TransferModule
    dm = data_module("cifar10", data_dir=str(cifar_dir), **TINY)
    source = SourceOptions("timm", name="cifar_resnet20", pretrained=False, num_classes=10)
    module = TransferModule.from_options(data=dm, method=SSKTOptions(aux_head="transfer_module"),
                                         sources=[source], channels_last=True)
    parts = {"target": module.target, "heads": module.method.heads, "sources": module.sources}
    for name, part in parts.items():
        convs = [p for p in part.parameters() if p.ndim == 4]
        assert convs, name
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs), name
    x = torch.randn(4, 3, 32, 32)
    out = module.target(x)
    assert out.logits.shape == (4, 10) and module.sources(x, None, None, "labeled")[0].shape == (4, 10)
