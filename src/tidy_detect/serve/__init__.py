"""The web service: ``create_app(detector, settings)`` and ``ServeSettings``.

FastAPI and uvicorn come with the ``serve`` extra (``pip install 'tidy-detect[serve]'``); they are
imported only when the app is built, so the rest of tidy-detect works without them.
"""

from __future__ import annotations

from typing import Any

from tidy_detect.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from tidy_detect.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'tidy_detect.serve' has no attribute {name!r}")
