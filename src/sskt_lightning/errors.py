"""User-facing errors. Each says what is wrong and which option fixes it."""


class SSKTError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(SSKTError, ValueError):
    """A config value is invalid or inconsistent (unknown model, class-count mismatch, ...)."""


class DataNotFoundError(SSKTError, FileNotFoundError):
    """A dataset is not on disk and could not be downloaded."""


class DataError(SSKTError, ValueError):
    """Dataset files are on disk but unusable (corrupt, truncated, refused, wrong shapes or labels)."""


class WeightsError(SSKTError, RuntimeError):
    """Pretrained weights could not be fetched or do not fit the network."""


class ResumeError(WeightsError):
    """``resume=`` names no usable checkpoint of this run (missing, truncated, foreign, mismatched)."""


class ResumeConfigError(ResumeError, ConfigError):
    """``resume=`` names a checkpoint of this run's kind trained with other settings (seed, data,
    method, optimizer, schedule, ...): continuing it would not be the same run."""


class OutputError(SSKTError, OSError):
    """The run directory cannot be written (read-only, full disk, a path under a file)."""


class NonFiniteError(SSKTError, ArithmeticError):
    """Training produced a non-finite loss or non-finite weights; the run was stopped."""


class CacheError(SSKTError, RuntimeError):
    """The soft-label cache cannot be used as asked (a damaged or foreign store, an unwritable
    cache directory, a key that does not match)."""
