"""One file's provenance record: every source read within bounds, findings summed up in one line.

The record is evidence beside the model's score, never an input to it: nothing here looks at the
score, and the score never looks here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tidy_detect.errors import ImageError
from tidy_detect.provenance.content_credentials import read_c2pa
from tidy_detect.provenance.content_credentials import unavailable as c2pa_unavailable
from tidy_detect.provenance.containers import read_blocks
from tidy_detect.provenance.findings import Finding, Findings, clip
from tidy_detect.provenance.generators import read_exif, read_png_texts
from tidy_detect.provenance.options import ProvenanceOptions
from tidy_detect.provenance.watermark import find_watermark
from tidy_detect.provenance.xmp import read_iptc_iim, read_xmp

log = logging.getLogger(__name__)

NOTHING_FOUND = "No provenance metadata found — this says nothing about whether the image is real"
_SOURCE_NAMES = {"c2pa": "C2PA", "xmp": "XMP", "iptc": "IPTC", "png-text": "PNG text", "exif": "EXIF",
                 "watermark": "watermark"}


def not_read(reason: str) -> dict[str, Any]:
    """The provenance record of an image whose file was not read for provenance, and why."""
    return {"checked": False, "declares_ai": None, "verified": False, "summary": f"Provenance not read: {reason}",
            "findings": [], "truncated": False, "format": None, "c2pa": None, "watermark": None, "skipped": {},
            "error": None}


def read_provenance(source: bytes | bytearray | memoryview | str | Path,
                    options: ProvenanceOptions | None = None) -> dict[str, Any]:
    """Everything an image file declares about how it was made, as a plain (JSON-ready) dict.

    Args:
        source: the file's bytes, or the path of a file (read within ``limits.max_file_bytes``).
        options: which checks run and their bounds (default: every check, no extra trust
            anchors; :meth:`ProvenanceOptions.from_env` reads the environment's choices).

    Returns:
        ``{"checked", "declares_ai", "verified", "summary", "findings", "truncated", "format",
        "c2pa", "watermark", "skipped", "error"}`` as documented in docs/provenance.md. Problems
        with the file (too large, unreadable, malformed metadata) are reported in ``error``.

    Raises:
        Nothing for any file content: the record says what went wrong. (Bad ``options`` are
        refused when the options are built, with ConfigError.)
    """
    options = options or ProvenanceOptions()
    if not options.enabled:
        return not_read("turned off (provenance mode 'off')")
    limits = options.limits
    if isinstance(source, (str, Path)):
        from tidy_detect.images import read_file

        try:
            data, _ = read_file(source, max_bytes=limits.max_file_bytes)
        except ImageError as exc:
            record = not_read("the file cannot be read")
            record["error"] = clip(str(exc), limits.max_string)
            return record
    else:
        data = bytes(source)
        if len(data) > limits.max_file_bytes:
            record = not_read("the file is too large")
            record["error"] = (f"{len(data):,} bytes is over the provenance limit of {limits.max_file_bytes:,} "
                               f"bytes per file")
            return record
    try:
        return _read(data, options)
    except Exception as exc:  # a bug in a parser must not take the record with it
        log.exception("provenance reading failed")
        record = not_read("an internal error stopped the reading")
        record["error"] = clip(f"internal error ({type(exc).__name__}: {exc}); please report it", limits.max_string)
        return record


def _step(findings: Findings, what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # one source failing leaves the others' findings
        log.debug("provenance step %s failed", what, exc_info=True)
        findings.error(f"{what}: internal error ({type(exc).__name__}: {str(exc)[:100]})")
        return None


def _read(data: bytes, options: ProvenanceOptions) -> dict[str, Any]:
    limits = options.limits
    findings = Findings(limits.max_findings)
    skipped: dict[str, str] = {}
    meta = read_blocks(data, limits)
    for note in meta.notes:
        findings.error(note)
    if meta.format is None:
        skipped["metadata"] = "not a JPEG, PNG, WebP, TIFF, GIF, BMP, AVIF or HEIF file"
    elif not meta.walked:
        skipped["metadata"] = f"the metadata blocks of {meta.format} files are not read (C2PA and the watermark are)"
    _step(findings, "PNG text", read_png_texts, meta.texts, findings, limits)
    for packet in meta.xmp[:4]:
        _step(findings, "XMP", read_xmp, packet, findings, limits)
    for block in meta.photoshop[:4]:
        _step(findings, "IPTC IIM", read_iptc_iim, block, findings, limits)
    for block in meta.exif[:4]:
        _step(findings, "EXIF", read_exif, block, findings, limits)

    c2pa_record = None
    reason = c2pa_unavailable()
    if reason is not None:
        skipped["c2pa"] = reason
        if meta.c2pa_blocks:
            findings.add(Finding("c2pa", "manifest store", f"{meta.c2pa_blocks} block(s)",
                                 f"the file carries Content Credentials, but they were not validated: {reason}"))
    elif meta.format is not None and (not meta.walked or meta.c2pa_blocks
                                      or any(f.field == "dcterms:provenance" for f in findings.items)):
        # A walked file without a manifest block (and no XMP pointer to a remote one) has none:
        # the library would only repeat, less clearly, what the walk already said about the file.
        c2pa_record = _step(findings, "C2PA", read_c2pa, data, meta.format, findings, options)
        if c2pa_record is None and meta.c2pa_blocks:
            findings.error(f"the file has {meta.c2pa_blocks} C2PA block(s), but the c2pa library found no manifest "
                           f"store in them (malformed?)")

    watermark_record = None
    if not options.watermark:
        skipped["watermark"] = "not looked for (provenance mode 'metadata')"
    elif meta.format is None:
        skipped["watermark"] = "not an image format tidy-detect reads"
    else:
        watermark_record = _step(findings, "watermark", find_watermark, data, findings, limits)
        if watermark_record is not None and not watermark_record["checked"]:
            skipped["watermark"] = watermark_record["reason"]

    items = findings.items
    declares = True if any(f.declares_ai is True for f in items) else (
        False if any(f.declares_ai is False for f in items) else None)
    error = "; ".join(findings.errors) if findings.errors else None
    return {
        "checked": True,
        "declares_ai": declares,
        "verified": any(f.verified for f in items),
        "summary": clip(summarize(items, declares, c2pa_record, error), limits.max_string),
        "findings": [f.to_dict(limits.max_string) for f in items],
        "truncated": findings.dropped > 0,
        "format": meta.format,
        "c2pa": c2pa_record,
        "watermark": watermark_record,
        "skipped": {k: clip(v, limits.max_string) for k, v in skipped.items()},
        "error": clip(error, limits.max_string * 2) if error else None,
    }


def _names(items: list[Finding]) -> str:
    generators = list(dict.fromkeys(f.generator for f in items if f.generator))
    sources = list(dict.fromkeys(_SOURCE_NAMES[f.source] for f in items))
    who = f" ({', '.join(generators[:3])})" if generators else ""
    return f"{', '.join(sources)}{who}"


def summarize(items: list[Finding], declares: bool | None, c2pa: dict[str, Any] | None, error: str | None) -> str:
    """The one-line summary of a provenance record."""
    problem = " Some metadata could not be read." if error else ""
    if not items:
        if error:
            return f"No provenance metadata could be read ({error.split(';')[0]}) — this says nothing about " \
                   f"whether the image is real"
        return NOTHING_FOUND
    status = f" The C2PA manifest is {c2pa['status'].replace('-', ' ')}." if c2pa and c2pa["status"] != "valid" else ""
    if declares is True:
        ai = [f for f in items if f.declares_ai is True]
        signed = [f for f in ai if f.verified]
        if signed:
            text = f"Verified Content Credentials declare generative AI: {signed[0].meaning}"
        else:
            text = f"The file claims generative AI made it, in {_names(ai)}; unverified: anyone can write or strip " \
                   f"such metadata"
        if any(f.declares_ai is False for f in items):
            text += "; other metadata declares a non-AI origin"
        return text + "." + status + problem
    if declares is False:
        other = [f for f in items if f.declares_ai is False]
        if any(f.verified for f in other):
            return f"Verified Content Credentials declare a non-AI origin: {other[0].meaning}." + problem
        return f"The file claims a non-AI origin ({other[0].meaning}, in {_names(other)}); unverified." + status + problem
    return f"Metadata found in {_names(items)}, but it does not say whether AI made the image." + status + problem


def short_label(provenance: dict[str, Any] | None) -> str:
    """A few words for a table cell: what the file declares, and how much that is worth."""
    if not provenance or not provenance.get("checked"):
        return "not read"
    declares, verified = provenance.get("declares_ai"), provenance.get("verified")
    if declares is True:
        label = "AI (verified)" if verified else "AI (claim)"
    elif declares is False:
        label = "not AI (verified)" if verified else "not AI (claim)"
    elif provenance.get("findings"):
        label = "metadata, no AI claim"
    else:
        label = "none found"
    c2pa = provenance.get("c2pa")
    if c2pa and c2pa.get("status") not in (None, "valid"):
        label += f"; C2PA {c2pa['status']}"
    if provenance.get("error"):
        label += "; read error"
    return label
