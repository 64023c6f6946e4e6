"""Frozen sources: weights from files of every supported format, the input adapter, offline errors."""

import pytest
import torch
from safetensors.torch import save_file

from sskt_lightning.errors import ConfigError, WeightsError
from sskt_lightning.nets.factory import create_network
from sskt_lightning.sources import InputAdapter, SourceSpec, build_source, build_sources

DATA = {"mean": [0.2860], "std": [0.3530], "in_chans": 1, "image_size": [28, 28], "num_classes": 4}


def small_source_file(tmp_path, fmt, num_classes=7, prefix=""):
    net = create_network("cifar_resnet20", num_classes=num_classes)
    sd = {prefix + k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "epoch": 3, "arch": "resnet20"}, path)
    return net, path


@pytest.mark.parametrize("fmt,prefix", [("safetensors", ""), ("pth", "module."), ("pth", "")])
def test_source_from_local_file_takes_class_count_from_weights(tmp_path, fmt, prefix):
    net, path = small_source_file(tmp_path, fmt, num_classes=7, prefix=prefix)
    spec = SourceSpec.from_config("s", {"name": "cifar_resnet20", "weights": str(path)})
    src = build_source(spec, DATA)
    assert src.num_classes == 7
    for k, v in net.state_dict().items():
        assert torch.equal(src.net.state_dict()[k], v), k


def test_source_is_frozen_and_stays_in_eval_mode(tmp_path):
    _, path = small_source_file(tmp_path, "safetensors")
    src = build_source(SourceSpec.from_config("s", {"name": "cifar_resnet20", "weights": str(path)}), DATA)
    src.train()
    assert not src.net.training
    assert all(not p.requires_grad for p in src.parameters())
    out = src(torch.randn(2, 1, 28, 28))
    assert not out.requires_grad and out.shape == (2, 7)


def test_reference_bn_mode_follows_train_mode(tmp_path):
    _, path = small_source_file(tmp_path, "safetensors")
    src = build_source(SourceSpec.from_config("s", {"name": "cifar_resnet20", "weights": str(path)}),
                       DATA, bn_mode="train")
    src.train()
    assert src.net.training
    before = src.net.bn1.running_mean.clone() if hasattr(src.net, "bn1") else None
    src(torch.randn(4, 1, 28, 28))
    if before is not None:
        assert not torch.equal(before, src.net.bn1.running_mean)  # the reference behaviour: stats drift


def test_num_classes_conflict_is_refused(tmp_path):
    _, path = small_source_file(tmp_path, "safetensors", num_classes=7)
    spec = SourceSpec.from_config("s", {"name": "cifar_resnet20", "weights": str(path), "num_classes": 10})
    with pytest.raises(WeightsError, match="num_classes=10 but .* has 7 classes"):
        build_source(spec, DATA)


def test_wrong_architecture_names_the_mismatch(tmp_path):
    _, path = small_source_file(tmp_path, "safetensors")
    spec = SourceSpec.from_config("s", {"name": "cifar_resnet32", "weights": str(path)})
    with pytest.raises(WeightsError, match="do not fit the network.*missing keys"):
        build_source(spec, DATA)


def test_unreadable_or_missing_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="Could not read weights"):
        build_source(SourceSpec.from_config("s", {"name": "cifar_resnet20", "weights": str(bad)}), DATA)
    with pytest.raises(WeightsError, match="does not exist"):
        build_source(SourceSpec.from_config("s", {"name": "cifar_resnet20", "weights": str(tmp_path / "x")}), DATA)


def test_unknown_source_option_is_refused():
    with pytest.raises(ConfigError, match="unknown option"):
        SourceSpec.from_config("s", {"name": "resnet50", "pretrainde": True})


def test_input_adapter_matches_hand_normalisation():
    data_mean, data_std = [0.2860], [0.3530]
    src_mean, src_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    adapter = InputAdapter(data_mean, data_std, src_mean, src_std, src_size=56)
    pixels = torch.rand(2, 1, 28, 28)
    x = (pixels - 0.2860) / 0.3530
    out = adapter(x)
    assert out.shape == (2, 3, 56, 56)
    up = torch.nn.functional.interpolate(pixels, size=(56, 56), mode="bilinear", align_corners=False)
    for c in range(3):
        expected = (up[:, 0] - src_mean[c]) / src_std[c]
        # float32 bilinear resize then affine (or the reverse): a few ulp apart; rtol 1e-5 + atol 1e-5 is
        # >= 80 ulp of these values (|x| <= 2.7), on any CPU
        assert torch.allclose(out[:, c], expected, atol=1e-5)


def test_input_adapter_same_size_three_channels_is_pure_renormalisation():
    adapter = InputAdapter([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 32)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(adapter(x), x * 0.5 + 0.5, atol=1e-6)   # elementwise float32: ~1 ulp apart


def test_offline_hub_weights_fail_fast_with_the_fix(offline, monkeypatch, tmp_path):
    # fast as events, not seconds (a wall-clock limit fails on a loaded machine): offline, the hub is asked
    # in its offline mode (HF_HUB_OFFLINE: it answers from its cache at once instead of retrying for a
    # minute) and nothing sleeps for a back-off. Empty caches: weights cached on this machine must not
    # make the test pass.
    import timm
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    asked_offline, real = [], timm.create_model

    def spy(*args, **kwargs):
        asked_offline.append(constants.HF_HUB_OFFLINE)
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    spec = SourceSpec.from_config("imagenet_resnet18", {"name": "resnet18.tv_in1k", "pretrained": True})
    with pytest.raises(WeightsError) as err:
        build_source(spec, DATA)
    assert asked_offline == [True] and offline.sleeps == [], (asked_offline, offline.sleeps)
    msg = str(err.value)
    assert "source.imagenet_resnet18.weights=" in msg and "pretrained=false" in msg


def test_offline_url_weights_fail_with_the_fix():
    spec = SourceSpec.from_config("places365_resnet50", {
        "name": "resnet50", "pretrained": True, "strip_prefix": ["module."],
        "url": "http://places2.csail.mit.edu/models_places365/resnet50_places365.pth.tar"})
    with pytest.raises(WeightsError, match=r"resnet50_places365.pth.tar.*source.places365_resnet50.weights="):
        build_source(spec, DATA)


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        bank = build_sources({"a": {"name": "cifar_resnet20", "pretrained": False, "num_classes": 5}}, DATA)
    assert bank.num_classes == [5]


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_compile_and_ddp_wrapper_prefixes_are_removed(tmp_path, prefix):
    """timm's clean_state_dict: torch.compile's `_orig_mod.` and DDP's `module.`, in either order."""
    net, path = small_source_file(tmp_path, "pth", num_classes=7, prefix=prefix)
    src = build_source(SourceSpec.from_config("s", {"name": "cifar_resnet20", "weights": str(path)}), DATA)
    for k, v in net.state_dict().items():
        assert torch.equal(src.net.state_dict()[k], v), k


def test_user_prefix_over_a_wrapper_prefix(tmp_path):
    net, path = small_source_file(tmp_path, "safetensors", num_classes=7, prefix="module.backbone.")
    spec = SourceSpec.from_config("s", {"name": "cifar_resnet20", "weights": str(path), "strip_prefix": ["backbone."]})
    src = build_source(spec, DATA)
    assert torch.equal(src.net.state_dict()["fc.weight"], net.state_dict()["fc.weight"])


def test_a_file_with_pickled_objects_is_refused_not_run(tmp_path):
    """Weights files are read with torch.load(weights_only=True) only, never through timm's
    readers (which allow-list argparse.Namespace and suggest weights_only=False)."""
    import argparse
    net = create_network("cifar_resnet20", num_classes=7)
    path = tmp_path / "timm_train.pth.tar"
    torch.save({"state_dict": net.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsError, match="refused to load.*argparse"):
        build_source(SourceSpec.from_config("s", {"name": "cifar_resnet20", "weights": str(path)}), DATA)


def _url_source(tmp_path, monkeypatch, obj):
    """A source whose `url` is a file:// URL to a torch file holding `obj`, with a private hub cache."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))   # not the user's hub cache
    path = tmp_path / "served" / "weights.pth"
    path.parent.mkdir()
    torch.save(obj, path)
    spec = SourceSpec.from_config("s", {"name": "cifar_resnet20", "pretrained": True, "url": path.as_uri()})
    return spec, tmp_path / "hub" / "checkpoints" / "weights.pth"


def test_a_url_serving_pickled_objects_is_refused_and_names_the_cached_copy(tmp_path, monkeypatch):
    """torch.hub keeps whatever it downloaded: the error names that copy to delete and never
    repeats torch's advice to load with weights_only=False."""
    import argparse
    spec, cached = _url_source(tmp_path, monkeypatch, {"args": argparse.Namespace(lr=0.1)})
    with pytest.raises(WeightsError, match="refused to load") as err:
        build_source(spec, DATA)
    msg = str(err.value)
    assert f"delete {cached}" in msg and cached.is_file()
    assert "weights_only=False" not in msg


def test_a_url_serving_a_non_weights_file_names_the_cached_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    served = tmp_path / "notes.pth"
    served.write_text("not a torch file\n")
    spec = SourceSpec.from_config("s", {"name": "cifar_resnet20", "pretrained": True, "url": served.as_uri()})
    with pytest.raises(WeightsError, match="not a weights file") as err:
        build_source(spec, DATA)
    assert f"delete {tmp_path / 'hub' / 'checkpoints' / 'notes.pth'}" in str(err.value)
    assert "weights_only=False" not in str(err.value)


@pytest.mark.parametrize("obj,held", [
    (torch.zeros(4, 3), r"a single tensor of shape \(4, 3\)"),
    ([torch.zeros(2), torch.zeros(3)], "a list of 2 items"),
    ({"state_dict": {0: torch.zeros(2), 1: torch.zeros(3)}}, r"tensors under keys that are not parameter names \(0, 1: int\)"),
])
def test_a_torch_file_that_is_not_a_state_dict_says_what_it_holds(tmp_path, obj, held):
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    spec = SourceSpec.from_config("s", {"name": "cifar_resnet20", "weights": str(path)})
    with pytest.raises(WeightsError, match=f"source.s.weights={path} holds {held}.*torch.save\\(model.state_dict"):
        build_source(spec, DATA)
