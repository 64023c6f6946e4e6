"""KD (Hinton et al. 2015): the target matches a frozen teacher's softened class distribution.

    L = (1 - alpha) * CE(z, y) + alpha * T^2 * KL(softmax_T(z_teacher) || softmax_T(z))

(formula: ``losses.kd_loss``; KL summed over classes, averaged over the batch).

``loss`` picks the distillation term D (``losses.KD_LOSSES``): ``kd`` the KL above (default),
``dist`` DIST (Huang et al. 2022, beta = gamma = 1), ``lskd`` logit-standardised KD (Sun et al. 2024):
``L = (1 - alpha) * CE(z, y) + alpha * D(z, z_teacher, T)``.

With ``unlabeled=True`` (needs ``data.unlabeled=true``) the batch is ``{"labeled": (x, y, idx, view),
"unlabeled": (x_u, idx_u, view_u)}`` and the distillation term runs on both streams, the task term
on the labeled images only:

    L = (1 - alpha) * CE(z[:B_l], y) + alpha * D(z, z_teacher, T)     over all B_l + B_u images,

i.e. the KD term is the mean over the B_l + B_u images of the concatenated batch, each image
weighted alike (for ``dist``, the batch term ranks over all of them). The teacher labels both
streams through ``module.sources(x, idx, view, stream)``, so the soft-label cache serves both.
The target's forward runs once on the concatenated batch (its BatchNorm statistics see both
streams, as SSKT's). The teacher is the
single entry of ``cfg.source``: hub weights, a local file, or a checkpoint of this project
(``source=[checkpoint] source.checkpoint.weights=<.ckpt>``). It is a :class:`FrozenSource`: no
gradients, eval mode, never in the optimizer, never checkpointed; its input is adapted to its own
resolution and statistics like every source.

KD compares the two distributions class by class, so the teacher's class set must be the target's,
in the same order. :meth:`KD.setup` refuses (before any training) a teacher with another class
count, or, when the teacher knows its class names (checkpoints of this project), other names;
teachers with a different label space are what ``method=sskt`` is for.
"""
from __future__ import annotations

import torch

from sskt_lightning.errors import ConfigError
from sskt_lightning.losses import KD_LOSSES, kd_loss
from sskt_lightning.methods.base import TEMPERATURE_HINT, Method, check_positive, check_range, split_batch
from sskt_lightning.methods.source_cache import SourceCacheOptions

_FIX_COUNT = ("Give one: source=[checkpoint] source.checkpoint.weights=/path/to/teacher.ckpt (a run of "
              "this project on the target's classes), or any single source whose classes are the "
              "target's (e.g. source=[imagenet_resnet50] for an ImageNet target).")


def _names_preview(names, limit: int = 6) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


class KD(SourceCacheOptions, Method):
    name = "kd"
    needs_sources = True
    accepts_unlabeled = True
    loss_terms = {"kd_loss": "the KD term"}

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, loss: str = "kd", unlabeled: bool = False,
                 cache: str = "off", cache_budget_gb: float = 16.0, cache_topk: int | None = None):
        super().__init__()
        self.alpha = check_range("alpha", alpha, 0.0, 1.0, "[0, 1] (KD mixes (1 - alpha) * CE + alpha * KD: "
                                 "L = (1 - alpha) * CE + alpha * T^2 * KL)")
        self.temperature = check_positive("temperature", temperature, TEMPERATURE_HINT)
        if loss not in KD_LOSSES:
            raise ConfigError(f"method.loss={loss!r}; choose one of {list(KD_LOSSES)} (kd: Hinton's KL, "
                              "dist: DIST, lskd: logit-standardised KD).")
        self.distill_loss = loss          # not ``self.loss``: that is the method computing the loss
        self.unlabeled = bool(unlabeled)
        self.init_cache(cache, cache_budget_gb, cache_topk)

    # ------------------------------------------------------------------ set-up
    def setup(self, module):
        sources = module.sources.sources
        if len(sources) != 1:
            got = f"{len(sources)}: {list(sources)}" if len(sources) else "none (source=[])"
            raise ConfigError(f"method=kd takes exactly one teacher, the single entry of cfg.source; "
                              f"got {got}. {_FIX_COUNT}")
        key, teacher = next(iter(sources.items()))
        info = module.data_info
        c, names = int(info["num_classes"]), info.get("class_names")
        data = info.get("name", "the target data")
        fix = ("KD matches the teacher's class distribution to the target's class by class, so "
               "both need the same label space. For a teacher trained on other classes use "
               "method=sskt, which learns the teacher's distribution through an auxiliary head.")
        if teacher.num_classes != c:
            what = f" ({_names_preview(teacher.class_names)})" if teacher.class_names else ""
            raise ConfigError(
                f"method=kd: the teacher (source.{key}) has {teacher.num_classes} classes{what}, the "
                f"target ({data}) has {c}{f' ({_names_preview(names)})' if names else ''}. {fix}")
        if teacher.class_names is not None and names is not None and list(teacher.class_names) != list(names):
            t_names, y_names = [str(n) for n in teacher.class_names], [str(n) for n in names]
            i = next(i for i, (a, b) in enumerate(zip(t_names, y_names)) if a != b)
            order = " (the same names in another order)" if sorted(t_names) == sorted(y_names) else ""
            raise ConfigError(
                f"method=kd: the teacher (source.{key}) has {teacher.num_classes} classes named "
                f"{_names_preview(t_names)}, the target ({data}) has {c} named {_names_preview(y_names)}"
                f"{order}; they first differ at class {i}: teacher {t_names[i]!r} vs target "
                f"{y_names[i]!r}. {fix}")
        self.teacher_key = key

    # ------------------------------------------------------------------ training
    def loss(self, module, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor):
        """The total loss and its two (unweighted) terms for logging. ``logits``/``teacher`` may hold
        more rows than ``labels`` (the unlabeled stream after the labeled images)."""
        teacher = teacher.detach()
        loss = kd_loss(logits, teacher, labels, self.alpha, self.temperature, module.multi_label,
                       self.distill_loss)
        with torch.no_grad():   # the terms of kd_loss, for the log only
            task = module.task_loss(logits[:labels.shape[0]], labels)
            kd = KD_LOSSES[self.distill_loss](logits, teacher, self.temperature)
        return loss, {"loss": loss, "task_loss": task, "kd_loss": kd}

    def training_step(self, module, batch):
        x, y, idx, view = split_batch(batch)
        stream = "labeled"
        if self.unlabeled:
            if not (isinstance(batch, dict) and "unlabeled" in batch):
                raise ConfigError("method.unlabeled=true needs data.unlabeled=true (a second, unlabeled stream).")
            xu, idxu, viewu = batch["unlabeled"]
            stream = [("labeled", len(x)), ("unlabeled", len(xu))]
            x, idx, view = torch.cat([x, xu]), torch.cat([idx, idxu]), torch.cat([view, viewu])
        logits = module.target(x).logits
        teacher = module.sources(x, idx, view, stream)[0]   # FrozenSource (no_grad, eval), or its cache
        loss, parts = self.loss(module, logits, teacher, y)
        module.log_train(parts, logits[:y.shape[0]], y)
        return loss

    def describe(self):
        return {"alpha": self.alpha, "temperature": self.temperature, "loss": self.distill_loss,
                "unlabeled": self.unlabeled, **self.describe_cache()}
