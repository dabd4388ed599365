"""Signed, declared and hostile files for the provenance tests (made here, once per session)."""

from __future__ import annotations

import pytest

from tests.provenance import fixtures as F


@pytest.fixture(scope="session")
def chain() -> F.Chain:
    """The test certificate chain whose root the tests trust."""
    pytest.importorskip("c2pa", reason="C2PA needs c2pa-python")
    return F.make_chain()


@pytest.fixture(scope="session")
def stranger() -> F.Chain:
    """A chain whose root nobody trusts."""
    pytest.importorskip("c2pa", reason="C2PA needs c2pa-python")
    return F.make_chain("Unknown Signer", "nobody we know")


@pytest.fixture(scope="session")
def trusted(chain):
    """Provenance options that trust the test root (every check on)."""
    from tidy_detect.provenance import ProvenanceOptions

    return ProvenanceOptions(trust_anchors=chain.root_pem.decode("ascii"), trust_source="test-root.pem")


@pytest.fixture(scope="session")
def signed(chain) -> bytes:
    """A JPEG whose C2PA manifest says a trained model made it, signed by the trusted chain."""
    return F.sign(F.encode(F.photo(1, (160, 120)), "JPEG", quality=92), chain)


@pytest.fixture(scope="session")
def tiny_head(tiny_bundle, tmp_path_factory):
    """``{"head", "extractor", "root"}``: a head trained on a small tree with the tiny models."""
    from tidy_detect.config import load_preset
    from tidy_detect.features.extractor import Extractor, extract
    from tidy_detect.training import train_head

    from tests.conftest import make_tree

    root = tmp_path_factory.mktemp("provenance-head")
    make_tree(root / "tree", {"gen": 3}, seed=5)
    extractor = Extractor(load_preset(tiny_bundle / "tiny.toml")).load()
    extract([root / "tree"], root / "store", extractor=extractor)
    result = train_head([root / "store"], root / "head.safetensors", epochs=2, hidden=8, batch_size=8)
    return {"head": result.path, "extractor": extractor, "root": root}


@pytest.fixture(scope="session")
def declared_files(tmp_path_factory, chain, stranger, signed):
    """A folder of files that declare their origin (and hostile ones), the trusted root's PEM file,
    and what each file's provenance must say: ``{"folder", "root_pem", "expected": {name: check}}``."""
    import zlib

    folder = tmp_path_factory.mktemp("declared") / "images"
    folder.mkdir()
    root_pem = folder.parent / "test-root.pem"
    root_pem.write_bytes(chain.root_pem)
    files = {
        "signed.jpg": signed,
        "tampered.jpg": F.tamper_pixels(signed),
        "untrusted.jpg": F.sign(F.encode(F.photo(2, (160, 120)), "JPEG"), stranger),
        "xmp.jpg": F.jpeg_with_xmp(F.xmp_packet("compositeWithTrainedAlgorithmicMedia")),
        "a1111.png": F.png_with_text({"parameters": F.A1111_PARAMETERS}),
        "comfy.png": F.png_with_text({"prompt": F.COMFY_PROMPT, "workflow": F.COMFY_WORKFLOW}),
        "exif.jpg": F.jpeg_with_exif(software="Midjourney v6"),
        "plain.png": F.encode(F.photo(9), "PNG"),
        "laughs.jpg": F.jpeg_with_xmp(F.BILLION_LAUGHS),
        "huge.png": F.png_with_chunks(F.png_chunk(b"tEXt", b"parameters\x00" + b"x" * 3_000_000)),
        "bomb.png": F.png_with_chunks(F.png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00\x00\x00"
                                                  + zlib.compress(b"<" * 50_000_000, 9))),
        "badc2pa.jpg": _corrupt_manifest(signed),
    }
    import importlib.util

    if importlib.util.find_spec("imwatermark") is not None:  # the provenance extra
        files["marked.png"] = F.watermarked_png(b"SDV2", size=(256, 256), seed=3)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    expected = {
        "signed.jpg": lambda p: p["verified"] and p["declares_ai"] is True and p["c2pa"]["status"] == "valid",
        "tampered.jpg": lambda p: not p["verified"] and p["c2pa"]["status"] == "tampered",
        "untrusted.jpg": lambda p: not p["verified"] and p["c2pa"]["status"] == "untrusted",
        "xmp.jpg": lambda p: p["declares_ai"] is True and p["findings"][0]["source"] == "iptc",
        "a1111.png": lambda p: p["declares_ai"] is True and p["findings"][0]["source"] == "png-text",
        "comfy.png": lambda p: {f["generator"] for f in p["findings"]} == {"ComfyUI"},
        "exif.jpg": lambda p: p["findings"][0]["source"] == "exif" and p["declares_ai"] is True,
        "plain.png": lambda p: p["findings"] == [] and p["declares_ai"] is None and p["error"] is None,
        "laughs.jpg": lambda p: "declares a DTD" in p["error"] and p["declares_ai"] is None,
        "huge.png": lambda p: "over the limit of 1,048,576 bytes" in p["error"],
        "bomb.png": lambda p: "inflates to more than the limit" in p["error"],
        "badc2pa.jpg": lambda p: p["c2pa"]["status"] == "unreadable" and "C2PA manifest cannot be read" in p["error"],
        "marked.png": lambda p: p["watermark"]["found"] and p["watermark"]["payload"].startswith("Stable Diffusion 2"),
    }
    return {"folder": folder, "root_pem": root_pem, "expected": {k: v for k, v in expected.items() if k in files}}


def _corrupt_manifest(signed: bytes) -> bytes:
    data = bytearray(signed)
    spot = data.find(b"c2pa.claim") + 30  # inside the claim's CBOR
    data[spot:spot + 16] = b"\xff" * 16
    return bytes(data)
