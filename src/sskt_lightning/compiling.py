"""``compile.*``: ``torch.compile`` for the networks of a run (PyTorch 2's graph compiler).

    compile:
      target: false    # the trainable networks: the target, the method's heads / peers / generator
      sources: false   # every frozen source (inference only)
      mode: null       # torch.compile's mode: null (default), reduce-overhead, max-autotune, ...

Each network is compiled in place (``nn.Module.compile``), so its state-dict keys, checkpoints and
the soft-label cache's weight hashes are those of the eager network: a compiled run resumes an
eager one and the other way round. Compilation happens on the first batch (and again when a
network switches between training and evaluation, or when a batch has another shape) and costs
tens of seconds per network on a CPU; it pays on a GPU and on long runs. Numbers agree with the eager
run to floating-point rounding (fused kernels sum in another order), not bit for bit.

A method whose training ``torch.compile`` cannot serve says why in its ``no_compiled_target``:
MAXL's meta step differentiates the target's loss twice (second order), which ``torch.compile``
does not support, so ``compile.target`` is refused for MAXL with that reason (its sources, if any,
may still be compiled).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

from sskt_lightning.errors import ConfigError

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_options(options: Mapping | None, method=None) -> dict:
    """``compile.*`` as ``{target, sources, mode}``, or a ConfigError that names the fix.
    ``method``: the method's class (or instance); its ``no_compiled_target`` refuses compile.target."""
    options = dict(options or {})
    unknown = sorted(set(options) - {"target", "sources", "mode"})
    if unknown:
        raise ConfigError(f"compile.{unknown[0]}: unknown option; known: compile.target, compile.sources, "
                          "compile.mode.")
    for key in ("target", "sources"):
        if not isinstance(options.get(key, False), bool):
            raise ConfigError(f"compile.{key}={options[key]!r}: must be true or false.")
    if options.get("mode") not in MODES:
        raise ConfigError(f"compile.mode={options['mode']!r}: choose one of {list(MODES)} "
                          "(torch.compile's modes; null is its default).")
    why_not = getattr(method, "no_compiled_target", None)
    if options.get("target") and why_not:
        raise ConfigError(f"compile.target=true with method={method.name}: {why_not}. Leave "
                          f"compile.target=false for method={method.name}.")
    return {"target": bool(options.get("target", False)), "sources": bool(options.get("sources", False)),
            "mode": options.get("mode")}


def _trainable_networks(module) -> Iterator:
    """The target and each network the method trains (heads, DML peers, MAXL's generator)."""
    from torch import nn   # here, not at import: the config checks above run before torch is loaded
    yield module.target
    for child in module.method.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from (child.values() if isinstance(child, nn.ModuleDict) else child)
        else:
            yield child


def compile_networks(module, options: Mapping | None) -> list[str]:
    """Compile ``module``'s networks in place as ``options`` (``compile.*``) say; the names compiled."""
    opts = check_compile_options(options, module.method)
    done = []
    if opts["target"]:
        for net in _trainable_networks(module):
            net.compile(mode=opts["mode"])
            done.append(type(net).__name__)
    if opts["sources"]:
        for key, source in module.sources.sources.items():
            source.compile(mode=opts["mode"])
            done.append(f"source {key}")
    return done
