"""Short runs still record their training metrics: every loss term's epoch mean
(``train/<term>_epoch``) and every optimizer's learning rate (``lr/<name>``) once per epoch, in
``csv/metrics.csv``, whatever ``trainer.log_every_n_steps`` is."""
import csv
from pathlib import Path

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
    "kd": (["method=kd", *TIMM_SOURCE, "source.timm.num_classes=10"], 1, ["loss", "task_loss", "kd_loss"],
           {"target": [0.1]}),
    "fixmatch": (["method=fixmatch", "data.unlabeled=true", "data.labels_per_class=4"], 1,
                 ["loss", "task_loss", "unsup_loss", "mask_rate", "threshold", "pseudo_label_acc"], {"target": [0.1]}),
    "dml": (["method=dml"], 2, ["loss", "peer1_loss"], {"target": [0.1, 0.004], "peer1": [0.1, 0.004]}),
    "maxl": (["method=maxl", "method.generator.name=resnet20"], 1,
             ["loss", "primary_loss", "aux_loss", "gen_loss"], {"target": [0.1], "generator": [1e-3]}),
}


CONF_METHODS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "method").glob("*.yaml"))


def test_every_method_of_conf_has_a_case():
    # CASES is checked against conf/method/*.yaml, so a method added there without a case here fails
    assert sorted(CASES) == CONF_METHODS


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
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
            # float32 running mean of 3 float32 steps vs the float64 mean of their CSV text: a few ulp
            # (~3e-7) apart at most; rel 1e-5 is ~80 float32 ulp, any machine honours it
            assert means == [pytest.approx(sum(steps) / STEPS, rel=1e-5)], (term, epoch)
        for name, per_epoch in lrs.items():
            logged = [float(r[f"lr/{name}"]) for r in in_epoch if r.get(f"lr/{name}")]
            # one float32 rounding of a schedule value (<= 6e-8 relative), no kernel involved: rel 1e-6 holds anywhere
            assert logged == [pytest.approx(per_epoch[epoch], rel=1e-6)], (name, epoch)


@pytest.mark.slow
def test_a_run_shorter_than_the_logging_interval_still_logs_its_losses(tmp_path, cifar_dir):
    """The issue's case: log_every_n_steps=50, a few steps: no step row at all, but the epoch means."""
    cfg = compose_config([*BASE, f"paths.data_dir={cifar_dir}", "method=scratch",
                          "trainer.log_every_n_steps=50"], tmp_path)
    run(cfg)
    table = rows(tmp_path / "csv" / "metrics.csv")
    assert not any(r.get("train/loss") for r in table)
    assert [r["epoch"] for r in table if r.get("train/loss_epoch")] == ["0"]
    assert [float(r["lr/target"]) for r in table if r.get("lr/target")] == [pytest.approx(0.1)]


def test_parameter_groups_with_different_rates_are_logged_apart(monkeypatch):
    """lr/<name> when an optimizer's groups share a rate, lr/<name>/pg<k> when they differ; the
    value is the mean over the epoch's steps (a per-step schedule changes it within an epoch)."""
    from types import SimpleNamespace

    import torch

    from sskt_lightning.module import TransferModule
    from sskt_lightning.options import build_config
    info = {"num_classes": 3, "in_chans": 1, "image_size": [8, 8], "mean": [0.5], "std": [0.5]}
    module = TransferModule(build_config(method="dml"), info)
    w = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    target = torch.optim.SGD([{"params": [w[0]], "lr": 0.1}, {"params": [w[1]], "lr": 0.01}])
    peer = torch.optim.SGD([{"params": [w[2]], "lr": 0.2}])
    module._trainer = SimpleNamespace(optimizers=[target, peer])
    logged = {}
    monkeypatch.setattr(module, "log", lambda key, value, **kw: logged.__setitem__(key, value))
    module.on_train_epoch_start()
    for lr in (0.1, 0.3):          # two steps; the first group's rate changes between them
        target.param_groups[0]["lr"] = lr
        module.on_train_batch_start(None, 0)
    module._log_learning_rates()
    assert logged == {"lr/target/pg0": pytest.approx(0.2), "lr/target/pg1": pytest.approx(0.01),
                      "lr/peer1": pytest.approx(0.2)}
