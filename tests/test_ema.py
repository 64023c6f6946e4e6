"""model.ema=<decay>: the evaluated network is the exponential moving average of the target's weights
(sskt_lightning.averaging), for every method. Checked here: the average after k optimizer steps
equals the hand-computed average of the weight trajectory (float64; BatchNorm statistics averaged,
the step count copied; with and without the warm-up); validation, test, last.ckpt and sskt-eval use
the average while the raw weights stay in the checkpoint; a run killed mid-epoch and resumed ends
bit-identical (raw weights, average, its step count); two DDP processes hold the same average; a
method with manual optimization (DML: two optimizers, one holds the target) averages once per batch;
bad decays are refused before any data is read. model.ema_bn=recompute: the statistics against hand
computation, what the checkpoint holds and sskt-eval reads, the images it uses, resume and DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from sskt_lightning.averaging import TargetAverage, check_ema_options, decay_at, describe
from sskt_lightning.compose import compose_config
from sskt_lightning.errors import ConfigError
from sskt_lightning.eval import build_target, evaluate, read_checkpoint

from test_resume import COMMON, COMPARED, _killed_run, _restore_deterministic_flag, _run  # noqa: F401

TESTS = Path(__file__).parent


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize("bad", [0, 1, 1.0, 0.0, -0.5, 1.5, float("nan"), True, "0.9"])
def test_a_decay_outside_0_1_is_refused_before_any_data_is_read(bad, tmp_path):
    from sskt_lightning.validate import validate_config
    cfg = compose_config(["data=cifar10", "method=scratch", f"paths.data_dir={tmp_path / 'absent'}"], tmp_path)
    cfg.model.ema = bad
    with pytest.raises(ConfigError, match=r"model.ema=.*strictly between 0 and 1.*or null"):
        validate_config(cfg)


def test_ema_warmup_must_be_a_boolean_and_null_is_off():
    with pytest.raises(ConfigError, match=r"model.ema_warmup='yes': must be true or false"):
        check_ema_options({"ema": 0.9, "ema_warmup": "yes"})
    assert check_ema_options({"ema": None}) == (None, True)
    assert check_ema_options({"ema": 0.99, "ema_warmup": False}) == (0.99, False)


@pytest.mark.parametrize("option, value, message", [
    ("ema_bn", "update", r"model.ema_bn='update': choose average .* or recompute"),
    ("ema_bn_images", 0, r"model.ema_bn_images=0: must be a positive number of images"),
    ("ema_bn_images", 1.5, r"model.ema_bn_images=1.5: must be a positive number"),
    ("ema_bn_images", True, r"model.ema_bn_images=True: must be a positive number"),
])
def test_bad_ema_bn_options_are_refused_before_any_data_is_read(option, value, message, tmp_path):
    from sskt_lightning.validate import validate_config
    cfg = compose_config(["data=cifar10", "method=scratch", "model.ema=0.9",
                          f"paths.data_dir={tmp_path / 'absent'}"], tmp_path)
    cfg.model[option] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_recomputed_statistics_without_an_average_are_refused(tmp_path):
    from sskt_lightning.validate import validate_config
    cfg = compose_config(["data=cifar10", "method=scratch", "model.ema_bn=recompute",
                          f"paths.data_dir={tmp_path / 'absent'}"], tmp_path)
    with pytest.raises(ConfigError, match=r"model.ema_bn=recompute .* there is no average: set model.ema=<decay>"):
        validate_config(cfg)


def test_recomputed_statistics_are_the_hand_computed_mean_and_variance():
    """update_bn through TargetAverage: every BatchNorm's running mean / variance become the mean over
    the batches of each batch's mean / unbiased variance of its input (float64, by hand); the
    parameters and the target are untouched; the averaged statistics before it are gone."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2)).double()
    avg = TargetAverage(net, 0.9, bn="recompute", bn_images=8)
    for _ in range(3):                          # some averaged statistics first
        with torch.no_grad():
            net.train()(torch.randn(5, 3, 6, 6, dtype=torch.float64) * 3 + 1)
        avg.update(net)
    target_before = {k: v.clone() for k, v in net.state_dict().items()}
    params_before = [p.clone() for p in avg.averaged.module.parameters()]
    mode_before = avg.averaged.module.training
    batches = [torch.randn(4, 3, 6, 6, dtype=torch.float64) * 2 - 1 for _ in range(2)]
    avg.recompute_statistics(iter(batches))
    m = avg.averaged.module
    # by hand: layer by layer in train mode, each batch normalised by its own statistics
    conv1, bn1, conv2, bn2 = m[0], m[1], m[3], m[4]
    with torch.no_grad():
        h1 = [conv1(x) for x in batches]
        mean1 = torch.stack([h.mean((0, 2, 3)) for h in h1]).mean(0)
        var1 = torch.stack([h.var((0, 2, 3), unbiased=True) for h in h1]).mean(0)
        z = [torch.relu((h - h.mean((0, 2, 3), keepdim=True)) / (h.var((0, 2, 3), unbiased=False, keepdim=True)
                                                                 + bn1.eps).sqrt() * bn1.weight[:, None, None]
                        + bn1.bias[:, None, None]) for h in h1]
        h2 = [conv2(x) for x in z]
        mean2 = torch.stack([h.mean((0, 2, 3)) for h in h2]).mean(0)
        var2 = torch.stack([h.var((0, 2, 3), unbiased=True) for h in h2]).mean(0)
    torch.testing.assert_close(bn1.running_mean, mean1)
    torch.testing.assert_close(bn1.running_var, var1)
    torch.testing.assert_close(bn2.running_mean, mean2)
    torch.testing.assert_close(bn2.running_var, var2)
    assert bn1.momentum == 0.1 and m.training == mode_before    # update_bn restores both
    assert all(torch.equal(a, b) for a, b in zip(params_before, m.parameters()))
    assert all(torch.equal(v, target_before[k]) for k, v in net.state_dict().items())


def test_recomputed_statistics_do_not_depend_on_the_process_count(tmp_path, cifar_dir):
    """Every process recomputes the statistics over all the images, in batches of the configured
    (global) evaluation size: a data module split across 2 processes gives bit-identical statistics
    to an unsplit one (before the fix, the per-process batch size halved the batches, which changes
    update_bn's mean of per-batch statistics)."""
    from types import SimpleNamespace
    from sskt_lightning.train import build_data, build_module, data_info_of
    cfg = compose_config(["data=cifar10", f"paths.data_dir={cifar_dir}", "method=scratch", "data.batch_size=8",
                          "data.val_size=16", "model.ema=0.9", "model.ema_bn=recompute", "model.ema_bn_images=24"],
                         tmp_path)
    stats = []
    for processes in (1, 2):
        dm = build_data(cfg)
        dm.setup("fit")
        dm.split_batch_across(processes)
        assert dm.eval_batch_size == 16 // processes and dm.global_eval_batch_size == 16
        torch.manual_seed(0)
        module = build_module(cfg, data_info_of(dm))
        module._trainer = SimpleNamespace(datamodule=dm)
        module.ema.update(module.target)
        module._recompute_average_statistics()
        stats.append({k: v.clone() for k, v in module.ema.averaged.module.state_dict().items() if "running_" in k})
    assert stats[0] and stats[0].keys() == stats[1].keys()
    assert all(torch.equal(v, stats[1][k]) for k, v in stats[0].items()), "the statistics depend on the process count"


def test_statistics_images_are_fixed_by_the_seed_and_draw_nothing_from_training(tmp_path, cifar_dir):
    """The unlabeled stream's images when there is one, else the labelled ones; the same order for
    the same data.seed (another for another seed); the training streams' generators untouched."""
    from sskt_lightning.train import build_data
    common = ["data=cifar10", f"paths.data_dir={cifar_dir}", "method=scratch", "data.labels_per_class=2",
              "data.val_size=16"]

    def dm(*extra):
        module = build_data(compose_config([*common, *extra], tmp_path))
        module.setup("fit")
        return module

    labelled = dm()
    before = [g.get_state() for g in labelled._generators]
    images = labelled.statistics_images(1000)
    assert all(torch.equal(a, g.get_state()) for a, g in zip(before, labelled._generators))
    assert images.dtype == torch.uint8 and len(images) == len(labelled.train_indices) == 20   # all 20 labelled
    train = labelled.train_arrays.images[labelled.train_indices]
    assert sorted(map(bytes, images.flatten(1).numpy())) == sorted(map(bytes, train.flatten(1).numpy()))
    pool = dm("data.unlabeled=true")
    a, b = pool.statistics_images(7), dm("data.unlabeled=true").statistics_images(7)
    assert len(a) == 7 and torch.equal(a, b)
    unlabeled = pool._unlabeled_images[pool.unlabeled_indices]
    assert all(any(torch.equal(x, u) for u in unlabeled) for x in a)
    assert not torch.equal(a, dm("data.unlabeled=true", "seed=1").statistics_images(7))


def test_warmup_decay_values():
    """TF's ExponentialMovingAverage(num_updates) rule: min(decay, (1 + n) / (10 + n))."""
    assert decay_at(0.999, True, 1) == pytest.approx(2 / 11, abs=0)
    assert decay_at(0.999, True, 90) == pytest.approx(91 / 100, abs=0)
    assert decay_at(0.999, True, 8990) == 0.999       # (1 + 8990) / (10 + 8990) = 0.999: warm-up over
    assert decay_at(0.999, True, 10 ** 6) == 0.999
    assert decay_at(0.5, True, 100) == 0.5
    assert decay_at(0.999, False, 1) == 0.999
    assert describe(0.999, True) == "ema(0.999, warmup)" and describe(0.99, False) == "ema(0.99)"
    assert describe(None) == "raw"


# ---------------------------------------------------------------------------- the average itself
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.bn(self.fc(x)))


@pytest.mark.parametrize("warmup", [True, False])
def test_the_average_is_the_hand_computed_ema_of_the_trajectory(warmup):
    """float64: after k steps the average is w_1 (first step copied), then
    e = d_n e + (1 - d_n) w_{n+1}; parameters AND BatchNorm running statistics (use_buffers=True);
    num_batches_tracked is copied, not averaged. Updates come from the target's optimizer steps only:
    another optimizer's steps (a DML peer's) do not count."""
    torch.manual_seed(0)
    net, other = Tiny().double(), torch.nn.Linear(2, 2).double()
    ema = TargetAverage(net, 0.8, warmup)
    opt, other_opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9), torch.optim.SGD(other.parameters(), lr=0.1)
    ema.attach(net, [opt, other_opt])
    trajectory = []
    for _ in range(6):
        x = torch.randn(8, 3, dtype=torch.float64)
        for o, loss in ((opt, net(x).square().mean()), (other_opt, other(torch.randn(4, 2, dtype=torch.float64)).sum())):
            o.zero_grad()
            loss.backward()
            o.step()
        trajectory.append({k: v.clone() for k, v in net.state_dict().items()})
    assert ema.updates == 6 and int(ema.averaged.n_averaged) == 6
    expected = dict(trajectory[0])
    for n, weights in enumerate(trajectory[1:], start=1):
        d = min(0.8, (1 + n) / (10 + n)) if warmup else 0.8
        expected = {k: (d * expected[k] + (1 - d) * w if w.is_floating_point() else w) for k, w in weights.items()}
    got = ema.averaged.module.state_dict()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-14, msg=key)
    assert int(got["bn.num_batches_tracked"]) == 6
    # the running statistics were averaged, not taken from the last step
    assert not torch.allclose(got["bn.running_mean"], trajectory[-1]["bn.running_mean"])
    # swap in and out: the raw weights come back bit for bit
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    assert ema.swap_in(net) and ema.evaluating
    torch.testing.assert_close(net.state_dict()["fc.weight"], expected["fc.weight"], rtol=1e-12, atol=1e-14)
    ema.swap_out(net)
    assert all(torch.equal(net.state_dict()[k], raw[k]) for k in raw)
    ema.detach()
    opt.step()
    assert ema.updates == 6                      # detached: no more updates


def test_several_optimizers_holding_the_target_are_refused():
    net = Tiny()
    ema = TargetAverage(net, 0.9)
    a = torch.optim.SGD(net.fc.parameters(), lr=0.1)
    b = torch.optim.SGD([*net.bn.parameters(), *net.out.parameters()], lr=0.1)
    with pytest.raises(ConfigError, match="2 optimizers hold the target's weights"):
        ema.attach(net, [a, b])


# ---------------------------------------------------------------------------- a run
# the default progress bar stays on (what users get: it reads the metrics the average is validated with)
SMALL = ["data=cifar10", "model=resnet20", "trainer=cpu", "trainer.max_epochs=2",
         "data.batch_size=8", "data.val_size=16", "data.num_workers=0"]


class RecordRaw(L.Callback):
    """The raw target after every optimizer step (float64 copies) and the logged validation values."""

    def __init__(self):
        self.trajectory, self.val = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.trajectory.append({k: v.detach().double() if v.is_floating_point() else v.detach().clone()
                                for k, v in module.target.state_dict().items()})

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.val.append((float(trainer.callback_metrics["val/acc"]), float(trainer.callback_metrics["val/loss"])))


@pytest.mark.slow
def test_validation_test_checkpoint_and_eval_use_the_average(tmp_path, cifar_dir, monkeypatch):
    """scratch, channels_last: the checkpoint's state_dict is the average of the raw trajectory
    (float32 run, compared in float64 to rounding), its raw weights under ckpt['ema']; the run's
    validation and test numbers are the average's (sskt-eval of last.ckpt gives them back), not the
    raw weights'."""
    import sskt_lightning.train as train_mod
    recorder = RecordRaw()
    real = train_mod.build_callbacks
    monkeypatch.setattr(train_mod, "build_callbacks",
                        lambda cfg, d: (lambda cbs, w: ([*cbs[:-2], recorder, *cbs[-2:]], w))(*real(cfg, d)))
    res = train_mod.run(compose_config([*SMALL, f"paths.data_dir={cifar_dir}", "method=scratch", "model.ema=0.7",
                                        "channels_last=true"], tmp_path / "run"))
    assert res["weights"] == "ema(0.7, warmup)"
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    steps = len(recorder.trajectory)
    assert steps == ckpt["global_step"] == 16 and ckpt["ema"]["updates"] == steps
    assert ckpt["ema"]["decay"] == 0.7 and ckpt["ema"]["warmup"] is True
    raw = ckpt["ema"]["raw_state_dict"]
    target_keys = {k for k in ckpt["state_dict"] if k.startswith("target.")}
    assert set(raw) == target_keys
    last = recorder.trajectory[-1]
    for key in target_keys:
        assert torch.equal(raw[key].to(last[key[7:]].dtype), last[key[7:]]), key     # raw: the last step's weights
    expected = dict(recorder.trajectory[0])
    for n, weights in enumerate(recorder.trajectory[1:], start=1):
        d = min(0.7, (1 + n) / (10 + n))
        expected = {k: (d * expected[k] + (1 - d) * w if w.is_floating_point() else w) for k, w in weights.items()}
    for key in target_keys:
        # float32 accumulation of 16 updates vs float64: a few float32 ulps
        torch.testing.assert_close(ckpt["state_dict"][key].to(expected[key[7:]].dtype), expected[key[7:]],
                                   rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(ckpt["state_dict"]["target.net.fc.weight"], raw["target.net.fc.weight"])

    # sskt-eval reads the average: the run's own test and last validation numbers
    tested = evaluate(compose_config([f"ckpt_path={ckpt_path}", "trainer=smoke"], tmp_path / "e1", config_name="eval"))
    assert tested["weights"] == "ema(0.7, warmup)"
    assert tested["acc"] == pytest.approx(res["test_acc"], abs=1e-6)
    assert tested["loss"] == pytest.approx(res["extra"]["test_loss"], rel=1e-5)
    val = evaluate(compose_config([f"ckpt_path={ckpt_path}", "trainer=smoke", "split=val"], tmp_path / "e2",
                                  config_name="eval"))
    assert val["acc"] == pytest.approx(res["last_val_acc"], abs=1e-6)
    assert recorder.val[-1][0] == pytest.approx(res["last_val_acc"], abs=1e-6)
    assert val["loss"] == pytest.approx(recorder.val[-1][1], rel=1e-5)      # validation ran on the average
    # ... and not the raw weights': the test loss, by hand, of the average and of the raw network
    dm = train_mod.build_data(compose_config([*SMALL, f"paths.data_dir={cifar_dir}", "method=scratch"], tmp_path / "d"))
    dm.setup("test")

    def test_loss(state_dict):
        net = build_target({**read_checkpoint(ckpt_path), "state_dict": state_dict}).eval()
        with torch.no_grad():
            batches = [(net(b[0]), b[1]) for b in map(dm.prepare_batch, dm.test_dataloader())]
        logits, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        acc = (logits.argmax(1) == labels).double().mean().item()
        return torch.nn.functional.cross_entropy(logits, labels).item(), acc

    assert test_loss(ckpt["state_dict"])[0] == pytest.approx(res["extra"]["test_loss"], rel=1e-5)
    raw_loss, raw_acc = test_loss({**ckpt["state_dict"], **raw})
    assert abs(raw_loss - res["extra"]["test_loss"]) > 1e-3
    # the run also tested the raw weights, paired: results.json's extra
    assert res["extra"]["test_raw_loss"] == pytest.approx(raw_loss, rel=1e-5)
    assert res["extra"]["test_raw_acc"] == pytest.approx(raw_acc, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [[], ["trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2"]],
                         ids=["validated every epoch", "last epoch not validated"])
def test_recomputed_statistics_are_what_is_evaluated_and_exported(tmp_path, cifar_dir, schedule):
    """scratch, model.ema=0.7, ema_bn=recompute against ema_bn=average, same seed: training is the
    same (raw weights and averaged parameters bit-identical: the recomputation draws nothing); the
    recompute run's last.ckpt holds BatchNorm statistics equal to update_bn of its averaged weights
    over statistics_images, by hand, not the averaged ones - also when no validation recomputed them
    before the checkpoint was written; sskt-eval of it gives the run's test accuracy back."""
    import sskt_lightning.train as train_mod
    from torch.optim.swa_utils import update_bn
    from sskt_lightning.data.augment import normalize
    runs = {}
    for mode in ("average", "recompute"):
        overrides = [*SMALL, f"paths.data_dir={cifar_dir}", "method=scratch", "model.ema=0.7", f"model.ema_bn={mode}",
                     "model.ema_bn_images=40", *schedule]
        res = train_mod.run(compose_config(overrides, tmp_path / mode))
        assert res["status"] == "ok"
        runs[mode] = (res, torch.load(tmp_path / mode / "checkpoints" / "last.ckpt", weights_only=True))
    (_, avg), (res, rec) = runs["average"], runs["recompute"]
    assert avg["ema"]["raw_state_dict"].keys() == rec["ema"]["raw_state_dict"].keys()
    assert all(torch.equal(v, rec["ema"]["raw_state_dict"][k]) for k, v in avg["ema"]["raw_state_dict"].items())
    bn_keys = [k for k in rec["state_dict"] if k.startswith("target.") and ("running_" in k)]
    params = [k for k in rec["state_dict"] if k.startswith("target.") and "running_" not in k
              and "num_batches" not in k]
    assert bn_keys and all(torch.equal(avg["state_dict"][k], rec["state_dict"][k]) for k in params)
    assert all(not torch.equal(avg["state_dict"][k], rec["state_dict"][k]) for k in bn_keys)
    # by hand: the averaged weights, statistics over the data module's 40 images, in evaluation batches
    dm = train_mod.build_data(compose_config([*SMALL, f"paths.data_dir={cifar_dir}", "method=scratch"], tmp_path / "d"))
    dm.setup("fit")
    net = build_target({**read_checkpoint(tmp_path / "recompute" / "checkpoints" / "last.ckpt"),
                        "state_dict": avg["state_dict"]})
    images = dm.statistics_images(40)
    assert len(images) == 40
    size = dm.eval_batch_size or dm.batch_size
    assert size == 16                            # 16, 16, 8: update_bn weighs every batch alike
    update_bn([normalize(images[i:i + size], dm.mean, dm.std) for i in range(0, 40, size)], net)
    mine = net.state_dict()
    for key in bn_keys:
        torch.testing.assert_close(rec["state_dict"][key], mine[key.removeprefix("target.net.")],
                                   rtol=1e-5, atol=1e-6, msg=key)
    tested = evaluate(compose_config([f"ckpt_path={tmp_path / 'recompute' / 'checkpoints' / 'last.ckpt'}",
                                      "trainer=smoke"], tmp_path / "e", config_name="eval"))
    assert tested["acc"] == pytest.approx(res["test_acc"], abs=1e-6)


@pytest.mark.slow
def test_dml_manual_optimization_averages_once_per_batch(tmp_path, cifar_dir):
    """DML steps two optimizers per batch (global_step 2 per batch); only the target's counts."""
    res = _run(tmp_path, cifar_dir, "method=dml", "model.ema=0.9", "trainer.max_epochs=1")
    assert res["status"] == "ok" and res["weights"] == "ema(0.9, warmup)"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 16 and ckpt["ema"]["updates"] == 8
    peers = [k for k in ckpt["state_dict"] if k.startswith("method.")]
    assert peers and not any(k.startswith("method.") for k in ckpt["ema"]["raw_state_dict"])   # the target only


@pytest.mark.slow
@pytest.mark.parametrize("ema_bn", ["average", "recompute"])
def test_killed_and_resumed_run_with_an_average_equals_the_uninterrupted_one(tmp_path, cifar_dir, ema_bn):
    """DML (manual optimization) with model.ema: SIGKILL mid-epoch 1, resume from epoch 0's last.ckpt:
    the same results, and bit-identical raw weights, average and update count (with the average's
    BatchNorm statistics averaged, or recomputed before each evaluation)."""
    overrides = ["method=dml", "model.ema=0.8", f"model.ema_bn={ema_bn}", "model.ema_bn_images=24"]
    ref = _run(tmp_path / "ref", cifar_dir, *overrides)
    out = tmp_path / "killed"
    _killed_run(out, cifar_dir, overrides)
    early = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert early["ema"]["updates"] == 8                       # epoch 0: 8 batches
    resumed = _run(out, cifar_dir, *overrides, f"resume={out / 'checkpoints' / 'last.ckpt'}")
    assert {k: resumed[k] for k in (*COMPARED, "weights")} == {k: ref[k] for k in (*COMPARED, "weights")}
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 24
    for part in ("state_dict", "raw"):
        x = a["state_dict"] if part == "state_dict" else a["ema"]["raw_state_dict"]
        y = b["state_dict"] if part == "state_dict" else b["ema"]["raw_state_dict"]
        assert x.keys() == y.keys()
        different = [k for k in x if not torch.equal(x[k], y[k])]
        assert not different, f"{part}: {len(different)} of {len(x)} tensors differ, e.g. {different[:3]}"


# ---------------------------------------------------------------------------- DDP
class AverageDigest(L.Callback):
    """After training, each process writes a digest of its average's parameters and buffers."""

    def on_fit_end(self, trainer, module):
        from sskt_lightning.callbacks import WeightsDigest
        avg = module.ema.averaged.module
        out = Path(trainer.default_root_dir) / f"ema_digest_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"updates": module.ema.updates,
                                   "parameters": WeightsDigest._digest(sorted(avg.named_parameters())),
                                   "buffers": WeightsDigest._digest(sorted(avg.named_buffers()))}))


@pytest.mark.slow
@pytest.mark.parametrize("ema_bn", ["average", "recompute"])
def test_two_ddp_processes_hold_the_same_average(tmp_path, cifar_dir, ema_bn):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sskt_lightning.train", "data=cifar10", f"paths.data_dir={cifar_dir}",
           f"hydra.run.dir={out}", "trainer=ddp_cpu", "method=scratch", "model.ema=0.9", "data.batch_size=8",
           "data.val_size=16", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
           "+callbacks.avg._target_=test_ema.AverageDigest", f"model.ema_bn={ema_bn}"]   # the default progress bar on
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "ok" and results["weights"] == "ema(0.9, warmup)"
    digests = [json.loads((out / f"ema_digest_rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["updates"] == digests[1]["updates"] == 3
    assert digests[0]["parameters"] == digests[1]["parameters"], "the ranks' averages diverged"
    assert digests[0]["buffers"] == digests[1]["buffers"], "the ranks' averaged BatchNorm statistics differ"
