"""Bounded walks over an image file's blocks: what metadata it carries, without decoding pixels.

JPEG segments (up to the start of the scan), PNG chunks (all of them, text after the image data
included) and the chunks of a RIFF (WebP) file are walked from the bytes; each block is read only
within :class:`~tidy_detect.provenance.options.Limits`, compressed PNG text is inflated with a
ceiling, and a file that ends inside a block stops the walk with a note. Nothing here raises on
bad input: every problem becomes a note.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from tidy_detect.provenance.options import Limits

XMP_JPEG = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_JPEG_EXTENDED = b"http://ns.adobe.com/xmp/extension/\x00"
XMP_PNG_KEYWORD = "XML:com.adobe.xmp"
PHOTOSHOP = b"Photoshop 3.0\x00"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_NOTES = 8

# Formats whose blocks are not walked here; the C2PA library still reads their manifests.
_MAGIC = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"))
_HEIF_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIF", b"heix": "HEIF", b"mif1": "HEIF",
                b"msf1": "HEIF", b"hevc": "HEIF"}


@dataclass
class FileMetadata:
    """What one file declares in its blocks (raw, not yet interpreted)."""

    format: str | None = None  # JPEG, PNG, WEBP, TIFF, GIF, BMP, AVIF, HEIF or None (unknown)
    texts: list[tuple[str, str]] = field(default_factory=list)  # PNG text chunks: (keyword, text)
    xmp: list[bytes] = field(default_factory=list)  # XMP packets
    exif: list[bytes] = field(default_factory=list)  # EXIF (TIFF structure, without the "Exif" header)
    photoshop: list[bytes] = field(default_factory=list)  # Photoshop resource blocks (IPTC IIM inside)
    c2pa_blocks: int = 0  # blocks that carry a C2PA manifest store (JPEG APP11, PNG caBX, RIFF C2PA)
    walked: bool = False  # whether the format's blocks were walked at all
    notes: list[str] = field(default_factory=list)  # what could not be read, and why
    read_bytes: int = 0

    def note(self, message: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(message)


def sniff_format(data: bytes) -> str | None:
    """The container format from the first bytes, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return _HEIF_BRANDS.get(data[8:12])
    return None


class _Budget:
    """How much more the walk may read: per block and for the whole file."""

    def __init__(self, meta: FileMetadata, limits: Limits) -> None:
        self.meta, self.limits = meta, limits

    def take(self, size: int, what: str) -> bool:
        """Whether a block of ``size`` bytes may be read; notes why not."""
        limits = self.limits
        if size > limits.max_block_bytes:
            self.meta.note(f"{what} of {size:,} bytes is over the limit of {limits.max_block_bytes:,} bytes per "
                           f"metadata block; not read")
            return False
        if self.meta.read_bytes + size > limits.max_metadata_bytes:
            self.meta.note(f"{what} not read: the file's metadata passed the limit of "
                           f"{limits.max_metadata_bytes:,} bytes read per file")
            return False
        self.meta.read_bytes += size
        return True

    def inflate(self, compressed: bytes, what: str) -> bytes | None:
        """zlib data inflated to at most the per-block limit; None (with a note) past it or when corrupt."""
        if not self.take(len(compressed), what):
            return None
        ceiling = self.limits.max_block_bytes
        try:
            inflater = zlib.decompressobj()
            out = inflater.decompress(compressed, ceiling + 1)
        except zlib.error as exc:
            self.meta.note(f"{what}: compressed data is corrupt ({exc}); not read")
            return None
        if len(out) > ceiling or inflater.unconsumed_tail:
            self.meta.note(f"{what} inflates to more than the limit of {ceiling:,} bytes per metadata block; "
                           f"not read")
            return None
        if not self.take(len(out), what):
            return None
        return out


def read_blocks(data: bytes, limits: Limits) -> FileMetadata:
    """Walk the blocks of an image file's bytes; never raises on bad input."""
    meta = FileMetadata(format=sniff_format(data))
    budget = _Budget(meta, limits)
    walker = {"JPEG": _walk_jpeg, "PNG": _walk_png, "WEBP": _walk_riff}.get(meta.format or "")
    if walker is not None:
        meta.walked = True
        walker(data, meta, budget, limits)
    return meta


def _walk_jpeg(data: bytes, meta: FileMetadata, budget: _Budget, limits: Limits) -> None:
    pos, n, count = 2, len(data), 0
    while pos < n:
        count += 1
        if count > limits.max_blocks:
            meta.note(f"JPEG: more than {limits.max_blocks:,} segments; the rest was not read")
            return
        if data[pos] != 0xFF:
            meta.note(f"JPEG: no segment marker at byte {pos:,} (a corrupt file?); the rest was not read")
            return
        if pos + 1 >= n:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker == 0xD9:  # end of image
            return
        if pos + 4 > n:
            break
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if length < 2:
            meta.note(f"JPEG: segment at byte {pos:,} has an impossible length {length}; the rest was not read")
            return
        if marker == 0xDA:  # start of scan: the metadata segments come before it
            return
        end = pos + 2 + length
        if end > n:
            meta.note(f"JPEG: the file ends inside a segment (at byte {n:,} of {end:,}): truncated?")
            return
        body = data[pos + 4:end]
        if marker == 0xE1 and body.startswith(b"Exif\x00\x00"):
            if budget.take(len(body), "JPEG EXIF segment"):
                meta.exif.append(body[6:])
        elif marker == 0xE1 and body.startswith(XMP_JPEG):
            if budget.take(len(body), "JPEG XMP segment"):
                meta.xmp.append(body[len(XMP_JPEG):])
        elif marker == 0xE1 and body.startswith(XMP_JPEG_EXTENDED):
            meta.note("JPEG: an extended XMP segment was not read (the main XMP packet was)")
        elif marker == 0xED and body.startswith(PHOTOSHOP):
            if budget.take(len(body), "JPEG Photoshop (IPTC) segment"):
                meta.photoshop.append(body[len(PHOTOSHOP):])
        elif marker == 0xEB and b"jumb" in body[:32]:
            meta.c2pa_blocks += 1
        pos = end
    meta.note("JPEG: the file ends before its image data (truncated?)")


def _walk_png(data: bytes, meta: FileMetadata, budget: _Budget, limits: Limits) -> None:
    pos, n, count = len(PNG_SIGNATURE), len(data), 0
    while True:
        if pos + 8 > n:
            meta.note("PNG: the file ends before its IEND chunk (truncated?)")
            return
        count += 1
        if count > limits.max_blocks:
            meta.note(f"PNG: more than {limits.max_blocks:,} chunks; the rest was not read")
            return
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        kind = data[pos + 4:pos + 8]
        start, end = pos + 8, pos + 8 + length
        if length > 0x7FFFFFFF:
            meta.note(f"PNG: chunk at byte {pos:,} has an impossible length {length:,}; the rest was not read")
            return
        if end + 4 > n:
            meta.note(f"PNG: the file ends inside its {_name(kind)} chunk (at byte {n:,} of {end + 4:,}): truncated?")
            return
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            _png_text(kind, data, start, end, meta, budget)
        elif kind == b"eXIf":
            if budget.take(length, "PNG eXIf chunk"):
                body = data[start:end]
                meta.exif.append(body[6:] if body.startswith(b"Exif\x00\x00") else body)
        elif kind == b"caBX":
            meta.c2pa_blocks += 1
        elif kind == b"IEND":
            return
        pos = end + 4


def _name(kind: bytes) -> str:
    return kind.decode("ascii").strip() if all(32 <= b < 127 for b in kind) else repr(kind)


def _png_text(kind: bytes, data: bytes, start: int, end: int, meta: FileMetadata, budget: _Budget) -> None:
    # The keyword comes first (1-79 Latin-1 characters, then a NUL): read it before deciding on the text.
    nul = data.find(b"\x00", start, min(end, start + 80))
    if nul < 0:
        meta.note(f"PNG {kind.decode()} chunk without a keyword; skipped")
        return
    keyword = data[start:nul].decode("latin-1")
    what = f"PNG {kind.decode()} chunk {keyword[:40]!r}"
    rest = nul + 1
    if kind == b"tEXt":
        if budget.take(end - rest, what):
            meta.texts.append((keyword, data[rest:end].decode("latin-1")))
        return
    if kind == b"zTXt":
        if rest >= end or data[rest] != 0:
            meta.note(f"{what}: unknown compression method; skipped")
            return
        raw = budget.inflate(data[rest + 1:end], what)
        if raw is not None:
            meta.texts.append((keyword, raw.decode("latin-1")))
        return
    # iTXt: compression flag, method, language tag NUL, translated keyword NUL, UTF-8 text
    if rest + 2 > end:
        meta.note(f"{what}: too short; skipped")
        return
    compressed, method = data[rest], data[rest + 1]
    lang_end = data.find(b"\x00", rest + 2, end)
    trans_end = data.find(b"\x00", lang_end + 1, end) if lang_end >= 0 else -1
    if trans_end < 0:
        meta.note(f"{what}: malformed (missing language or translated keyword); skipped")
        return
    body = data[trans_end + 1:end]
    if compressed:
        if method != 0:
            meta.note(f"{what}: unknown compression method; skipped")
            return
        raw = budget.inflate(body, what)
    else:
        raw = body if budget.take(len(body), what) else None
    if raw is None:
        return
    if keyword == XMP_PNG_KEYWORD:
        meta.xmp.append(raw)
    else:
        meta.texts.append((keyword, raw.decode("utf-8", "replace")))


def _walk_riff(data: bytes, meta: FileMetadata, budget: _Budget, limits: Limits) -> None:
    pos, n, count = 12, len(data), 0
    while pos + 8 <= n:
        count += 1
        if count > limits.max_blocks:
            meta.note(f"WebP: more than {limits.max_blocks:,} chunks; the rest was not read")
            return
        kind = data[pos:pos + 4]
        size = struct.unpack("<I", data[pos + 4:pos + 8])[0]
        start, end = pos + 8, pos + 8 + size
        if end > n:
            meta.note(f"WebP: the file ends inside its {_name(kind)} chunk (at byte {n:,} of {end:,}): truncated?")
            return
        if kind == b"EXIF":
            if budget.take(size, "WebP EXIF chunk"):
                body = data[start:end]
                meta.exif.append(body[6:] if body.startswith(b"Exif\x00\x00") else body)
        elif kind == b"XMP ":
            if budget.take(size, "WebP XMP chunk"):
                meta.xmp.append(data[start:end])
        elif kind == b"C2PA":
            meta.c2pa_blocks += 1
        pos = end + (size & 1)  # chunks are padded to an even size
