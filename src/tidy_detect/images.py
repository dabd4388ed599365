"""The one safe way to open an image.

Every entry point (extract, detect, the server) goes through :func:`load_image`, so every image is
decoded the same way: EXIF orientation applied, first frame of an animation, any mode converted to
8-bit RGB, a pixel limit checked from the header before decoding, and one clear ``ImageError`` for
anything that cannot be read.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tidy_detect.errors import (
    CorruptImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    UnsupportedImageError,
)

DEFAULT_MAX_PIXELS = 100_000_000

# Suffixes picked up when a folder is walked (compared lower-case). Files given by name are always
# tried, whatever their suffix.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif",
     ".heic", ".heif", ".ppm", ".pgm", ".pbm", ".tga", ".jp2"}
)

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]


@dataclass
class LoadedImage:
    """A decoded image with what the feature store records about it."""

    image: Image.Image  # RGB, 8 bits per channel, orientation applied
    sha256: str  # of the file's bytes (of the pixels for an in-memory PIL image)
    width: int
    height: int
    format: str  # "JPEG", "PNG", ... ("RAW" for an in-memory PIL image without a format)
    num_bytes: int


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(source: ImageSource, *, name: str | None = None) -> tuple[bytes, str]:
    """Return the raw bytes of a path or a bytes-like object, and a name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<bytes>"
    path = Path(source)
    label = name or str(path)
    try:
        return path.read_bytes(), label
    except FileNotFoundError as exc:
        raise ImageNotFoundError(f"{label}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageNotFoundError(f"{label}: is a folder, not an image file") from exc
    except PermissionError as exc:
        raise ImageNotFoundError(f"{label}: permission denied") from exc
    except OSError as exc:
        raise ImageNotFoundError(f"{label}: cannot be read ({exc.strerror or exc})") from exc


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> LoadedImage:
    """Decode an image from a path, bytes or a PIL image into 8-bit RGB.

    Args:
        source: a file path, the file's bytes, or an already opened PIL image.
        max_pixels: images whose header announces more pixels than this are refused before
            decoding (decompression bombs).
        name: how to call the image in error messages (defaults to the path).

    Returns:
        A :class:`LoadedImage`; ``sha256`` is the hash of the file bytes, so it identifies the
        file's content independently of where it lies.

    Raises:
        ImageNotFoundError, UnsupportedImageError, CorruptImageError, ImageTooLargeError: all
        subclasses of ``ImageError``, with the image's name and what is wrong in the message.
    """
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        _check_pixels(source.width, source.height, max_pixels, label)
        rgb = to_rgb(source, label)
        digest = sha256_bytes(rgb.tobytes() + f"{rgb.width}x{rgb.height}".encode())
        return LoadedImage(rgb, digest, rgb.width, rgb.height, source.format or "RAW", 0)

    data, label = read_source(source, name=name)
    if not data:
        raise CorruptImageError(f"{label}: the file is empty (0 bytes)")
    digest = sha256_bytes(data)
    with warnings.catch_warnings():
        # Pillow warns (and raises above twice its limit) for large images; our own limit,
        # checked from the header below, replaces both.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        previous_limit = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None
            image = _open(data, label)
            _check_pixels(image.width, image.height, max_pixels, label)
            fmt = image.format or "UNKNOWN"
            rgb = _decode(image, label)
        except ImageError as exc:
            exc.sha256 = digest  # error records still identify the file's content
            raise
        finally:
            Image.MAX_IMAGE_PIXELS = previous_limit
    return LoadedImage(rgb, digest, rgb.width, rgb.height, fmt, len(data))


def _open(data: bytes, label: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedImageError(
            f"{label}: not an image, or a format Pillow cannot read here "
            f"(readable include JPEG, PNG, WebP, BMP, TIFF, GIF; HEIC needs the pillow-heif plugin)"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptImageError(f"{label}: the header cannot be read ({exc})") from exc


def _check_pixels(width: int, height: int, max_pixels: int, label: str) -> None:
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"{label}: the header gives an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{label}: {width}x{height} = {width * height:,} pixels is over the limit of "
            f"{max_pixels:,} (a guard against decompression bombs); raise max_pixels if the image is genuine"
        )


def _decode(image: Image.Image, label: str) -> Image.Image:
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animations: the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:  # pragma: no cover - limit disabled above
        raise ImageTooLargeError(f"{label}: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        message = str(exc)
        if "truncated" in message.lower() or isinstance(exc, EOFError):
            raise CorruptImageError(f"{label}: the file is truncated ({message or 'unexpected end of data'})") from exc
        raise CorruptImageError(f"{label}: the image data cannot be decoded ({message})") from exc
    return to_rgb(image, label)


def to_rgb(image: Image.Image, label: str = "<image>") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Alpha is dropped (the stored colour values are kept), as ``convert("RGB")`` does in the
    benchmark code the paper's numbers come from. 16-bit and float grayscale are rescaled to 8 bits
    rather than clipped.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.uint16).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = float(array.max()) if array.size else 0.0
        scale = 255.0 / 65535.0 if high > 255 else 1.0  # 16-bit PNGs open as mode "I"
        if mode == "F" and high <= 1.0:
            scale = 255.0
        return Image.fromarray(np.clip(array * scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UnsupportedImageError(f"{label}: pixel mode {mode!r} cannot be converted to RGB ({exc})") from exc


def is_image_path(path: Path) -> bool:
    """Whether a folder walk should pick up this file (by suffix, case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "ImageError",
    "ImageSource",
    "LoadedImage",
    "is_image_path",
    "load_image",
    "read_source",
    "sha256_bytes",
    "to_rgb",
]
