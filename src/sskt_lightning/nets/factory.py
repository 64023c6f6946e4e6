"""Build any network by name and read its pooled feature and stage outputs.

Names resolve in this order:
  * ``torchvision.<arch>``: a torchvision model (``torchvision.models.get_model``);
  * a plain name such as ``resnet18`` when the data is at most 64 px and ``cifar_resnet18`` is
    registered: the CIFAR-style net (3x3 stem, no max-pool) suited to small images;
  * a plain name with no timm model of that name but a registered ``cifar_`` twin (``resnet20``):
    the CIFAR-style net at any resolution;
  * any other timm name (``resnet50``, ``resnet50.tv_in1k``, ``convnext_atto``, ``cifar_wrn40_2``).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import timm
import torch
import torchvision
from torch import nn

from sskt_lightning.errors import ConfigError

SMALL_IMAGE_MAX = 64
TORCHVISION_PREFIX = "torchvision."
# First feature_info entries that are stems, not stages: the transfer module skips them.
_STEM_MODULES = {"act1", "bn1", "conv1", "stem", "stem.act", "relu", "maxpool"}


def resolve_model_name(name: str, image_size: int | None = None) -> str:
    """Map a config name to the concrete registry name (see the module docstring)."""
    if name.startswith(TORCHVISION_PREFIX) or name.startswith("cifar_"):
        return name
    arch = name.split(".")[0]
    cifar = f"cifar_{arch}"
    if timm.is_model(cifar) and "." not in name:
        if (image_size is not None and image_size <= SMALL_IMAGE_MAX) or not timm.is_model(arch):
            return cifar
    return name


def _unknown_model(name: str) -> ConfigError:
    candidates = timm.list_models() + [TORCHVISION_PREFIX + n for n in torchvision.models.list_models()]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(
        f"Unknown model {name!r}: not a timm model, not a registered cifar_* net and not "
        f"'torchvision.<arch>'.{hint} List choices with timm.list_models('*resnet*') or "
        f"torchvision.models.list_models()."
    )


def create_network(name: str, num_classes: int, in_chans: int = 3, pretrained: bool = False,
                   image_size: int | None = None, **kwargs) -> nn.Module:
    """Create a classifier with ``num_classes`` outputs taking ``in_chans``-channel images.

    ``pretrained`` fetches hub weights (timm/torchvision); callers that may be offline wrap it
    (see :mod:`sskt_lightning.sources`).
    """
    name = resolve_model_name(name, image_size)
    if name.startswith(TORCHVISION_PREFIX):
        arch = name[len(TORCHVISION_PREFIX):]
        if arch not in torchvision.models.list_models():
            raise _unknown_model(name)
        if in_chans != 3:
            raise ConfigError(f"{name} takes 3-channel input; use the timm model of the same name "
                              f"(timm adapts the stem to in_chans={in_chans}).")
        weights = "DEFAULT" if pretrained else None
        if weights is not None:
            model = torchvision.models.get_model(arch, weights=weights, **kwargs)
            if _classifier(model).out_features != num_classes:
                _replace_classifier(model, num_classes)
            return model
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if not timm.is_model(name):
        raise _unknown_model(name)
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                             in_chans=in_chans, **kwargs)


def _classifier(model: nn.Module) -> nn.Linear:
    """The final linear layer: timm's ``get_classifier()`` or the last ``nn.Linear``."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Linear):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no linear classifier to attach heads to.")
    return linears[-1]


def classifier_name(model: nn.Module) -> str:
    """The module name of the final linear layer (:func:`_classifier`) inside ``model``."""
    clf = _classifier(model)
    return next(name for name, m in model.named_modules() if m is clf)


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    old = _classifier(model)
    for name, module in model.named_modules():
        if module is old:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr,
                    nn.Linear(old.in_features, num_classes))
            return


def stage_modules(model: nn.Module) -> list[tuple[str, int]]:
    """``(module name, channels)`` of each stage whose output feeds a transfer-module branch.

    Taken from timm's ``feature_info`` (the ``cifar_*`` nets provide it too), minus stem entries.
    """
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ConfigError(
            f"{type(model).__name__} has no feature_info, so the transfer module cannot find its "
            "stages. Use a timm or cifar_* model, or method.aux_head=linear.")
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    stages = [(e["module"], int(e["num_chs"])) for e in entries]
    if len(stages) > 1 and stages[0][0] in _STEM_MODULES:
        stages = stages[1:]
    return stages


@dataclass
class NetOutput:
    logits: torch.Tensor
    pooled: torch.Tensor | None = None      # input of the classifier (pooled penultimate feature)
    stages: list[torch.Tensor] | None = None  # output of every stage, shallow to deep


class TappedNet(nn.Module):
    """A classifier whose forward also returns its pooled feature and stage outputs.

    Forward hooks read the tensors as they pass, so any timm/torchvision net works unchanged and the
    state dict keeps the network's own key names (under ``net.``).
    """

    def __init__(self, net: nn.Module, tap_pooled: bool = False, tap_stages: bool = False):
        super().__init__()
        self.net = net
        self.tap_pooled, self.tap_stages = tap_pooled, tap_stages
        self._pooled: torch.Tensor | None = None
        self._stages: list[torch.Tensor] = []
        self._recording = False   # hooks store tensors only inside forward(), never on net(x)
        classifier = _classifier(net)
        self.num_features = classifier.in_features
        self.num_classes = classifier.out_features
        self.stage_channels: list[int] = []
        if tap_pooled:
            classifier.register_forward_pre_hook(self._save_pooled)
        if tap_stages:
            for module_name, channels in stage_modules(net):
                net.get_submodule(module_name).register_forward_hook(self._save_stage)
                self.stage_channels.append(channels)

    def _save_pooled(self, _module, args):
        if self._recording:
            self._pooled = args[0].flatten(1)

    def _save_stage(self, _module, _args, output):
        if self._recording:
            self._stages.append(output)

    def forward(self, x: torch.Tensor) -> NetOutput:
        self._stages, self._recording = [], True
        try:
            logits = self.net(x)
        finally:
            self._recording = False
        out = NetOutput(logits, self._pooled if self.tap_pooled else None,
                        self._stages if self.tap_stages else None)
        self._pooled, self._stages = None, []
        return out

    # ------------------------------------------------------------------ model.freeze=backbone
    frozen_backbone = False

    def freeze_backbone(self) -> list[str]:
        """A linear probe: every parameter but the classifier's stops requiring gradients, and the
        backbone stays in eval mode whenever the module trains (BatchNorm keeps its running
        statistics and normalises with them, dropout is off); returns the trainable parameters' names."""
        self._classifier_name = classifier_name(self.net)
        prefix = self._classifier_name + "."
        for name, param in self.net.named_parameters():
            param.requires_grad_(name.startswith(prefix))
        self.frozen_backbone = True
        self.train(self.training)
        return [n for n, p in self.net.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_backbone and mode:
            self.net.train(False)
            self.net.get_submodule(self._classifier_name).train(True)
        return self
