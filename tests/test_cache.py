"""The soft-label cache: view ids, lookups at the stored precision (fp16: online to 2^-11), safe
keys, concurrent and crashing writers, cold/warm runs equal, the build/info/clear CLI, KD and both SSKT streams through the one seam."""
import csv
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sskt_lightning.cache.__main__ import main as cache_cli
from sskt_lightning.cache.keys import (
    StreamData,
    cache_mode,
    compute_signature,
    data_streams,
    open_stores,
    store_key,
)
from sskt_lightning.cache.store import (
    FILLED,
    META,
    PAYLOAD,
    Layout,
    SoftLabelStore,
    choose_layout,
    list_stores,
    store_path,
)
from sskt_lightning.compose import compose_config
from sskt_lightning.data.augment import BatchAugment, normalize
from sskt_lightning.errors import CacheError, ConfigError
from sskt_lightning.sources import FrozenSource, InputAdapter, SourceBank
from sskt_lightning.train import run

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights")

FP16_REL = 2.0 ** -11          # float16 rounding: relative error <= 2^-11 (normal range)
SMOKE = ["trainer=smoke", "data.batch_size=8", "data.val_size=16", "data.num_workers=0",
         "trainer.limit_train_batches=3", "trainer.max_epochs=2", "model=resnet20", "data=cifar10"]
SOURCE = ["method=sskt", "source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.pretrained=false",
          "source.timm.num_classes=10", "method.aux_head=linear"]
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
CPU = {"device": "cpu"}         # the compute field of a store built or used on a CPU


def overrides(data_dir, cache_dir, *extra):
    return [f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}", *SMOKE, *SOURCE, *extra]


def loss_curve(out):
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def tiny_source(num_classes=10, seed=0, size=None):
    import timm
    torch.manual_seed(seed)
    net = timm.create_model("cifar_resnet20", num_classes=num_classes)
    return FrozenSource("s", net, InputAdapter(MEAN, STD, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), size))


# ------------------------------------------------------------------------------------ view ids
def test_view_ids_name_the_pixels_each_sample_got():
    aug = BatchAugment(4, True)
    assert (aug.num_views, aug.identity_view) == (162, 80)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(0)
    y, view = aug(x, return_view=True)
    torch.manual_seed(0)
    assert torch.equal(aug(x), y)                                   # the same draws as without views
    assert torch.equal(aug.apply(x, view), y)                       # a view id renders its pixels again
    assert torch.equal(aug.apply(x, torch.full((64,), aug.identity_view)), x)
    all_views = torch.arange(aug.num_views)
    dy, dx, flip = aug.decode(all_views)
    assert torch.equal(aug.encode(dy, dx, flip), all_views)
    assert len({(a, b, c) for a, b, c in zip(dy.tolist(), dx.tolist(), flip.tolist())}) == 162
    one = x[:1].expand(162, -1, -1, -1)                             # view 1: the top-left crop, flipped
    rendered = aug.apply(one, all_views)
    assert torch.equal(rendered[1], F.pad(x[0], (4, 4, 4, 4))[:, 0:8, 0:8].flip(-1))
    assert BatchAugment(0, False).num_views == 1 and BatchAugment(2, False).num_views == 25


def test_views_come_from_the_data_modules_own_generators(cifar_dir):
    """A stream's views depend on the seed and the step only: draws from torch's global RNG in
    between (a method's initialisation, dropout) change nothing, each stream has its own generator,
    and the generators' states resume the sequence."""
    from sskt_lightning.data import ImageDataModule

    def module(seed=0):
        dm = ImageDataModule("cifar10", cifar_dir, batch_size=8, val_size=16, download=False, seed=seed,
                             labels_per_class=2, unlabeled=True)
        dm.setup("fit")
        return dm

    batch = (torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64), torch.arange(8))

    def views(dm, steps=3, global_draws=0):
        out = []
        for _ in range(steps):
            torch.rand(global_draws)
            out.append(dm.prepare_batch(batch, augment=True)[-1])
        return torch.stack(out)

    torch.manual_seed(0)
    reference = views(module())
    torch.manual_seed(123)
    assert torch.equal(views(module(), global_draws=1000), reference)
    assert not torch.equal(views(module(seed=1)), reference)
    both = module().prepare_batch({"labeled": batch, "unlabeled": (batch[0], batch[2])}, augment=True)
    assert torch.equal(both["labeled"][-1], reference[0])          # the unlabeled stream draws from its own
    dm = module()
    views(dm, steps=1)
    state = dm.state_dict()
    resumed = module()
    resumed.load_state_dict(state)
    assert torch.equal(views(resumed, steps=2), reference[1:])


# ------------------------------------------------------------------------------------ layouts
def test_fp16_and_topk_layouts_rebuild_the_softmax():
    torch.manual_seed(0)
    z = torch.randn(32, 1000) * 3
    full = Layout("fp16", 1000)
    back = full.decode(full.encode(z))
    assert ((back - z).abs() <= FP16_REL * z.abs() + 1e-7).all()
    topk = Layout("topk", 1000, 64)
    assert topk.bytes_per_entry == 64 * 4 + 8
    rows = topk.encode(z)
    val, idx = z.topk(64, 1)
    tail = torch.ones_like(z, dtype=torch.bool).scatter(1, idx, False)
    for T in (1.0, 3.0):
        q = topk.decode(rows, temperature=T)
        assert torch.allclose(q.gather(1, idx), val, rtol=FP16_REL)     # the top k exact (fp16)
        p, pq = F.softmax(z / T, 1), F.softmax(q / T, 1)                 # the tail's total exact at T = 1, 3
        assert torch.allclose((p * tail).sum(1), (pq * tail).sum(1), rtol=3e-3)
        kl = F.kl_div(F.log_softmax(q / T, 1), F.log_softmax(z / T, 1), log_target=True, reduction="none").sum(1)
        assert (kl <= (p * tail).sum(1) * torch.log(torch.tensor(1000.0 - 64)) + 1e-4).all()   # the stated bound
    assert not torch.equal(topk.decode(rows, temperature=1.0), topk.decode(rows, temperature=3.0))


def test_layout_follows_the_budget():
    assert choose_layout(50_000 * 162, 10, 16 * 2 ** 30).kind == "fp16"
    assert choose_layout(50_000 * 162, 1000, 16 * 2 ** 30).kind == "fp16"           # 15.1 GiB
    big = choose_layout(100_000 * 162, 1000, 16 * 2 ** 30)                           # STL-10 unlabeled
    assert big.kind == "topk" and 200 < big.k < 300
    assert choose_layout(100, 1000, 1e9, topk=5) == Layout("topk", 1000, 5)
    with pytest.raises(CacheError, match="cache_budget_gb"):
        choose_layout(10 ** 9, 1000, 1e6)


# ------------------------------------------------------------------------------------ keys
def test_key_changes_with_weights_adapter_data_augmentation_precision_and_compute():
    source = tiny_source()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    data = StreamData("cifar10", "train", images, MEAN, STD).key()
    aug = BatchAugment(4, True).signature()
    layout = Layout("fp16", 10)

    def key(sig=None, data=data, aug=aug, precision="32-true", layout=layout, compute=CPU):
        return store_key(sig or source.signature(), data, aug, precision, layout, compute)

    base = key()
    assert key() == base                                                            # deterministic
    changed = []
    with torch.no_grad():
        source.net.fc.weight[0, 0] += 1e-3
    changed.append(key())
    with torch.no_grad():
        source.net.fc.weight[0, 0] -= 1e-3
    resized = FrozenSource("s", source.net, InputAdapter(MEAN, STD, (0.5,) * 3, (0.25,) * 3, 74))
    changed.append(key(resized.signature()))
    restat = FrozenSource("s", source.net, InputAdapter(MEAN, STD, (0.5,) * 3, (0.2,) * 3, None))
    changed.append(key(restat.signature()))
    other = images.clone()
    other[3, 1, 2, 2] ^= 1
    changed.append(key(data=StreamData("cifar10", "train", other, MEAN, STD).key()))
    changed.append(key(data=StreamData("cifar10", "unlabeled", images, MEAN, STD).key()))
    changed.append(key(data=StreamData("cifar10", "train", images, MEAN, (0.5, 0.5, 0.5)).key()))
    changed.append(key(aug=BatchAugment(2, True).signature()))
    changed.append(key(aug=BatchAugment(4, False).signature()))
    changed.append(key(precision="bf16-mixed"))
    changed.append(key(layout=Layout("topk", 10, 3)))
    changed.append(key(compute=compute_signature("mps")))
    changed.append(key(compute=compute_signature("cuda")))
    changed.append(key(compute=compute_signature("cuda", matmul_tf32=True, float32_matmul_precision="high")))
    changed.append(key(compute=compute_signature("cuda", cudnn_tf32=True)))
    assert all(k != base for k in changed)
    assert len({json.dumps(k, sort_keys=True) for k in changed}) == len(changed)


def test_the_compute_field_says_the_device_and_cudas_tf32_settings(monkeypatch):
    """A store computed on a GPU with TF32 (~1e-3 relative error, more than fp16's 2^-11) is not
    what a CPU computes: the key says where and how; the TF32 flags count on CUDA only."""
    from sskt_lightning.cache.keys import current_compute
    cpu = compute_signature("cpu")
    tf32 = compute_signature("cuda", matmul_tf32=True, cudnn_tf32=True, float32_matmul_precision="high")
    assert cpu == CPU and tf32 != cpu and tf32 != compute_signature("cuda", cudnn_tf32=True)
    assert store_path("/c", store_key({}, {}, {}, "32-true", Layout("fp16", 3), tf32)) != \
        store_path("/c", store_key({}, {}, {}, "32-true", Layout("fp16", 3), cpu))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert current_compute("cpu") == current_compute(torch.device("cpu")) == cpu
    assert current_compute("cuda:1") == compute_signature("cuda", torch.backends.cuda.matmul.allow_tf32, False,
                                                          torch.get_float32_matmul_precision())
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")                   # turns matmul TF32 on
    try:
        assert current_compute("cuda") == compute_signature("cuda", True, True, "high")
        assert current_compute("cpu") == cpu
    finally:
        torch.set_float32_matmul_precision(before)


class FakeDataModule:
    """What ``data_streams`` reads from sskt_lightning's ImageDataModule."""
    name = "cifar10"

    def __init__(self, images, mean=MEAN, std=STD):
        self.images, self.mean, self.std = images, mean, std

    def source_streams(self):
        return {"labeled": ("train", self.images)}


def test_the_data_normalisation_is_in_every_key(tmp_path):
    """The reference adapter feeds the data module's normalised batch to the source as is, so its
    logits depend on data.mean / data.std: another normalisation is another store."""
    import timm

    from sskt_lightning.sources import ReferenceInputAdapter
    torch.manual_seed(0)
    bank = SourceBank([FrozenSource("s", timm.create_model("cifar_resnet20", num_classes=10),
                                    ReferenceInputAdapter(1.0))])
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    paths = []
    for mean, std in ((MEAN, STD), ((0.5, 0.5, 0.5), STD), (MEAN, (0.5, 0.5, 0.5)), (MEAN, STD)):
        streams = data_streams(FakeDataModule(images, mean, std))
        stores = open_stores(bank, streams, BatchAugment(0, False), "32-true", tmp_path, "read_write",
                             compute=CPU)
        paths.append(stores["labeled"][0].path)
        stores["labeled"][0].close()
    assert len(set(paths[:3])) == 3 and paths[3] == paths[0]
    key = json.loads((paths[1] / META).read_text())["key"]["data"]
    assert (key["mean"], key["std"]) == ([0.5, 0.5, 0.5], list(STD))


def test_train_mode_batchnorm_refuses_the_cache():
    from sskt_lightning.methods.sskt import SSKT
    with pytest.raises(ConfigError, match="source_bn=train.*per image"):
        SSKT(source_bn="train", cache="read_write")
    with pytest.raises(ConfigError, match="method.cache"):
        cache_mode("sometimes")
    assert cache_mode(False) == "off" and SSKT(source_bn="train", cache="off").cache == "off"


# ------------------------------------------------------------------------------------ store files
def make_store(tmp_path, n=5, views=4, classes=3, **kw):
    key = {"test": "store", **kw}
    return SoftLabelStore.create_or_open(tmp_path, key, n, views, Layout("fp16", classes), {"source": "t"}), key


def test_a_foreign_or_damaged_store_is_refused(tmp_path):
    store, key = make_store(tmp_path)
    store.close()
    meta = json.loads((store.path / META).read_text())
    meta["key"]["test"] = "other"
    (store.path / META).write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="differs in test.*clear --key"):
        SoftLabelStore.create_or_open(tmp_path, key, 5, 4, Layout("fp16", 3))
    meta["key"]["test"] = "store"
    (store.path / META).write_text(json.dumps(meta))
    with open(store.path / PAYLOAD, "ab") as f:
        f.write(b"x")
    with pytest.raises(CacheError, match="damaged"):
        SoftLabelStore.create_or_open(tmp_path, key, 5, 4, Layout("fp16", 3))


def test_lookups_out_of_range_are_refused(tmp_path):
    store, _ = make_store(tmp_path)
    with pytest.raises(CacheError, match="out of range"):
        store.lookup(np.array([5]), np.array([0]))


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from sskt_lightning.cache.store import Layout, SoftLabelStore
    root, first, crash = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = SoftLabelStore.create_or_open(root, {"test": "shared"}, 40, 6, Layout("fp16", 7), {}, commit_every=16)
    if crash == "after_payload":          # die once the payload is written, before any flag is set
        import os
        os.fdatasync = lambda fd: os._exit(3)
    pairs = [(i, v) for i in range(first, first + 30) for v in range(6)]
    for a in range(0, len(pairs), 8):
        idx = np.array([p[0] for p in pairs[a:a + 8]]); view = np.array([p[1] for p in pairs[a:a + 8]])
        rows = (idx[:, None] * 10 + view[:, None] + np.arange(7) / 8).astype(np.float16)
        store.put(idx, view, rows)
    store.close()
""")


def expected_rows(idx, view):
    return (idx[:, None] * 10 + view[:, None] + np.arange(7) / 8).astype(np.float16)


@pytest.mark.slow
def test_two_concurrent_writers_share_one_store(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(first), "no"])
             for first in (0, 10)]                       # both create the store and overlap on 10..29
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    stores = list_stores(tmp_path / "cache")
    assert len(stores) == 1 and not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]
    store = SoftLabelStore(stores[0], writable=False)
    idx, view = np.repeat(np.arange(40), 6), np.tile(np.arange(6), 40)
    hit, rows = store.lookup(idx, view)
    assert hit.sum() == 40 * 6
    assert np.array_equal(rows, expected_rows(idx, view))


@pytest.mark.slow
def test_a_writer_killed_mid_commit_leaves_no_trusted_entry(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "cache"), "0", "after_payload"], timeout=120)
    assert proc.returncode == 3
    path = list_stores(tmp_path / "cache")[0]
    assert os.path.getsize(path / PAYLOAD) > 0 and any(open(path / PAYLOAD, "rb").read())   # payload written ...
    store = SoftLabelStore(path, writable=True)
    hit, _ = store.lookup(np.arange(30), np.zeros(30, dtype=np.int64))
    assert not hit.any() and store.count_filled() == 0                                       # ... never trusted
    # an interrupted creation leaves only a temporary directory: not a store, removed by `clear`
    (tmp_path / "cache" / ".tmp-deadbeef.123.abc").mkdir()
    assert list_stores(tmp_path / "cache") == [path]
    store.put(np.array([1]), np.array([2]), expected_rows(np.array([1]), np.array([2])))
    store.close()
    again = SoftLabelStore(path, writable=False)
    hit, rows = again.lookup(np.array([1, 2]), np.array([2, 2]))
    assert hit.tolist() == [True, False] and np.array_equal(rows, expected_rows(np.array([1]), np.array([2])))


# ------------------------------------------------------------------------------------ through the bank
def data_and_module(cfg):
    """The data module and the TransferModule of a composed config, as train.run builds them."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sskt_lightning.module import TransferModule
    from sskt_lightning.train import data_info_of
    L.seed_everything(cfg.seed)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return dm, TransferModule(OmegaConf.to_container(cfg, resolve=True), data_info_of(dm))


@pytest.mark.slow
def test_cached_logits_equal_online_logits_for_random_image_views(tmp_path, cifar_dir):
    """Built by the CLI (every view of every image), then random (image, view) pairs looked up
    through the source bank equal the source run online on those views, to fp16 precision."""
    args = overrides(cifar_dir, tmp_path / "cache", "data.augment_pad=1")
    assert cache_cli(["build", "--batch-size", "512", *args]) == 0
    dm, module = data_and_module(compose_config(args, tmp_path / "run"))
    bank: SourceBank = module.sources
    stores = open_stores(bank, data_streams(dm), dm.augment, "32-true", tmp_path / "cache", "read_only",
                         compute=CPU)
    store = stores["labeled"][0]
    assert store.count_filled() == 80 * 18                 # 80 images x (3 x 3 offsets x 2 flips)
    g = torch.Generator().manual_seed(1)
    index, view = torch.randint(0, 80, (40,), generator=g), torch.randint(0, 18, (40,), generator=g)
    x = normalize(dm.augment.apply(dm.train_arrays.images[index], view), dm.mean, dm.std)
    online = bank(x, index, view)[0]
    bank.attach_cache(stores, write=False)
    cached = bank(x, index, view)[0]
    assert store.stats()["hits"] == 40 and store.stats()["misses"] == 0
    assert torch.allclose(cached, online, rtol=FP16_REL, atol=1e-5)
    assert not torch.equal(cached, online)                 # it did come from the fp16 store
    bank.detach_cache()


@pytest.mark.slow
def test_warm_cache_follows_the_online_run(tmp_path, cifar_dir, monkeypatch):
    """cache=off, then a cold and a warm read_write run, same seed: the cold and warm runs are
    identical (every answer has the stored precision), and both follow the online run."""
    import timm

    import sskt_lightning.methods.sskt as sskt_mod
    # A source whose soft labels move when its logits are rounded to fp16: the random net's logits (up to
    # ~55) give a saturated softmax at T=3, insensitive to rounding; its classifier scaled by 0.1 gives
    # logits up to ~20 with a spread-out softmax (mean top probability ~0.3)
    torch.manual_seed(0)
    net = timm.create_model("cifar_resnet20", num_classes=10)
    net.fc.weight.data.mul_(0.1)
    net.fc.bias.data.mul_(0.1)
    torch.save(net.state_dict(), tmp_path / "source.pth")
    first_targets, real = [], sskt_mod.sskt_loss

    def spy(task, aux, targets, *args, **kwargs):
        # each step: the largest source logit, and the loss the same step gives with fp16-rounded targets
        rounded = real(task, aux, [t.half().float() for t in targets], *args, **kwargs)[0].item()
        first_targets.append((max(t.abs().max().item() for t in targets), rounded))
        return real(task, aux, targets, *args, **kwargs)

    monkeypatch.setattr(sskt_mod, "sskt_loss", spy)
    curves, stats, step0 = [], [], []
    for i, mode in enumerate(["off", "read_write", "read_write", "read_only"]):
        out = tmp_path / f"run{i}"
        first_targets.clear()
        cfg = compose_config(overrides(cifar_dir, tmp_path / "cache", f"method.cache={mode}",
                                       f"source.timm.weights={tmp_path / 'source.pth'}"), out)
        results = run(cfg)
        curves.append(loss_curve(out))
        stats.append(results["method_settings"].get("cache_stats"))
        step0.append(first_targets[0])
    online, cold, warm, read_only = curves
    assert len(online) == 6 and cold == warm == read_only
    # step 0 sees the same weights: the cached soft labels give the online loss to fp16 precision. Each
    # cached logit t_k is off by at most d = 2^-11 |t|max; that moves log softmax(t/T) by at most 2d/T,
    # so the aux term T^2 sum_k q_k (-log p_k) by at most a fraction 2d/T of itself, and the total loss
    # (task + alpha * aux) by at most that fraction too. Later steps drift apart slowly (fp16 targets ->
    # slightly different updates), as any rounding does over training.
    T = cfg.method.temperature
    fp16_bound = 2 * FP16_REL * step0[0][0] / T
    assert 1e-3 < fp16_bound < 1e-2                     # the source is neither saturated nor tiny
    assert warm[0] != online[0]                          # the fp16 soft labels do change the loss ...
    assert warm[0] == pytest.approx(online[0], rel=fp16_bound)   # ... within what fp16 allows
    # ... and exactly as the online logits rounded to fp16 do: same weights, batch and kernels on one
    # machine, so equal up to the float32 text of the CSV (rel 1e-6 ~ 8 ulp; a bfloat16 store, a wrong
    # view or a wrong temperature is off by far more, though it can stay within the bound above)
    assert warm[0] == pytest.approx(step0[0][1], rel=1e-6)
    assert np.allclose(warm, online, rtol=1e-2)
    assert stats[0] is None
    assert stats[1]["timm"][0]["hit_rate"] == 0.0 and stats[1]["timm"][0]["written"] == 48   # 2 x 3 x 8
    assert stats[2]["timm"][0]["hit_rate"] == 1.0 and stats[3]["timm"][0]["hit_rate"] == 1.0


@pytest.mark.slow
def test_same_seed_runs_with_other_settings_hit_the_cache_completely(tmp_path, cifar_dir):
    """The views are the data module's, not the global RNG's: a run whose heads draw other random
    initial weights (transfer module vs linear) still sees exactly the (image, view) pairs the first
    run stored."""
    args = overrides(cifar_dir, tmp_path / "cache", "method.cache=read_write")
    first = run(compose_config(args, tmp_path / "a"))["method_settings"]["cache_stats"]["timm"][0]
    other = run(compose_config([*args, "method.aux_head=transfer_module", "method.alpha=0.5"], tmp_path / "b"))
    assert first["hit_rate"] == 0.0
    assert other["method_settings"]["cache_stats"]["timm"][0]["hit_rate"] == 1.0


@pytest.mark.slow
def test_changed_source_fills_its_own_store_and_says_why(tmp_path, cifar_dir, caplog):
    args = overrides(cifar_dir, tmp_path / "cache", "method.cache=read_write")
    run(compose_config(args, tmp_path / "a"))
    caplog.set_level("WARNING", logger="sskt_lightning.cache.keys")
    results = run(compose_config([*args, "seed=1"], tmp_path / "b"))     # another seed: other random weights
    assert len(list_stores(tmp_path / "cache")) == 2
    assert results["method_settings"]["cache_stats"]["timm"][0]["hits"] == 0
    assert "differs in source.weights_sha256)" in caplog.text        # and in nothing else


@pytest.mark.slow
def test_sskt_unlabeled_stream_and_kd_teacher_use_the_cache(tmp_path, cifar_dir):
    unlabeled = ["data.labels_per_class=2", "data.unlabeled=true", "method.unlabeled=true",
                 "method.cache=read_write"]
    args = overrides(cifar_dir, tmp_path / "cache", *unlabeled)
    first = run(compose_config(args, tmp_path / "u1"))["method_settings"]["cache_stats"]["timm"]
    second = run(compose_config(args, tmp_path / "u2"))["method_settings"]["cache_stats"]["timm"]
    assert len(first) == 1                                  # the pool is the training array: one store
    assert first[0]["written"] == 2 * 2 * 16 and second[0]["hit_rate"] == 1.0   # 2 epochs x 2 batches x (8 + 8)
    kd = [f"paths.data_dir={cifar_dir}", f"paths.cache_dir={tmp_path / 'cache'}", *SMOKE, "method=kd",
          *SOURCE[1:5], "method.cache=read_write"]
    run(compose_config(kd, tmp_path / "k1"))
    results = run(compose_config(kd, tmp_path / "k2"))
    assert results["method_settings"]["cache_stats"]["timm"][0]["hit_rate"] == 1.0


def test_cache_refuses_a_source_in_train_mode_before_training(tmp_path, cifar_dir):
    with pytest.raises(ConfigError, match="source_bn=train"):
        run(compose_config(overrides(cifar_dir, tmp_path / "cache", "method.cache=read_write",
                                     "method.source_bn=train"), tmp_path / "r"))


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_build_resumes_and_info_and_clear(tmp_path, cifar_dir, capsys, monkeypatch):
    args = overrides(cifar_dir, tmp_path / "cache", "data.augment_pad=0", "data.augment_flip=true")
    calls = {"n": 0}
    put = SoftLabelStore.put

    def interrupted_put(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return put(self, *a, **k)

    monkeypatch.setattr(SoftLabelStore, "put", interrupted_put)
    assert cache_cli(["build", "--batch-size", "32", *args]) == 130
    monkeypatch.setattr(SoftLabelStore, "put", put)
    path = list_stores(tmp_path / "cache")[0]
    assert SoftLabelStore(path, writable=False).count_filled() == 64       # two batches committed
    capsys.readouterr()
    assert cache_cli(["build", "--batch-size", "32", *args]) == 0
    out = capsys.readouterr().out
    assert "96 entries to compute" in out and f"store {path.name} on cpu" in out   # 80 x 2 views - 64
    meta = json.loads((path / META).read_text())
    assert meta["key"]["compute"] == CPU and meta["labels"]["device"] == "cpu"   # the device it ran on
    assert cache_cli(["info", *args]) == 0
    out = capsys.readouterr().out
    assert path.name in out and "160/160" in out and "100.0%" in out
    assert cache_cli(["clear", "--key", "nope", *args]) == 2
    assert cache_cli(["clear", "--key", path.name, *args]) == 0
    assert list_stores(tmp_path / "cache") == []
    assert not (tmp_path / "cache" / path.name).exists() and (path / FILLED).exists() is False


def test_commit_writes_each_empty_slot_once_and_never_rewrites_a_filled_one(tmp_path):
    """Duplicates within a buffer: the first occurrence is written; an entry already filled (by this
    writer or another) is never rewritten (a reader may be reading it without the lock); ``written``
    counts only the rows actually written."""
    store, _ = make_store(tmp_path, n=5, views=4, classes=3)

    def row(v):
        return np.full((1, 3), v, np.float16)

    store.put(np.array([1, 2, 1]), np.array([0, 3, 0]), np.concatenate([row(1), row(2), row(9)]))
    assert store.commit() == 2 and store.written == 2
    store.put(np.array([1, 4]), np.array([0, 0]), np.concatenate([row(7), row(4)]))   # (1, 0) is filled
    assert store.commit() == 1 and store.written == 3
    other, _ = make_store(tmp_path, n=5, views=4, classes=3)               # a second writer, same store
    other.put(np.array([2]), np.array([3]), row(8))
    assert other.commit() == 0 and other.written == 0
    store.close()
    other.close()
    again = SoftLabelStore(store.path, writable=False)
    hit, rows = again.lookup(np.array([1, 2, 4, 0]), np.array([0, 3, 0, 0]))
    assert hit.tolist() == [True, True, True, False] and again.count_filled() == 3
    assert rows[:, 0].tolist() == [1.0, 2.0, 4.0]                          # the first values stay


def test_source_signature_is_the_one_before_a_dtype_conversion():
    """Lightning converts the modules to the precision's dtype (16-true, bf16-true, 64-true) before
    ``on_fit_start`` opens the stores, while ``cache build`` hashes the source before casting it:
    the signature is the one before any dtype conversion (the precision is its own key field)."""
    source = tiny_source()
    before = source.signature()
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        converted = tiny_source()
        converted.to(dtype)
        assert converted.net.fc.weight.dtype == dtype and converted.adapter.data_mean.dtype == dtype
        assert converted.signature() == before
    moved = tiny_source()
    moved.to("cpu", memory_format=torch.channels_last)           # no dtype change: the signature stays live
    with torch.no_grad():
        moved.net.fc.weight[0, 0] += 1e-3
    assert moved.signature()["weights_sha256"] != before["weights_sha256"]
    module = torch.nn.Sequential(tiny_source())                  # converted through a parent, as Lightning does
    module.half()
    assert module[0].signature() == before


@pytest.mark.slow
def test_a_store_built_by_the_cli_is_found_by_a_bf16_true_run(tmp_path, cifar_dir):
    """``cache build`` at bf16-true hashes the fp32 source and casts it after; training opens its
    stores in ``on_fit_start``, after Lightning's precision plugin converted the module: one key."""
    from lightning.pytorch.plugins.precision import HalfPrecision
    args = overrides(cifar_dir, tmp_path / "cache", "data.augment_pad=0", "data.augment_flip=false",
                     "trainer.precision=bf16-true")
    assert cache_cli(["build", "--device", "cpu", *args]) == 0
    dm, module = data_and_module(compose_config(args, tmp_path / "run"))
    HalfPrecision("bf16-true").convert_module(module)           # what strategy.setup does before on_fit_start
    assert next(module.sources.parameters()).dtype == torch.bfloat16
    stores = open_stores(module.sources, data_streams(dm), dm.augment, "bf16-true", tmp_path / "cache",
                         "read_only", compute=CPU)
    assert stores["labeled"][0].count_filled() == 80 and len(list_stores(tmp_path / "cache")) == 1


# ------------------------------------------------------------------------------------ disk space
def test_short_writes_are_completed_before_a_flag_is_set(tmp_path, monkeypatch):
    pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: pwrite(fd, bytes(data)[:3], offset))  # 3 B a call
    store, _ = make_store(tmp_path, n=2, views=2, classes=5)                # 10 B an entry
    rows = np.arange(10, dtype=np.float16).reshape(2, 5) + 1
    store.put(np.array([0, 1]), np.array([1, 0]), rows)
    assert store.commit() == 2
    store.close()
    hit, back = SoftLabelStore(store.path, writable=False).lookup(np.array([0, 1]), np.array([1, 0]))
    assert hit.all() and np.array_equal(back, rows)


def test_a_store_that_would_not_fit_the_disk_is_refused_at_creation(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 6, 10 ** 6 - 99, 99))
    with pytest.raises(CacheError, match=r"needs 100 B when full.*99 B free.*cache_budget_gb.*paths.cache_dir.*"
                                         r"method.cache=read_only or off"):
        make_store(tmp_path, n=5, views=4, classes=2)              # 5 x 4 x (4 B payload + 1 B flag)
    assert list(tmp_path.iterdir()) == []                          # nothing created, nothing left over
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 ** 6, 10 ** 6 - 100, 100))
    store, _ = make_store(tmp_path, n=5, views=4, classes=2)
    assert os.stat(store.path / FILLED).st_blocks > 0              # the flags are allocated, not a hole


@pytest.mark.slow
def test_a_full_disk_stops_writing_with_one_warning_and_the_run_goes_on(tmp_path, cifar_dir, monkeypatch, caplog,
                                                                        capsys):
    """ENOSPC while committing: the store stops storing (one warning), lookups go on, misses run
    the source, and the run computes what a run with a writable cache computes."""
    import errno
    cold = run(compose_config(overrides(cifar_dir, tmp_path / "ok", "method.cache=read_write"), tmp_path / "a"))

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    caplog.set_level("WARNING", logger="sskt_lightning.cache.store")
    args = overrides(cifar_dir, tmp_path / "full", "method.cache=read_write")
    results = run(compose_config(args, tmp_path / "b"))
    assert loss_curve(tmp_path / "b") == loss_curve(tmp_path / "a") and len(loss_curve(tmp_path / "a")) == 6
    assert results["test_acc"] == cold["test_acc"]
    stats = results["method_settings"]["cache_stats"]["timm"][0]
    assert stats["written"] == 0 and stats["misses"] == 48 and "No space left" in stats["write_stopped"]
    warnings = [r for r in caplog.records if "stops storing" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    assert SoftLabelStore(list_stores(tmp_path / "full")[0], writable=False).count_filled() == 0
    capsys.readouterr()
    assert cache_cli(["build", *args, "data.augment_pad=0", "data.augment_flip=false"]) == 2   # it only writes
    assert re.search(r"error: cache build: No space left.*paths.cache_dir", capsys.readouterr().err, re.DOTALL)


# ------------------------------------------------------------------------------------ damaged stores
@pytest.mark.slow
def test_damaged_meta_is_a_cache_error_naming_clear_and_clear_removes_it(tmp_path, capsys):
    from sskt_lightning.cache.keys import explain_new_store
    labels = {"source": "s", "dataset": "d", "split": "train"}
    good = SoftLabelStore.create_or_open(tmp_path, {"v": 1}, 2, 2, Layout("fp16", 3), labels)
    corrupt = SoftLabelStore.create_or_open(tmp_path, {"v": 2}, 2, 2, Layout("fp16", 3), labels)
    missing = SoftLabelStore.create_or_open(tmp_path, {"v": 3}, 2, 2, Layout("fp16", 3), labels)
    for s in (good, corrupt, missing):
        s.close()
    (corrupt.path / META).write_text('{"key": {"v": 2}, "num_im')                 # a torn meta.json
    (missing.path / META).unlink()
    note = explain_new_store(tmp_path, {"v": 4}, labels)
    assert f"{good.path.name} (differs in v)" in note
    assert f"{corrupt.path.name} (unreadable meta.json" in note and f"clear --key {corrupt.path.name}" in note
    for path, key in ((corrupt.path, {"v": 2}), (missing.path, {"v": 3})):
        with pytest.raises(CacheError, match=rf"{path}.*meta.json.*python -m sskt_lightning.cache clear --key "
                                             rf"{path.name}"):
            SoftLabelStore.create_or_open(tmp_path, key, 2, 2, Layout("fp16", 3), labels)
    capsys.readouterr()
    assert cache_cli(["info", f"paths.cache_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert f"{corrupt.path.name}  damaged" in out and f"{missing.path.name}  damaged" in out and "3 store(s)" in out
    assert cache_cli(["clear", "--key", missing.path.name, "--key", corrupt.path.name,
                      f"paths.cache_dir={tmp_path}"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.path.name]


def _edit_meta(path, **fields):
    """Set fields of a store's meta.json: the counts at its top, the rest in its layout."""
    meta = json.loads((path / META).read_text())
    for name, value in fields.items():
        (meta if name in ("num_images", "num_views") else meta["layout"])[name] = value
    (path / META).write_text(json.dumps(meta))


@pytest.mark.slow
@pytest.mark.parametrize("damage, why", [
    (lambda p: _edit_meta(p, num_classes=-5), "whole number of classes >= 1, got -5"),
    (lambda p: _edit_meta(p, num_classes="ten"), "whole number of classes >= 1, got 'ten'"),
    (lambda p: _edit_meta(p, kind="topk", k="1"), "got k='1'"),
    (lambda p: _edit_meta(p, num_images=-2, num_views=-2), "num_images=-2 is not a whole number"),
    (lambda p: (p / PAYLOAD).unlink(), "it has no payload.bin"),
    (lambda p: (p / FILLED).unlink(), "it has no filled.bin"),
    (lambda p: (p / META).write_text("[1, 2]"), "its meta.json cannot be read (ValueError: not a JSON object (a list))"),
    (lambda p: (p / META).unlink(), "it has no meta.json"),
])
def test_a_store_with_impossible_meta_or_missing_files_is_damaged(tmp_path, capsys, damage, why):
    store, key = make_store(tmp_path)
    store.close()
    damage(store.path)
    with pytest.raises(CacheError, match=rf"{store.path} is damaged: .*{re.escape(why)}.*python -m "
                                         rf"sskt_lightning.cache clear --key {store.path.name}"):
        SoftLabelStore.create_or_open(tmp_path, key, 5, 4, Layout("fp16", 3))
    capsys.readouterr()
    assert cache_cli(["info", f"paths.cache_dir={tmp_path}"]) == 0      # listed as damaged, not a traceback
    assert f"{store.path.name}  damaged" in capsys.readouterr().out


@pytest.mark.parametrize("code", ["ENOSPC", "EACCES"])
def test_a_store_whose_meta_cannot_be_written_is_a_cache_error_and_leaves_nothing(tmp_path, monkeypatch, code):
    """meta.json is written through sskt_lightning.atomic (fsync, rename); when that fails the
    error names the cache's own fixes (not the run directory's) and no half-made store remains."""
    import errno

    from sskt_lightning import atomic

    def refuse(src, dst):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(atomic.os, "replace", refuse)      # only the atomic write of meta.json renames so
    with pytest.raises(CacheError, match=r"meta.json.*paths.cache_dir.*method.cache=read_only or off") as err:
        make_store(tmp_path)
    assert os.strerror(getattr(errno, code)) in str(err.value) and "hydra.run.dir" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
