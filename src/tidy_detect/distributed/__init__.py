"""The same extraction on a Ray cluster (the ``distributed`` extra).

Importing this package does not import Ray; the functions do, and raise
:class:`RayNotInstalledError` with the install command when it is missing.
"""

from __future__ import annotations

from tidy_detect.distributed.engines import ENGINES, extract_with_engine, ray_options_from_cli
from tidy_detect.distributed.ray_engine import (
    RayExtractionSummary,
    RayNotInstalledError,
    RayOptions,
    extract_items_ray,
    extract_ray,
    ray_cluster,
    run_extraction_ray,
)

__all__ = [
    "ENGINES",
    "RayExtractionSummary",
    "RayNotInstalledError",
    "RayOptions",
    "extract_items_ray",
    "extract_ray",
    "extract_with_engine",
    "ray_cluster",
    "ray_options_from_cli",
    "run_extraction_ray",
]
