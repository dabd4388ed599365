"""What the web service allows and how it batches: one frozen, self-validating dataclass.

The defaults are sized for the smallest machine this project runs on (2 cores, 24 GiB): the worst
request the limits allow holds about 0.3 GiB of its own (:func:`worst_request_bytes`), decoding
holds at most about 1 GiB for the whole server (:func:`decode_bytes`), and 4,096 open connections
cost about 0.1 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tidy_detect.errors import ConfigError

MIB = 1024 * 1024
GIB = 1024 * MIB

# Decoding one image holds Pillow's RGB buffer (4 bytes per pixel) and, for a moment, a second
# one (the orientation step copies; palette and greyscale files convert): 8 bytes per pixel.
DECODE_BYTES_PER_PIXEL = 8
IMAGE_BYTES_PER_PIXEL = 4  # a decoded RGB image kept for the model (Pillow pads RGB to 32 bits)


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"serve setting {name} must be an integer >= {minimum}, got {value!r}")


def _seconds(name: str, value: object, minimum: float = 0.0, allow_zero: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (
        value > minimum or (allow_zero and value == 0)) and value <= 86_400 * 3650
    if not ok:
        rule = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"serve setting {name} must be a number of seconds {rule}, got {value!r}")


@dataclass(frozen=True)
class ServeSettings:
    """Limits, micro-batching and access of the web service.

    Attributes:
        max_upload_bytes: largest request body (all files of one request together); larger ones get
            413 before they are read into memory.
        max_files: most images in one request (413 above).
        max_pixels: most pixels per image, checked from the header before decoding (422 above);
            ``None`` takes the detector's ``runtime.max_pixels``.
        max_request_pixels: most pixels of all images of one request together, from their headers,
            before any is decoded (413 above): bounds the decoding time one request can ask for.
        decode_pixels: the server-wide pixel budget of images being decoded at once (the large
            lane); an image waits until its pixels fit, smaller ones may pass a larger one that
            does not fit yet. Decoding costs about 8 bytes per pixel, so 128M pixels is ~1 GiB.
        decode_workers: threads decoding large images (the large lane).
        small_image_pixels: images of at most this many pixels decode in their own thread (the
            small lane) outside the budget, so a small request is never stuck behind large ones.
        reduce_max_side: decoded images are downscaled so their longer side is at most this
            before they wait for the model (the models resize anyway; CLIP's native-resolution
            centre crop is kept); 0 turns reduction off.
        max_batch: most images per model call; 1 turns micro-batching off.
        max_wait_ms: how long the first image of a batch waits for others; 0 never waits.
        max_pending: most images waiting for the model; more get 503 (so memory stays bounded
            under overload instead of queueing without end).
        max_connections: most open connections; at the limit the oldest idle one is closed for a
            new one, and with none idle the new one gets 503. Also capped below the process's
            open-file limit.
        header_timeout: seconds a connection may take to send a request's headers (slowloris);
            408 (or a plain close when nothing was sent) after.
        body_timeout: most seconds between two chunks of a request body; 408 after.
        body_total_timeout: most seconds for a whole request body; 408 after.
        keepalive_timeout: seconds an idle keep-alive connection stays open.
        api_key: when set, every ``/v1`` route needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
        results_dir: when set, each request's JSON records are written there (never the images).
        results_keep: most files kept in ``results_dir``, oldest removed first; 0 keeps all.
        results_max_age_days: files older than this are removed from ``results_dir``; 0 keeps all.
    """

    max_upload_bytes: int = 20 * MIB
    max_files: int = 16
    max_pixels: int | None = None
    max_request_pixels: int = 400_000_000
    decode_pixels: int = 128_000_000
    decode_workers: int = 2
    small_image_pixels: int = 4_000_000
    reduce_max_side: int = 2048
    max_batch: int = 8
    max_wait_ms: float = 20.0
    max_pending: int = 256
    max_connections: int = 4096
    header_timeout: float = 15.0
    body_timeout: float = 30.0
    body_total_timeout: float = 120.0
    keepalive_timeout: float = 5.0
    api_key: str | None = None
    results_dir: Path | None = None
    results_keep: int = 10_000
    results_max_age_days: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_files", "max_batch", "max_pending", "max_request_pixels",
                     "decode_pixels", "decode_workers", "small_image_pixels", "max_connections"):
            _positive_int(name, getattr(self, name))
        for name in ("reduce_max_side", "results_keep"):
            _positive_int(name, getattr(self, name), minimum=0)
        if self.max_pixels is not None and (isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int)
                                            or self.max_pixels < 1):
            raise ConfigError(f"serve setting max_pixels must be an integer >= 1 or None, got {self.max_pixels!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) or not (
                0 <= self.max_wait_ms <= 60_000):
            raise ConfigError(f"serve setting max_wait_ms must be between 0 and 60000, got {self.max_wait_ms!r}")
        for name in ("header_timeout", "body_timeout", "body_total_timeout", "keepalive_timeout"):
            _seconds(name, getattr(self, name))
        _seconds("results_max_age_days", self.results_max_age_days, allow_zero=True)
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("serve setting api_key must not be empty; leave it unset to serve without a key")
        if self.results_dir is not None and not isinstance(self.results_dir, Path):
            object.__setattr__(self, "results_dir", Path(self.results_dir))

    def limits(self, detector_max_pixels: int) -> dict[str, int]:
        """The limits as the API reports them (``GET /v1/info``)."""
        return {"max_upload_bytes": self.max_upload_bytes, "max_files": self.max_files,
                "max_pixels": self.max_pixels or detector_max_pixels}

    def decode_bytes(self) -> int:
        """Most memory decoding holds at once, server-wide: the large lane's budget plus one small image."""
        return (self.decode_pixels + self.small_image_pixels) * DECODE_BYTES_PER_PIXEL

    def worst_request_bytes(self) -> int:
        """Most memory one request holds of its own: its body (as received and as parts) and its
        decoded images waiting for the model (reduced, or at the per-request pixel limit)."""
        kept_pixels = self.max_request_pixels
        if self.reduce_max_side:
            kept_pixels = min(kept_pixels, self.max_files * self.reduce_max_side ** 2)
        return 2 * self.max_upload_bytes + kept_pixels * IMAGE_BYTES_PER_PIXEL

    def pending_bytes(self) -> int:
        """Most memory the images waiting for the model hold (``max_pending`` of them, reduced)."""
        per_image = self.reduce_max_side ** 2 if self.reduce_max_side else (self.max_pixels or 100_000_000)
        return self.max_pending * per_image * IMAGE_BYTES_PER_PIXEL

    def memory_summary(self) -> str:
        """One sentence for ``serve --help`` and the log: what the limits cost in memory."""
        side = f"reduced to {self.reduce_max_side} px a side" if self.reduce_max_side else "not reduced"
        return (f"the worst request holds about {self.worst_request_bytes() / GIB:.2f} GiB (its body twice and its "
                f"decoded images, {side}); decoding holds at most about {self.decode_bytes() / GIB:.2f} GiB "
                f"server-wide; under overload the images waiting for the model hold up to "
                f"{self.pending_bytes() / GIB:.1f} GiB")
