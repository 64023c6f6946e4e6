"""Short runs still record their training metrics: every loss term's epoch mean
(``train/<term>_epoch``) and every optimizer's learning rate (``lr/<name>``) once per epoch, in
``csv/metrics.csv``, whatever ``trainer.log_every_n_steps`` is."""
import csv

import pytest

from sskt_lightning.compose import compose_config
from sskt_lightning.train import run

STEPS = 3
BASE = ["data=cifar10", "model=resnet20", "trainer=smoke", "data.batch_size=8", "data.val_size=16",
        "data.num_workers=0", f"trainer.limit_train_batches={STEPS}", "trainer.log_every_n_steps=1"]
# a random, 32 px cifar source: no hub, no file
TIMM_SOURCE = ["source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.pretrained=false",
               "source.timm.num_classes=5"]
CASES = {
    "scratch": (["method=scratch"], 2, ["loss"], {"target": [0.1, 0.1 * 0.2 ** 2]}),
    "sskt": (["method=sskt", *TIMM_SOURCE], 1, ["loss", "task_loss", "aux_timm"], {"target": [0.1]}),
    "dml": (["method=dml"], 2, ["loss", "peer1_loss"], {"target": [0.1, 0.004], "peer1": [0.1, 0.004]}),
    "maxl": (["method=maxl", "method.generator.name=resnet20"], 1,
             ["loss", "primary_loss", "aux_loss", "gen_loss"], {"target": [0.1], "generator": [1e-3]}),
}


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.parametrize("method", sorted(CASES))
def test_epoch_means_of_every_loss_term_and_the_lr_of_every_optimizer(method, tmp_path, cifar_dir):
    overrides, epochs, terms, lrs = CASES[method]
    cfg = compose_config([*BASE, f"paths.data_dir={cifar_dir}", f"trainer.max_epochs={epochs}", *overrides],
                         tmp_path)
    run(cfg)
    table = rows(tmp_path / "csv" / "metrics.csv")
    for epoch in range(epochs):
        in_epoch = [r for r in table if r["epoch"] == str(epoch)]
        for term in terms:
            steps = [float(r[f"train/{term}"]) for r in in_epoch if r.get(f"train/{term}")]
            means = [float(r[f"train/{term}_epoch"]) for r in in_epoch if r.get(f"train/{term}_epoch")]
            assert len(steps) == STEPS, (term, epoch)
            assert means == [pytest.approx(sum(steps) / STEPS, rel=1e-5)], (term, epoch)
        for name, per_epoch in lrs.items():
            logged = [float(r[f"lr/{name}"]) for r in in_epoch if r.get(f"lr/{name}")]
            assert logged == [pytest.approx(per_epoch[epoch], rel=1e-6)], (name, epoch)


def test_a_run_shorter_than_the_logging_interval_still_logs_its_losses(tmp_path, cifar_dir):
    """The issue's case: log_every_n_steps=50, a few steps: no step row at all, but the epoch means."""
    cfg = compose_config([*BASE, f"paths.data_dir={cifar_dir}", "method=scratch",
                          "trainer.log_every_n_steps=50"], tmp_path)
    run(cfg)
    table = rows(tmp_path / "csv" / "metrics.csv")
    assert not any(r.get("train/loss") for r in table)
    assert [r["epoch"] for r in table if r.get("train/loss_epoch")] == ["0"]
    assert [float(r["lr/target"]) for r in table if r.get("lr/target")] == [pytest.approx(0.1)]
