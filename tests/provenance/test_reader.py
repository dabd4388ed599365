"""Each source of provenance read from files made here: C2PA (valid, tampered, untrusted), IPTC/XMP
digital source types, the generator tools' PNG text chunks, EXIF, IPTC IIM and the watermark."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tidy_detect.provenance import NOTHING_FOUND, ProvenanceOptions, read_provenance, short_label

from tests.provenance import fixtures as F

METADATA = ProvenanceOptions(mode="metadata")


def finding(record: dict, source: str) -> dict:
    found = [f for f in record["findings"] if f["source"] == source]
    assert found, record
    return found[0]


# -- C2PA -----------------------------------------------------------------------------------------------

def test_a_signed_manifest_from_a_trusted_chain_is_verified(signed, trusted):
    record = read_provenance(signed, trusted)
    assert record["checked"] and record["format"] == "JPEG" and record["error"] is None
    assert record["declares_ai"] is True and record["verified"] is True
    c2pa = record["c2pa"]
    assert c2pa["status"] == "valid" and c2pa["validation_state"] == "Trusted" and c2pa["failures"] == []
    assert c2pa["signer"] == {"name": "Test Signer", "issuer": "tidy-detect tests"}
    assert c2pa["claim_generator"] == "Test Generator 1.0"
    by_field = {f["field"]: f for f in record["findings"]}
    action = by_field["action c2pa.created"]
    assert action["value"] == "trainedAlgorithmicMedia" and action["declares_ai"] is True and action["verified"]
    assert "trained model" in action["meaning"]
    assert by_field["signature"]["value"] == "valid" and by_field["signature"]["verified"] is True
    assert record["summary"].startswith("Verified Content Credentials declare generative AI")
    assert short_label(record) == "AI (verified)"


def test_changed_pixels_make_the_manifest_tampered_and_unverified(signed, trusted):
    record = read_provenance(F.tamper_pixels(signed), trusted)
    assert record["c2pa"]["status"] == "tampered"
    assert "assertion.dataHash.mismatch" in record["c2pa"]["failures"]
    assert record["verified"] is False and not any(f["verified"] for f in record["findings"])
    assert record["declares_ai"] is True  # still declared, as a claim
    assert "tampered" in record["summary"] and "unverified" in record["summary"]
    assert short_label(record) == "AI (claim); C2PA tampered"


def test_a_changed_manifest_has_an_invalid_signature(signed, trusted):
    data = bytearray(signed)
    spot = data.find(b"c2pa.signature") + 200  # inside the signature box
    data[spot] ^= 0xFF
    record = read_provenance(bytes(data), trusted)
    assert record["c2pa"]["status"] == "invalid-signature" and record["verified"] is False


def test_a_signer_outside_the_trusted_roots_is_untrusted(stranger, trusted):
    data = F.sign(F.encode(F.photo(2), "JPEG"), stranger)
    record = read_provenance(data, trusted)
    assert record["c2pa"]["status"] == "untrusted"
    assert record["c2pa"]["failures"] == ["signingCredential.untrusted"]
    assert record["c2pa"]["signer"]["name"] == "Unknown Signer"
    assert record["verified"] is False and record["declares_ai"] is True


def test_without_trust_anchors_even_the_test_chain_is_untrusted(signed):
    assert read_provenance(signed, METADATA)["c2pa"]["status"] == "untrusted"


def test_a_verified_camera_capture_declares_a_non_ai_origin(chain, trusted):
    data = F.sign(F.encode(F.photo(3), "JPEG"), chain, "digitalCapture", generator="Test Camera")
    record = read_provenance(data, trusted)
    assert record["declares_ai"] is False and record["verified"] is True
    assert record["summary"].startswith("Verified Content Credentials declare a non-AI origin")
    assert short_label(record) == "not AI (verified)"


def test_c2pa_in_a_png(chain, trusted):
    data = F.sign(F.encode(F.photo(4), "PNG"), chain, mime="image/png")
    record = read_provenance(data, trusted)
    assert record["format"] == "PNG" and record["c2pa"]["status"] == "valid" and record["declares_ai"] is True


def test_a_remote_manifest_is_reported_and_never_fetched(chain, trusted, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("provenance reading opened a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    record = read_provenance(F.sign_remote(F.encode(F.photo(), "JPEG"), chain), trusted)
    assert record["c2pa"]["status"] == "remote" and record["c2pa"]["remote_url"] == "http://127.0.0.1:9/manifest.c2pa"
    assert {f["field"] for f in record["findings"]} == {"dcterms:provenance", "remote manifest"}
    assert record["verified"] is False and record["declares_ai"] is None


# -- IPTC / XMP ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [F.jpeg_with_xmp, F.png_with_xmp, F.webp_with_xmp], ids=["jpeg", "png", "webp"])
def test_xmp_digital_source_type_in_each_container(make):
    record = read_provenance(make(F.xmp_packet("trainedAlgorithmicMedia")), METADATA)
    found = finding(record, "iptc")
    assert found["field"] == "Iptc4xmpExt:DigitalSourceType (XMP)" and found["value"] == "trainedAlgorithmicMedia"
    assert found["declares_ai"] is True and found["verified"] is False
    assert record["declares_ai"] is True and record["verified"] is False and record["c2pa"] is None
    assert "claims generative AI" in record["summary"]


@pytest.mark.parametrize("code, declares", [("compositeWithTrainedAlgorithmicMedia", True), ("digitalCapture", False),
                                            ("algorithmicallyEnhanced", None), ("someFutureCode", None)])
def test_digital_source_types_mean_what_iptc_says(code, declares):
    record = read_provenance(F.jpeg_with_xmp(F.xmp_packet(code, as_element=True)), METADATA)
    assert finding(record, "iptc")["value"] == code
    assert record["declares_ai"] is declares


def test_xmp_creator_tool_naming_a_generator():
    record = read_provenance(F.png_with_xmp(F.xmp_packet(None, creator_tool="Adobe Firefly")), METADATA)
    found = finding(record, "xmp")
    assert found["field"] == "xmp:CreatorTool" and found["generator"] == "Adobe Firefly"
    assert record["declares_ai"] is True


def test_iptc_iim_originating_program():
    iim = b"\x1c\x02\x41" + struct.pack(">H", 10) + b"Midjourney"
    resource = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(iim)) + iim
    data = F.jpeg_with_segment(F.encode(F.photo(), "JPEG"), 0xED, b"Photoshop 3.0\x00" + resource)
    found = finding(read_provenance(data, METADATA), "iptc")
    assert found["field"] == "IPTC IIM 2:65 Originating Program" and found["generator"] == "Midjourney"


# -- generator metadata ---------------------------------------------------------------------------------

def test_the_web_uis_parameters_chunk():
    record = read_provenance(F.png_with_text({"parameters": F.A1111_PARAMETERS}), METADATA)
    found = finding(record, "png-text")
    assert found["field"] == "PNG text 'parameters'"
    assert found["value"].startswith("prompt: a lighthouse on a cliff at dusk")
    assert "v1-5-pruned-emaonly" in found["meaning"] and "Stable Diffusion web UI" in found["generator"]
    assert record["declares_ai"] is True and record["verified"] is False


def test_comfyui_prompt_and_workflow_compressed():
    record = read_provenance(F.png_with_text({"prompt": F.COMFY_PROMPT, "workflow": F.COMFY_WORKFLOW},
                                             compressed=True), METADATA)
    fields = {f["field"]: f for f in record["findings"]}
    assert fields["PNG text 'prompt'"]["generator"] == "ComfyUI"
    assert "checkpoint sd_xl_base_1.0.safetensors" in fields["PNG text 'prompt'"]["value"]
    assert fields["PNG text 'workflow'"]["generator"] == "ComfyUI"


def test_novelai_and_invokeai():
    novel = read_provenance(F.png_with_text({"Software": "NovelAI", "Comment": F.NOVELAI_COMMENT}), METADATA)
    assert {f["generator"] for f in novel["findings"]} == {"NovelAI"}
    assert any("steps 28" in f["value"] for f in novel["findings"])
    invoke = read_provenance(F.png_with_text({"invokeai_metadata": F.INVOKEAI_METADATA}), METADATA)
    assert finding(invoke, "png-text")["value"] == "model stable-diffusion-v1-5"


def test_text_chunks_are_recognised_by_shape_not_by_name_alone():
    record = read_provenance(F.png_with_text({"prompt": "write me a poem", "parameters": "brightness=3",
                                              "Comment": "holiday photo"}), METADATA)
    assert record["findings"] == [] and record["declares_ai"] is None and record["summary"] == NOTHING_FOUND


def test_exif_software_and_the_web_uis_user_comment():
    software = read_provenance(F.jpeg_with_exif(software="Midjourney v6"), METADATA)
    assert finding(software, "exif")["generator"] == "Midjourney" and software["declares_ai"] is True
    comment = F.jpeg_with_exif(user_comment=b"UNICODE\x00" + F.A1111_PARAMETERS.encode("utf-16-be"))
    found = finding(read_provenance(comment, METADATA), "exif")
    assert found["field"] == "EXIF UserComment" and found["value"].startswith("prompt: a lighthouse")
    camera = read_provenance(F.jpeg_with_exif(software="Ver.1.00"), METADATA)
    assert finding(camera, "exif")["declares_ai"] is None and camera["declares_ai"] is None
    assert short_label(camera) == "metadata, no AI claim"


# -- the watermark -----------------------------------------------------------------------------------------

def test_the_stable_diffusion_watermark_is_found():
    pytest.importorskip("imwatermark", reason="the watermark needs the provenance extra")
    record = read_provenance(F.watermarked_png(b"SDV2"), ProvenanceOptions())
    mark = record["watermark"]
    assert mark["checked"] and mark["found"] and mark["decoded"] == "SDV2"
    assert mark["payload"] == "Stable Diffusion 2 (Stability AI reference scripts)" and mark["agreement"] >= 0.9
    found = finding(record, "watermark")
    assert found["declares_ai"] is True and found["verified"] is False and found["value"] == "SDV2"
    v1 = read_provenance(F.watermarked_png(b"StableDiffusionV1", seed=7), ProvenanceOptions())["watermark"]
    assert v1["found"] and v1["payload"].startswith("Stable Diffusion 1")
    sdxl_bits = [int(b) for b in bin(0b101100111110110010010000011110111011000110011110)[2:]]  # as the SDXL scripts
    sdxl = read_provenance(F.watermarked_png(sdxl_bits, size=(512, 384), seed=8), ProvenanceOptions())["watermark"]
    assert sdxl["found"] and sdxl["payload"].startswith("SDXL") and sdxl["decoded"] == "0xb3ec907bb19e"


def test_no_watermark_in_a_plain_image_and_none_in_metadata_mode():
    pytest.importorskip("imwatermark", reason="the watermark needs the provenance extra")
    plain = F.encode(F.photo(5, (512, 512)), "PNG")
    record = read_provenance(plain, ProvenanceOptions())
    assert record["watermark"]["checked"] and not record["watermark"]["found"]
    assert record["findings"] == [] and record["declares_ai"] is None and record["summary"] == NOTHING_FOUND
    quick = read_provenance(F.watermarked_png(b"SDV2"), METADATA)
    assert quick["watermark"] is None and "mode 'metadata'" in quick["skipped"]["watermark"]


def test_small_images_are_not_checked_for_the_watermark():
    pytest.importorskip("imwatermark", reason="the watermark needs the provenance extra")
    record = read_provenance(F.encode(F.photo(), "PNG"), ProvenanceOptions())
    assert record["watermark"]["checked"] is False and "below the decoder's minimum" in record["skipped"]["watermark"]


# -- the record as a whole ---------------------------------------------------------------------------------

def test_nothing_declared_is_absence_not_evidence():
    record = read_provenance(F.encode(F.photo(), "JPEG"), METADATA)
    assert record["declares_ai"] is None and record["verified"] is False and record["findings"] == []
    assert record["summary"] == NOTHING_FOUND and "says nothing about whether the image is real" in record["summary"]
    assert short_label(record) == "none found"


def test_records_are_plain_json_and_read_from_paths_too(tmp_path, signed, trusted):
    path = tmp_path / "signed.jpg"
    path.write_bytes(signed)
    from_path = read_provenance(path, trusted)
    assert from_path == read_provenance(signed, trusted)
    assert json.loads(json.dumps(from_path)) == from_path
    missing = read_provenance(tmp_path / "nope.jpg", trusted)
    assert missing["checked"] is False and "no such file" in missing["error"]


def test_mode_off_reads_nothing(signed):
    record = read_provenance(signed, ProvenanceOptions(mode="off"))
    assert record["checked"] is False and record["findings"] == [] and "turned off" in record["summary"]
    assert short_label(record) == "not read"


@pytest.mark.parametrize("payload, seed", [(b"SDV2", 0), (b"StableDiffusionV1", 1), (None, 2)])
def test_the_one_pass_decode_reads_what_the_decoder_reads_per_length(payload, seed, monkeypatch):
    """One pass pooling every block's vote gives, for each payload length, the decoder's own bits."""
    pytest.importorskip("imwatermark", reason="the watermark needs the provenance extra")
    import io

    from imwatermark import WatermarkDecoder
    from PIL import Image

    from tidy_detect.provenance import watermark

    data = F.watermarked_png(payload, size=(320, 288), seed=seed) if payload else F.encode(F.photo(seed, (320, 288)), "PNG")
    bgr = np.ascontiguousarray(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[:, :, ::-1])
    lengths = sorted({len(p.bits) for p in watermark.PAYLOADS})
    fast = watermark.decode_lengths(bgr, lengths, WatermarkDecoder)
    monkeypatch.setenv("TIDY_DETECT_SPEEDUPS", "off")
    plain = watermark.decode_lengths(bgr, lengths, WatermarkDecoder)
    for length in lengths:
        reference = np.asarray(WatermarkDecoder("bits", length).decode(bgr, "dwtDct"), np.uint8)
        assert np.array_equal(fast[length], reference) and np.array_equal(plain[length], reference), length


def test_without_the_c2pa_bindings_a_manifest_is_reported_unvalidated(signed, monkeypatch):
    from tidy_detect.provenance import reader

    monkeypatch.setattr(reader, "c2pa_unavailable", lambda: "c2pa-python is not installed (pip install c2pa-python)")
    record = read_provenance(signed, METADATA)
    assert record["skipped"]["c2pa"].startswith("c2pa-python is not installed") and record["c2pa"] is None
    found = finding(record, "c2pa")
    assert found["field"] == "manifest store" and "not validated" in found["meaning"] and not found["verified"]


def test_without_the_watermark_extra_the_check_says_why(monkeypatch):
    from tidy_detect.provenance import watermark

    monkeypatch.setattr(watermark, "_load", lambda: (None, "invisible-watermark is not installed (pip install "
                                                            "'tidy-detect[provenance]')"))
    record = read_provenance(F.encode(F.photo(0, (300, 300)), "PNG"), ProvenanceOptions())
    assert "pip install 'tidy-detect[provenance]'" in record["skipped"]["watermark"]
    assert record["watermark"]["checked"] is False
