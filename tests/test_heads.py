"""Auxiliary heads on every registered CIFAR net and one timm net: shapes and stage taps."""
import pytest
import timm
import torch

from sskt_lightning.heads import LinearHead, TransferHead, build_head, transfer_module_sizes
from sskt_lightning.nets.factory import TappedNet, create_network, resolve_model_name, stage_modules
from sskt_lightning.errors import ConfigError

CIFAR_NETS = timm.list_models("cifar_*")


@pytest.mark.parametrize("name", CIFAR_NETS + ["resnet18"])
def test_heads_shapes_on_every_net(name):
    net = create_network(name, num_classes=10, in_chans=3)
    tapped = TappedNet(net, tap_pooled=True, tap_stages=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = tapped(x)
        assert out.logits.shape == (2, 10)
        assert out.pooled.shape == (2, tapped.num_features)
        assert [f.shape[1] for f in out.stages] == tapped.stage_channels
        assert len(out.stages) >= 3
        for kind in ("linear", "mlp", "transfer_module"):
            head = build_head(kind, tapped, num_classes=365).eval()
            assert head(out).shape == (2, 365)


def test_stage_taps_skip_the_stem_of_timm_resnets():
    net = create_network("resnet18", num_classes=5)
    assert [m for m, _ in stage_modules(net)] == ["layer1", "layer2", "layer3", "layer4"]


def test_transfer_module_reference_sizes():
    assert transfer_module_sizes(64, None, None) == (64, 32)       # CIFAR ResNets
    assert transfer_module_sizes(2048, None, None) == (1000, 500)  # ImageNet ResNet-50
    assert transfer_module_sizes(64, 128, 16) == (128, 16)


def test_transfer_module_averages_branch_vectors():
    tm = TransferHead([4, 8], num_classes=3, out_dim=6, mid_dim=2).eval()
    feats = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    from sskt_lightning.nets.factory import NetOutput
    vectors = [b(f) for b, f in zip(tm.branches, feats)]
    expected = tm.fc((vectors[0] + vectors[1]) / 2)
    # the same modules on the same tensors; only the averaging may round differently (1 ulp), which the
    # small fc carries through: allclose's rtol 1e-5 + atol 1e-6 is ~80 float32 ulp, on any CPU
    assert torch.allclose(tm(NetOutput(None, None, feats)), expected, atol=1e-6)
    # each branch: conv1x1 -> conv3x3 stride 2 -> conv1x1, each with BN + ReLU, then GAP
    convs = [m for m in tm.branches[0].modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.in_channels, c.out_channels) for c in convs] == [
        ((1, 1), (1, 1), 4, 2), ((3, 3), (2, 2), 2, 2), ((1, 1), (1, 1), 2, 6)]


def test_transfer_head_keeps_its_checkpoint_keys_and_its_own_name():
    """The head class was renamed (TransferModule -> TransferHead, the LightningModule's name); the
    state-dict keys checkpoints store are those of its attributes and stay as they were."""
    from sskt_lightning import heads
    keys = list(TransferHead([4, 8], num_classes=3, out_dim=6, mid_dim=2, conv_bias=True).state_dict())
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert keys == [f"branches.{b}.{c}.{k}" for b in (0, 1) for c in (0, 1, 2)
                    for k in ["0.weight", "0.bias", *(f"1.{n}" for n in bn)]] + ["fc.weight", "fc.bias"]
    assert not hasattr(heads, "TransferModule")


def test_hooks_do_not_accumulate_outside_forward():
    tapped = TappedNet(create_network("cifar_resnet20", 10), tap_pooled=True, tap_stages=True)
    with torch.no_grad():
        tapped.net(torch.randn(1, 3, 32, 32))
    assert tapped._stages == [] and tapped._pooled is None


def test_model_name_resolution_rule():
    assert resolve_model_name("resnet18", 32) == "cifar_resnet18"
    assert resolve_model_name("resnet18", 96) == "resnet18"
    assert resolve_model_name("resnet20", 96) == "cifar_resnet20"   # no ImageNet ResNet-20 exists
    assert resolve_model_name("resnet50.tv_in1k", 32) == "resnet50.tv_in1k"
    assert resolve_model_name("vgg16_bn", 32) == "cifar_vgg16_bn"


def test_unknown_model_is_refused_with_suggestions():
    with pytest.raises(ConfigError, match=r"Unknown model 'resnet2O'.*Did you mean"):
        create_network("resnet2O", num_classes=10)


def test_one_channel_input():
    tapped = TappedNet(create_network("resnet18", 4, in_chans=1, image_size=28), tap_stages=True)
    with torch.no_grad():
        out = tapped(torch.randn(2, 1, 28, 28))
    assert out.logits.shape == (2, 4)
    head = LinearHead(tapped.num_features, 7)
    assert head.fc.in_features == 512
