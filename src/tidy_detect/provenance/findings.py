"""One piece of evidence, as every source reports it, and the bounded list that collects them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SOURCES = ("c2pa", "xmp", "iptc", "png-text", "exif", "watermark")


def clip(text: Any, limit: int) -> str:
    """``text`` as a single-line string of at most ``limit`` characters (an ellipsis marks a cut)."""
    value = " ".join(str(text).split())
    return value if len(value) <= limit else value[:max(limit - 1, 1)] + "…"


@dataclass
class Finding:
    """What one source says about how the file was made.

    ``declares_ai`` is True when the statement says generative AI made (part of) the image, False
    when it says the image has another origin (a camera capture, a human-made creation), None
    when it says neither. ``verified`` is True only for statements inside a C2PA manifest whose
    signature validated against a trusted chain; everything else is a claim anyone could write.
    """

    source: str
    field: str
    value: str
    meaning: str
    declares_ai: bool | None = None
    verified: bool = False
    generator: str | None = None

    def to_dict(self, limit: int) -> dict[str, Any]:
        return {"source": self.source, "field": clip(self.field, limit), "value": clip(self.value, limit),
                "meaning": clip(self.meaning, limit), "declares_ai": self.declares_ai, "verified": self.verified,
                "generator": None if self.generator is None else clip(self.generator, limit)}


@dataclass
class Findings:
    """Findings of one file, at most ``limit`` of them, plus the problems met on the way."""

    limit: int
    items: list[Finding] = field(default_factory=list)
    dropped: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, finding: Finding) -> None:
        if finding.source not in SOURCES:
            raise ValueError(f"unknown provenance source {finding.source!r}")  # a bug, not bad input
        key = (finding.source, finding.field, finding.value)
        if any((f.source, f.field, f.value) == key for f in self.items):
            return
        if len(self.items) < self.limit:
            self.items.append(finding)
        else:
            self.dropped += 1

    def error(self, message: str) -> None:
        if len(self.errors) < 8 and message not in self.errors:
            self.errors.append(message)
