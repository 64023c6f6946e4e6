"""What every method must do, as functions over a method config name: tests/test_method_contract.py
runs them for each ``conf/method/*.yaml``, tests/test_extending_doc.py for the example method of
docs/extending.md (found through ``hydra.searchpath``, with no other file edited).

Nothing here names a method: what a method needs (sources, an unlabeled stream) is asked of its
class (``needs_sources``, ``accepts_unlabeled``, ``requires_unlabeled``)."""
from __future__ import annotations

import functools
from pathlib import Path

from hydra.utils import get_class

from sskt_lightning.compose import CONFIG_DIR, compose_config

METHOD_DIR = Path(CONFIG_DIR) / "method"
# A random-weight 10-class source that needs no download (serves as KD's teacher on CIFAR-10 too).
SMALL_SOURCE = ["source=[timm]", "source.timm.name=cifar_resnet20", "source.timm.num_classes=10",
                "source.timm.pretrained=false"]
# Where an option of this name must refuse a value, whatever the method (name -> (bad value, message)).
BAD_VALUES = {"temperature": ("0", r"method.temperature=0: must be > 0"),
              "alpha": ("-0.1", r"method.alpha=-0.1: must lie in")}


def packaged_methods() -> list[str]:
    """The method configs users pick with ``method=<name>``: the top-level ``conf/method/*.yaml``."""
    return sorted(p.stem for p in METHOD_DIR.glob("*.yaml"))


def method_config(name: str, extra: list[str] = ()) -> dict:
    """The composed ``cfg.method`` of ``method=<name>`` (a fresh copy; composed once per name)."""
    import copy
    return copy.deepcopy(_composed_method(name, tuple(extra)))


@functools.lru_cache(maxsize=None)
def _composed_method(name: str, extra: tuple[str, ...]) -> dict:
    import tempfile

    from omegaconf import OmegaConf
    cfg = compose_config([f"method={name}", *extra], Path(tempfile.gettempdir()) / "contract-compose")
    return OmegaConf.to_container(cfg.method, resolve=True)


def method_class(name: str, extra: list[str] = ()):
    """The class ``method=<name>`` builds (at collection: the packaged yaml's ``_target_``, read
    without composing)."""
    path = METHOD_DIR / f"{name}.yaml"
    if not extra and path.is_file():
        from omegaconf import OmegaConf
        return get_class(OmegaConf.load(path)["_target_"])
    return get_class(method_config(name, extra)["_target_"])


# The unlabeled stream of the small test data (80 images: 4 labelled per class, the rest a pool).
UNLABELED_STREAM = ["data.unlabeled=true", "data.labels_per_class=4"]


def requires_unlabeled(cls) -> bool:
    """The class trains only with data.unlabeled=true's second stream (FixMatch)."""
    return bool(getattr(cls, "requires_unlabeled", False))


def overrides_for(name: str, extra: list[str] = ()) -> list[str]:
    """``method=<name>`` plus what its class needs: a small random source when it takes sources, the
    unlabeled stream when it cannot train without one."""
    cls = method_class(name, extra)
    return [f"method={name}", *extra, *(SMALL_SOURCE if cls.needs_sources else []),
            *(UNLABELED_STREAM if requires_unlabeled(cls) else [])]


# Options whose effect depends on where a run is in its schedule: a method that has one is also
# resumed with it on (DML's KL warm-up ramps with the step count a resume restores).
SCHEDULED_OPTIONS = {"kl_warmup": "2"}


def variants(name: str, extra: list[str] = ()) -> dict[str, list[str]]:
    """The runs a method is checked with: as packaged; with a second, unlabeled stream when its class
    takes one (``accepts_unlabeled``), also under a step budget (both streams cycle across epochs);
    with each of its :data:`SCHEDULED_OPTIONS` on."""
    cls = method_class(name, extra)
    base = overrides_for(name, extra)
    out = {name: base}
    if requires_unlabeled(cls):            # as packaged it has the stream; also under a step budget
        out[f"{name}_steps"] = [*base, "data.steps_per_epoch=5"]
    elif cls.accepts_unlabeled:
        out[f"{name}_unlabeled"] = [*base, "method.unlabeled=true", *UNLABELED_STREAM]
        out[f"{name}_unlabeled_steps"] = [*out[f"{name}_unlabeled"], "data.steps_per_epoch=5"]
    for option, value in SCHEDULED_OPTIONS.items():
        if option in cls.option_names():
            out[f"{name}_{option}"] = [*base, f"method.{option}={value}"]
    return out


# ------------------------------------------------------------------------------------- the checks
def check_config_is_the_constructor(name: str, extra: list[str] = ()) -> None:
    """The yaml's keys are the constructor's arguments with its defaults; its ``name`` is the
    class's; the typed options made from the constructor carry the same values."""
    import dataclasses

    from sskt_lightning.methods import Method
    from sskt_lightning.options import method_options
    packaged = method_config(name, extra)
    cls = get_class(packaged["_target_"])
    assert issubclass(cls, Method), f"{packaged['_target_']} is not a Method"
    assert packaged["name"] == cls.name == name.split("/")[-1], (packaged["name"], cls.name, name)
    assert Method.registry[cls.name] is cls                       # registered by its class attribute
    options = {k: v for k, v in packaged.items() if k not in ("_target_", "name")}
    where = f"{name}.yaml vs {cls.__name__}.__init__"
    assert set(options) == set(cls.option_names()), f"{where}: keys {sorted(options)} vs {cls.option_names()}"
    typed = method_options(cls)
    assert typed.config == name and {f.name for f in dataclasses.fields(typed)} == set(options)
    defaults = dataclasses.asdict(typed())
    differ = {k: (options[k], defaults[k]) for k in options if options[k] != defaults[k]}
    assert not differ, f"{where}: (yaml, constructor) defaults differ: {differ}"
    cls.check_options(packaged)                                    # the packaged values are valid


def check_bad_values_are_refused(name: str, tmp_path: Path, extra: list[str] = ()) -> None:
    """An unknown option, and a value the method cannot take, are refused with a message naming
    them, before any data is read."""
    import pytest

    from sskt_lightning.errors import ConfigError
    from sskt_lightning.train import run
    base = ["trainer=smoke", f"paths.data_dir={tmp_path / 'no_data_here'}", *overrides_for(name, extra)]
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'temperatur' \(did you mean 'temperature'\?\)|"
                                          r"unknown option\(s\) 'temperatur'"):
        run(compose_config([*base, "+method.temperatur=2"], tmp_path / "unknown"))
    for option, (value, message) in BAD_VALUES.items():
        if option in method_class(name, extra).option_names():
            with pytest.raises(ConfigError, match=message):
                run(compose_config([*base, f"method.{option}={value}"], tmp_path / option))


def check_trains_and_checkpoints(name: str, data_dir: Path, tmp_path: Path, extra: list[str] = ()) -> dict:
    """A few training steps end to end: results.json, a last.ckpt holding every tensor of the
    module (the method's own networks included) but no frozen source."""
    import torch

    from sskt_lightning.train import run
    results = run(compose_config(["data=cifar10", f"paths.data_dir={data_dir}", "model=resnet20", "trainer=smoke",
                                  "data.batch_size=8", "data.val_size=16", "data.num_workers=0",
                                  *overrides_for(name, extra)], tmp_path))
    assert results["status"] == "ok" and results["method"] == method_class(name, extra).name
    ckpt = torch.load(tmp_path / results["checkpoints"]["last"], weights_only=True)
    assert ckpt["global_step"] > 0
    assert any(k.startswith("target.") for k in ckpt["state_dict"])
    assert not any(k.startswith("sources.") for k in ckpt["state_dict"])
    return results
