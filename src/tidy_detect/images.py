"""The one safe way to open an image.

Every entry point (extract, detect, the server) goes through :func:`load_image`, so every image is
decoded the same way: EXIF orientation applied, first frame of an animation, any mode converted to
8-bit RGB, a pixel limit checked from the header before decoding, and one clear ``ImageError`` for
anything that cannot be read.

Files are read within bounds (:func:`read_file`): only regular files (a FIFO would block forever, a
device like ``/dev/zero`` never ends), at most ``max_bytes`` of them (checked from the file's size
before reading, and again while reading, since a file can grow), and the header is checked against
the pixel limit from the first bytes before the rest of the file is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import stat as stat_module
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tidy_detect.errors import (
    CorruptImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    NotAFileError,
    UnsupportedImageError,
)

MIB = 1024 * 1024
DEFAULT_MAX_PIXELS = 100_000_000
# An uncompressed 100 M pixel RGB image (BMP, TIFF) is 300 MB; 512 MiB leaves room for 16-bit and
# metadata-heavy files while refusing anything that could only be an accident or an attack.
DEFAULT_MAX_FILE_BYTES = 512 * MIB
# Read first and probed for the image size: enough for the header of PNG, GIF, BMP, WebP and of
# JPEGs whose EXIF/ICC segments come before the frame header in the first 256 KiB.
HEADER_BYTES = 256 * 1024
# File timestamps tick at a few milliseconds on common file systems (seconds on some network and
# FAT ones): a file changed less than this before it was read is "racy" (see FileStat.of).
RACY_NS = 2_000_000_000

# Suffixes picked up when a folder is walked (compared lower-case). Files given by name are always
# tried, whatever their suffix.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif",
     ".heic", ".heif", ".ppm", ".pgm", ".pbm", ".tga", ".jp2"}
)

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]


@dataclass(frozen=True, slots=True)  # slots: resume holds one per stored row
class FileStat:
    """What resume compares to tell whether a file changed since it was read (see the store docs).

    ``ctime_ns`` changes whenever a file's content or metadata is changed through the file system
    and cannot be set back by a user (unlike ``mtime``), so a file whose recorded size, mtime,
    ctime and inode are all unchanged has not been rewritten in place or replaced.
    """

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, result: os.stat_result, read_ns: int | None = None) -> "FileStat":
        """The stat of a file; with ``read_ns`` (when it was read), a file changed so shortly
        before that a later change could share its timestamps is recorded with ``ctime_ns = -1``,
        which never matches, so resume checks its content (git's "racily clean" rule)."""
        ctime = int(result.st_ctime_ns)
        if read_ns is not None and read_ns - max(ctime, int(result.st_mtime_ns)) < RACY_NS:
            ctime = -1
        return cls(int(result.st_size), int(result.st_mtime_ns), ctime, int(result.st_ino))


@dataclass
class LoadedImage:
    """A decoded image with what the feature store records about it."""

    image: Image.Image  # RGB, 8 bits per channel, orientation applied
    sha256: str  # of the file's bytes (of the pixels for an in-memory PIL image)
    width: int  # of the decoded image, before any reduction
    height: int
    format: str  # "JPEG", "PNG", ... ("RAW" for an in-memory PIL image without a format)
    num_bytes: int
    stat: FileStat | None = None  # of the file read (None for bytes and PIL sources)
    # Set by reduce_for_models: the native-resolution centre crop CLIP's global view needs, and how
    # many original pixels one pixel of ``image`` spans (boxes found on ``image`` scale by it).
    center: Image.Image | None = None
    scale: float = 1.0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_source(source: ImageSource, *, name: str | None = None, max_bytes: int = DEFAULT_MAX_FILE_BYTES
                ) -> tuple[bytes, str]:
    """Return the raw bytes of a path or a bytes-like object, and a name for messages.

    Paths are read with :func:`read_file` (regular files only, at most ``max_bytes``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        _check_bytes(len(source), max_bytes, label)
        return bytes(source), label
    label = name or str(source)
    data, _ = read_file(source, max_bytes=max_bytes, label=label)
    return data, label


_FILE_KINDS = ((stat_module.S_ISFIFO, "a FIFO (named pipe)"), (stat_module.S_ISCHR, "a character device"),
               (stat_module.S_ISBLK, "a block device"), (stat_module.S_ISSOCK, "a socket"))


def _check_regular(result: os.stat_result, label: str) -> None:
    mode = result.st_mode
    if stat_module.S_ISDIR(mode):
        raise ImageNotFoundError(f"{label}: is a folder, not an image file")
    if not stat_module.S_ISREG(mode):
        kind = next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")
        raise NotAFileError(f"{label}: is {kind}, not a regular file; only regular files are read as images")


def _check_bytes(size: int, max_bytes: int, label: str) -> None:
    if size > max_bytes:
        raise ImageTooLargeError(f"{label}: {size:,} bytes is over the limit of {max_bytes:,} bytes "
                                 f"({max_bytes / MIB:g} MiB) per image file; raise --max-file-mb if the file is genuine")


def read_file(path: str | Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES, label: str | None = None,
              probe: Callable[[bytes], None] | None = None) -> tuple[bytes, FileStat]:
    """Read a regular file of at most ``max_bytes``, with its :class:`FileStat` as read.

    ``probe`` is called with the first :data:`HEADER_BYTES` before the rest is read, so a header
    that already shows the file is unwanted (too many pixels) stops the read there.

    Raises:
        ImageNotFoundError: missing, a folder, or unreadable. NotAFileError: a FIFO, device or
        socket. ImageTooLargeError: over ``max_bytes``. Whatever ``probe`` raises.
    """
    label = label or str(path)
    try:
        _check_regular(os.stat(path), label)
        # O_NONBLOCK: if a FIFO was put in the file's place after the check, open must not wait
        # for a writer; for regular files it changes nothing.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise ImageNotFoundError(f"{label}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageNotFoundError(f"{label}: is a folder, not an image file") from exc
    except PermissionError as exc:
        raise ImageNotFoundError(f"{label}: permission denied") from exc
    except OSError as exc:
        raise ImageNotFoundError(f"{label}: cannot be read ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "rb", buffering=0) as handle:
        try:
            read_ns = time.time_ns()
            opened = os.fstat(fd)
            _check_regular(opened, label)  # what was opened, not what was checked before
            _check_bytes(opened.st_size, max_bytes, label)
            head = _read_up_to(handle, min(HEADER_BYTES, max_bytes + 1))
            if probe is not None and len(head) < opened.st_size:
                probe(head)
            data = head + _read_up_to(handle, max_bytes + 1 - len(head))
        except OSError as exc:
            raise ImageNotFoundError(f"{label}: cannot be read ({exc.strerror or exc})") from exc
    _check_bytes(len(data), max_bytes, label)  # it grew while being read
    return data, FileStat.of(opened, read_ns)


def _read_up_to(handle: io.RawIOBase, size: int) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = handle.read(min(left, 16 * MIB))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def stat_file(path: str | Path) -> FileStat | None:
    """The :class:`FileStat` of a path now (following symlinks), or None if it cannot be stat'ed."""
    try:
        return FileStat.of(os.stat(path))
    except OSError:
        return None


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
               exif_transpose: bool = True) -> LoadedImage:
    """Decode an image from a path, bytes or a PIL image into 8-bit RGB.

    Args:
        source: a file path, the file's bytes, or an already opened PIL image.
        max_pixels: images whose header announces more pixels than this are refused before
            decoding (decompression bombs), for files from the first bytes before the rest is read.
        name: how to call the image in error messages (defaults to the path).
        max_bytes: files (and bytes) larger than this are refused before they are read.
        exif_transpose: turn the pixels as the EXIF orientation tag says (what a viewer shows);
            ``False`` keeps them as stored, as the benchmarks' reference code reads them
            (``Image.open(path).convert("RGB")``), so that their centre crops are the same.

    Returns:
        A :class:`LoadedImage`; ``sha256`` is the hash of the file bytes, so it identifies the
        file's content independently of where it lies.

    Raises:
        ImageNotFoundError, NotAFileError, UnsupportedImageError, CorruptImageError,
        ImageTooLargeError: all subclasses of ``ImageError``, with the image's name and what is
        wrong in the message. Errors about a file carry its ``stat`` (a :class:`FileStat` or None)
        and, once it was read whole, its ``sha256``.
    """
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        _check_pixels(source.width, source.height, max_pixels, label)
        rgb = to_rgb(source, label)
        digest = sha256_bytes(rgb.tobytes() + f"{rgb.width}x{rgb.height}".encode())
        return LoadedImage(rgb, digest, rgb.width, rgb.height, source.format or "RAW", 0)

    file_stat: FileStat | None = None
    with pixel_limit_lifted():
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, label = read_source(source, name=name, max_bytes=max_bytes)
        else:
            label = name or str(source)
            try:
                data, file_stat = read_file(source, max_bytes=max_bytes, label=label,
                                            probe=lambda head: _probe_header(head, max_pixels, label))
            except ImageError as exc:
                exc.stat = stat_file(source)
                raise
        try:
            if not data:
                raise CorruptImageError(f"{label}: the file is empty (0 bytes)")
            digest = sha256_bytes(data)
            try:
                image = _open(data, label)
                _check_pixels(image.width, image.height, max_pixels, label)
                fmt = image.format or "UNKNOWN"
                rgb = _decode(image, label, exif_transpose)
            except ImageError as exc:
                exc.sha256 = digest  # error records still identify the file's content
                raise
        except ImageError as exc:
            exc.stat = file_stat
            raise
    return LoadedImage(rgb, digest, rgb.width, rgb.height, fmt, len(data), file_stat)


class pixel_limit_lifted:
    """Pillow warns (and raises above twice its limit) for large images; our own limit, checked
    from the header, replaces both while any of our loads runs. Reference-counted under a lock,
    since decoding runs in several threads and each must see the limit lifted until it is done."""

    _lock = threading.Lock()
    _depth = 0
    _saved: int | None = None

    def __enter__(self) -> None:
        cls = type(self)
        with cls._lock:
            if cls._depth == 0:
                cls._saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None  # also silences DecompressionBombWarning
            cls._depth += 1

    def __exit__(self, *exc: object) -> None:
        cls = type(self)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0:
                Image.MAX_IMAGE_PIXELS = cls._saved


def _probe_header(head: bytes, max_pixels: int, label: str) -> None:
    """Refuse a file from its first bytes when they already announce too many pixels.

    A header that cannot be parsed from the first bytes alone (a TIFF whose directory is at the
    end, a JPEG with huge metadata segments) is left to the full read, which checks it again.
    """
    try:
        image = Image.open(io.BytesIO(head))
    except Exception:  # noqa: BLE001 - any failure here only means "decide after the full read"
        return
    _check_pixels(image.width, image.height, max_pixels, label)


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


def _decode(image: Image.Image, label: str, exif_transpose: bool = True) -> Image.Image:
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animations: the first frame
        image.load()
        if exif_transpose:
            # In place: without an orientation tag exif_transpose would return a full copy.
            ImageOps.exif_transpose(image, in_place=True)
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


def reduce_for_models(loaded: LoadedImage, max_side: int, view_size: int) -> LoadedImage:
    """A copy of ``loaded`` whose image is at most ``max_side`` pixels on its longer side.

    Every model resizes its input anyway (Grounding DINO to at most 1333 px, OWLv2 to 960, the
    captioners to 384 or less, object crops to CLIP's 224); only CLIP's global view, a centre crop
    of ``view_size`` pixels at native resolution, needs the original pixels, so that crop is taken
    first and kept in ``center``. ``scale`` says how many original pixels one reduced pixel spans,
    so boxes found on the reduced image map back to the original. Images already small enough are
    returned as they are; ``max_side <= 0`` turns reduction off.

    Features of a reduced image differ slightly from those of the full one (the models resize
    from another starting size), which is why only the web service reduces, and only above a
    size no benchmark image reaches.
    """
    image = loaded.image
    longest = max(image.size)
    if max_side <= 0 or longest <= max_side or loaded.center is not None:
        return loaded
    from tidy_detect.views import center_crop

    center = center_crop(image, view_size)
    factor = longest / max_side
    size = (max(1, round(image.width / factor)), max(1, round(image.height / factor)))
    # reducing_gap: Pillow first shrinks by an integer factor with a box filter (fast, little
    # memory), then resamples the rest with Lanczos.
    reduced = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    return dataclasses.replace(loaded, image=reduced, center=center, scale=longest / max(size))


def is_image_path(path: Path) -> bool:
    """Whether a folder walk should pick up this file (by suffix, case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "FileStat",
    "IMAGE_SUFFIXES",
    "ImageError",
    "ImageSource",
    "LoadedImage",
    "is_image_path",
    "load_image",
    "pixel_limit_lifted",
    "read_file",
    "read_source",
    "reduce_for_models",
    "stat_file",
    "sha256_bytes",
    "to_rgb",
]
