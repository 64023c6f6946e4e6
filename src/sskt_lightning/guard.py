"""The non-finite guard: a run whose loss turns NaN/inf stops with a message, not a plausible result.

Every method passes its loss terms to ``TransferModule.log_train`` (``loss``, ``task_loss``,
``aux_<source>``, ``kd_loss``, ``peer<k>_loss``, MAXL's ``primary_loss``/``aux_loss``/``gen_loss``
...), automatic and manual optimization alike. :meth:`NonFiniteGuard.update` records, on the device
and without a host sync, the first step at which each term was non-finite; :meth:`check` (one sync)
runs at logging intervals, at every epoch end and before every checkpoint save, and raises
:class:`~sskt_lightning.errors.NonFiniteError` naming the step, the term and the usual causes. A
method says what its own terms are (``Method.loss_terms`` / ``Method.describe_term``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from sskt_lightning.errors import NonFiniteError

CAUSES = ("Usual causes: a learning rate too high for this model and batch size (optim.optimizer.lr; "
          "for MAXL also method.generator_optim.lr / method.lr_inner), a temperature near 0 "
          "(method.temperature), an overflow in reduced precision (trainer.precision=16-mixed: try "
          "bf16-mixed or 32-true), or corrupt input data.")

_TERM_NAMES = {"loss": "the total loss", "task_loss": "the task loss"}   # every method's


def describe_term(key: str, method=None) -> str:
    """``key (what it is)``: the common terms here, a method's own from its class
    (``Method.describe_term``: the running method's first, else any registered method's)."""
    if key in _TERM_NAMES:
        return f"{key} ({_TERM_NAMES[key]})"
    from sskt_lightning.methods import Method
    for cls in [*([method] if method is not None else []), *Method.registry.values()]:
        what = cls.describe_term(key)
        if what:
            return f"{key} ({what})"
    return key


class NonFiniteGuard:
    """First non-finite step of each logged term, kept on the device."""

    def __init__(self, method=None):
        self.method = method   # the run's method (class or instance): it names its own loss terms
        self.step = 0   # training steps seen (calls of update)
        # per set of logged keys: the first step each was non-finite (-1: never), one device tensor
        self.first_bad: dict[tuple[str, ...], torch.Tensor] = {}
        self.checked_through = 0

    def update(self, parts: Mapping[str, torch.Tensor]) -> None:
        """A handful of device ops per step, whatever the number of terms; no host sync."""
        self.step += 1
        items = [(k, v.detach()) for k, v in parts.items() if isinstance(v, torch.Tensor)]
        if not items:
            return
        keys = tuple(k for k, _ in items)
        device = items[0][1].device      # a host scalar among device losses (a logged weight) joins them
        values = torch.stack([(v if v.numel() == 1 else v.sum()).reshape(()).float().to(device) for _, v in items])
        first = self.first_bad.get(keys)
        if first is None or first.device != values.device:
            first = torch.full((len(keys),), -1, dtype=torch.long, device=values.device)
        self.first_bad[keys] = torch.where(~torch.isfinite(values) & (first < 0), self.step, first)

    def _firsts(self) -> dict[str, int]:
        """Term -> first non-finite step (-1: never), over every set of keys seen (one sync)."""
        if not self.first_bad:
            return {}
        groups = list(self.first_bad.items())
        device = groups[0][1].device
        flat = torch.cat([t.to(device) for _, t in groups]).tolist()
        out: dict[str, int] = {}
        i = 0
        for keys, _ in groups:
            for k in keys:
                s, i = flat[i], i + 1
                prev = out.get(k, -1)
                out[k] = s if prev < 0 else (prev if s < 0 else min(prev, s))
        return out

    def check(self, where: str, epoch: int | None = None,
              any_rank: Callable[[bool], bool] | None = None) -> None:
        """Raise :class:`NonFiniteError` if any term was non-finite since the run started.

        ``any_rank`` (distributed runs): ``local -> whether any process saw one``, so that every
        process stops at the same check instead of waiting for the others in a collective."""
        found = self._firsts()
        keys, firsts = list(found), list(found.values())
        bad = sorted((s, k == "loss", k) for k, s in zip(keys, firsts) if s >= 0)
        if any_rank is not None and any_rank(bool(bad)) and not bad:
            raise NonFiniteError(
                f"Training stopped at step {self.step}: another process of this distributed run saw a "
                f"non-finite loss ({where}); its error names the term and step. {CAUSES}")
        if bad:
            step = bad[0][0]
            culprits = [k for s, _, k in bad if s == step and k != "loss"] or ["loss"]
            finite = [k for k, s in zip(keys, firsts) if s < 0 or s > step]
            raise NonFiniteError(
                f"Training stopped: the loss went non-finite (NaN or inf) at training step {step}"
                f"{f' (epoch {epoch})' if epoch is not None else ''}, in "
                f"{', '.join(describe_term(k, self.method) for k in culprits)}"
                f"{f'; still finite then: {finite}' if finite else ''}. Detected at step {self.step}, {where} "
                f"(the guard checks at logging intervals, epoch ends and before every checkpoint). {CAUSES} "
                "No checkpoint with non-finite values was written; results.json records the failure.")
        self.checked_through = self.step


def check_weights_finite(named: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Refuse non-finite parameters/buffers (one host sync)."""
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return
    device = named[0][1].device
    ok = torch.stack([torch.isfinite(t.detach()).all().to(device) for _, t in named])
    if not bool(ok.all()):
        bad = [n for (n, _), good in zip(named, ok.tolist()) if not good]
        raise NonFiniteError(f"Training stopped: the weights went non-finite (NaN or inf) in the last training "
                             f"step(s) before the checkpoint {where}, although every logged loss term was "
                             f"finite: {len(bad)} tensors ({bad[:4]}); refusing to save it. {CAUSES}")
