"""Training budgets in steps, whatever the number of labels: data.steps_per_epoch, the unlabeled
stream sized by its ratio, data.val_per_class, the warm-up cosine schedule. (Step-based schedules for
every method, and one seed fixing the labelled subset, the validation subset and the target's
initialisation for every method: test_method_contract.py, over conf/method/.)"""
import math

import pytest
import torch
from omegaconf import OmegaConf

import sskt_lightning.train as train_mod
from sskt_lightning.compose import compose_config
from sskt_lightning.data import ImageDataModule
from sskt_lightning.data.datamodule import CyclingSampler
from sskt_lightning.errors import ConfigError
from sskt_lightning.optim import warmup_cosine


def dm_of(root, **kw):
    args = dict(batch_size=8, val_size=10, download=False, labels_per_class=1, seed=3)
    args.update(kw)
    dm = ImageDataModule("cifar10", root, **args)
    dm.setup("fit")
    return dm


def indices(loader):
    return torch.cat([batch[2] if len(batch) == 3 else batch[1] for batch in loader]).tolist()


# ----------------------------------------------------------------------------- steps per epoch


def test_steps_per_epoch_cycles_few_labels_into_full_batches(cifar_dir):
    dm = dm_of(cifar_dir, steps_per_epoch=5)        # 10 labelled images (1 per class), batch 8
    labeled = dm.train_dataloader()
    assert dm.num_train == 10 and len(labeled) == 5
    seen = indices(labeled)
    assert len(seen) == 5 * 8
    # successive passes: every labelled image once per pass of 10, then reshuffled
    for k in range(4):
        assert sorted(seen[10 * k: 10 * k + 10]) == sorted(dm.train_indices.tolist())
    assert seen[:10] != seen[10:20]
    # null: one pass over the labelled images (10 // 8 = 1 full batch), as before
    assert len(dm_of(cifar_dir).train_dataloader()) == 1


def test_the_budget_does_not_depend_on_the_number_of_labels(cifar_dir):
    few, many = dm_of(cifar_dir, steps_per_epoch=6), dm_of(cifar_dir, steps_per_epoch=6, labels_per_class=5)
    assert few.num_train == 10 and many.num_train == 50
    assert len(few.train_dataloader()) == len(many.train_dataloader()) == 6


def test_unlabeled_stream_is_sized_by_its_ratio_and_covers_the_pool(cifar_dir):
    dm = dm_of(cifar_dir, steps_per_epoch=7, unlabeled=True, unlabeled_ratio=0.5)
    loaders = dm.train_dataloader()
    assert dm.num_unlabeled == 60 and dm.unlabeled_batch_size == 4          # round(8 * 0.5)
    assert len(loaders["labeled"]) == len(loaders["unlabeled"]) == 7
    seen = indices(loaders["unlabeled"])
    assert len(seen) == 7 * 4 and len(set(seen)) == 28                        # no repeat within a pass
    # 3 epochs draw 84 > 60: the first 60 are the whole pool once, then a new shuffled pass
    stream = seen + indices(loaders["unlabeled"]) + indices(loaders["unlabeled"])
    assert sorted(stream[:60]) == sorted(dm.unlabeled_indices.tolist())
    # independent of the labelled loader's natural length (one pass = 1 batch here)
    assert len(dm_of(cifar_dir, unlabeled=True, unlabeled_ratio=0.5).train_dataloader()["unlabeled"]) == 1


def test_the_streams_are_a_function_of_seed_and_epoch(cifar_dir):
    """What a resume needs: epoch e's order again, from a fresh data module told the epoch."""
    a, b = dm_of(cifar_dir, steps_per_epoch=3, unlabeled=True), dm_of(cifar_dir, steps_per_epoch=3, unlabeled=True)
    la = a.train_dataloader()
    epochs = [[indices(loader) for loader in la.values()] for _ in range(3)]
    lb = b.train_dataloader()
    for loader in lb.values():
        loader.sampler.set_epoch(2)               # as Lightning does at every epoch start
    assert [indices(loader) for loader in lb.values()] == epochs[2]
    assert epochs[0] != epochs[1]
    other = dm_of(cifar_dir, steps_per_epoch=3, unlabeled=True, seed=4).train_dataloader()
    assert indices(other["unlabeled"]) != epochs[0][1]


def test_cycling_sampler_and_bad_budgets(cifar_dir):
    sampler = CyclingSampler(3, 7, seed=0)
    order = list(sampler) + list(sampler)          # two epochs: one stream of passes of 3
    assert len(order) == 14 and all(sorted(order[k:k + 3]) == [0, 1, 2] for k in range(0, 12, 3))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="data.steps_per_epoch"):
            ImageDataModule("cifar10", cifar_dir, steps_per_epoch=bad)


# ----------------------------------------------------------------------------- validation split


def test_val_per_class_is_balanced_disjoint_and_seeded(cifar_dir):
    dm = dm_of(cifar_dir, val_per_class=2, unlabeled=True)      # 80 images, 8 per class
    val, train, unl = dm.val_indices.tolist(), dm.train_indices.tolist(), dm.unlabeled_indices.tolist()
    labels = dm.task.train_labels
    assert dm.num_val == 20 and torch.bincount(labels[dm.val_indices], minlength=10).tolist() == [2] * 10
    assert dm.num_train == 10 and dm.num_unlabeled == 50
    assert not set(val) & set(train) and not set(val) & set(unl) and not set(train) & set(unl)
    assert sorted(val + train + unl) == list(range(80))
    # the seed fixes the validation subset (and another seed draws another one)
    assert dm_of(cifar_dir, val_per_class=2).val_indices.tolist() == val
    assert dm_of(cifar_dir, val_per_class=2, seed=4).val_indices.tolist() != val
    with pytest.raises(ConfigError, match="data.val_per_class=9"):
        dm_of(cifar_dir, val_per_class=9)


@pytest.mark.slow
def test_sizes_are_in_results_json(tmp_path, cifar_dir):
    cfg = compose_config(["data=cifar10", f"paths.data_dir={cifar_dir}", "model=resnet20", "method=scratch",
                          "trainer=smoke", "data.batch_size=8", "data.num_workers=0", "data.labels_per_class=2",
                          "data.val_per_class=3", "data.steps_per_epoch=3"], tmp_path)
    results = train_mod.run(cfg)
    # 20 labelled, 30 validation; the unlabeled stream is off (its pool of 30 unused): 0
    assert (results["num_train"], results["num_val"], results["num_unlabeled"]) == (20, 30, 0)


# ----------------------------------------------------------------------------- schedules


def test_warmup_cosine_by_hand():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = warmup_cosine(opt, total_steps=10, warmup=0.2)      # 2 warm-up steps
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1, 0.2] + [0.2 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert lrs == pytest.approx(expected)
    assert warmup_cosine(opt, total_steps=10, warmup=3).lr_lambdas[0](2) == pytest.approx(1.0)


def test_step_interval_needs_a_trainer():
    from sskt_lightning.optim import build_optimizer
    cfg = OmegaConf.create({"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
                            "interval": "step", "scheduler": {"_target_": "sskt_lightning.optim.warmup_cosine",
                                                              "_partial_": True}})
    with pytest.raises(ConfigError, match="optim.interval=step"):
        build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))], None)
    cfg.interval = "batch"
    with pytest.raises(ConfigError, match="optim.interval='batch'"):
        build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))], None)
