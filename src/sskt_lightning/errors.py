"""User-facing errors. Each says what is wrong and which option fixes it."""


class SSKTError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(SSKTError, ValueError):
    """A config value is invalid or inconsistent (unknown model, class-count mismatch, ...)."""


class DataNotFoundError(SSKTError, FileNotFoundError):
    """A dataset is not on disk and could not be downloaded."""


class WeightsError(SSKTError, RuntimeError):
    """Pretrained weights could not be fetched or do not fit the network."""


class CacheError(SSKTError, RuntimeError):
    """The soft-label cache cannot be used as asked (a damaged or foreign store, an unwritable
    cache directory, a key that does not match)."""
