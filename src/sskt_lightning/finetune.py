"""``model.weights`` / ``model.freeze``: start the target from a local file, and train only its classifier.

    model.weights: null | <file>   # .safetensors, .pth/.pt, or a .ckpt of this project
    model.freeze:  null | backbone # backbone: a linear probe (only the classifier trains)

The file is read like every weights file of the harness (:func:`sskt_lightning.weights.read_file`:
``torch.load(weights_only=True)`` or safetensors; nested ``state_dict``/``model`` keys and DDP /
``torch.compile`` prefixes removed). From a checkpoint of this project the target's weights are the
``target.net.`` entries of its state dict (:func:`read_target_state_dict`, the one place that reads
them). When the file's classifier has another class count than the target's data, the classifier is
replaced: the network is built with the target's class count, so its freshly initialised classifier
stays and every other weight comes from the file. Any other difference (missing or unexpected
keys, other shapes) is a :class:`TargetWeightsError` naming the first keys and the fix.

``model.freeze=backbone`` sets ``requires_grad=False`` on every parameter of the target but its
classifier's (so no optimizer holds them: the methods build theirs from the parameters that require
gradients) and keeps the backbone in eval mode while training (:meth:`TappedNet.freeze_backbone`):
its BatchNorm running statistics and its dropout stay as the file left them. It needs weights to
freeze: ``model.weights`` or ``model.pretrained=true``.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sskt_lightning import weights as W
from sskt_lightning.errors import ConfigError, WeightsError
from sskt_lightning.nets.factory import classifier_name, create_network

FREEZE_CHOICES = ("backbone",)


class TargetWeightsError(WeightsError, ConfigError):
    """``model.weights`` names no usable file, or one that does not fit ``model.name``."""


def file_sha256(path: str | Path) -> str:
    """The sha256 of the file's bytes (recorded in results.json: which file the run started from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_target_state_dict(path: str | Path, option: str = "model.weights") -> tuple[dict[str, torch.Tensor], dict]:
    """The target network's state dict in the file at ``path`` and what the file says about it
    (``model_name``, ``class_names`` for checkpoints of this project; ``{}`` otherwise).

    The one function that reads a target's weights out of a file: a checkpoint of this project keeps
    them under ``target.net.`` (:data:`sskt_lightning.weights.TARGET_PREFIX`)."""
    try:
        obj = W.read_file(path, option)
    except WeightsError as err:
        raise TargetWeightsError(str(err)) from None
    info: dict = {}
    if W.is_project_checkpoint(obj):
        hp = obj["hyper_parameters"]
        info = {"model_name": hp.get("model_name"), "class_names": (hp.get("data_info") or {}).get("class_names")}
    try:
        sd = W.extract_state_dict(obj, what=f"{option}={path}")
    except WeightsError as err:
        raise TargetWeightsError(str(err)) from None
    if not sd:
        raise TargetWeightsError(f"{option}={path} is a checkpoint of this project without target weights "
                                 f"(no '{W.TARGET_PREFIX}' entries in its state dict); give the run's "
                                 "checkpoints/last.ckpt or best.ckpt.")
    return sd, info


def load_target_weights(net: nn.Module, sd: Mapping[str, torch.Tensor], what: str, model_name: str) -> bool:
    """Load ``sd`` into ``net``; True when the classifier was replaced (the file's has another class
    count: ``net`` keeps its own, freshly initialised). Anything else that does not fit is a
    :class:`TargetWeightsError`."""
    clf = classifier_name(net)
    own = net.state_dict()
    clf_keys = {k for k in own if k.startswith(clf + ".")}
    file_w, own_w = sd.get(f"{clf}.weight"), own.get(f"{clf}.weight")
    replaced = file_w is not None and own_w is not None and file_w.shape[0] != own_w.shape[0]
    if replaced:
        sd = {k: v for k, v in sd.items() if k not in clf_keys}
    missing = [k for k in own if k not in sd and not (replaced and k in clf_keys)]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k}: file {tuple(sd[k].shape)} vs net {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = [f"{len(missing)} missing keys {missing[:3]}" if missing else "",
                 f"{len(unexpected)} unexpected keys {unexpected[:3]}" if unexpected else "",
                 f"{len(shape)} shape mismatches {shape[:2]}" if shape else ""]
        raise TargetWeightsError(
            f"{what} does not fit model.name={model_name} ({type(net).__name__}): "
            f"{'; '.join(p for p in parts if p)}. The file was saved from another architecture: set "
            "model.name to the one it was saved from (model=<config> or model.name=<timm name>), or give "
            f"a file saved from {model_name}.")
    net.load_state_dict(sd, strict=not replaced)
    return replaced


def build_target(model_name: str, model_cfg: Mapping, data_info: Mapping) -> tuple[nn.Module, dict]:
    """The target network as ``cfg.model`` says (hub weights with ``pretrained``, or ``weights``),
    and the settings results.json records (``{}`` when neither ``weights`` nor ``freeze`` is set)."""
    weights, freeze = model_cfg.get("weights"), model_cfg.get("freeze")
    pretrained = bool(model_cfg.get("pretrained", False))
    if freeze is not None and freeze not in FREEZE_CHOICES:
        raise ConfigError(f"model.freeze={freeze!r}; choose null (train every weight) or "
                          f"{' | '.join(FREEZE_CHOICES)} (train only the classifier: a linear probe).")
    if freeze and not weights and not pretrained:
        raise ConfigError(f"model.freeze={freeze} trains only the classifier on top of a frozen backbone, "
                          "but the backbone has random weights. Give it weights: model.weights=<file> "
                          "(.safetensors, .pth or a .ckpt of this project) or model.pretrained=true.")
    num_classes = int(data_info["num_classes"])
    kwargs = dict(model_cfg.get("kwargs") or {})
    if not weights:
        net = create_network(model_name, num_classes, data_info["in_chans"], pretrained=pretrained, **kwargs)
        return net, ({"freeze": freeze} if freeze else {})
    what = f"model.weights={weights}"
    sd, info = read_target_state_dict(weights)
    saved = info.get("model_name")
    if saved and saved != model_name:
        raise TargetWeightsError(f"{what} is a checkpoint of a {saved} target, this run builds {model_name} "
                                 f"(model.name): set model.name={saved}.")
    # the file's weights replace the hub's: no download
    net = create_network(model_name, num_classes, data_info["in_chans"], pretrained=False, **kwargs)
    replaced = load_target_weights(net, sd, what, model_name)
    names, ours = info.get("class_names"), data_info.get("class_names")
    if not replaced and names is not None and ours is not None and list(map(str, names)) != list(map(str, ours)):
        warnings.warn(f"{what}: its classifier is kept (same class count, {num_classes}) but was trained on other "
                      f"class names ({list(names)[:3]}... vs the data's {list(ours)[:3]}...): its outputs start "
                      "out mapped to the wrong classes until training re-learns them.", stacklevel=2)
    settings = {"weights": str(weights), "weights_sha256": file_sha256(Path(weights).expanduser()),
                "classifier": "replaced" if replaced else "from the file"}
    if freeze:
        settings["freeze"] = freeze
    return net, settings
