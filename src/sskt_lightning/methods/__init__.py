"""Transfer methods, each selected with ``method=<name>`` (``conf/method/<name>.yaml``, whose
``_target_`` names the class).

Every module of this package is imported here, so each :class:`Method` subclass that sets a
``name`` registers itself (``Method.registry``) and is importable from this package under its class
name: a new method is one file here plus its yaml, no list to edit (docs/extending.md).
"""
import importlib
import pkgutil

from sskt_lightning.methods.base import Method


def _import_all() -> dict[str, type[Method]]:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return {cls.__name__: cls for cls in Method.registry.values() if cls.__module__.startswith(__name__ + ".")}


_classes = _import_all()
globals().update(_classes)
__all__ = ["Method", *sorted(_classes)]
del _classes
