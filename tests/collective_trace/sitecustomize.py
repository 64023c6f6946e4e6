"""Test aid, imported at interpreter start-up when this folder is on PYTHONPATH (Python's
``sitecustomize`` hook): with ``SSKT_TRACE_COLLECTIVES=<dir>`` set, every torch.distributed collective
a process issues is appended to ``<dir>/rank<r>.txt`` as one line (operation, tensor shape, dtype).
Lightning's DDP launcher starts the other ranks with the same environment, so every rank is traced;
a test then asserts that all ranks issued the same sequence (a collective on a subset of ranks is
what aborted gloo and hangs NCCL). Without the variable it does nothing and imports nothing."""
import os

_DIR = os.environ.get("SSKT_TRACE_COLLECTIVES")

if _DIR:
    import torch.distributed as dist

    _files: dict = {}

    def _describe(value) -> str:
        if hasattr(value, "shape"):
            return f"{tuple(value.shape)}:{value.dtype}"
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(_describe(v) for v in value) + "]"
        return type(value).__name__

    def _traced(name, original):
        def collective(*args, **kwargs):
            rank = dist.get_rank() if dist.is_initialized() else -1
            out = _files.get(rank)
            if out is None:
                out = _files[rank] = open(os.path.join(_DIR, f"rank{rank}.txt"), "a", buffering=1)
            out.write(f"{name} {' '.join(_describe(a) for a in args[:1])}\n")
            return original(*args, **kwargs)
        return collective

    for _name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                  "barrier", "all_gather_object", "broadcast_object_list", "gather", "scatter", "reduce"):
        if hasattr(dist, _name):
            setattr(dist, _name, _traced(_name, getattr(dist, _name)))
