"""CIFAR-style nets: timm registration, the timm-style interface, feature_info and sizes."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import sskt_lightning.nets  # noqa: F401  (registers cifar_* with timm)
from sskt_lightning.errors import WeightsError

EXPECTED = {
    "cifar_resnet18", "cifar_resnet20", "cifar_resnet32", "cifar_resnet34", "cifar_resnet44",
    "cifar_resnet50", "cifar_resnet56", "cifar_resnet110", "cifar_vgg16_bn", "cifar_wrn16_2",
    "cifar_wrn40_2",
}
NAMES = timm.list_models("cifar_*")

# Published parameter counts (10 classes); checked to +-5%.
PARAMS_M = {
    "cifar_resnet20": 0.27, "cifar_resnet32": 0.46, "cifar_resnet44": 0.66, "cifar_resnet56": 0.85,
    "cifar_resnet110": 1.7, "cifar_resnet18": 11.2, "cifar_resnet50": 23.5, "cifar_vgg16_bn": 14.7,
    "cifar_wrn40_2": 2.2, "cifar_wrn16_2": 0.69,
    # CIFAR ResNet-34 (3x3 stem, no max-pool, BasicBlocks [3, 4, 6, 3], widths 64..512): 21,282,122 by
    # the hand formula of test_basic_block_resnet_param_counts_match_the_hand_formula, the count
    # published for kuangliu/pytorch-cifar's ResNet34
    "cifar_resnet34": 21.3,
}
N_STAGES = {"resnet18": 4, "resnet34": 4, "resnet50": 4, "vgg16_bn": 5, "wrn16_2": 3, "wrn40_2": 3}

_cache: dict = {}


def cached(name: str) -> nn.Module:
    """A shared eval-mode 10-class 3-channel instance for read-only tests."""
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = timm.create_model(name, num_classes=10).eval()
    return _cache[name]


def capture_stages(model: nn.Module, x: torch.Tensor):
    """Forward ``x`` with hooks on every feature_info module; return (outputs, call counts, result)."""
    outs: dict = {}
    calls: dict = {}
    handles = []
    for info in model.feature_info:
        name = info["module"]

        def hook(_mod, _inp, out, name=name):
            calls[name] = calls.get(name, 0) + 1
            outs[name] = out

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        feats = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return outs, calls, feats


def test_registry_lists_exactly_the_cifar_nets():
    assert sorted(NAMES) == sorted(EXPECTED)
    assert len(NAMES) == 11


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_chans", [3, 1])
def test_output_shape_and_pretrained_cfg(name, in_chans):
    model = cached(name) if in_chans == 3 else timm.create_model(name, num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        y = model(torch.randn(2, in_chans, 32, 32))
    assert y.shape == (2, 10)
    assert model.num_classes == 10
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (in_chans, 32, 32)
    assert isinstance(cfg["mean"], tuple) and len(cfg["mean"]) == in_chans
    assert isinstance(cfg["std"], tuple) and len(cfg["std"]) == in_chans
    if in_chans == 3:
        assert cfg["mean"] == pytest.approx((0.4914, 0.4822, 0.4465))
        assert cfg["std"] == pytest.approx((0.2470, 0.2435, 0.2616))
    else:
        assert cfg["mean"] == (0.5,) and cfg["std"] == (0.5,)
    assert cfg["num_classes"] == 10
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, nn.Conv2d) and first.in_channels == in_chans


@pytest.mark.parametrize("name", NAMES)
def test_feature_info_matches_hooked_tensors(name):
    model = cached(name)
    short = name.removeprefix("cifar_")
    assert len(model.feature_info) == N_STAGES.get(short, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs, calls, feats = capture_stages(model, x)
    for info in model.feature_info:
        assert set(info) >= {"num_chs", "reduction", "module"}
        assert calls[info["module"]] == 1, f"{info['module']} must run exactly once per forward"
        out = outs[info["module"]]
        assert out.ndim == 4
        assert out.shape[1] == info["num_chs"]
        assert out.shape[2] == out.shape[3] == 32 // info["reduction"]
    reductions = [i["reduction"] for i in model.feature_info]
    assert reductions == sorted(reductions) and len(set(reductions)) == len(reductions)
    # The last stage is the feature map forward_features returns, with num_features channels.
    assert torch.equal(outs[model.feature_info[-1]["module"]], feats)
    assert feats.shape[1] == model.num_features == model.feature_info[-1]["num_chs"]


@pytest.mark.parametrize("name", NAMES)
def test_forward_head_and_forward_agree(name):
    model = cached(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        full = model(x)
    assert pooled.shape == (2, model.num_features)
    close32(pooled, feats.mean(dim=(2, 3)))
    assert isinstance(model.get_classifier(), nn.Linear)
    assert model.get_classifier().in_features == model.num_features
    close32(logits, model.get_classifier()(pooled))
    close32(full, logits)


def close32(actual, expected):
    """Two float32 code paths for one value. The untrained deep nets' features reach ~1e9 (resnet110), so
    an absolute 1e-6 held only while both paths ran the very same kernel; rel 1e-5 of the tensor's scale
    (~80 float32 ulp) holds on any CPU and still catches a wrong pooling or head."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet50", "cifar_vgg16_bn", "cifar_wrn16_2"])
def test_reset_classifier(name):
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    assert model.num_classes == 7 and model.pretrained_cfg["num_classes"] == 7
    assert model.get_classifier().out_features == 7
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", NAMES)   # the registry, so a new net without an expected count fails
def test_param_counts(name):
    assert name in PARAMS_M, f"{name} is registered but has no published parameter count in PARAMS_M"
    n = sum(p.numel() for p in cached(name).parameters())
    expected = PARAMS_M[name] * 1e6
    assert abs(n - expected) <= 0.05 * expected, f"{name}: {n / 1e6:.3f}M params, expected ~{PARAMS_M[name]}M"


def basic_block_resnet_params(blocks, classes=10):
    """Parameters of a CIFAR BasicBlock ResNet, by hand: 3x3 stem conv (no bias) + BN, stages of widths
    64/128/256/512 (stride 2 from stage 2), each block two 3x3 convs + two BNs, a 1x1 conv + BN shortcut
    where the shape changes, then a 512 -> classes linear layer with bias."""
    conv3, bn = (lambda i, o: 9 * i * o), (lambda c: 2 * c)
    total, cin = conv3(3, 64) + bn(64), 64
    for width, n in zip((64, 128, 256, 512), blocks):
        for _ in range(n):
            total += conv3(cin, width) + bn(width) + conv3(width, width) + bn(width)
            if cin != width:
                total += cin * width + bn(width)
            cin = width
    return total + 512 * classes + classes


@pytest.mark.parametrize(("name", "blocks", "published"), [("cifar_resnet18", (2, 2, 2, 2), 11_173_962),
                                                            ("cifar_resnet34", (3, 4, 6, 3), 21_282_122)])
def test_basic_block_resnet_param_counts_match_the_hand_formula(name, blocks, published):
    # published: kuangliu/pytorch-cifar's ResNet18/34 counts for 10 classes; the formula reproduces them
    assert basic_block_resnet_params(blocks) == published
    assert sum(p.numel() for p in cached(name).parameters()) == published


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_true_raises_weights_error(name):
    with pytest.raises(WeightsError, match=r"no hub weights.*local weights file") as exc:
        timm.create_model(name, pretrained=True, num_classes=10)
    assert name in str(exc.value)


# One per block type: BasicBlock, Bottleneck, VGG block, wide pre-activation block.
@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet50", "cifar_vgg16_bn", "cifar_wrn16_2"])
def test_gradients_reach_stem_and_hooked_stages(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=1).train()
    x = torch.randn(2, 1, 32, 32)
    outs, _, feats = capture_stages(model, x)
    # Auxiliary heads use the hooked stage outputs: backprop through them must not hit in-place errors.
    loss = model.forward_head(feats).sum() + sum(o.mean() for o in outs.values())
    loss.backward()
    stem = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert stem.weight.grad is not None
    assert stem.weight.grad.abs().sum() > 0


def test_timm_kwargs_are_handled():
    overlay = dict(mean=(0.1, 0.2, 0.3))
    model = timm.create_model(
        "cifar_resnet20", num_classes=100, cache_dir="/nonexistent", pretrained_cfg_overlay=overlay
    )
    assert model.num_classes == 100
    assert model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    assert model.pretrained_cfg["architecture"] == "cifar_resnet20"
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.1, 0.2, 0.3)
    with pytest.raises(TypeError):
        timm.create_model("cifar_resnet20", not_a_real_option=1)


def test_wrn_drop_rate_is_in_block_dropout():
    model = timm.create_model("cifar_wrn16_2", drop_rate=0.3)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 6 and all(d.p == 0.3 for d in drops)  # 2 blocks x 3 stages
    assert not any(isinstance(m, nn.Dropout) for m in timm.create_model("cifar_wrn16_2").modules())


# ---------------------------------------------------------------------------- features_only (timm's)
@pytest.mark.parametrize("name", NAMES)
def test_features_only_returns_the_stage_maps_of_feature_info(name):
    """timm.create_model(name, features_only=True): timm's FeatureListNet over the same stages,
    same weights (same seed) and the same maps as the full net's feature_info modules."""
    from timm.models import FeatureListNet
    torch.manual_seed(0)
    feats_net = timm.create_model(name, features_only=True).eval()
    assert isinstance(feats_net, FeatureListNet)
    full = cached(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = feats_net(x)
        outs, _, _ = capture_stages(full, x)
    info = feats_net.feature_info
    assert len(maps) == len(info.channels()) == len(full.feature_info)
    for m, chs, red, ref in zip(maps, info.channels(), info.reduction(), full.feature_info, strict=True):
        assert m.shape == (2, chs, 32 // red, 32 // red)
        assert (chs, red) == (ref["num_chs"], ref["reduction"])
        assert torch.allclose(m, outs[ref["module"]], atol=1e-5), ref["module"]
    assert not any(isinstance(mod, nn.Linear) for mod in feats_net.modules())   # the head is dropped
    assert "num_classes" not in feats_net.pretrained_cfg


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_vgg16_bn", "cifar_wrn16_2"])
def test_features_only_with_out_indices_and_one_channel(name):
    net = timm.create_model(name, features_only=True, out_indices=(-2, -1), in_chans=1).eval()
    with torch.no_grad():
        maps = net(torch.randn(1, 1, 32, 32))
    assert [m.shape[1] for m in maps] == net.feature_info.channels() == [
        e["num_chs"] for e in cached(name).feature_info[-2:]]
    assert net.pretrained_cfg["input_size"] == (1, 32, 32)


@pytest.mark.slow
def test_package_import_is_light_and_nets_register_on_their_import():
    """`import sskt_lightning` loads neither torch nor timm (the command line starts fast), so it
    registers nothing; `import sskt_lightning.nets` (or anything that builds a net) registers them."""
    import subprocess
    import sys
    code = ("import sys, sskt_lightning; assert 'torch' not in sys.modules and 'timm' not in sys.modules\n"
            "import timm\nassert not timm.list_models('cifar_*')\n"
            "import sskt_lightning.nets\nprint(len(timm.list_models('cifar_*')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(len(EXPECTED))]


@pytest.mark.parametrize("feature_cls", ["dict", "hook"])
def test_features_only_other_timm_feature_classes(feature_cls):
    torch.manual_seed(0)
    net = timm.create_model("cifar_resnet20", features_only=True, feature_cls=feature_cls).eval()
    torch.manual_seed(0)
    ref = timm.create_model("cifar_resnet20", features_only=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, want = net(x), ref(x)
    got = list(got.values()) if isinstance(got, dict) else got
    assert len(got) == len(want) == 3 and all(torch.allclose(a, b) for a, b in zip(got, want))
