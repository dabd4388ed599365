"""What the web service allows and how it batches: one frozen, self-validating dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tidy_detect.errors import ConfigError

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    """Limits, micro-batching and access of the web service.

    Attributes:
        max_upload_bytes: largest request body (all files of one request together); larger ones get
            413 before they are read into memory.
        max_files: most images in one request (413 above).
        max_pixels: most pixels per image, checked from the header before decoding (422 above);
            ``None`` takes the detector's ``runtime.max_pixels``.
        max_batch: most images per model call; 1 turns micro-batching off.
        max_wait_ms: how long the first image of a batch waits for others; 0 never waits.
        max_pending: most images waiting for the model; more get 503 (so memory stays bounded
            under overload instead of queueing without end).
        api_key: when set, every ``/v1`` route needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
        results_dir: when set, each request's JSON records are written there (never the images).
    """

    max_upload_bytes: int = 20 * MIB
    max_files: int = 16
    max_pixels: int | None = None
    max_batch: int = 8
    max_wait_ms: float = 20.0
    max_pending: int = 256
    api_key: str | None = None
    results_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_files", "max_batch", "max_pending"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"serve setting {name} must be an integer >= 1, got {value!r}")
        if self.max_pixels is not None and (isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int)
                                            or self.max_pixels < 1):
            raise ConfigError(f"serve setting max_pixels must be an integer >= 1 or None, got {self.max_pixels!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) or not (
                0 <= self.max_wait_ms <= 60_000):
            raise ConfigError(f"serve setting max_wait_ms must be between 0 and 60000, got {self.max_wait_ms!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("serve setting api_key must not be empty; leave it unset to serve without a key")
        if self.results_dir is not None and not isinstance(self.results_dir, Path):
            object.__setattr__(self, "results_dir", Path(self.results_dir))

    def limits(self, detector_max_pixels: int) -> dict[str, int]:
        """The limits as the API reports them (``GET /v1/info``)."""
        return {"max_upload_bytes": self.max_upload_bytes, "max_files": self.max_files,
                "max_pixels": self.max_pixels or detector_max_pixels}
