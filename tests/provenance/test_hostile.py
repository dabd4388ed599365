"""Hostile metadata: huge and compressed-bomb chunks, entity expansion, malformed XMP, JSON and C2PA
manifests, truncated files, endless chunk lists. Each gives a bounded, clear ``error`` and a record
that is still plain JSON; none raises or runs away."""

from __future__ import annotations

import json
import struct
import time
import zlib

import pytest

from tidy_detect.provenance import Limits, ProvenanceOptions, read_provenance

from tests.provenance import fixtures as F

METADATA = ProvenanceOptions(mode="metadata")
MiB = 1024 * 1024


def read_bounded(data: bytes, options: ProvenanceOptions = METADATA, seconds: float = 5.0) -> dict:
    """The record, checked for the bounds every record keeps."""
    started = time.perf_counter()
    record = read_provenance(data, options)
    assert time.perf_counter() - started < seconds
    limit = options.limits.max_string
    assert json.loads(json.dumps(record)) == record
    assert len(record["summary"]) <= limit
    assert record["error"] is None or len(record["error"]) <= 2 * limit
    assert len(record["findings"]) <= options.limits.max_findings
    for found in record["findings"]:
        assert all(len(found[k]) <= limit for k in ("field", "value", "meaning"))
    return record


def test_a_huge_text_chunk_is_skipped_with_its_size():
    data = F.png_with_chunks(F.png_chunk(b"tEXt", b"parameters\x00" + b"Steps: 20, " * 2_000_000))
    record = read_bounded(data)
    assert "PNG tEXt chunk 'parameters' of 22,000,000 bytes is over the limit of 1,048,576 bytes" in record["error"]
    assert record["findings"] == [] and record["declares_ai"] is None


@pytest.mark.parametrize("kind, header", [(b"zTXt", b"parameters\x00\x00"),
                                          (b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00\x00\x00")])
def test_compressed_bombs_are_inflated_only_to_the_limit(kind, header):
    bomb = zlib.compress(b"a" * 300_000_000, 9)  # 300 MB in ~300 KB
    record = read_bounded(F.png_with_chunks(F.png_chunk(kind, header + bomb)))
    assert "inflates to more than the limit of 1,048,576 bytes per metadata block" in record["error"]


def test_corrupt_compressed_text():
    record = read_bounded(F.png_with_chunks(F.png_chunk(b"zTXt", b"parameters\x00\x00not zlib at all")))
    assert "compressed data is corrupt" in record["error"]


def test_billion_laughs_is_refused_before_any_expansion():
    record = read_bounded(F.jpeg_with_xmp(F.BILLION_LAUGHS), seconds=2.0)
    assert "declares a DTD" in record["error"] and record["findings"] == []
    assert record["summary"].startswith("No provenance metadata could be read")
    assert "says nothing about whether the image is real" in record["summary"]


def test_external_entities_are_refused():
    packet = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
              b'<x:xmpmeta xmlns:x="adobe:ns:meta/">&e;</x:xmpmeta>')
    record = read_bounded(F.png_with_xmp(packet))
    assert "declares a DTD" in record["error"] and "root:" not in json.dumps(record)


@pytest.mark.parametrize("packet", [b"<x:xmpmeta><unclosed", b"\xff\xfe\x00garbage", b"<a>" * 50_000],
                         ids=["unclosed", "binary", "deep"])
def test_malformed_xmp_is_an_error_and_other_sources_still_count(packet):
    data = F.png_with_chunks(F.png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + packet),
                             F.png_chunk(b"tEXt", b"parameters\x00" + F.A1111_PARAMETERS.encode()))
    record = read_bounded(data)
    assert "XMP packet is not well-formed XML" in record["error"]
    assert record["declares_ai"] is True  # the parameters chunk is still read


def test_an_xmp_packet_with_very_many_elements_is_read_only_so_far():
    body = b"".join(b"<rdf:li>x</rdf:li>" for _ in range(50_000))
    packet = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
              b"<rdf:Bag>" + body + b"</rdf:Bag></x:xmpmeta>")
    assert "XMP: more than 20,000 elements" in read_bounded(F.png_with_xmp(packet))["error"]
    small = ProvenanceOptions(mode="metadata", limits=Limits(max_xml_elements=100))
    assert "more than 100 elements" in read_bounded(F.png_with_xmp(packet), small)["error"]


def test_deeply_nested_json_in_a_prompt_chunk():
    record = read_bounded(F.png_with_text({"prompt": "[" * 200_000, "workflow": "{" * 100_000}))
    assert record["findings"] == [] and record["error"] is None


@pytest.mark.parametrize("corrupt", ["description", "claim"])
def test_malformed_c2pa_manifests_are_a_bounded_error(signed, trusted, corrupt):
    data = bytearray(signed)
    if corrupt == "description":
        spot = data.find(b"jumb") + 8  # the description box of the manifest store
        data[spot:spot + 4] = b"XXXX"
    else:
        spot = data.find(b"c2pa.claim") + 30  # inside the claim's CBOR
        data[spot:spot + 16] = b"\xff" * 16
    record = read_bounded(bytes(data), trusted)
    assert record["c2pa"]["status"] == "unreadable" and record["verified"] is False
    assert record["error"].startswith("C2PA manifest cannot be read (")


def test_a_jumbf_segment_that_holds_no_manifest_is_noted():
    junk = b"JP\x00\x00\x00\x00\x00\x01" + struct.pack(">I", 64) + b"jumb" + b"\x13" * 56
    record = read_bounded(F.jpeg_with_segment(F.encode(F.photo(), "JPEG"), 0xEB, junk))
    assert "C2PA block(s), but the c2pa library found no manifest store" in record["error"]


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_truncated_files(signed, trusted, cut):
    png = F.png_with_text({"parameters": F.A1111_PARAMETERS})
    for data in (png, F.webp_with_xmp(F.xmp_packet())):
        record = read_bounded(data[:int(len(data) * cut)], trusted)
        assert record["checked"] and "truncated?" in record["error"]
    jpeg = read_bounded(signed[:int(len(signed) * cut)], trusted)
    if cut < 0.3:  # the manifest itself is cut
        assert "the file ends inside a segment" in jpeg["error"] and jpeg["verified"] is False
    else:  # the image data is: what was signed is not all there
        assert jpeg["c2pa"]["status"] == "tampered" and jpeg["verified"] is False


def test_impossible_lengths_stop_the_walk():
    jpeg = F.encode(F.photo(), "JPEG")
    bad = jpeg[:2] + b"\xff\xe1\x00\x01" + jpeg[2:]
    assert "impossible length" in read_bounded(bad)["error"]
    png = F.png_with_chunks(struct.pack(">I", 0xFFFFFFF0) + b"tEXt" + b"x" * 20)
    assert "impossible length" in read_bounded(png)["error"]


def test_endless_chunk_lists_stop_at_the_block_limit():
    chunks = [F.png_chunk(b"tEXt", b"k\x00v")] * 3000
    options = ProvenanceOptions(mode="metadata", limits=Limits(max_blocks=1000))
    assert "more than 1,000 chunks" in read_bounded(F.png_with_chunks(*chunks), options)["error"]


def test_findings_and_strings_are_capped():
    texts = {f"Software{i}": "x" for i in range(5)}
    texts.update({"Software": "ComfyUI " + "y" * 5000, "Source": "Midjourney", "Author": "NovelAI", "Title": "Fooocus"})
    options = ProvenanceOptions(mode="metadata", limits=Limits(max_findings=2, max_string=60))
    record = read_bounded(F.png_with_text(texts), options)
    assert len(record["findings"]) == 2 and record["truncated"] is True
    assert all(len(f["value"]) <= 60 for f in record["findings"])


def test_the_metadata_budget_per_file():
    chunk = F.png_chunk(b"tEXt", b"Comment\x00" + b"z" * 900_000)
    options = ProvenanceOptions(mode="metadata", limits=Limits(max_metadata_bytes=2 * MiB))
    assert "passed the limit of 2,097,152 bytes read per file" in read_bounded(F.png_with_chunks(chunk, chunk, chunk),
                                                                             options)["error"]


def test_a_file_over_the_size_limit_is_not_read():
    options = ProvenanceOptions(mode="metadata", limits=Limits(max_file_bytes=1000))
    record = read_bounded(F.png_with_text({"parameters": F.A1111_PARAMETERS}) + b"\x00" * 2000, options)
    assert record["checked"] is False and "over the provenance limit of 1,000 bytes" in record["error"]


def test_broken_exif_is_an_error():
    data = F.jpeg_with_segment(F.encode(F.photo(), "JPEG"), 0xE1, b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    record = read_bounded(data)
    assert record["checked"] and "EXIF block is partly corrupt" in record["error"]


def test_not_an_image_at_all():
    record = read_bounded(b"just some text, not an image")
    assert record["checked"] and record["format"] is None and record["findings"] == []
    assert "not a JPEG, PNG" in record["skipped"]["metadata"]


def test_hostile_strings_are_kept_as_text():
    script = '<img src=x onerror="alert(1)">'
    record = read_bounded(F.png_with_text({"Software": f"ComfyUI {script}"}))
    assert script in record["findings"][0]["value"]  # reported as the file says it; the page shows it as text
