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
    assert torch.allclose(pooled, feats.mean(dim=(2, 3)), atol=1e-6)
    assert isinstance(model.get_classifier(), nn.Linear)
    assert model.get_classifier().in_features == model.num_features
    assert torch.allclose(logits, model.get_classifier()(pooled), atol=1e-5)
    assert torch.allclose(full, logits, atol=1e-5)


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


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_param_counts(name):
    n = sum(p.numel() for p in cached(name).parameters())
    expected = PARAMS_M[name] * 1e6
    assert abs(n - expected) <= 0.05 * expected, f"{name}: {n / 1e6:.3f}M params, expected ~{PARAMS_M[name]}M"


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
