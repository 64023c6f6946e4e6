"""SSKT with unlabeled images: the auxiliary loss sees both streams, the task loss only labels."""
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sskt_lightning.compose import compose_config
from sskt_lightning.module import TransferModule
from sskt_lightning.train import data_info_of, run

from small_trainer import small_trainer

UNLABELED = ["data=cifar10", "data.val_size=16", "data.batch_size=4", "data.num_workers=0",
             "data.labels_per_class=2", "data.unlabeled=true", "data.unlabeled_ratio=2.0",
             "method=sskt", "method.unlabeled=true", "method.aux_head=linear", "source=[timm]",
             "source.timm.name=cifar_resnet20", "source.timm.pretrained=false", "model=resnet20"]


def build(tmp_path, data_dir, *extra):
    cfg = compose_config([*UNLABELED, f"paths.data_dir={data_dir}", *extra], tmp_path)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return cfg, dm, TransferModule(OmegaConf.to_container(cfg, resolve=True), data_info_of(dm))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_unlabeled_images_reach_only_the_aux_loss(tmp_path, cifar_dir):
    cfg, dm, module = build(tmp_path, cifar_dir)
    # poison every label of the unlabeled pool: reading one would crash cross-entropy (class 10_000)
    labels = dm.task.train_labels
    labels[dm.unlabeled_indices] = 10_000
    seen = {"task": [], "source": []}
    task_loss, sources_forward = module.task_loss, module.sources.forward

    def spy_task(logits, y):
        seen["task"].append((logits.shape[0], y.max().item()))
        return task_loss(logits, y)

    def spy_sources(x, index=None, *args):
        seen["source"].append(set(index.tolist()))
        return sources_forward(x, index, *args)

    module.task_loss = spy_task
    module.sources.forward = spy_sources
    trainer = small_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    labeled_bs, unlabeled_bs = dm.batch_size, dm.unlabeled_batch_size
    assert unlabeled_bs == 8
    assert seen["task"] and all(n == labeled_bs and top < 10 for n, top in seen["task"])
    pool = set(dm.unlabeled_indices.tolist())
    for idx in seen["source"]:   # each aux batch: the labeled images plus unlabeled ones
        assert len(idx & pool) > 0 and len(idx - pool) > 0


def test_unlabeled_stream_has_the_labeled_stream_length(tmp_path, cifar_dir):
    _, dm, _ = build(tmp_path, cifar_dir)
    loaders = dm.train_dataloader()
    assert len(loaders["unlabeled"]) == len(loaders["labeled"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_unlabeled_sskt_runs_end_to_end(tmp_path, cifar_dir, monkeypatch):
    # through run(), as a user runs it: every training step's auxiliary loss must see the labeled images
    # AND the unlabeled ones (4 + 8 rows), the task loss only the 4 labeled ones; a flag in
    # results.json and a file on disk would also hold for a run that silently dropped the unlabeled stream
    import sskt_lightning.methods.sskt as sskt_mod
    rows, real = [], sskt_mod.sskt_loss

    def spy(task, aux, targets, *args, **kwargs):
        rows.append(([a.shape[0] for a in aux], [t.shape[0] for t in targets]))
        return real(task, aux, targets, *args, **kwargs)

    monkeypatch.setattr(sskt_mod, "sskt_loss", spy)
    cfg = compose_config([*UNLABELED, f"paths.data_dir={cifar_dir}", "trainer=smoke"], tmp_path)
    results = run(cfg)
    assert results["method_settings"]["unlabeled"] is True and results["num_unlabeled"] > 0
    assert (tmp_path / "results.json").is_file()
    assert rows and all(r == ([4 + 8], [4 + 8]) for r in rows), rows


def test_unlabeled_method_without_unlabeled_data_is_refused(tmp_path, cifar_dir):
    from sskt_lightning.errors import ConfigError
    cfg, dm, module = build(tmp_path, cifar_dir, "data.unlabeled=false")
    batch = next(iter(dm.train_dataloader()))
    with pytest.raises(ConfigError, match="data.unlabeled=true"):
        module.method.training_step(module, dm.prepare_batch(batch, False))


def test_aux_kl_is_the_soft_cross_entropy_minus_the_targets_entropy():
    import torch

    from sskt_lightning.losses import aux_kl, soft_cross_entropy
    # float64: CE - T^2 H cancels ~75x here (9.86 - 9.73 = 0.131), so in float32 one rounding of the CE
    # term moves the difference by ~1e-5 relative; in float64 rel 1e-10 keeps a >1e3 margin over that
    # cancellation and still catches any formula error
    f64 = torch.float64
    a = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]], dtype=f64)
    t, T = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=f64), 3.0
    q = torch.softmax(t / T, 1)
    entropy = -(q * q.log()).sum(1).mean()
    assert aux_kl(a, t, T).item() == pytest.approx((soft_cross_entropy(a, t, T) - T * T * entropy).item(), rel=1e-10)
    assert aux_kl(t, t, T).item() == pytest.approx(0.0, abs=1e-12)    # reaches zero when the head copies the source


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_sskt_logs_the_aux_kl_per_source(tmp_path, cifar_dir):
    import csv
    cfg = compose_config([*UNLABELED, f"paths.data_dir={cifar_dir}", "trainer=smoke"], tmp_path)
    run(cfg)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    aux = [float(r["train/aux_timm"]) for r in rows if r.get("train/aux_timm")]
    kl = [float(r["train/aux_kl_timm"]) for r in rows if r.get("train/aux_kl_timm")]
    assert aux and len(kl) == len(aux)
    assert all(0 <= k < a for k, a in zip(kl, aux))    # CE = KL + the (positive) entropy of the soft target
