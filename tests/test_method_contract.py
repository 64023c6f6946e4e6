"""The method contract, for every method config in conf/method/ (as timm's tests run over
list_models()): each composes into a class whose constructor is its config, refuses bad values
before reading data, trains a few steps and checkpoints, steps its learning-rate schedules per
step when asked, starts from the seed's data split and initial target, and (slow) a run killed
with SIGKILL mid-epoch and resumed ends bit-identical to an uninterrupted one. A new
conf/method/<name>.yaml is picked up with no edit here (tests/method_contract.py: what each check
does; tests/test_ddp.py runs every method under DDP)."""
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import sskt_lightning.train as train_mod
from sskt_lightning.compose import compose_config
from sskt_lightning.data import ImageDataModule

from method_contract import (
    SMALL_SOURCE,
    check_bad_values_are_refused,
    check_config_is_the_constructor,
    check_trains_and_checkpoints,
    method_class,
    UNLABELED_STREAM,
    overrides_for,
    packaged_methods,
    requires_unlabeled,
    variants,
)
from test_resume import _restore_deterministic_flag, assert_resume_equals_uninterrupted  # noqa: F401
from small_trainer import small_trainer

METHODS = packaged_methods()
VARIANTS = {k: v for name in METHODS for k, v in variants(name).items()}


def test_every_method_class_has_a_config():
    """A method class without a conf/method/*.yaml could not be chosen: each registered method of
    the package has one whose _target_ is that class."""
    from sskt_lightning.methods import Method
    assert len(METHODS) >= 5, METHODS
    configured = {method_class(name) for name in METHODS}
    package = {c for c in Method.registry.values() if c.__module__.startswith("sskt_lightning.methods.")}
    assert package <= configured, package - configured


@pytest.mark.parametrize("name", METHODS)
def test_the_config_is_the_constructor(name):
    check_config_is_the_constructor(name)


@pytest.mark.parametrize("name", METHODS)
def test_bad_values_are_refused_before_any_data_is_read(name, tmp_path):
    check_bad_values_are_refused(name, tmp_path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.parametrize("name", METHODS)
def test_trains_a_few_steps_and_checkpoints(name, cifar_dir, tmp_path):
    check_trains_and_checkpoints(name, cifar_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, cifar_dir, variant):
    assert_resume_equals_uninterrupted(tmp_path, cifar_dir, VARIANTS[variant])

# ----------------------------------------------------------------------------- schedules


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.parametrize("name", METHODS)
def test_step_schedules_step_per_training_step(tmp_path, cifar_dir, name, monkeypatch):
    """optim=sgd_cosine: 2 epochs of 3 steps -> every scheduler built from cfg.optim (the target's,
    each DML peer's, MAXL's multi-task one) stepped 6 times, with automatic and manual optimization
    alike; a method's own per-epoch schedule (MAXL's generator) stepped once per epoch."""
    built = []
    real = train_mod.TransferModule.default_optimizers
    monkeypatch.setattr(train_mod.TransferModule, "default_optimizers",
                        lambda self, params: built.append(1) or real(self, params))
    cfg = compose_config(["data=cifar10", f"paths.data_dir={cifar_dir}", "model=resnet20", *overrides_for(name),
                          "trainer=cpu", "trainer.max_epochs=2", "trainer.limit_val_batches=1", "data.batch_size=4",
                          "data.num_workers=0", "data.val_size=8", "data.steps_per_epoch=3", "optim=sgd_cosine",
                          "optim.scheduler.warmup=2"], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = train_mod.TransferModule(OmegaConf.to_container(cfg, resolve=True), train_mod.data_info_of(dm))
    trainer = small_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    configs = trainer.lr_scheduler_configs
    step_based = [c for c in configs if c.interval == "step"]
    # one per optimizer cfg.optim built: 1 (scratch, sskt, kd, maxl's multi-task net), 1 + peers (dml)
    assert len(built) >= 1 and len(step_based) == len(built)
    if not module.automatic_optimization:
        assert len(trainer.optimizers) >= 2        # manual optimization: the methods with several
    for c in step_based:
        assert c.scheduler.last_epoch == 6
        factor = 0.5 * (1 + math.cos(math.pi * 4 / 4))                          # step 6 of 6: the end
        assert c.scheduler.get_last_lr()[0] == pytest.approx(0.1 * factor, abs=1e-12)
    for c in configs:
        if c.interval == "epoch":                  # a method's own schedule (MAXL's generator)
            assert c.scheduler.last_epoch == 2


# ----------------------------------------------------------------------------- one seed, every method


class _Stop(Exception):
    pass


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_a_seed_fixes_data_and_target_init_for_every_method(tmp_path, cifar_dir, monkeypatch):
    """Through train.run itself: the labelled and validation subsets and the target's initial weights
    are the same for every method (and its unlabeled-stream variant) at one seed."""
    seen = {}

    class Probe(train_mod.TransferModule):
        def __init__(self, config, data_info):
            super().__init__(config, data_info)
            seen["target"] = {k: v.clone() for k, v in self.target.state_dict().items()}
            raise _Stop

    def split_of(dm_self, *a, **k):
        out = original_setup(dm_self, *a, **k)
        seen["split"] = (dm_self.train_indices.tolist(), dm_self.val_indices.tolist())
        return out

    original_setup = ImageDataModule.setup
    monkeypatch.setattr(ImageDataModule, "setup", split_of)
    monkeypatch.setattr(train_mod, "TransferModule", Probe)
    base = ["data=cifar10", f"paths.data_dir={cifar_dir}", "model=resnet20", "trainer=smoke", "data.batch_size=8",
            "data.num_workers=0", "data.labels_per_class=2", "data.val_per_class=2", "seed=5", *SMALL_SOURCE]
    runs = {"scratch": ["method=scratch"]}
    for name in METHODS:
        runs[name] = [f"method={name}"]
        if requires_unlabeled(method_class(name)):       # (FixMatch) the stream, nothing else
            runs[name] += UNLABELED_STREAM[:1]
        elif method_class(name).accepts_unlabeled:
            runs[f"{name}_unlabeled"] = [f"method={name}", "method.unlabeled=true", "data.unlabeled=true"]
    assert len(runs) >= 6, runs
    got = {}
    for name, overrides in runs.items():
        with pytest.raises(_Stop):
            train_mod.run(compose_config([*base, *overrides], tmp_path / name))
        got[name] = (seen["split"], seen["target"])
    split0, target0 = got["scratch"]
    for name, (split, target) in got.items():
        assert split == split0, name
        assert target.keys() == target0.keys() and all(torch.equal(target[k], target0[k]) for k in target0), name
    with pytest.raises(_Stop):   # another seed: another subset, another initialisation
        train_mod.run(compose_config([*base, "seed=6", "method=scratch"], tmp_path / "other"))
    assert seen["split"] != split0
    assert any(not torch.equal(seen["target"][k], target0[k]) for k in target0 if target0[k].is_floating_point())
