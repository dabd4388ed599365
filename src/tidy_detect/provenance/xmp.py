"""XMP packets and IPTC IIM records: the digital source type and tools they name, parsed safely.

XMP is parsed with defusedxml with DTDs refused outright (an XMP packet never has one, and a DTD is
how entity-expansion bombs such as "billion laughs" get in), external entities refused, and at
most ``max_xml_elements`` elements looked at. IPTC IIM records (inside Photoshop's JPEG segment)
are read by a small bounded loop: the format is a flat list of tagged, length-prefixed records.
"""

from __future__ import annotations

import struct
from typing import Iterator
from xml.etree.ElementTree import Element

from tidy_detect.provenance.findings import Finding, Findings
from tidy_detect.provenance.options import Limits
from tidy_detect.provenance.vocabulary import digital_source_type, known_generator

IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
XMP_BASIC = "http://ns.adobe.com/xap/1.0/"
PHOTOSHOP_NS = "http://ns.adobe.com/photoshop/1.0/"
DC_TERMS = "http://purl.org/dc/terms/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"

# (namespace, property) -> (reported field name, what it is)
_PROPERTIES = {
    (IPTC_EXT, "DigitalSourceType"): "Iptc4xmpExt:DigitalSourceType",
    (XMP_BASIC, "CreatorTool"): "xmp:CreatorTool",
    (PHOTOSHOP_NS, "Credit"): "photoshop:Credit",
    (PHOTOSHOP_NS, "Source"): "photoshop:Source",
    (DC_TERMS, "provenance"): "dcterms:provenance",
}


def _split(tag: str) -> tuple[str, str]:
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        return namespace, local
    return "", tag


def _text(element: Element) -> str | None:
    """A property element's value: its text, its rdf:resource, or its first rdf:li (Alt/Seq/Bag)."""
    resource = element.get(f"{{{RDF}}}resource")
    if resource:
        return resource
    if element.text and element.text.strip():
        return element.text.strip()
    for child in element.iter(f"{{{RDF}}}li"):
        if child.text and child.text.strip():
            return child.text.strip()
    return None


def _properties(root: Element, limit: int, findings: Findings) -> Iterator[tuple[str, str]]:
    """``(field, value)`` for the properties of interest, as elements or as attributes."""
    for count, element in enumerate(root.iter()):
        if count >= limit:
            findings.error(f"XMP: more than {limit:,} elements; the rest was not read")
            return
        field = _PROPERTIES.get(_split(element.tag))
        if field is not None:
            value = _text(element)
            if value:
                yield field, value
        for name, value in element.attrib.items():
            field = _PROPERTIES.get(_split(name))
            if field is not None and value.strip():
                yield field, value.strip()


def read_xmp(packet: bytes, findings: Findings, limits: Limits) -> None:
    """Add what one XMP packet declares to ``findings``; a packet that cannot be parsed safely
    becomes an error there."""
    import defusedxml
    import defusedxml.ElementTree as SafeET

    data = packet.strip(b"\x00 \t\r\n")
    if not data:
        return
    try:
        root = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DTDForbidden:
        findings.error("XMP packet declares a DTD, which XMP never has (the way entity-expansion attacks come "
                       "in); it was not read")
        return
    except (defusedxml.EntitiesForbidden, defusedxml.ExternalReferenceForbidden):
        findings.error("XMP packet declares entities or external references; it was not read")
        return
    except Exception as exc:  # ParseError and whatever else malformed XML raises
        findings.error(f"XMP packet is not well-formed XML ({str(exc)[:120]}); it was not read")
        return
    for field, value in _properties(root, limits.max_xml_elements, findings):
        _interpret(field, value, findings)


def _interpret(field: str, value: str, findings: Findings) -> None:
    if field == "Iptc4xmpExt:DigitalSourceType":
        code, meaning, declares = digital_source_type(value)
        findings.add(Finding("iptc", f"{field} (XMP)", code, f"IPTC digital source type: {meaning}", declares))
    elif field == "dcterms:provenance":
        findings.add(Finding("xmp", field, value, "refers to a C2PA manifest (kept elsewhere or removed from "
                                                  "this file); not verified"))
    elif field == "xmp:CreatorTool":
        generator = known_generator(value)
        meaning = f"made with {generator}, by the file's creator tool" if generator else "the tool that wrote the file"
        findings.add(Finding("xmp", field, value, meaning, True if generator else None, generator=generator))
    else:
        generator = known_generator(value)
        if generator:
            findings.add(Finding("xmp", field, value, f"credits {generator}", True, generator=generator))


# -- IPTC IIM (Photoshop image resource 0x0404) ---------------------------------------------------

_IIM_FIELDS = {65: "IPTC IIM 2:65 Originating Program", 110: "IPTC IIM 2:110 Credit",
               115: "IPTC IIM 2:115 Source", 120: "IPTC IIM 2:120 Caption"}


def _photoshop_resources(block: bytes, limit: int) -> Iterator[tuple[int, bytes]]:
    pos, n = 0, len(block)
    for _ in range(limit):
        if pos + 12 > n or block[pos:pos + 4] != b"8BIM":
            return
        resource = struct.unpack(">H", block[pos + 4:pos + 6])[0]
        name_len = block[pos + 6]
        pos += 7 + name_len + ((name_len + 1) & 1)  # Pascal string padded to an even size
        if pos + 4 > n:
            return
        size = struct.unpack(">I", block[pos:pos + 4])[0]
        start, end = pos + 4, pos + 4 + size
        if end > n:
            return
        yield resource, block[start:end]
        pos = end + (size & 1)


def read_iptc_iim(block: bytes, findings: Findings, limits: Limits) -> None:
    """Add what the IPTC IIM records of one Photoshop resource block declare to ``findings``."""
    for resource, data in _photoshop_resources(block, limits.max_blocks):
        if resource != 0x0404:
            continue
        pos, n, utf8 = 0, len(data), False
        for _ in range(limits.max_blocks):
            if pos + 5 > n or data[pos] != 0x1C:
                break
            record, dataset = data[pos + 1], data[pos + 2]
            size = struct.unpack(">H", data[pos + 3:pos + 5])[0]
            if size & 0x8000:  # an extended-length record: never used for these short text fields
                findings.error("IPTC IIM: an extended-length record; the rest was not read")
                break
            value = data[pos + 5:pos + 5 + size]
            pos += 5 + size
            if record == 1 and dataset == 90:
                utf8 = value == b"\x1b%G"
            elif record == 2 and dataset in _IIM_FIELDS:
                text = value.decode("utf-8" if utf8 else "latin-1", "replace").strip()
                if not text:
                    continue
                generator = known_generator(text)
                field = _IIM_FIELDS[dataset]
                if dataset == 65:
                    meaning = (f"made with {generator}, by the originating program" if generator
                               else "the program that made the file")
                    findings.add(Finding("iptc", field, text, meaning, True if generator else None,
                                         generator=generator))
                elif generator:
                    findings.add(Finding("iptc", field, text, f"names {generator}", True, generator=generator))
