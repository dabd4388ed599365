"""What provenance reading may do and how much of a file it may read: options and limits.

Every bound a hostile file could push against is here, named, so a message can quote it and the
docs can list it (docs/provenance.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tidy_detect.errors import ConfigError

MIB = 1024 * 1024
MODES = ("full", "metadata", "off")
MODE_ENV = "TIDY_DETECT_PROVENANCE"
TRUST_ENV = "TIDY_DETECT_C2PA_TRUST_ANCHORS"


@dataclass(frozen=True)
class Limits:
    """Bounds on what one file's provenance reading reads, keeps and reports.

    Attributes:
        max_file_bytes: files larger than this are not read for provenance at all (the same
            default as the images' own limit).
        max_blocks: JPEG segments, PNG chunks or RIFF chunks walked; a file with more stops there.
        max_block_bytes: largest text, XMP, EXIF or IPTC block read (or inflated, for compressed
            PNG text); larger ones are skipped with a note in ``error``.
        max_metadata_bytes: all blocks read from one file together.
        max_xml_elements: elements of one XMP packet looked at.
        max_findings: findings kept per file (``truncated`` says when more were found).
        max_string: characters of any string reported (values, summaries, errors).
        max_manifest_json: characters of the C2PA manifest store's JSON parsed.
        watermark_max_pixels: the watermark is looked for only in images of at most this many
            pixels (and at least 256 x 256, the decoder's own minimum), decoded for that alone:
            the decoder is a pure-Python loop over 4 x 4 blocks (about 0.1 s per 512 x 512 pixels
            on one core). The default covers every native output size of the generators that embed
            it (SD 1/2 at 512-768 px, SDXL's buckets up to about 1.03 M pixels); larger images were
            upscaled, which destroys the mark anyway.
    """

    max_file_bytes: int = 512 * MIB
    max_blocks: int = 10_000
    max_block_bytes: int = 1 * MIB
    max_metadata_bytes: int = 8 * MIB
    max_xml_elements: int = 20_000
    max_findings: int = 24
    max_string: int = 300
    max_manifest_json: int = 4 * MIB
    watermark_max_pixels: int = 1_200_000

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_blocks", "max_block_bytes", "max_metadata_bytes", "max_xml_elements",
                     "max_findings", "max_string", "max_manifest_json", "watermark_max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"provenance limit {name} must be an integer >= 1, got {value!r}")
        if self.max_string < 40:
            raise ConfigError(f"provenance limit max_string must be >= 40, got {self.max_string!r}")


@dataclass(frozen=True)
class ProvenanceOptions:
    """Which provenance checks run.

    Attributes:
        mode: ``full`` reads the file's metadata and C2PA manifest and looks for the invisible
            watermark (which decodes the pixels once more); ``metadata`` skips the watermark;
            ``off`` reads nothing (records then say provenance was not read).
        trust_anchors: PEM text of root certificates a C2PA signer's chain may end at, on top of
            the c2pa library's own; only a chain ending at one of them is ``verified``.
        trust_source: where ``trust_anchors`` came from (a file name), for messages.
        limits: the bounds of :class:`Limits`.
    """

    mode: str = "full"
    trust_anchors: str | None = None
    trust_source: str | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"provenance mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def watermark(self) -> bool:
        return self.mode == "full"

    @classmethod
    def from_env(cls, mode: str | None = None, trust_anchors: str | Path | None = None,
                 limits: Limits | None = None) -> "ProvenanceOptions":
        """Options from the arguments, else from the environment: ``TIDY_DETECT_PROVENANCE``
        (full, metadata or off; default full) and ``TIDY_DETECT_C2PA_TRUST_ANCHORS`` (a PEM file).

        Raises:
            ConfigError: an unknown mode, or a trust-anchor file that cannot be read or holds no
                PEM certificate.
        """
        mode = mode or os.environ.get(MODE_ENV, "").strip().lower() or "full"
        if mode not in MODES:
            raise ConfigError(f"provenance mode ({MODE_ENV} or --provenance) must be one of {', '.join(MODES)}, "
                              f"got {mode!r}")
        trust = trust_anchors if trust_anchors is not None else (os.environ.get(TRUST_ENV) or None)
        pem, source = (load_trust_anchors(trust) if trust else (None, None))
        return cls(mode, pem, source, limits or Limits())


def load_trust_anchors(path: str | Path) -> tuple[str, str]:
    """The PEM text of a trust-anchor file and its name.

    Raises:
        ConfigError: the file cannot be read, is over 4 MiB, or holds no valid PEM certificate.
    """
    path = Path(path).expanduser()
    try:
        if path.stat().st_size > 4 * MIB:
            raise ConfigError(f"C2PA trust anchors {path}: over 4 MiB; a trust list is a few hundred KiB of PEM "
                              f"certificates")
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"C2PA trust anchors {path}: cannot be read ({detail}); give a PEM file of root "
                          f"certificates ({TRUST_ENV} or --c2pa-trust)") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigError(f"C2PA trust anchors {path}: no '-----BEGIN CERTIFICATE-----' block found; give a PEM "
                          f"file of root certificates")
    try:
        from cryptography import x509

        certificates = x509.load_pem_x509_certificates(text.encode("ascii"))
    except ImportError:  # without cryptography the c2pa library is absent too: nothing would use them
        certificates = [None]
    except ValueError as exc:
        raise ConfigError(f"C2PA trust anchors {path}: not PEM certificates ({exc}); give a file of "
                          f"'-----BEGIN CERTIFICATE-----' blocks") from None
    if not certificates:
        raise ConfigError(f"C2PA trust anchors {path}: no certificate in the PEM blocks")
    return text, path.name
