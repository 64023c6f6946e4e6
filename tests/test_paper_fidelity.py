"""Paper fidelity (issue #11): each piece checked against numbers of the authors' reference code --
the CIFAR ResNets (option-A shortcuts, fan-in init, parameter counts), the transfer module's sizes,
what the sources see (the reference's upsampling), MAXL's optimizer settings and its virtual step."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import sskt_lightning  # noqa: F401  (registers cifar_* with timm)
from sskt_lightning.compose import compose_config
from sskt_lightning.errors import ConfigError
from sskt_lightning.heads import MLPHead, TransferHead, build_head, transfer_module_sizes
from sskt_lightning.methods.maxl import MAXL, VirtualSGD, virtual_sgd_rules
from sskt_lightning.nets.cifar_resnet import ZeroPadShortcut
from sskt_lightning.nets.factory import TappedNet, create_network
from sskt_lightning.sources import ReferenceInputAdapter, SourceSpec, build_source
from sskt_lightning.train import CONFIG_DIR

PAPER = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment" / "paper").glob("*.yaml"))
CIFAR_DATA = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "in_chans": 3,
              "image_size": [32, 32], "num_classes": 10}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------- 1. CIFAR ResNets
@pytest.mark.parametrize("name,option_a,option_b", [("cifar_resnet20", 269_722, 272_474),
                                                    ("cifar_resnet32", 464_154, 466_906)])
def test_cifar_resnet_parameter_counts_match_the_reference(name, option_a, option_b):
    assert n_params(timm.create_model(name, num_classes=10)) == option_a        # the default: option A
    assert n_params(timm.create_model(name, num_classes=10, shortcut="B")) == option_b


def test_option_a_shortcut_is_subsampled_zero_padded_identity():
    torch.manual_seed(0)
    net = timm.create_model("cifar_resnet20", num_classes=10).eval()
    block = net.layer2[0]
    assert isinstance(block.downsample, ZeroPadShortcut) and n_params(block.downsample) == 0
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in net.modules())
    x = torch.randn(2, 16, 32, 32)
    planes = 32   # the reference: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
    expected = torch.cat([torch.zeros(2, planes // 4, 16, 16), x[:, :, ::2, ::2],
                          torch.zeros(2, planes // 4, 16, 16)], dim=1)
    assert torch.equal(block.downsample(x), expected)
    with torch.no_grad():   # the block adds exactly that to its residual branch
        residual = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(x)))))
        torch.testing.assert_close(block(x), torch.relu(residual + expected))


def test_cifar_resnet_init_is_fan_in_kaiming_on_conv_and_linear():
    torch.manual_seed(0)
    net = timm.create_model("cifar_resnet20", num_classes=1000)
    conv = net.layer3[2].conv2.weight                    # 64 x 64 x 3 x 3: fan-in 576, fan-out 576
    conv_in = net.layer2[0].conv1.weight                 # 32 x 16 x 3 x 3: fan-in 144, fan-out 288
    assert conv.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.03)
    assert conv_in.std().item() == pytest.approx(math.sqrt(2 / 144), rel=0.05)
    assert net.fc.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.03)   # 64 000 weights
    net.reset_classifier(500)
    assert net.fc.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    # the ImageNet-width CIFAR ResNets keep torchvision's fan-out convs and their projections
    r18 = timm.create_model("cifar_resnet18", num_classes=10)
    w = r18.layer2[0].conv1.weight                       # 128 x 64 x 3 x 3: fan-out 1152
    assert w.std().item() == pytest.approx(math.sqrt(2 / 1152), rel=0.03)
    assert isinstance(r18.layer2[0].downsample[0], nn.Conv2d)
    assert n_params(timm.create_model("cifar_resnet18", num_classes=10)) == 11_173_962


def test_shortcut_option_from_the_config_and_its_errors(tmp_path):
    cfg = compose_config(["model=resnet20", "+model.kwargs.shortcut=B"], tmp_path)
    net = create_network(cfg.model.name, 10, image_size=32, **cfg.model.kwargs)
    assert n_params(net) == 272_474
    with pytest.raises(ConfigError, match="shortcut"):
        timm.create_model("cifar_resnet20", shortcut="C")
    with pytest.raises(ConfigError, match="init"):
        timm.create_model("cifar_resnet20", init="xavier")


# ---------------------------------------------------------------------------- 2. transfer module
def reference_tm_params(stage_channels, o, m, k, bias=True):
    """The reference's head from its layer shapes: per branch conv1x1 (c->m), BN(m), conv3x3 (m->m),
    BN(m), conv1x1 (m->o), BN(o) -- convs with biases -- then Linear(o, K)."""
    b = 1 if bias else 0
    per_branch = lambda c: (c * m + b * m) + 2 * m + (9 * m * m + b * m) + 2 * m + (m * o + b * o) + 2 * o
    return sum(per_branch(c) for c in stage_channels) + o * k + k


def test_reference_transfer_module_for_an_imagenet_resnet18_target():
    target = TappedNet(create_network("resnet18", 20, image_size=224), tap_stages=True)
    assert target.stage_channels == [64, 128, 256, 512]
    for k, expected in [(1000, 12_505_000), (365, 11_869_365)]:
        head = build_head("transfer_module", target, k, width="reference", conv_bias=True)
        assert reference_tm_params([64, 128, 256, 512], 1000, 500, k) == expected
        assert n_params(head) == expected
    auto = build_head("transfer_module", target, 1000)           # the project's default rule
    assert auto.fc.in_features == 512 and n_params(auto) == reference_tm_params(
        [64, 128, 256, 512], 512, 256, 1000, bias=False)


def test_reference_transfer_module_for_a_cifar_resnet20_target():
    target = TappedNet(create_network("resnet20", 10, image_size=32), tap_stages=True)
    assert target.stage_channels == [16, 32, 64]
    for k, expected in [(1000, 103_528), (365, 62_253)]:
        head = build_head("transfer_module", target, k, width="reference", conv_bias=True)
        assert reference_tm_params([16, 32, 64], 64, 32, k) == expected
        assert n_params(head) == expected


def test_reference_width_rule():
    assert transfer_module_sizes(64, None, None, "reference") == (64, 32)      # CIFAR ResNets
    assert transfer_module_sizes(512, None, None, "reference") == (1000, 500)  # ResNet-18/34
    assert transfer_module_sizes(2048, None, None, "reference") == (1000, 500)  # ResNet-50
    assert transfer_module_sizes(512, None, None, "auto") == (512, 256)
    with pytest.raises(ConfigError, match="tm_width"):
        transfer_module_sizes(64, None, None, "paper")


@pytest.mark.parametrize("row,channels,o", [("voc2007_resnet18", [64, 128, 256, 512], 1000),
                                            ("cifar10_resnet20", [16, 32, 64], 64)])
def test_paper_configs_build_the_reference_heads(row, channels, o, tmp_path):
    cfg = compose_config([f"experiment=paper/{row}"], tmp_path)
    method = instantiate({k: v for k, v in OmegaConf.to_container(cfg.method).items() if k != "name"})
    size = 224 if row.startswith("voc") else 32
    target = TappedNet(create_network(cfg.model.name, 20, image_size=size, **cfg.model.kwargs), tap_stages=True)
    head = build_head(method.aux_head, target, 1000, method.tm_out, method.tm_mid, method.tm_width, method.tm_bias)
    assert isinstance(head, TransferHead) and target.stage_channels == channels
    assert n_params(head) == reference_tm_params(channels, o, o // 2, 1000)
    assert method.source_bn == "train" and method.aux_loss == "ce"
    assert (method.alpha, method.temperature) == (0.1, 3.0)


# ---------------------------------------------------------------------------- 3. what the source sees
def test_reference_adapter_is_the_reference_upsampling_exactly():
    g = torch.Generator().manual_seed(0)
    for size, out in [(32, 74), (96, 224)]:
        x = torch.randn(2, 3, size, size, generator=g)
        y = ReferenceInputAdapter()(x)
        assert y.shape[-2:] == (out, out)
        assert torch.equal(y, F.interpolate(x, scale_factor=7 / 3, mode="bilinear", align_corners=False))
        assert torch.equal(y, nn.Upsample(scale_factor=7 / 3, mode="bilinear")(x))
        # the scale is used as given: for 32 px, resizing to 74 px samples a different grid
        # (32/74 != 3/7); for 96 px the two agree (96/224 == 3/7)
        resized = F.interpolate(x, size=(out, out), mode="bilinear", align_corners=False)
        assert torch.allclose(y, resized) == (size == 96)
    x = torch.randn(2, 3, 224, 224, generator=g)
    assert ReferenceInputAdapter(1.0)(x) is x      # VOC: no resize, no re-normalisation


def test_reference_adapter_does_not_renormalise_and_its_signature():
    x = torch.full((1, 3, 32, 32), -1.7)
    torch.testing.assert_close(ReferenceInputAdapter()(x), torch.full((1, 3, 74, 74), -1.7))
    sig = ReferenceInputAdapter().signature()
    assert sig == {"kind": "reference", "scale_factor": 7 / 3, "mode": "bilinear", "align_corners": False,
                   "recompute_scale_factor": None, "antialias": False, "normalise": False, "channels": 3}
    assert ReferenceInputAdapter(2.0).signature() != sig


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_build_source_with_the_reference_adapter():
    spec = SourceSpec.from_config("s", {"name": "cifar_resnet20", "pretrained": False, "num_classes": 5,
                                        "adapter": "reference", "scale_factor": 7 / 3})
    src = build_source(spec, CIFAR_DATA)
    assert isinstance(src.adapter, ReferenceInputAdapter) and src.adapter.scale_factor == 7 / 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = src.net(F.interpolate(x, scale_factor=7 / 3, mode="bilinear", align_corners=False))
    torch.testing.assert_close(src(x), expected)
    default = build_source(SourceSpec.from_config("s", {"name": "cifar_resnet20", "pretrained": False,
                                                        "num_classes": 5, "adapter": "reference"}), CIFAR_DATA)
    assert default.adapter.scale_factor == 7 / 3


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.parametrize("options,data,match", [
    ({"adapter": "reference"}, {**CIFAR_DATA, "mean": [0.5], "std": [0.5], "in_chans": 1}, "adapter=project"),
    ({"adapter": "reference", "input_size": 74}, CIFAR_DATA, "input_size=null"),
    ({"scale_factor": 2.0}, CIFAR_DATA, "adapter=reference only"),
    ({"adapter": "paper"}, CIFAR_DATA, "choose 'project'"),
    ({"adapter": "reference", "scale_factor": -1}, CIFAR_DATA, "positive"),
])
def test_reference_adapter_errors(options, data, match):
    spec = SourceSpec.from_config("s", {"name": "cifar_resnet20", "pretrained": False, "num_classes": 5, **options})
    with pytest.raises(ConfigError, match=match):
        build_source(spec, data)


@pytest.mark.slow
def test_paper_configs_use_the_reference_adapter(tmp_path):
    for row in PAPER:
        cfg = compose_config([f"experiment=paper/{row}"], tmp_path)
        for key, opts in cfg.source.items():
            assert opts.adapter == "reference" and opts.input_size is None, (row, key)
            assert opts.scale_factor == (1.0 if row.startswith("voc") else 7 / 3), (row, key)
            assert opts.name, (row, key)       # the full source config, not an orphan override
    plain = compose_config(["source=[imagenet_resnet50,places365_resnet50]"], tmp_path)
    assert all(opts.adapter == "project" for opts in plain.source.values())   # the default elsewhere
    # a row's sources are one list: the KD column replaces it with its teacher, nothing left behind
    kd = compose_config(["experiment=paper/cifar10_resnet20", "method=kd", "source=[checkpoint]",
                         "source.checkpoint.weights=teacher.ckpt"], tmp_path)
    assert list(kd.source) == ["checkpoint"] and kd.source.checkpoint.adapter == "project"


# ---------------------------------------------------------------------------- 4. MAXL
def test_maxl_generator_optimizer_is_the_references_plain_sgd(tmp_path):
    cfg = compose_config(["method=maxl"], tmp_path)
    assert dict(cfg.method.generator_optim) == {"lr": 1e-3, "momentum": 0.0, "weight_decay": 5e-4,
                                                "nesterov": False, "step_size": 50, "gamma": 0.5}
    assert MAXL().generator_optim_cfg["momentum"] == 0.0
    paper = compose_config(["method=paper/maxl"], tmp_path)
    assert paper.method.aux_head == "mlp" and paper.method.lr_inner == 0.01
    assert dict(paper.method.lr_inner_decay) == {"every": 50, "factor": 0.5}
    assert dict(paper.method.generator_optim) == dict(cfg.method.generator_optim)
    reference_optim = compose_config(["optim=maxl"], tmp_path).optim
    assert (reference_optim.optimizer.lr, reference_optim.optimizer.momentum,
            reference_optim.optimizer.weight_decay) == (0.01, 0.0, 0.0)
    assert (reference_optim.scheduler.step_size, reference_optim.scheduler.gamma) == (50, 0.5)


def test_mlp_aux_head_and_inner_lr_decay():
    from types import SimpleNamespace
    target = TappedNet(create_network("cifar_resnet20", 4), tap_pooled=True)
    module = SimpleNamespace(target=target, multi_label=False, current_epoch=0,
                             cfg=OmegaConf.create({"model": {"name": "resnet20", "kwargs": {}}}),
                             data_info={"image_size": [32, 32], "in_chans": 3, "num_classes": 4})
    method = MAXL(psi=5, aux_head="mlp", lr_inner=0.01, lr_inner_decay={"every": 50, "factor": 0.5})
    method.setup(module)
    head = method.aux_head
    assert isinstance(head, MLPHead)
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (64, 64, 20)
    lrs = {}
    for epoch in (0, 49, 50, 99, 100, 150):
        module.current_epoch = epoch
        lrs[epoch] = method.inner_lr(module)
    assert lrs == pytest.approx({0: 0.01, 49: 0.01, 50: 0.005, 99: 0.005, 100: 0.0025, 150: 0.00125})
    with pytest.raises(ConfigError, match="lr_inner_decay needs a fixed method.lr_inner"):
        MAXL(lr_inner_decay={"every": 50, "factor": 0.5})
    with pytest.raises(ConfigError, match="every"):
        MAXL(lr_inner=0.01, lr_inner_decay={"epochs": 50, "factor": 0.5})
    with pytest.raises(ConfigError, match="aux_head"):
        MAXL(aux_head="transfer_module")


@pytest.mark.parametrize("momentum,dampening,nesterov,wd", [(0.0, 0.0, False, 0.0), (0.9, 0.0, False, 5e-4),
                                                            (0.9, 0.0, True, 5e-4), (0.9, 0.1, False, 1e-3)])
def test_virtual_sgd_is_torch_sgd(momentum, dampening, nesterov, wd):
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.3, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd)
    for step in range(3):   # the first step (no buffer yet) and later ones
        grad = torch.randn(5, generator=g, dtype=torch.float64)
        rule = virtual_sgd_rules(opt, {"p": p})["p"]
        expected = p.detach() - 0.3 * rule.direction(p.detach(), grad)
        p.grad = grad.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-14)
        # the slope of the update in the gradient
        e = torch.zeros(5, dtype=torch.float64)
        e[0] = 1.0
        slope = (rule.direction(p.detach(), grad + e) - rule.direction(p.detach(), grad))[0].item()
        assert slope == pytest.approx(rule.grad_scale(), abs=1e-12), step


def test_virtual_sgd_rules_refuse_other_optimizers():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match="inner_update=plain"):
        virtual_sgd_rules(torch.optim.Adam([p]), {"p": p})
    assert VirtualSGD().direction(p, torch.ones(2)).tolist() == [1.0, 1.0]   # the plain rule


# the tiny MAXL set-up of test_maxl.py, with a multi-task optimizer that has momentum + weight decay
def _tiny(seed=0):
    from test_maxl import batch, tiny_maxl
    method, module = tiny_maxl([1, 2, 3], entropy_weight=0.2, seed=seed)
    x, y = batch()
    return method, module, x, y


def _sgd_with_state(method, module, x, y, **hyper):
    """A real SGD multi-task optimizer (target + aux head) after one real step, so momentum buffers exist."""
    opt = torch.optim.SGD([*module.target.parameters(), *method.aux_head.parameters()], lr=0.1, **hyper)
    out = module.target(x)
    loss, _, _ = method.multitask_loss(out, y, method.generator_output(x, y).detach())
    opt.zero_grad()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return opt


def _gen_loss_after_a_real_step(method, module, opt, x, y, lr, w=0.2):
    """L_gen the long way: copy the multi-task net and its optimizer state, take one REAL optimizer step
    on L(theta1) with g's labels, evaluate the primary focal loss there, add the entropy term."""
    net, head = copy.deepcopy(module.target), copy.deepcopy(method.aux_head)
    opt2 = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=lr)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))   # step() updates buffers in place
    for group in opt2.param_groups:
        group["lr"] = lr
    gen = method.generator_output(x, y)
    out = net(x)
    loss, _, _ = method.multitask_loss(out, y, gen.detach())
    opt2.zero_grad()
    loss.backward()
    opt2.step()
    ybar = gen.mean(0)
    return (method.primary_loss(net.net(x), y) + w * (ybar * ybar.log()).sum()).detach()


@pytest.mark.parametrize("nesterov", [False, True])
def test_meta_gradient_under_momentum_and_weight_decay(nesterov):
    method, module, x, y = _tiny()
    lr = 0.5
    opt = _sgd_with_state(method, module, x, y, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    rules = virtual_sgd_rules(opt, method._net_params(module.target))
    assert all(r.buffer is not None and r.momentum == 0.9 and r.weight_decay == 5e-4 for r in rules.values())
    gen_params = list(method.generator.parameters())
    # the second-order objective is L_gen at the step the real optimizer takes
    objective, _ = method.generator_objective(module.target, x, y, lr, meta="second_order", rules=rules)
    torch.testing.assert_close(objective.detach(), _gen_loss_after_a_real_step(method, module, opt, x, y, lr))
    flat = {}
    for meta, r in [("second_order", rules), ("first_order", rules), ("first_order_plain", None)]:
        obj, _ = method.generator_objective(module.target, x, y, lr, meta=meta.removesuffix("_plain"), rules=r)
        flat[meta] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(obj, gen_params)])
    second, first, plain = flat["second_order"], flat["first_order"], flat["first_order_plain"]
    assert second.norm() > 1e-4
    assert F.cosine_similarity(first, second, dim=0) > 0.99
    assert (first.norm() / second.norm()).item() == pytest.approx(1.0, abs=0.05)
    # ignoring the optimizer's rule (theta - lr * grad) misses the gradient the real step has
    assert (plain - second).norm() > 5 * (first - second).norm()


def test_second_order_meta_gradient_under_momentum_matches_finite_differences():
    method, module, x, y = _tiny(seed=3)
    lr = 0.5
    opt = _sgd_with_state(method, module, x, y, momentum=0.9, weight_decay=5e-4)
    rules = virtual_sgd_rules(opt, method._net_params(module.target))
    objective, _ = method.generator_objective(module.target, x, y, lr, meta="second_order", rules=rules)
    names = [n for n, _ in method.generator.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(objective, list(method.generator.parameters()))))
    h, checked = 1e-6, 0
    for name, idx in [("conv.weight", 7), ("conv.weight", 40), ("fc.weight", 3), ("fc.bias", 2), ("bn.weight", 1)]:
        p = dict(method.generator.named_parameters())[name]
        old = p.view(-1)[idx].item()
        values = []
        for v in (old + h, old - h):
            with torch.no_grad():
                p.view(-1)[idx] = v
            values.append(_gen_loss_after_a_real_step(method, module, opt, x, y, lr).item())
        with torch.no_grad():
            p.view(-1)[idx] = old
        numeric = (values[0] - values[1]) / (2 * h)
        assert grads[name].view(-1)[idx].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9), (name, idx)
        checked += abs(numeric) > 1e-6
    assert checked >= 3


# ---------------------------------------------------------------------------- 5. paper configs
@pytest.mark.parametrize("row", PAPER)
def test_paper_config_headers_state_their_differences(row, tmp_path):
    text = (Path(CONFIG_DIR) / "experiment" / "paper" / f"{row}.yaml").read_text()
    assert "Published" in text and "Differences kept on purpose" in text and "kd_reference" in text
    cfg = compose_config([f"experiment=paper/{row}"], tmp_path)
    assert cfg.method.name == "sskt" and cfg.method.tm_width == "reference" and cfg.method.tm_bias
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.optim.optimizer.lr) == (200, 128, 0.1)
    assert cfg.optim.optimizer.momentum == 0.9
    assert cfg.optim.optimizer.weight_decay == (1e-4 if row.startswith("voc") else 5e-4)
    assert list(cfg.optim.scheduler.fractions) == [0.3, 0.6, 0.8] and cfg.optim.scheduler.gamma == 0.2


def test_the_other_columns_compose_on_a_paper_row(tmp_path):
    """The paper rows set no method option, so every method composes on them (a method-specific key
    in an experiment would break the others)."""
    for method, name in [("scratch", "scratch"), ("paper/maxl", "maxl"), ("kd", "kd"), ("dml", "dml")]:
        cfg = compose_config(["experiment=paper/cifar10_resnet20", f"method={method}"], tmp_path)
        assert cfg.method.name == name
        method_cfg = {k: v for k, v in OmegaConf.to_container(cfg.method).items() if k != "name"}
        instantiate(method_cfg, _convert_="all")   # no unknown keyword reaches the constructor
