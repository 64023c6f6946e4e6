"""FixMatch's strong view of the unlabeled stream (data/strong.py) and its harness glue: the ops
against torchvision / PIL / hand computation, determinism from the generator, the data module's
"unlabeled_strong" key, its generator in the checkpoint, and the strong_views capability."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from sskt_lightning.data.augment import normalize
from sskt_lightning.data.strong import (
    OP_NAMES,
    RA_OPS,
    StrongAugment,
    StrongDraw,
    apply_op,
    cutout,
    cutout_boxes,
)
from sskt_lightning.errors import ConfigError


def _images(b=8, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ the augmentation itself
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (1, 9, 13), (3, 2, 2)])
def test_same_generator_state_same_views_bit_for_bit_another_state_others(shape):
    x = _images(16, *shape)
    aug = StrongAugment()
    a = aug(x, _gen(5))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(aug(x, _gen(5)), a)
    assert not torch.equal(aug(x, _gen(6)), a)
    g = _gen(5)
    aug(x, g)
    assert not torch.equal(aug(x, g), a)          # the generator advances: the next batch differs
    torch.manual_seed(0)
    b = aug(x, _gen(5))
    torch.rand(1000)
    assert torch.equal(b, a)                        # torch's global RNG plays no part


def test_other_channel_counts_are_refused_whatever_the_draw():
    with pytest.raises(ValueError, match="1- or 3-channel"):
        StrongAugment()(_images(2, 2, 8, 8), _gen(0))


def test_the_draw_covers_every_op_and_magnitudes_stay_in_range():
    d = StrongAugment().draw(4000, _gen(0))
    assert d.ops.shape == (4000, 2) and d.mags.shape == (4000, 2) and d.cut.shape == (4000, 3)
    assert set(d.ops.flatten().tolist()) == set(range(14))
    assert OP_NAMES == ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
                        "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY")
    assert (d.mags >= 0).all() and (d.mags < 1).all() and (d.cut >= 0).all() and (d.cut < 1).all()


def _identity_draw(b, ops=(5, 5), mags=(0.5, 0.5), cut=(0.0, 0.5, 0.5)):
    aug = StrongAugment()
    return aug, StrongDraw(view=torch.full((b,), aug.crop.identity_view), ops=torch.tensor([list(ops)] * b),
                           mags=torch.tensor([list(mags)] * b, dtype=torch.float64),
                           cut=torch.tensor([list(cut)] * b, dtype=torch.float64))


def test_a_draw_of_identity_ops_without_cutout_renders_the_image_unchanged():
    x = _images(4)
    aug, d = _identity_draw(4)
    assert torch.equal(aug.apply(x, d), x)


def test_a_draw_maps_its_uniforms_into_each_ops_range():
    """ops (Solarize, Brightness) with uniforms (0.5, 0.25): threshold 128, factor 0.05 + 0.9 * 0.25."""
    x = _images(4)
    aug, d = _identity_draw(4, ops=(OP_NAMES.index("Solarize"), OP_NAMES.index("Brightness")), mags=(0.5, 0.25))
    solarized = torch.where(x >= 128, 255 - x, x)
    expected = (solarized.float() * torch.tensor(0.05 + 0.9 * 0.25, dtype=torch.float32)).clamp(0, 255).to(torch.uint8)
    assert torch.equal(aug.apply(x, d), expected)
    aug, d = _identity_draw(4, ops=(OP_NAMES.index("Posterize"), 5), mags=(0.6, 0.0))    # 4 + 4 * 0.6 -> 6 bits
    assert torch.equal(aug.apply(x, d), x & 0b11111100)


# each colour op against torchvision's, per image, with per-image magnitudes
TV = {"Brightness": TF.adjust_brightness, "Color": TF.adjust_saturation, "Contrast": TF.adjust_contrast,
      "Sharpness": TF.adjust_sharpness, "Solarize": TF.solarize, "AutoContrast": lambda img, v: TF.autocontrast(img),
      "Equalize": lambda img, v: TF.equalize(img), "Posterize": lambda img, v: TF.posterize(img, int(v))}


@pytest.mark.parametrize("name", sorted(TV))
@pytest.mark.parametrize("c", [1, 3])
def test_colour_ops_equal_torchvisions_per_image(name, c):
    """Bit for bit: 32 images of 32×30, enough pixels that a blend computed without torchvision's fused
    multiply-add would round some value the other way."""
    x = _images(32, c, 32, 30, seed=c)
    low, high = next((lo, hi) for n, lo, hi in RA_OPS if n == name)
    v = low + (min(high, 255.0) - low) * torch.rand(32, dtype=torch.float64, generator=_gen(1))
    out = apply_op(name, x, v)
    ref = torch.stack([TV[name](x[i], float(v[i])) for i in range(len(x))])
    assert torch.equal(out, ref)


def test_color_is_the_identity_on_gray_images_and_solarize_hand_computed():
    x = _images(3, 1, 6, 6)
    assert torch.equal(apply_op("Color", x, 0.05), x)
    tiny = torch.tensor([[[[0, 100, 127], [128, 200, 255]]]], dtype=torch.uint8)
    assert apply_op("Solarize", tiny, 128.0).tolist() == [[[[0, 100, 127], [127, 55, 0]]]]
    assert apply_op("Solarize", tiny, 256.0).tolist() == tiny.tolist()     # the top of the range: unchanged
    assert apply_op("Posterize", tiny, 4.7).tolist() == [[[[0, 96, 112], [128, 192, 240]]]]


def _pil(name, img: Image.Image, v: float, h: int, w: int) -> Image.Image:
    """semilearn's RandAugment ops, through PIL."""
    data = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
            "TranslateX": (1, 0, v * w, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, v * h)}
    return img.rotate(v) if name == "Rotate" else img.transform(img.size, Image.AFFINE, data[name])


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"])
@pytest.mark.parametrize("c,h,w", [(1, 28, 28), (3, 32, 32), (1, 9, 13)])
def test_geometric_ops_equal_pils_as_in_the_reference(name, c, h, w):
    """Nearest-neighbour, black fill, PIL's affine convention. Magnitudes are random draws: a value
    that puts a source coordinate exactly on a pixel edge (e.g. shear 0.2 at y + 0.5 = 2.5) may round
    the other way in PIL's 16.16 fixed point; such ties have probability zero here."""
    x = _images(6, c, h, w, seed=h)
    low, high = next((lo, hi) for n, lo, hi in RA_OPS if n == name)
    v = low + (high - low) * torch.rand(6, dtype=torch.float64, generator=_gen(h + w))
    out = apply_op(name, x, v)
    for i in range(6):
        arr = x[i].permute(1, 2, 0).numpy()
        ref = _pil(name, Image.fromarray(arr[..., 0] if c == 1 else arr), float(v[i]), h, w)
        ref = torch.from_numpy(np.asarray(ref).copy()).reshape(h, w, c).permute(2, 0, 1)
        assert torch.equal(out[i], ref), (name, float(v[i]))


def test_translate_by_whole_pixels_is_a_shift_with_black_fill():
    x = _images(1, 1, 10, 10)
    right = apply_op("TranslateX", x, -0.2)                 # input (x - 2, y): the content moves 2 px right
    assert torch.equal(right[..., 2:], x[..., :-2]) and (right[..., :2] == 0).all()
    up = apply_op("TranslateY", x, 0.3)                     # input (x, y + 3): the content moves 3 px up
    assert torch.equal(up[..., :-3, :], x[..., 3:, :]) and (up[..., -3:, :] == 0).all()


def test_cutout_fills_its_square_with_gray_and_nothing_else():
    # side 0.8 * 0.5 * 10 = 4 px, centre (5, 3): x0 = 3, y0 = 1
    box = cutout_boxes(torch.tensor([[0.8, 0.5, 0.3]], dtype=torch.float64), 10, 10)
    assert box.tolist() == [[3, 1, 7, 5]]
    corner = cutout_boxes(torch.tensor([[1.0, 0.0, 0.95]], dtype=torch.float64), 10, 10)   # clipped at the borders
    assert corner.tolist() == [[0, 7, 5, 10]]
    assert cutout_boxes(torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64), 10, 10)[0, 2:].tolist() == [5, 5]
    x = _images(1, 3, 10, 10)
    out = cutout(x, box)
    assert (out[..., 1:5, 3:7] == 127).all()
    keep = torch.ones(10, 10, dtype=torch.bool)
    keep[1:5, 3:7] = False
    assert torch.equal(out[..., keep], x[..., keep])


def test_strong_view_differs_from_the_weak_view():
    from sskt_lightning.data.augment import BatchAugment
    x = _images(32, 1, 28, 28)
    weak = BatchAugment()(x, generator=_gen(0))
    strong = StrongAugment()(x, _gen(0))      # the same crop draw first, then RandAugment and Cutout
    differs = (weak != strong).flatten(1).any(1)
    assert differs.float().mean() > 0.8


# ------------------------------------------------------------------ the data module
def _dm(cifar_dir, **kw):
    from sskt_lightning.data import ImageDataModule
    args = dict(batch_size=8, val_size=16, download=False, labels_per_class=2, unlabeled=True)
    args.update(kw)
    dm = ImageDataModule("cifar10", cifar_dir, **args)
    dm.setup("fit")
    return dm


def _batch(dm):
    labeled = next(iter(dm._labeled_loader()))
    unlabeled = next(iter(dm.train_dataloader()["unlabeled"]))
    return {"labeled": labeled, "unlabeled": unlabeled}


def test_the_batch_has_strong_views_only_when_on_and_training(cifar_dir):
    dm = _dm(cifar_dir)
    batch = _batch(dm)
    assert set(dm.prepare_batch(batch, augment=True)) == {"labeled", "unlabeled"}      # off by default
    dm.strong_views = True
    assert set(dm.prepare_batch(batch, augment=False)) == {"labeled", "unlabeled"}     # not training
    out = dm.prepare_batch(batch, augment=True)
    assert set(out) == {"labeled", "unlabeled", "unlabeled_strong"}
    xs, xu = out["unlabeled_strong"], out["unlabeled"][0]
    assert xs.dtype == torch.float32 and xs.shape == xu.shape
    # the same images in the same order, strongly augmented from generator 4, normalised like the weak ones
    expected = normalize(StrongAugment()(batch["unlabeled"][0], _gen(dm.seed + 10_007 + 2)), dm.mean, dm.std)
    assert torch.equal(xs, expected)
    assert not torch.equal(xs, xu)


def test_weak_views_are_the_same_with_or_without_strong_views(cifar_dir):
    """The soft-label cache keys weak views by (index, view): the strong views draw from their own
    generator, so switching them on changes no weak view."""
    off, on = _dm(cifar_dir), _dm(cifar_dir)
    on.strong_views = True
    batch = _batch(off)
    for _ in range(2):
        a, b = off.prepare_batch(batch, augment=True), on.prepare_batch(batch, augment=True)
        for key in ("labeled", "unlabeled"):
            assert all(torch.equal(p, q) for p, q in zip(a[key], b[key]))


def test_on_device_data_gives_the_same_strong_views(cifar_dir):
    host, dev = _dm(cifar_dir), _dm(cifar_dir, on_device=True)
    host.strong_views = dev.strong_views = True
    batch = _batch(host)
    index_only = {"labeled": batch["labeled"][1:], "unlabeled": batch["unlabeled"][1:]}
    a, b = host.prepare_batch(batch, augment=True), dev.prepare_batch(index_only, augment=True)
    assert torch.equal(a["unlabeled_strong"], b["unlabeled_strong"])


def test_the_strong_generator_is_saved_and_an_old_four_state_checkpoint_still_loads(cifar_dir):
    dm = _dm(cifar_dir)
    images = _images(8)
    dm.strong_view(images)
    state = dm.state_dict()
    assert len(state["generators"]) == 5
    following = [dm.strong_view(images) for _ in range(2)]
    resumed = _dm(cifar_dir)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.strong_view(images), f) for f in following)

    old = {"generators": state["generators"][:4]}       # written before the strong views existed
    late = _dm(cifar_dir)
    late.strong_view(images)                              # moved on: the load must put it back to its seed
    late.load_state_dict(old)
    assert torch.equal(late.strong_view(images), _dm(cifar_dir).strong_view(images))
    assert all(torch.equal(a.get_state(), b) for a, b in zip(late._generators[:4], old["generators"]))
    from sskt_lightning.data import ImageDataModule
    pending = ImageDataModule("cifar10", cifar_dir, batch_size=8, val_size=16, download=False,
                              labels_per_class=2, unlabeled=True)
    pending.load_state_dict(old)                          # before setup: applied by setup
    pending.setup("fit")
    assert torch.equal(pending.strong_view(images), _dm(cifar_dir).strong_view(images))
    with pytest.raises(ConfigError, match="3 data sampler states, this data module has 5"):
        _dm(cifar_dir).load_state_dict({"generators": state["generators"][:3]})


# ------------------------------------------------------------------ the capability and the harness
def test_the_capability_defaults_off_and_the_harness_refuses_it_without_an_unlabeled_stream(cifar_dir):
    from sskt_lightning.methods.base import Method, enable_strong_views
    from sskt_lightning.methods.scratch import Scratch
    assert Method.strong_views is False
    method = Scratch()
    dm = _dm(cifar_dir)
    enable_strong_views(method, dm)
    assert dm.strong_views is False
    method.strong_views = True
    enable_strong_views(method, dm)
    assert dm.strong_views is True
    enable_strong_views(method, None)                   # the user's own loaders: nothing to turn on
    with pytest.raises(ConfigError, match=r"data\.unlabeled=true"):
        enable_strong_views(method, _dm(cifar_dir, unlabeled=False, labels_per_class=None))


def test_a_users_trainer_turns_strong_views_on_before_the_first_batch(cifar_dir, tmp_path):
    from small_trainer import small_trainer

    from sskt_lightning import TransferModule
    dm = _dm(cifar_dir)
    module = TransferModule.from_options(data=dm, method="scratch")
    module.method.strong_views = True          # as a method's constructor may set it
    seen = []
    step = module.method.training_step

    def recording(mod, batch):
        seen.append({k: tuple(v.shape) if torch.is_tensor(v) else tuple(v[0].shape) for k, v in batch.items()})
        return step(mod, batch)

    module.method.training_step = recording
    trainer = small_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert len(seen) == 2
    assert all(s["unlabeled_strong"] == s["unlabeled"] == (8, 3, 32, 32) for s in seen)


def test_the_command_line_refuses_strong_views_without_data_unlabeled(tmp_path, cifar_dir, monkeypatch):
    from sskt_lightning.compose import compose_config
    from sskt_lightning.methods.scratch import Scratch
    from sskt_lightning.train import run
    monkeypatch.setattr(Scratch, "strong_views", True)
    cfg = compose_config(["data=cifar10", "model=resnet20", "trainer=cpu", "trainer.max_epochs=1",
                          "method=scratch", "data.batch_size=8", "data.val_size=16", "data.num_workers=0",
                          f"paths.data_dir={cifar_dir}"], tmp_path)
    with pytest.raises(ConfigError, match=r"set data\.unlabeled=true"):
        run(cfg)


@pytest.mark.parametrize("c,h,w", [(1, 28, 28), (3, 12, 10)])
def test_the_batched_rendering_equals_each_images_ops_applied_one_at_a_time(c, h, w):
    """The batch is rendered op by op over groups of images; the same draw, image by image: crop,
    op 1, op 2 with their magnitudes mapped into the ranges, then the Cutout box."""
    x = _images(64, c, h, w)
    aug = StrongAugment()
    d = aug.draw(64, _gen(3))
    out = aug.apply(x, d)
    cropped = aug.crop.apply(x, d.view)
    boxes = cutout_boxes(d.cut, h, w)
    for i in range(64):
        img = cropped[i:i + 1]
        for k in range(2):
            name, low, high = RA_OPS[int(d.ops[i, k])]
            img = apply_op(name, img, low + (high - low) * float(d.mags[i, k]))
        assert torch.equal(out[i:i + 1], cutout(img, boxes[i:i + 1])), i


def test_a_resumed_fit_replays_the_strong_views_bit_for_bit(tmp_path, cifar_dir):
    """Lightning saves the data module's generators in the checkpoint: epoch 2 of a run resumed from
    epoch 1's checkpoint sees the same strong views as epoch 2 of an uninterrupted run."""
    from small_trainer import small_trainer

    from sskt_lightning import TransferModule

    def fit(epochs, ckpt=None, save=None):
        dm = _dm(cifar_dir)
        module = TransferModule.from_options(data=dm, method="scratch")
        module.method.strong_views = True
        seen, step = [], module.method.training_step

        def recording(mod, batch):
            seen.append((mod.current_epoch, batch["unlabeled_strong"].clone()))
            return step(mod, batch)

        module.method.training_step = recording
        trainer = small_trainer(tmp_path, max_epochs=epochs, limit_train_batches=2, limit_val_batches=0)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return [x for epoch, x in seen if epoch == 1]

    straight = fit(2)
    fit(1, save=tmp_path / "epoch1.ckpt")
    resumed = fit(2, ckpt=tmp_path / "epoch1.ckpt")
    assert len(straight) == len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
