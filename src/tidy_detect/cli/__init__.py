"""The ``tidy-detect`` command line: one module per command group, all over the library.

The library never imports this package; commands import the library lazily inside their bodies,
so ``tidy-detect --help`` stays fast and needs neither torch nor the optional extras.

- :mod:`.app`: the typer app, the consoles, and the decorator that turns library errors into one
  line and an exit code (``errors.EXIT_CODES``);
- :mod:`.options`: options shared by several commands, the extraction config they build, progress
  bars and summaries;
- one module per command or group: :mod:`.extract`, :mod:`.train`, :mod:`.detect`,
  :mod:`.evaluate` (eval, robustness, ablate, report), :mod:`.datasets`, :mod:`.serve`,
  :mod:`.models`, :mod:`.store`, :mod:`.bench`, :mod:`.demo`.
"""

from __future__ import annotations

# Imported for their commands, in the order `tidy-detect --help` lists them.
from tidy_detect.cli import extract, train, detect, demo, bench  # noqa: F401, I001
from tidy_detect.cli import datasets, evaluate, models, serve, store  # noqa: F401, I001
from tidy_detect.cli import calibrate  # noqa: I001
from tidy_detect.cli.app import app, command, err, out
from tidy_detect.cli.options import build_extraction_config  # noqa: F401 - part of the package's API

calibrate.register(app)
evaluate.register(app)
serve.register(app)
datasets.register(app, command, out)

__all__ = ["app", "build_extraction_config", "command", "err", "main", "out"]


def main() -> None:
    """The ``tidy-detect`` entry point."""
    app()
