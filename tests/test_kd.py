"""KD (method=kd): the loss against a hand-computed number, teachers with another label space refused
before training, the teacher frozen, and an end-to-end run with a checkpoint of this project."""
import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sskt_lightning.compose import compose_config
from sskt_lightning.data.formats import CIFAR10_CLASSES
from sskt_lightning.errors import ConfigError
from sskt_lightning.losses import task_loss
from sskt_lightning.methods.kd import KD
from sskt_lightning.module import TransferModule
from sskt_lightning.nets.factory import NetOutput
from sskt_lightning.train import data_info_of, run

from small_trainer import small_trainer

SMOKE = ["trainer=smoke", "data.batch_size=8", "data.val_size=16", "data.num_workers=0"]
# A random-weight 10-class teacher that needs no download.
TIMM_TEACHER = ["source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.pretrained=false",
                "source.timm.num_classes=10"]
CIFAR10_INFO = {"name": "cifar10", "num_classes": 10, "in_chans": 3, "image_size": [32, 32],
                "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "multi_label": False,
                "class_names": list(CIFAR10_CLASSES)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_fixtures import write_cifar10
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, n_train=80, n_test=24)
    return root


def train(out, data_dir, *overrides):
    cfg = compose_config(["data=cifar10", f"paths.data_dir={data_dir}", "model=resnet20", *SMOKE,
                          *overrides], out)
    return run(cfg), out


@pytest.fixture(scope="module")
def scratch_ckpt(tmp_path_factory, data_dir):
    results, out = train(tmp_path_factory.mktemp("scratch"), data_dir, "method=scratch")
    return out / results["checkpoints"]["last"]


def module_for(tmp_path, *overrides, data_info=CIFAR10_INFO):
    cfg = compose_config(["data=cifar10", "model=resnet20", "method=kd", *overrides], tmp_path)
    return TransferModule(OmegaConf.to_container(cfg, resolve=True), data_info)


# ---------------------------------------------------------------------------- the loss
# By hand for B=2, C=3, alpha=0.9, T=4 (math module, softmax written out; full float64 digits):
#   CE  = mean(-log softmax([2,0,-1])[0], -log softmax([0,1,0])[2])
#   KL  = mean_b sum_k q_k log(q_k / p_k), q = softmax(t/4), p = softmax(z/4)
#   L   = 0.1 * CE + 0.9 * 16 * KL
HAND_CE, HAND_KL, HAND_LOSS = 0.8606453667441684, 0.06128666776298807, 0.968592552461445
# The logits are float64 and compared at rel 1e-12 (float64 eps 2.2e-16): a float32 run compared at
# rel 1e-6 tested the CPU's exp/log kernels (it failed on an Intel Xeon, 1.1e-6 off), not the formula.
F64, REL = torch.float64, 1e-12
Z = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]
TEACHER = [[1.0, 0.5, 0.0], [0.0, 0.0, 3.0]]


def test_training_step_loss_matches_hand_computation():
    z = torch.tensor(Z, dtype=F64, requires_grad=True)
    t = torch.tensor(TEACHER, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 2])
    logged = {}
    fake = SimpleNamespace(target=lambda x: NetOutput(z), sources=lambda x, idx, view, stream="labeled": [t], multi_label=False,
                           task_loss=lambda logits, labels: task_loss(logits, labels),
                           log_train=lambda parts, logits, labels: logged.update(parts))
    method = KD(alpha=0.9, temperature=4.0)
    loss = method.training_step(fake, (torch.zeros(2, 3, 4, 4), y, torch.arange(2), torch.zeros(2, dtype=torch.long)))
    assert loss.item() == pytest.approx(HAND_LOSS, rel=REL)
    assert logged["loss"].item() == pytest.approx(HAND_LOSS, rel=REL)
    assert logged["task_loss"].item() == pytest.approx(HAND_CE, rel=REL)
    assert logged["kd_loss"].item() == pytest.approx(16 * HAND_KL, rel=REL)
    loss.backward()
    assert z.grad is not None and t.grad is None        # teacher logits detached
    assert method.describe() == {"alpha": 0.9, "temperature": 4.0, "loss": "kd", "unlabeled": False}


def test_multi_label_targets_use_bce_as_the_task_term():
    z = torch.tensor(Z, dtype=F64)
    t = torch.tensor(TEACHER, dtype=F64)
    y = torch.tensor([[1, 0, 1], [0, 0, 1]])
    fake = SimpleNamespace(multi_label=True, task_loss=lambda logits, labels: task_loss(logits, labels, True))
    loss, parts = KD(alpha=0.9, temperature=4.0).loss(fake, z, t, y)
    # BCE by hand: mean over the 6 entries of -(y log sigmoid(z) + (1 - y) log(1 - sigmoid(z)))
    sig = [[1 / (1 + math.exp(-v)) for v in row] for row in Z]
    bce = -sum(math.log(s) if lab else math.log(1 - s)
               for srow, lrow in zip(sig, y.tolist()) for s, lab in zip(srow, lrow)) / 6
    assert parts["task_loss"].item() == pytest.approx(bce, rel=REL)
    assert loss.item() == pytest.approx(0.1 * bce + 0.9 * 16 * HAND_KL, rel=REL)


def test_config_defaults(tmp_path):
    cfg = compose_config(["method=kd"], tmp_path)
    assert cfg.method.alpha == 0.9 and cfg.method.temperature == 4.0 and cfg.method.name == "kd"


# ---------------------------------------------------------------------------- refusals
def test_teacher_with_another_class_count_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="method=sskt") as err:
        module_for(tmp_path, *TIMM_TEACHER, "source.timm.num_classes=100")
    assert "100 classes" in str(err.value) and "has 10" in str(err.value)


@pytest.mark.parametrize("sources,found", [(["source=[]"], "got none"),
                                           ([*TIMM_TEACHER, "source=[timm,imagenet_resnet18]",
                                             "source.imagenet_resnet18.pretrained=false"], "got 2")])
def test_zero_or_several_teachers_are_refused(tmp_path, sources, found):
    with pytest.raises(ConfigError, match="exactly one teacher") as err:
        module_for(tmp_path, *sources)
    assert found in str(err.value) and "source=[checkpoint]" in str(err.value)


@pytest.mark.slow
def test_checkpoint_teacher_with_other_class_names_is_refused(tmp_path, data_dir):
    # the teacher learned CIFAR-10 with classes 0 and 1 swapped: 10 classes, other names per logit
    swap = "data.label_map=[1,0,2,3,4,5,6,7,8,9]"
    results, out = train(tmp_path / "teacher", data_dir, "method=scratch", swap)
    ckpt = out / results["checkpoints"]["last"]
    cfg = compose_config(["data=cifar10", f"paths.data_dir={data_dir}", *SMOKE], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="method=sskt") as err:
        module_for(tmp_path, "source=[checkpoint]", f"source.checkpoint.weights={ckpt}",
                   data_info=data_info_of(dm))
    msg = str(err.value)
    assert "'automobile'" in msg and "'airplane'" in msg and "another order" in msg
    # the same checkpoint is a valid teacher for the task it was trained on
    dm_swapped = instantiate(compose_config(["data=cifar10", f"paths.data_dir={data_dir}", *SMOKE, swap],
                                            tmp_path).data)
    dm_swapped.setup("fit")
    module = module_for(tmp_path, "source=[checkpoint]", f"source.checkpoint.weights={ckpt}",
                        data_info=data_info_of(dm_swapped))
    assert module.sources.sources["checkpoint"].class_names == dm_swapped.class_names


# ---------------------------------------------------------------------------- the teacher stays frozen
def test_teacher_unchanged_and_in_eval_mode_while_the_target_learns(tmp_path, data_dir):
    cfg = compose_config(["data=cifar10", f"paths.data_dir={data_dir}", *SMOKE, "method=kd", *TIMM_TEACHER],
                         tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = TransferModule(OmegaConf.to_container(cfg, resolve=True), data_info_of(dm))
    teacher = module.sources.sources["timm"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    target_before = {k: v.clone() for k, v in module.target.state_dict().items()}
    modes = []
    teacher.net.register_forward_hook(lambda m, i, o: modes.append((m.training, o.requires_grad)))
    trainer = small_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert len(modes) == 3 and all(m == (False, False) for m in modes)   # eval mode, no graph
    after = teacher.state_dict()
    assert any("running_mean" in k for k in after)
    for k in before:
        assert torch.equal(before[k], after[k]), f"teacher tensor {k} changed"
    assert all(not p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert any(not torch.equal(target_before[k], v) for k, v in module.target.state_dict().items())


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_kd_from_a_checkpoint_of_this_project_end_to_end(tmp_path, data_dir, scratch_ckpt):
    results, out = train(tmp_path, data_dir, "method=kd", "source=[checkpoint]",
                         f"source.checkpoint.weights={scratch_ckpt}")
    assert json.loads((out / "results.json").read_text()) == results
    assert results["method"] == "kd" and results["sources"] == ["checkpoint"]
    assert results["method_settings"] == {"alpha": 0.9, "temperature": 4.0, "loss": "kd", "unlabeled": False}
    assert 0.0 <= results["test_acc"] <= 1.0
    with open(out / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("train/loss", "train/task_loss", "train/kd_loss"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values and all(v >= 0 for v in values), key
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("sources.") for k in ckpt)   # the teacher is not saved


# ---------------------------------------------------------------------------- the unlabeled stream
ZU, TU = [[0.5, -1.0, 2.0]], [[2.0, 1.0, -1.0]]   # one unlabeled image: student and teacher logits


def _kl_row(z, t, T):
    p = [math.exp(v / T) / sum(math.exp(u / T) for u in z) for v in z]
    q = [math.exp(v / T) / sum(math.exp(u / T) for u in t) for v in t]
    return sum(q[k] * (math.log(q[k]) - math.log(p[k])) for k in range(len(q)))


def _fake_module(z, t, seen, logged):
    def target(x):
        seen["x"] = x
        return NetOutput(z[:len(x)])

    def sources(x, idx, view, stream="labeled"):
        seen.update(stream=stream, idx=idx.tolist(), view=view.tolist())
        return [t[:len(x)]]
    return SimpleNamespace(target=target, sources=sources, multi_label=False,
                           task_loss=lambda logits, labels: task_loss(logits, labels),
                           log_train=lambda parts, logits, labels: logged.update(parts, logits=logits))


def test_unlabeled_kd_term_on_both_streams_task_term_on_the_labeled():
    """L = (1 - alpha) CE(labeled) + alpha T^2 KL averaged over the 2 labeled + 1 unlabeled images
    (each image weighted alike); the teacher labels the concatenated batch with its stream segments."""
    z = torch.tensor(Z + ZU, dtype=F64, requires_grad=True)
    t = torch.tensor(TEACHER + TU, dtype=F64)
    seen, logged = {}, {}
    batch = {"labeled": (torch.zeros(2, 3, 4, 4), torch.tensor([0, 2]), torch.tensor([5, 6]), torch.tensor([0, 1])),
             "unlabeled": (torch.ones(1, 3, 4, 4), torch.tensor([9]), torch.tensor([3]))}
    loss = KD(alpha=0.9, temperature=4.0, unlabeled=True).training_step(_fake_module(z, t, seen, logged), batch)
    kl = (2 * HAND_KL + _kl_row(ZU[0], TU[0], 4.0)) / 3      # HAND_KL: the mean of the 2 labeled rows
    assert loss.item() == pytest.approx(0.1 * HAND_CE + 0.9 * 16 * kl, rel=REL)
    assert logged["task_loss"].item() == pytest.approx(HAND_CE, rel=REL)
    assert logged["kd_loss"].item() == pytest.approx(16 * kl, rel=REL)
    assert logged["logits"].shape[0] == 2                     # accuracy on the labeled images only
    assert seen["stream"] == [("labeled", 2), ("unlabeled", 1)]
    assert seen["idx"] == [5, 6, 9] and seen["view"] == [0, 1, 3] and seen["x"].shape[0] == 3
    assert torch.equal(seen["x"][2], torch.ones(3, 4, 4))
    # without method.unlabeled the stream is not used: the labeled images only
    seen.clear()
    KD(alpha=0.9, temperature=4.0).training_step(_fake_module(z, t, seen, logged), batch)
    assert seen["stream"] == "labeled" and seen["x"].shape[0] == 2
    assert logged["loss"].item() == pytest.approx(HAND_LOSS, rel=REL)


def test_unlabeled_without_the_stream_is_refused():
    z, t = torch.tensor(Z, dtype=F64), torch.tensor(TEACHER, dtype=F64)
    batch = (torch.zeros(2, 3, 4, 4), torch.tensor([0, 2]), torch.arange(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"method.unlabeled=true needs data.unlabeled=true"):
        KD(unlabeled=True).training_step(_fake_module(z, t, {}, {}), batch)


@pytest.mark.slow
def test_kd_with_the_unlabeled_stream_and_lskd_through_the_cache_end_to_end(tmp_path, data_dir):
    """A tiny CLI run: KD with LS-KD on both streams, the teacher's logits from the soft-label cache
    (fp16: every logit, which LS-KD needs); a second run reads them all back."""
    args = ["method=kd", *TIMM_TEACHER, "method.unlabeled=true", "data.unlabeled=true", "data.labels_per_class=4",
            "method.loss=lskd", "method.cache=read_write", f"paths.cache_dir={tmp_path / 'cache'}"]
    results, out = train(tmp_path / "a", data_dir, *args)
    settings = results["method_settings"]
    assert results["status"] == "ok" and results["num_unlabeled"] > 0
    assert settings["unlabeled"] is True and settings["loss"] == "lskd"
    # the pool's streams share one image array, so one store: 8 labeled + 8 unlabeled lookups per step
    (store,) = settings["cache_stats"]["timm"]
    assert store["written"] == store["misses"] > 0 and store["misses"] % 16 == 0
    again, _ = train(tmp_path / "b", data_dir, *args)
    assert all(s["hit_rate"] == 1.0 for s in again["method_settings"]["cache_stats"]["timm"])
    with open(out / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/kd_loss_epoch") for r in rows)
    # a top-k store cannot serve LS-KD: refused before the first step
    with pytest.raises(ConfigError, match="z-scores the sources' raw logits"):
        train(tmp_path / "c", data_dir, *args, "method.cache_topk=3", f"paths.cache_dir={tmp_path / 'cache3'}")
