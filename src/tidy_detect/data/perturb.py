"""Image perturbations for robustness sweeps (paper Fig. 3, the CNNDetection protocol).

A perturbation is applied to the full decoded image, before any crop, identically for reals and
fakes, and deterministically per image: random noise is drawn from a generator seeded by the
image's content hash and the perturbation, so a rerun gives the same pixels.

Kinds and default levels: ``noise`` (Gaussian, standard deviation on [0, 1] pixel values:
0.001, 0.005, 0.01), ``blur`` (Gaussian, sigma in pixels: 1, 2, 3), ``jpeg`` (quality 75, 50, 25);
extras: ``resize`` (scale factor, bilinear) and ``webp`` (quality). Results are 8-bit RGB again,
so the smallest noise level mostly survives as +-1 grey-level changes, as it would on disk.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from tidy_detect.errors import ConfigError, UnknownNameError

DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "noise": (0.001, 0.005, 0.01),
    "blur": (1.0, 2.0, 3.0),
    "jpeg": (75, 50, 25),
}
EXTRA_LEVELS: dict[str, tuple[float, ...]] = {"resize": (0.75, 0.5), "webp": (75, 50)}


def _noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    noisy = pixels + rng.normal(0.0, sigma, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8), "RGB")


def _blur(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    from scipy.ndimage import gaussian_filter

    pixels = np.asarray(image, dtype=np.float32)
    blurred = np.stack([gaussian_filter(pixels[..., c], sigma=sigma) for c in range(3)], axis=-1)
    return Image.fromarray(np.clip(np.rint(blurred), 0, 255).astype(np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str, quality: float) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _jpeg(image: Image.Image, quality: float, rng: np.random.Generator) -> Image.Image:
    return _encode(image, "JPEG", quality)


def _webp(image: Image.Image, quality: float, rng: np.random.Generator) -> Image.Image:
    return _encode(image, "WEBP", quality)


def _resize(image: Image.Image, scale: float, rng: np.random.Generator) -> Image.Image:
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR)


_KINDS: dict[str, tuple[Callable[[Image.Image, float, np.random.Generator], Image.Image], Callable[[float], bool], str]] = {
    "noise": (_noise, lambda v: 0 < v <= 1, "a standard deviation in (0, 1]"),
    "blur": (_blur, lambda v: 0 < v <= 50, "a sigma in (0, 50] pixels"),
    "jpeg": (_jpeg, lambda v: 1 <= v <= 100 and float(v).is_integer(), "an integer quality in [1, 100]"),
    "webp": (_webp, lambda v: 1 <= v <= 100 and float(v).is_integer(), "an integer quality in [1, 100]"),
    "resize": (_resize, lambda v: 0 < v <= 4, "a scale factor in (0, 4]"),
}


@dataclass(frozen=True)
class Perturbation:
    """One perturbation at one level, e.g. ``Perturbation("jpeg", 75)``."""

    kind: str
    level: float

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise UnknownNameError(f"Unknown perturbation {self.kind!r}. Known: {', '.join(sorted(_KINDS))}.")
        _, valid, rule = _KINDS[self.kind]
        if not isinstance(self.level, (int, float)) or not valid(float(self.level)):
            raise ConfigError(f"{self.kind} level must be {rule}, got {self.level!r}")

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.level:g}"

    def to_dict(self) -> dict[str, float | str]:
        return {"kind": self.kind, "level": float(self.level)}

    @classmethod
    def from_dict(cls, data: dict) -> "Perturbation":
        return cls(data["kind"], data["level"])

    def apply(self, image: Image.Image, key: str) -> Image.Image:
        """The perturbed copy of an RGB image; ``key`` (its sha256) seeds any randomness."""
        digest = hashlib.sha256(f"{key}|{self.name}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return _KINDS[self.kind][0](image, float(self.level), rng)


def parse_levels(kind: str, text: str | None) -> list[Perturbation]:
    """``"75,50,25"`` for ``jpeg`` -> three perturbations; None gives the default levels."""
    if text is None:
        levels = DEFAULT_LEVELS.get(kind) or EXTRA_LEVELS.get(kind)
        if levels is None:
            raise UnknownNameError(f"Unknown perturbation {kind!r}. Known: {', '.join(sorted(_KINDS))}.")
        return [Perturbation(kind, v) for v in levels]
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise ConfigError(f"{kind} levels must be numbers separated by commas, got {text!r}") from None
    return [Perturbation(kind, v) for v in values]
