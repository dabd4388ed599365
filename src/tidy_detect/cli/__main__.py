"""``python -m tidy_detect.cli``: the same as the ``tidy-detect`` command."""

from tidy_detect.cli import main

main()
