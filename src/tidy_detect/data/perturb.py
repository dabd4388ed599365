"""Image perturbations for robustness sweeps (paper Fig. 3, the CNNDetection / UniFD protocol).

A perturbation is applied to the full decoded 8-bit RGB image, before any crop or resize,
identically for reals and fakes, and deterministically per image, as UniFD's ``validate.py``
does (``RealFakeDataset.__getitem__``: ``Image.open(path).convert("RGB")``, then
``gaussian_blur`` if a sigma is given, then ``png2jpg`` if a quality is given, then
``CenterCrop(224)``). Kinds and default levels: ``noise`` (0.001, 0.005, 0.01), ``blur``
(1, 2, 3), ``jpeg`` (75, 50, 25); extras: ``resize`` (scale factor, bilinear) and ``webp``
(quality). One perturbation is applied at a time; the result is 8-bit RGB again.

What each kind reproduces, bit for bit (``tests/evaluate/test_perturb.py`` holds copies of the
peers' functions and compares pixels with ``np.array_equal``):

``blur``
    ``gaussian_blur`` of Yuheng-Li/UniversalFakeDetect ``validate.py``, which is also
    ``gaussian_blur`` of PeterWang512/CNNDetection ``data/datasets.py`` (there called from
    ``data_augment`` on ``np.array(img)``): a uint8 copy of the image, then for each channel
    ``scipy.ndimage.gaussian_filter(img[:, :, c], output=img[:, :, c], sigma=sigma)``, in place,
    with scipy's defaults (``mode="reflect"``, ``truncate=4.0``). Because the output is uint8,
    scipy truncates to integers after each of its two 1-D passes (axis 0, then axis 1); a float
    filter rounded once at the end is 1 or 2 grey levels higher on many pixels.
``jpeg``
    ``pil_jpg`` of CNNDetection ``data/datasets.py`` and ``png2jpg`` of UniFD ``validate.py``
    (the same calls): ``Image.fromarray(pixels).save(buffer, format="jpeg", quality=q)`` with
    Pillow's other defaults (4:2:0 chroma subsampling at every quality, the standard IJG tables
    scaled by ``q``, baseline, no Huffman optimisation, libjpeg's defaults otherwise), decoded
    again by Pillow. CNNDetection's default training method, ``cv2_jpg``
    (``cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])`` then ``imdecode``),
    uses the same libjpeg settings: with Pillow 13 (libjpeg-turbo 3.2) and opencv-python-headless
    5.0 (libjpeg-turbo 3.1) the two give the same bytes, so OpenCV is not needed; the tests
    check this whenever ``cv2`` happens to be importable. A Pillow built on another JPEG library
    (IJG libjpeg 9, mozjpeg) may differ.
``noise``
    Neither peer has a noise perturbation; ours is defined here. With ``x`` the image as float32
    in [0, 1] (``uint8 / 255``), ``n`` drawn from ``numpy.random.default_rng(seed).normal(0.0,
    sigma, (H, W, 3))`` (float64, cast to float32), the result is
    ``clip(rint((x + n) * 255), 0, 255)`` as uint8: additive white Gaussian noise, independent
    per pixel and channel, with standard deviation ``sigma`` on the [0, 1] scale (``255 *
    sigma`` grey levels), rounded half to even and clipped back to 8 bits, as it would be on
    disk: sigma 0.001 is a quarter of a grey level, so it survives as +-1 changes on about 5% of
    the values, sigma 0.01 (2.55 levels) changes about 85% of them.
    ``seed`` is the first 8 bytes, little-endian, of ``sha256(f"{key}|{name}")``, where ``key``
    is the image file's sha256 and ``name`` the perturbation's name (``"noise-0.01"``): the same
    file gets the same noise in every run, on every machine and engine, whatever the order.
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
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    noisy = pixels + rng.normal(0.0, sigma, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8))


def _blur(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    from scipy.ndimage import gaussian_filter

    # The peers' exact call: uint8 in, uint8 out, in place per channel (see the module docstring).
    pixels = np.array(image.convert("RGB"))
    for c in range(3):
        gaussian_filter(pixels[:, :, c], output=pixels[:, :, c], sigma=sigma)
    return Image.fromarray(pixels)


def _encode(image: Image.Image, fmt: str, quality: float) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _jpeg(image: Image.Image, quality: float, rng: np.random.Generator) -> Image.Image:
    # CNNDetection's pil_jpg: a fresh image from the pixels, so no metadata of the source
    # (a comment, a DPI) reaches the encoder and the bytes are the peers' too.
    return _encode(Image.fromarray(np.array(image.convert("RGB"))), "JPEG", quality)


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


# Kinds whose pixels changed since stores first recorded perturbations: the method goes into the
# store's record, so a store made with the earlier float-rounded blur (recorded without a method)
# is refused rather than resumed with other pixels. Kinds whose pixels never changed record none,
# which keeps their existing stores valid.
_METHODS: dict[str, str] = {"blur": "uint8-per-pass"}


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
        """What a store records; a store is only resumed with an equal dict."""
        data: dict[str, float | str] = {"kind": self.kind, "level": float(self.level)}
        if self.kind in _METHODS:
            data["method"] = _METHODS[self.kind]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Perturbation":
        """The perturbation a store recorded.

        Raises:
            ConfigError: the record names another method than the one implemented (e.g. a blur
                store made before blur became the peers' uint8 filter), so its pixels would differ.
        """
        perturbation = cls(data["kind"], data["level"])
        method = _METHODS.get(perturbation.kind)
        if data.get("method") != method:
            raise ConfigError(
                f"{perturbation.kind} method must be {method!r}, got {data.get('method')!r}: these images were "
                f"perturbed by an earlier definition; extract them again into a new folder"
            )
        return perturbation

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
