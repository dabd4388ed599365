"""One exception base for everything tidy-detect raises on purpose.

Library code raises these and never prints or exits; the CLI maps each kind to an exit code
(``exit_code``) and prints one line. Messages name the thing, the rule and the bad value, and
where it helps, what to do next.
"""

from __future__ import annotations


class TidyError(Exception):
    """Base of every error tidy-detect raises deliberately."""

    exit_code = 1


class ConfigError(TidyError, ValueError):
    """An option, preset or config value is invalid."""

    exit_code = 2


class UnknownNameError(ConfigError, KeyError):
    """A component name is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(TidyError):
    """An input path, folder or manifest cannot be used."""

    exit_code = 3


class ModelLoadError(TidyError):
    """A model's weights or processor cannot be found or loaded."""

    exit_code = 4


class ImageError(TidyError):
    """One image cannot be decoded safely. Batch commands record it and go on."""

    exit_code = 5
    kind = "image"


class ImageNotFoundError(ImageError):
    kind = "not-found"


class UnsupportedImageError(ImageError):
    kind = "unsupported"


class CorruptImageError(ImageError):
    kind = "corrupt"


class ImageTooLargeError(ImageError):
    kind = "too-large"


class StoreError(TidyError):
    """A feature store is unreadable, or was made with a different configuration."""

    exit_code = 6


class CheckpointError(TidyError):
    """A head checkpoint is unreadable or does not fit the features it is given."""

    exit_code = 7


class NotFittedError(TidyError, AttributeError):
    """An estimator was used before ``fit``."""

    exit_code = 7
