"""What the declarations mean: IPTC digital source types and a small table of generator names.

Both are data, not code paths: adding a generator is one line of :data:`GENERATORS`.
"""

from __future__ import annotations

import re

# IPTC NewsCodes "digitalsourcetype" (https://cv.iptc.org/newscodes/digitalsourcetype/), by the
# last part of the code's URI: (what it says, declares_ai). declares_ai: True = generative AI made
# (part of) it; False = another origin is declared; None = neither (edits, composites of unknown parts).
DIGITAL_SOURCE_TYPES: dict[str, tuple[str, bool | None]] = {
    "trainedAlgorithmicMedia": ("created by a trained model (generative AI)", True),
    "compositeWithTrainedAlgorithmicMedia": ("a composite that includes generative-AI elements", True),
    "algorithmicMedia": ("created by an algorithm without training data (not generative AI)", False),
    "algorithmicallyEnhanced": ("a capture or creation enhanced by an algorithm", None),
    "digitalCapture": ("captured from the real world by a digital camera", False),
    "computationalCapture": ("captured by a camera with computational processing", False),
    "negativeFilm": ("scanned from a film negative", False),
    "positiveFilm": ("scanned from a film positive", False),
    "print": ("scanned from a print", False),
    "minorHumanEdits": ("a capture with minor human edits", False),
    "humanEdits": ("media with human edits", None),
    "compositeCapture": ("a composite of captures", False),
    "compositeSynthetic": ("a composite that includes synthetic elements", None),
    "composite": ("a composite of several elements", None),
    "digitalCreation": ("created by a person with digital tools (not generative AI)", False),
    "dataDrivenMedia": ("a representation of data made by a person", False),
    "screenCapture": ("a capture of a screen", False),
    "virtualRecording": ("a recording of a virtual event", False),
    # older codes, still found in files
    "digitalArt": ("created by a person with digital tools (older code)", False),
    "softwareImage": ("created by software (older code)", None),
}


def digital_source_type(value: str) -> tuple[str, str, bool | None]:
    """``(code, meaning, declares_ai)`` of a digital source type URI or bare code; unknown codes
    mean nothing (``declares_ai`` None)."""
    code = value.strip().rstrip("/").rsplit("/", 1)[-1].rsplit("#", 1)[-1]
    meaning, declares = DIGITAL_SOURCE_TYPES.get(code, (f"an unknown digital source type {code!r}", None))
    return code, meaning, declares


# Generators that name themselves in metadata (EXIF Software, XMP CreatorTool, PNG text ...):
# (the name reported, a case-insensitive pattern with word boundaries). Only products that make
# images with generative AI belong here: their name in a file is a claim that they made it.
GENERATORS: tuple[tuple[str, str], ...] = (
    ("Stable Diffusion", r"stable[ _-]?diffusion|\bsdxl\b"),
    ("Stable Diffusion web UI (AUTOMATIC1111)", r"automatic1111|stable-diffusion-webui"),
    ("Forge", r"\bsd[ _-]?forge\b|stable-diffusion-webui-forge"),
    ("ComfyUI", r"\bcomfy[ _-]?ui\b"),
    ("InvokeAI", r"\binvoke[ _-]?ai\b"),
    ("NovelAI", r"\bnovel[ _-]?ai\b"),
    ("Fooocus", r"\bfooocus\b"),
    ("SwarmUI", r"\b(stable)?swarm[ _-]?ui\b"),
    ("Draw Things", r"\bdraw things\b"),
    ("DiffusionBee", r"\bdiffusion[ _-]?bee\b"),
    ("Midjourney", r"\bmidjourney\b"),
    ("DALL·E", r"\bdall[ ·\-_.]?e\b"),
    ("Adobe Firefly", r"\bfirefly\b"),
    ("Google AI", r"made with google ai|\bgoogle imagen\b"),
    ("Bing Image Creator", r"\bbing image creator\b"),
    ("Microsoft Designer", r"\bmicrosoft designer\b"),
    ("Leonardo.Ai", r"\bleonardo[ .]?ai\b"),
    ("Ideogram", r"\bideogram\b"),
    ("Flux", r"\bflux\.1\b|\bflux[ _-]?(dev|schnell|pro)\b"),
    ("DreamStudio", r"\bdreamstudio\b"),
    ("NightCafe", r"\bnightcafe\b"),
    ("Craiyon", r"\bcraiyon\b"),
    ("Runway", r"\brunwayml\b|\brunway gen-?\d\b"),
    ("Diffusers", r"\bdiffusers\b"),
)
_COMPILED = tuple((name, re.compile(pattern, re.IGNORECASE)) for name, pattern in GENERATORS)


def known_generator(text: str, limit: int = 4096) -> str | None:
    """The name of the first known generator ``text`` mentions (looking at its first ``limit``
    characters), or None."""
    head = text[:limit]
    for name, pattern in _COMPILED:
        if pattern.search(head):
            return name
    return None
