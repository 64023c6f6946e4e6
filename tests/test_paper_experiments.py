"""Every paper experiment config composes and runs a few SSKT steps on local files."""
from pathlib import Path

import pytest

import data_fixtures as fx
from sskt_lightning.compose import compose_config
from sskt_lightning.train import CONFIG_DIR, run

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment" / "paper").glob("*.yaml"))
WRITERS = {"cifar10": fx.write_cifar10, "cifar100": fx.write_cifar100, "stl10": fx.write_stl10}
if hasattr(fx, "write_voc2007"):
    WRITERS["voc2007"] = lambda root: fx.write_voc2007(root, n_trainval=24, n_test=8)


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_experiment_runs_a_few_steps(name, tmp_path):
    cfg = compose_config([f"experiment=paper/{name}"], tmp_path)
    assert cfg.trainer.max_epochs == 200 and cfg.optim.optimizer.lr == 0.1
    data = cfg.data.name
    WRITERS[data](tmp_path / "data")
    sources = list(cfg.source)
    overrides = [f"experiment=paper/{name}", f"paths.data_dir={tmp_path / 'data'}", "trainer=smoke", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                 "data.batch_size=4", "data.val_size=8", "data.num_workers=0", "method=sskt",
                 *(f"source.{s}.pretrained=false" for s in sources),
                 # small stand-ins for the ResNet-50 sources keep this a few-second test
                 *(f"source.{s}.name=cifar_resnet20" for s in sources),
                 *(f"source.{s}.input_size=32" for s in sources)]
    if data == "voc2007":
        overrides.append("data.image_size=64")
    cfg = compose_config(overrides, tmp_path / "run")
    assert cfg.trainer.max_epochs == 1   # the experiment sets 200; the command line wins
    results = run(cfg)
    assert results["sources"] == sources and results["data"] == data
