"""The ``method.cache`` options of the methods whose frozen sources label images (SSKT, KD).

    method.cache: off | read_write | read_only
    method.cache_budget_gb: 16     # per store (one source x one image array) when full
    method.cache_topk: null        # null: all K logits in fp16 if they fit the budget, else the
                                   # largest top-k that fits; an int forces top-k with that k

See :mod:`sskt_lightning.cache` and docs/cache.md.
"""
from __future__ import annotations

from sskt_lightning.cache.keys import attach, cache_mode
from sskt_lightning.errors import ConfigError
from sskt_lightning.methods.base import trainer_of


class SourceCacheOptions:
    """Mixed into a :class:`~sskt_lightning.methods.base.Method` whose sources go through
    ``module.sources``: opens the stores at ``on_fit_start``, commits and closes them at
    ``on_fit_end`` and reports the hit counts in ``describe``. Mixing it in is the capability
    ``soft_label_cache`` (``python -m sskt_lightning.cache`` serves such methods)."""

    soft_label_cache = True

    def init_cache(self, cache="off", cache_budget_gb: float = 16.0, cache_topk: int | None = None,
                   source_bn: str = "eval") -> None:
        self.cache = cache_mode(cache, source_bn)
        if not float(cache_budget_gb) > 0:
            raise ConfigError(f"method.cache_budget_gb={cache_budget_gb} must be > 0 (GiB per store).")
        if cache_topk is not None and (isinstance(cache_topk, bool) or int(cache_topk) < 1):
            raise ConfigError(f"method.cache_topk={cache_topk!r} must be null or an integer >= 1.")
        self.cache_budget_gb = float(cache_budget_gb)
        self.cache_topk = None if cache_topk is None else int(cache_topk)
        self.cache_stats: dict | None = None

    @property
    def cache_temperature(self) -> float:
        """The T at which this method softens the sources' logits (a top-k store rebuilds its
        tail for it)."""
        return float(getattr(self, "temperature", 1.0))

    def on_fit_start(self, module) -> None:
        if self.cache == "off" or len(module.sources) == 0:
            return
        trainer = module.trainer
        attach(module.sources, self.cache, datamodule=trainer.datamodule, precision=trainer.precision,
               cache_dir=(module.cfg.get("paths") or {}).get("cache_dir"), device=module.device,
               budget_gb=self.cache_budget_gb, topk=self.cache_topk, temperature=self.cache_temperature,
               source_bn=getattr(self, "source_bn", "eval"))
        self._check_raw_logits(module)

    @property
    def raw_logits_loss(self) -> str | None:
        """The method's distillation loss when it reads the sources' raw logits (``losses.NEEDS_RAW_LOGITS``:
        ``lskd`` z-scores them), else None; read from ``aux_loss`` (SSKT) or ``distill_loss`` (KD)."""
        from sskt_lightning.losses import NEEDS_RAW_LOGITS
        for name in (getattr(self, "aux_loss", None), getattr(self, "distill_loss", None)):
            if name in NEEDS_RAW_LOGITS:
                return name
        return None

    def _check_raw_logits(self, module) -> None:
        """A top-k store gives back the k largest logits and a tail rebuilt for one temperature: right
        for every loss of a softmax at that T, wrong for one that standardises the logits first."""
        loss = self.raw_logits_loss
        stores = [s for per in getattr(module.sources, "_stores", {}).values() for s in per]
        topk = sorted({s.layout.k for s in stores if s.layout.kind == "topk"})
        if loss is None or not topk:
            return
        module.sources.detach_cache()
        option = "aux_loss" if getattr(self, "aux_loss", None) == loss else "loss"
        raise ConfigError(
            f"method.{option}={loss} z-scores the sources' raw logits, but the soft-label cache keeps only the "
            f"top {topk[0]} logits per image (method.cache_topk, or a cache_budget_gb too small for all of "
            "them) and rebuilds the rest for one temperature. Use method.cache=off, or a cache that holds "
            "every logit: method.cache_topk=null with a larger method.cache_budget_gb.")

    def on_fit_end(self, module) -> None:
        if module.sources.cached:
            stats = module.sources.detach_cache()
            trainer = trainer_of(module)
            if trainer is not None and trainer.world_size > 1:   # every process looked up its own shard
                import torch.distributed as dist
                if dist.is_available() and dist.is_initialized():
                    gathered: list = [None] * trainer.world_size
                    dist.all_gather_object(gathered, stats)
                    stats = merge_cache_stats(gathered)
            self.cache_stats = stats

    def describe_cache(self) -> dict:
        """For results.json: nothing when the cache is off (results read as before)."""
        if self.cache == "off":
            return {}
        return {"cache": self.cache, "cache_budget_gb": self.cache_budget_gb, "cache_topk": self.cache_topk,
                "cache_stats": self.cache_stats}


def merge_cache_stats(per_process: list[dict]) -> dict:
    """The hit/miss counts of all processes (one ``detach_cache()`` result each: source -> one dict
    per store), summed store by store; ``hit_rate`` recomputed, ``write_stopped`` if any stopped."""
    merged: dict = {}
    for stats in per_process:
        for key, stores in stats.items():
            slots = merged.setdefault(key, [None] * len(stores))
            for i, s in enumerate(stores):
                m = slots[i] or {"hits": 0, "misses": 0, "written": 0, "write_stopped": False}
                m = {"hits": m["hits"] + s["hits"], "misses": m["misses"] + s["misses"],
                     "written": m["written"] + s["written"],
                     "write_stopped": bool(m["write_stopped"] or s.get("write_stopped"))}
                slots[i] = m
    for stores in merged.values():
        for m in stores:
            total = m["hits"] + m["misses"]
            m["hit_rate"] = m["hits"] / total if total else None
    return merged
