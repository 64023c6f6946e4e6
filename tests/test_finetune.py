"""model.weights / model.freeze (sskt_lightning.finetune): the target starts from a file in each format
(.safetensors, .pth, this project's .ckpt, each written by the test in its real format), its classifier
kept when the class count matches and replaced when it does not, clear errors for another
architecture and a missing file; a frozen backbone gets no gradient, no optimizer slot and keeps its
BatchNorm statistics; results.json records the file, its sha256 and the freeze."""
import hashlib
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from sskt_lightning.compose import compose_config
from sskt_lightning.data.formats import CIFAR10_CLASSES
from sskt_lightning.errors import ConfigError
from sskt_lightning.module import TransferModule
from sskt_lightning.nets.factory import create_network
from sskt_lightning.train import run

from small_trainer import small_trainer

SMOKE = ["trainer=smoke", "data.batch_size=8", "data.val_size=16", "data.num_workers=0"]
CIFAR10_INFO = {"name": "cifar10", "num_classes": 10, "in_chans": 3, "image_size": [32, 32],
                "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "multi_label": False,
                "class_names": list(CIFAR10_CLASSES)}
CLASSIFIER = ("fc.weight", "fc.bias")   # the CIFAR ResNets' classifier


def module_for(tmp_path, *overrides, method="scratch"):
    cfg = compose_config(["model=resnet20", f"method={method}", "trainer=cpu", *overrides], tmp_path / "cfg")
    return TransferModule(OmegaConf.to_container(cfg, resolve=True), CIFAR10_INFO)


def random_net(name="cifar_resnet20", num_classes=10, seed=1):
    torch.manual_seed(seed)
    net = create_network(name, num_classes)
    with torch.no_grad():   # BatchNorm statistics that differ from a fresh net's too
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net


def save(net, path):
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def assert_same(got: dict, want: dict, skip=()):
    assert set(got) == set(want)
    for k in want:
        if k not in skip:
            assert torch.equal(got[k], want[k]), k


@pytest.fixture(scope="module")
def project_ckpt(tmp_path_factory):
    """A checkpoint of this project as a run writes it (a scratch resnet20 on tiny CIFAR-10)."""
    from data_fixtures import write_cifar10
    data = tmp_path_factory.mktemp("data")
    write_cifar10(data, n_train=80, n_test=24)
    out = tmp_path_factory.mktemp("scratch")
    results = run(compose_config(["data=cifar10", f"paths.data_dir={data}", "model=resnet20", "method=scratch",
                                  *SMOKE], out))
    return out / results["checkpoints"]["last"], data


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_from_a_file_equal_the_file(tmp_path, suffix):
    net = random_net()
    path = save(net, tmp_path / f"w{suffix}")
    module = module_for(tmp_path, f"model.weights={path}")
    assert_same(module.target.net.state_dict(), net.state_dict())
    assert module.model_settings == {"weights": str(path), "classifier": "from the file",
                                     "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_weights_from_a_checkpoint_of_this_project(tmp_path, project_ckpt):
    ckpt, _ = project_ckpt
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    want = {k[len("target.net."):]: v for k, v in sd.items() if k.startswith("target.net.")}
    assert want and len(want) == len(create_network("cifar_resnet20", 10).state_dict())
    module = module_for(tmp_path, f"model.weights={ckpt}")
    assert_same(module.target.net.state_dict(), want)
    # the same classes, named alike: no warning; other names with the same count: kept, with a warning
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module_for(tmp_path, f"model.weights={ckpt}")
    other = {**CIFAR10_INFO, "class_names": [f"c{i}" for i in range(10)]}
    cfg = compose_config(["model=resnet20", "method=scratch", f"model.weights={ckpt}"], tmp_path / "cfg2")
    with pytest.warns(UserWarning, match=r"classifier is kept .* other class names"):
        TransferModule(OmegaConf.to_container(cfg, resolve=True), other)
    # a checkpoint says its architecture: another model.name is refused with the fix
    with pytest.raises(ConfigError, match=r"checkpoint of a cifar_resnet20 target.*builds cifar_resnet32.*"
                                          r"set model.name=cifar_resnet20"):
        module_for(tmp_path, "model=resnet32", f"model.weights={ckpt}")


def test_classifier_replaced_when_the_class_count_differs(tmp_path):
    net = random_net(num_classes=100)
    path = save(net, tmp_path / "w100.pth")
    torch.manual_seed(0)
    module = module_for(tmp_path, f"model.weights={path}")
    got, want = module.target.net.state_dict(), net.state_dict()
    assert_same(got, want, skip=CLASSIFIER)
    assert got["fc.weight"].shape == (10, 64) and got["fc.bias"].shape == (10,)
    # the replacement is the freshly built 10-class net's own classifier (same seed, same init)
    torch.manual_seed(0)
    fresh = create_network("cifar_resnet20", 10).state_dict()
    assert torch.equal(got["fc.weight"], fresh["fc.weight"])
    assert module.target.num_classes == 10 and module.model_settings["classifier"] == "replaced"


def test_classifier_kept_when_the_class_count_matches(tmp_path):
    net = random_net(num_classes=10)
    module = module_for(tmp_path, f"model.weights={save(net, tmp_path / 'w10.pth')}")
    for k in CLASSIFIER:
        assert torch.equal(module.target.net.state_dict()[k], net.state_dict()[k])


def test_another_architecture_is_refused_naming_keys_and_fix(tmp_path):
    path = save(random_net("cifar_resnet32"), tmp_path / "r32.pth")
    with pytest.raises(ConfigError) as err:
        module_for(tmp_path, f"model.weights={path}")
    text = str(err.value)
    assert f"model.weights={path} does not fit model.name=cifar_resnet20" in text
    assert "unexpected keys ['layer1.3." in text          # resnet32 has 5 blocks per stage, resnet20 3
    assert "set model.name to the one it was saved from" in text
    wide = save(random_net("cifar_resnet56"), tmp_path / "r56.pth")
    with pytest.raises(ConfigError, match="unexpected keys"):
        module_for(tmp_path, f"model.weights={wide}")


def test_a_missing_or_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.weights=.*nope.pth: the file does not exist"):
        module_for(tmp_path, f"model.weights={tmp_path / 'nope.pth'}")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ConfigError, match="not a dict of named tensors"):
        module_for(tmp_path, f"model.weights={tmp_path / 'tensor.pth'}")


# ---------------------------------------------------------------------------- freezing
def batches(n=16, bs=8):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g) * 2 + 1, torch.arange(n) % 10, torch.arange(n))
    return DataLoader(ds, batch_size=bs)


def fit(module, root):
    trainer = small_trainer(root, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=batches())
    return trainer


@pytest.mark.parametrize("freeze", [True, False])
def test_a_frozen_backbone_keeps_weights_and_batchnorm_statistics(tmp_path, freeze):
    """Frozen: only the classifier requires gradients, is in the optimizer and changes; the backbone's
    BatchNorm runs in eval mode during training and its running statistics stay the file's. Not
    frozen (the control): both change."""
    net = random_net()
    path = save(net, tmp_path / "w.pth")
    module = module_for(tmp_path, f"model.weights={path}", *(["model.freeze=backbone"] if freeze else []))
    before = {k: v.clone() for k, v in module.target.net.state_dict().items()}
    modes = []
    bn = next(m for m in module.target.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.register_forward_pre_hook(lambda m, _: modes.append(m.training))
    trainer = fit(module, tmp_path)
    after = module.target.net.state_dict()
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    trainable = {n for n, p in module.target.net.named_parameters() if p.requires_grad}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert set(CLASSIFIER) <= changed
    if freeze:
        assert trainable == set(CLASSIFIER)
        assert optimized == {id(p) for p in module.target.net.fc.parameters()}
        assert changed == set(CLASSIFIER), sorted(changed - set(CLASSIFIER))[:4]
        assert modes and not any(modes)              # BatchNorm normalised with its running statistics
        assert module.model_settings["freeze"] == "backbone"
        module.train()
        assert not bn.training and module.target.net.fc.training   # train() keeps the backbone in eval
    else:
        assert len(trainable) == len(list(module.target.net.parameters()))
        assert any(k.endswith("running_mean") for k in changed) and any(k.startswith("conv1") for k in changed)
        assert modes and all(modes)


def test_freeze_needs_weights_and_a_known_value(tmp_path):
    with pytest.raises(ConfigError, match=r"model.freeze=backbone.*random weights.*model.weights=<file>"):
        module_for(tmp_path, "model.freeze=backbone")
    path = save(random_net(), tmp_path / "w.pth")
    with pytest.raises(ConfigError, match=r"model.freeze='head'; choose null .* backbone"):
        module_for(tmp_path, f"model.weights={path}", "model.freeze=head")


# ---------------------------------------------------------------------------- end to end
def test_fine_tune_run_records_the_file_and_its_hash(tmp_path, project_ckpt):
    """A linear probe from a project checkpoint through the CLI's run(): results.json names the file,
    its sha256 and the freeze; the trained checkpoint's backbone is the file's."""
    ckpt, data = project_ckpt
    out = tmp_path / "probe"
    results = run(compose_config(["data=cifar10", f"paths.data_dir={data}", "model=resnet20", "method=scratch",
                                  f"model.weights={ckpt}", "model.freeze=backbone", *SMOKE], out))
    assert results["status"] == "ok"
    settings = json.loads((out / "results.json").read_text())["model_settings"]
    assert settings == {"weights": str(ckpt), "weights_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
                        "classifier": "from the file", "freeze": "backbone"}
    start = torch.load(ckpt, weights_only=True)["state_dict"]
    end = torch.load(out / results["checkpoints"]["last"], weights_only=True)["state_dict"]
    backbone = [k for k in start if k.startswith("target.net.") and not k.startswith("target.net.fc.")]
    assert backbone and all(torch.equal(start[k], end[k]) for k in backbone)
    assert not torch.equal(start["target.net.fc.weight"], end["target.net.fc.weight"])


def test_the_python_api_takes_weights_and_freeze(tmp_path):
    """``TransferModule.from_options(model=ModelOptions(..., weights=, freeze=))``: the same as the CLI keys."""
    from sskt_lightning.options import ModelOptions, ScratchOptions
    net = random_net()
    path = save(net, tmp_path / "w.safetensors")
    module = TransferModule.from_options(data=CIFAR10_INFO, method=ScratchOptions(),
                                         model=ModelOptions("resnet20", weights=str(path), freeze="backbone"))
    assert_same(module.target.net.state_dict(), net.state_dict())
    assert {n for n, p in module.target.net.named_parameters() if p.requires_grad} == set(CLASSIFIER)
