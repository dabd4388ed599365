"""The invisible watermark that Stable Diffusion's reference scripts embed, read with its own decoder.

The reference scripts of Stable Diffusion 1 and 2, Stability AI's generative-models (SDXL) and
diffusers' SDXL pipelines mark every output with the DWT-DCT watermark of the
``invisible-watermark`` package (``imwatermark``), each with a fixed payload (:data:`PAYLOADS`).
Decoding reads a fixed number of bits from any image; only a close match with a known payload is a
finding. The mark does not survive JPEG compression or resizing well, so "not found" says nothing.

Needs the ``provenance`` extra (``pip install 'tidy-detect[provenance]'``: invisible-watermark,
opencv-python, PyWavelets).
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from tidy_detect.provenance.findings import Finding, Findings
from tidy_detect.provenance.options import Limits

MIN_PIXELS = 256 * 256  # the decoder refuses smaller images
MATCH = 0.9  # share of a payload's bits that must match (random bits match half; 29 of SDV2's 32)
METHOD = "dwtDct"


def _bits(message: int, length: int) -> tuple[int, ...]:
    return tuple(int(b) for b in format(message, f"0{length}b"))


@dataclass(frozen=True)
class Payload:
    """A watermark payload a generator embeds, and where it comes from."""

    name: str
    bits: tuple[int, ...]
    text: str | None = None  # for byte payloads: the text they spell

    @classmethod
    def from_text(cls, name: str, text: str) -> "Payload":
        bits = np.unpackbits(np.frombuffer(text.encode("ascii"), np.uint8))
        return cls(name, tuple(int(b) for b in bits), text)


PAYLOADS = (
    Payload.from_text("Stable Diffusion 1 (CompVis reference scripts)", "StableDiffusionV1"),
    Payload.from_text("Stable Diffusion 2 (Stability AI reference scripts)", "SDV2"),
    Payload("SDXL (Stability AI generative-models, diffusers)",
            _bits(0b101100111110110010010000011110111011000110011110, 48)),
    Payload("Stability AI generative-models (second 48-bit message)",
            _bits(0b001010101111111010000111100111001111010100101110, 48)),
)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any, str | None]:
    try:
        from imwatermark import WatermarkDecoder
    except ImportError:
        return None, "invisible-watermark is not installed (pip install 'tidy-detect[provenance]')"
    except Exception as exc:  # cv2 or PyWavelets failing to load
        return None, f"invisible-watermark does not load ({type(exc).__name__}: {str(exc)[:100]})"
    return WatermarkDecoder, None


def unavailable() -> str | None:
    """Why the watermark cannot be read here, or None."""
    return _load()[1]


def _pixels(data: bytes, limits: Limits) -> tuple[np.ndarray | None, str | None]:
    """The stored pixels (no orientation applied: the mark was embedded in them) as BGR, or why not."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height < MIN_PIXELS:
                    return None, f"the image is {width}x{height} pixels, below the decoder's minimum of 256x256"
                if width * height > limits.watermark_max_pixels:
                    return None, (f"the image is {width}x{height} pixels, over the watermark check's limit of "
                                  f"{limits.watermark_max_pixels:,} pixels")
                rgb = np.asarray(image.convert("RGB"))
    except Exception as exc:
        return None, f"the pixels cannot be decoded ({type(exc).__name__})"
    return np.ascontiguousarray(rgb[:, :, ::-1]), None


def _one_pass_enabled() -> bool:
    # The project's one switch for speed-ups (see tidy_detect.models.optimize), read here without
    # importing the models.
    return os.environ.get("TIDY_DETECT_SPEEDUPS", "").strip().lower() not in ("off", "0", "false", "no", "none")


def decode_lengths(bgr: np.ndarray, lengths: list[int], decoder_class: Any) -> dict[int, np.ndarray]:
    """The bits the DWT-DCT decoder reads for each payload length, as 0/1 arrays.

    The decoder's cost is one pass over every 4 x 4 block whatever the length, and each block votes
    for bit ``block_index % length``. So one pass with the least common multiple of the lengths,
    keeping every block's vote, gives each length's bits by pooling the votes of the indices that
    fall on the same bit: the same votes, averaged and thresholded as the decoder does, in one pass
    instead of one per length. This uses the decoder's block step (``EmbedMaxDct.decode_frame``);
    if that is not there (another invisible-watermark version) or ``TIDY_DETECT_SPEEDUPS=off``, each
    length is decoded with the public ``WatermarkDecoder`` instead.
    """
    if _one_pass_enabled():
        try:
            return _decode_one_pass(bgr, lengths)
        except (ImportError, AttributeError, TypeError):  # internals of another version
            pass
    return {length: np.asarray(decoder_class("bits", length).decode(bgr, METHOD), np.uint8).reshape(-1)[:length]
            for length in lengths}


def _decode_one_pass(bgr: np.ndarray, lengths: list[int]) -> dict[int, np.ndarray]:
    import cv2
    import pywt
    from imwatermark.maxDct import EmbedMaxDct

    period = math.lcm(*lengths)
    embed = EmbedMaxDct(watermarks=[], wmLen=period)  # the decoder's defaults: scales [0, 36, 36], 4 x 4 blocks
    rows, cols = bgr.shape[:2]
    yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
    votes: list[list[int]] = [[] for _ in range(period)]
    for channel in range(2):  # as EmbedMaxDct.decode: the first two channels whose scale is set
        scale = embed._scales[channel]
        if scale <= 0:
            continue
        approximation, _ = pywt.dwt2(yuv[:rows // 4 * 4, :cols // 4 * 4, channel], "haar")
        votes = embed.decode_frame(approximation, scale, votes)
    out = {}
    for length in lengths:
        pooled = [[v for j in range(bit, period, length) for v in votes[j]] for bit in range(length)]
        out[length] = np.array([np.array(p).mean() * 255 > 127 for p in pooled], np.uint8)
    return out


def find_watermark(data: bytes, findings: Findings, limits: Limits) -> dict[str, Any]:
    """Look for the known payloads in an image's pixels; a match becomes a finding.

    Returns the ``watermark`` part of the provenance record: ``{"checked", "found", "payload",
    "decoded", "agreement", "reason"}``. Never raises.
    """
    result: dict[str, Any] = {"checked": False, "found": False, "payload": None, "decoded": None,
                              "agreement": None, "reason": None}
    bgr, reason = _pixels(data, limits)  # first: the decoder's import (torch, OpenCV) costs seconds
    if bgr is None:
        result["reason"] = reason
        return result
    decoder_class, reason = _load()
    if decoder_class is None:
        result["reason"] = reason
        return result
    best: tuple[float, Payload | None, np.ndarray | None] = (0.0, None, None)
    lengths = sorted({len(p.bits) for p in PAYLOADS})
    try:
        decoded_by_length = decode_lengths(bgr, lengths, decoder_class)
        for payload in PAYLOADS:
            decoded = decoded_by_length[len(payload.bits)]
            agreement = float(np.mean(decoded == np.asarray(payload.bits, np.uint8)))
            if agreement > best[0]:
                best = (agreement, payload, decoded)
    except Exception as exc:  # the decoder's own failures on odd shapes
        result["reason"] = f"the decoder failed ({type(exc).__name__}: {str(exc)[:100]})"
        return result
    agreement, payload, decoded = best
    result.update(checked=True, reason=None, agreement=round(agreement, 4),
                  payload=payload.name if payload else None)
    if payload is None or agreement < MATCH or decoded is None:
        result["payload"] = None
        return result
    if payload.text is not None:
        text = np.packbits(decoded).tobytes().decode("ascii", "replace")
    else:
        text = "0x" + np.packbits(decoded).tobytes().hex()
    result.update(found=True, decoded=text)
    findings.add(Finding("watermark", f"invisible watermark ({METHOD})", text,
                         f"the invisible watermark of {payload.name} ({agreement:.0%} of its {len(payload.bits)} "
                         f"bits match); anyone with the encoder can embed it, so it is a claim",
                         True, generator="Stable Diffusion"))
    return result
