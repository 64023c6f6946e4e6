"""What every part of the report shares: its error, the file names it reads, the method order, the dash
for a missing number, the default baseline, and atomic writing."""
from __future__ import annotations

from pathlib import Path

from sskt_lightning.errors import SSKTError


# table order by the run's method (``method=``); the benchmark's rows share these: finetuned_source and
# linear_probe are method=scratch, kd_unlabeled method=kd, dml_unlabeled method=dml, freematch / flexmatch /
# softmatch method=fixmatch, sskt_unlabeled and sskt_fixmatch method=sskt (within a method: by name)
METHOD_ORDER = ("scratch", "kd", "dml", "maxl", "sskt", "fixmatch")
RESULTS_NAME, FAILED_NAME, PROTOCOL_NAME = "results.json", "failed.txt", "protocol.json"
DASH = "–"  # an undefined std (one seed) or a missing number
DEFAULT_BASELINE = "method=scratch"


class ReportError(SSKTError, ValueError):
    """The runs cannot be summarised as asked (none found, inconsistent metrics, bad arguments)."""


def _write(path: Path, data: str | bytes) -> Path:
    """``path`` replaced atomically; an unwritable ``--out`` is a :class:`ReportError` naming the fix."""
    from sskt_lightning.atomic import atomic_write_bytes
    try:
        return atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as err:                                   # atomic's OutputError is one
        cause = err.__cause__ or err.__context__ or err     # the OSError behind atomic's OutputError
        raise ReportError(f"report: cannot write {path} ({getattr(cause, 'strerror', None) or err}); choose a "
                          f"writable directory with --out DIR.") from None
