"""What the API may say about the server: model ids and fingerprints, never local paths.

A hub id (``openai/clip-vit-large-patch14``) is public and kept; a local folder says where the
server keeps its files (and often who runs it), so it is reported by its last component only,
``local:clip``, with the weights fingerprint to tell copies apart. Messages the server writes
itself (a failed load, an internal error) are scrubbed of absolute paths before a client sees them.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable

# org/name (or a bare name) in the characters the Hugging Face hub allows
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
# An absolute path inside free text: starts after a space, quote, bracket or '=' (not after a
# letter, ':' or '/', so URLs and "and/or" are left alone) and runs to the next separator.
_ABS_PATH = re.compile(r"(?<![\w:/.\-~])(?:[A-Za-z]:\\|~/|/)[^\s'\"`<>|;,()\[\]{}]*")


def _leaf(path: str) -> str:
    pure = PureWindowsPath(path) if "\\" in path else PurePosixPath(path)
    return pure.name or "folder"


def is_local(source: str) -> bool:
    """Whether a model reference is a local folder rather than a hub id."""
    if PurePosixPath(source).is_absolute() or PureWindowsPath(source).is_absolute() or "\\" in source:
        return True
    if source.startswith(("./", "../", "~", ".")) or not _HUB_ID.match(source):
        return True
    try:
        return Path(source).exists()
    except OSError:
        return False


def public_source(source: str | None) -> str | None:
    """A hub id as it is, a local folder as ``local:<its name>``."""
    if source is None:
        return None
    text = str(source)
    return f"local:{_leaf(text.rstrip(chr(47) + chr(92)))}" if is_local(text) else text


def public_models(models: dict[str, Any], extraction: dict[str, Any]) -> dict[str, Any]:
    """The ``models`` dict of :meth:`Detector.info` with local folders hidden, plus each model's
    weights fingerprint (the extraction config's ``weights`` key)."""
    out = {key: (public_source(value) if key in ("clip", "captioner_model", "grounder_model") else value)
           for key, value in models.items()}
    out["weights"] = {part: (extraction.get(part) or {}).get("weights") for part in ("clip", "captioner", "grounder")}
    return out


class PathScrubber:
    """Replaces the server's own paths in text: model folders by ``local:<name>``, any other
    absolute path by ``local:<last component>``."""

    def __init__(self, model_folders: Iterable[str | None] = ()) -> None:
        folders = {str(f).rstrip("/") for f in model_folders if f and is_local(str(f))}
        resolved = set()
        for folder in folders:
            try:
                resolved.add(str(Path(folder).expanduser().resolve()))
            except (OSError, RuntimeError):
                pass
        self.folders = sorted(folders | resolved, key=len, reverse=True)  # longest first: no partial hits

    def text(self, message: str, any_path: bool = True) -> str:
        """``message`` without the model folders and, with ``any_path``, without any absolute path
        (off for records, whose messages start with the client's own file name)."""
        for folder in self.folders:
            message = message.replace(folder, f"local:{_leaf(folder)}")
        if not any_path:
            return message
        return _ABS_PATH.sub(lambda m: f"local:{_leaf(m.group(0).rstrip('/'))}", message)

    def value(self, data: Any) -> Any:
        """``data`` (JSON-like) with every string scrubbed."""
        if isinstance(data, str):
            return self.text(data)
        if isinstance(data, dict):
            return {key: self.value(item) for key, item in data.items()}
        if isinstance(data, (list, tuple)):
            return [self.value(item) for item in data]
        return data
