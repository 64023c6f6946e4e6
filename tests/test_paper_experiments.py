"""Every paper experiment config composes and runs a few steps on local files, with its own default
method (method=paper/sskt: the reference's SSKT), and the MAXL column with method=paper/maxl."""
from pathlib import Path

import pytest

import data_fixtures as fx
from sskt_lightning.compose import compose_config
from sskt_lightning.train import CONFIG_DIR, run

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment" / "paper").glob("*.yaml"))
WRITERS = {"cifar10": fx.write_cifar10, "cifar100": fx.write_cifar100, "stl10": fx.write_stl10}
if hasattr(fx, "write_voc2007"):
    WRITERS["voc2007"] = lambda root: fx.write_voc2007(root, n_trainval=24, n_test=8)
SMOKE = ["trainer=smoke", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "data.batch_size=4", "data.val_size=8", "data.num_workers=0"]


def small_run(name, tmp_path, *extra):
    cfg = compose_config([f"experiment=paper/{name}"], tmp_path)
    assert cfg.trainer.max_epochs == 200 and cfg.optim.optimizer.lr == 0.1
    data = cfg.data.name
    WRITERS[data](tmp_path / "data")
    sources = list(cfg.source)
    overrides = [f"experiment=paper/{name}", f"paths.data_dir={tmp_path / 'data'}", *SMOKE,
                 *(f"source.{s}.pretrained=false" for s in sources),
                 # small stand-ins for the ImageNet sources keep this a few-second test; they see what
                 # the experiment's reference adapter gives them (the batch upsampled x7/3, or as is)
                 *(f"source.{s}.name=cifar_resnet20" for s in sources), *extra]
    if data == "voc2007":   # above 64 px, so resnet18/50 stay the ImageNet-style nets of the row
        overrides.append("data.image_size=96")
    if cfg.model.name not in ("resnet20", "resnet32") and "method=paper/maxl" not in extra:
        # narrow heads: the reference's 1000/500 ones for wide targets (12.5M parameters per source,
        # checked in test_paper_fidelity.py) would make this test write 200 MB checkpoints
        overrides += ["method.tm_out=32", "method.tm_mid=16"]
    cfg = compose_config(overrides, tmp_path / "run")
    assert cfg.trainer.max_epochs == 1   # the experiment sets 200; the command line wins
    return cfg, run(cfg), sources


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_experiment_runs_a_few_steps(name, tmp_path):
    cfg, results, sources = small_run(name, tmp_path)
    assert results["sources"] == sources and results["data"] == cfg.data.name
    assert results["method"] == "sskt"
    settings = results["method_settings"]
    assert settings["source_bn"] == "train" and settings["tm_width"] == "reference" and settings["tm_bias"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_paper_maxl_column_runs_a_few_steps(tmp_path):
    cfg, results, _ = small_run("cifar10_resnet20", tmp_path, "method=paper/maxl", "method.psi=10",
                                "optim=maxl")
    settings = results["method_settings"]
    assert results["method"] == "maxl" and settings["aux_head"] == "mlp" and settings["psi"] == 10
    assert settings["generator_optim"]["momentum"] == 0.0 and settings["lr_inner"] == 0.01
    assert cfg.optim.optimizer.lr == 0.01 and cfg.optim.optimizer.momentum == 0.0
