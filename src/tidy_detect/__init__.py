"""tidy-detect: detect AI-generated images from image-caption discrepancy in CLIP space (TIDY).

The public API is imported lazily so that ``import tidy_detect`` and ``tidy-detect --help`` stay
fast; torch and transformers load only when a model is needed.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "extract": ("tidy_detect.features.extractor", "extract"),
    "Extractor": ("tidy_detect.features.extractor", "Extractor"),
    "ExtractionSummary": ("tidy_detect.features.extractor", "ExtractionSummary"),
    "FeatureStore": ("tidy_detect.features.store", "FeatureStore"),
    "ExtractionConfig": ("tidy_detect.config", "ExtractionConfig"),
    "ModelConfig": ("tidy_detect.config", "ModelConfig"),
    "FeatureConfig": ("tidy_detect.config", "FeatureConfig"),
    "RuntimeConfig": ("tidy_detect.config", "RuntimeConfig"),
    "RepresentationConfig": ("tidy_detect.config", "RepresentationConfig"),
    "load_preset": ("tidy_detect.config", "load_preset"),
    "load_image": ("tidy_detect.images", "load_image"),
    "TidyError": ("tidy_detect.errors", "TidyError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tidy_detect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
