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


class NotAFileError(ImageError):
    """A FIFO, device or socket where an image file was expected (reading it could block or never end)."""

    kind = "not-a-file"


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


class NothingProcessedError(TidyError):
    """A batch command had inputs (or none were found) but could not process a single image."""

    exit_code = 8


class InputsFailedError(TidyError):
    """Some inputs could not be processed and ``--fail-on-error`` asked for a non-zero exit."""

    exit_code = 9


class VerificationFailedError(TidyError):
    """`models verify`: a check that the models' weights can pass did not pass."""

    exit_code = 10


# Exit codes of the command line, for `tidy-detect --help` and the README (one source of truth).
EXIT_CODES = (
    (0, "success"),
    (1, "other tidy-detect error"),
    (2, "bad option, preset or config value (also usage errors)"),
    (3, "an input path or manifest cannot be used"),
    (4, "a model cannot be found or loaded"),
    (5, "an image cannot be read (single-image operations)"),
    (6, "a feature store is unreadable, made with other settings, or locked by another writer"),
    (7, "a head checkpoint is unreadable or does not fit"),
    (8, "nothing could be processed (no images found, or every one failed)"),
    (9, "some inputs failed and --fail-on-error was given"),
    (10, "models verify: a check failed (the table says which)"),
    (70, "internal error (a bug: rerun with --traceback and report it)"),
    (130, "interrupted (finished work is kept)"),
)


class NotFittedError(TidyError, AttributeError):
    """An estimator was used before ``fit``."""

    exit_code = 7
