"""A tiny trained head and its Detector, built once for the web-service tests, and image bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

from tests.conftest import make_tree, random_image


@pytest.fixture(scope="session")
def served(tiny_bundle, tmp_path_factory):
    """``{"head", "detector", "root"}``: a head trained on a small tree and the Detector loaded from it."""
    from tidy_detect.config import load_preset
    from tidy_detect.detect import Detector
    from tidy_detect.features.extractor import Extractor, extract
    from tidy_detect.training import train_head

    root = tmp_path_factory.mktemp("serve")
    make_tree(root / "tree", {"gen": 4}, seed=3)
    extractor = Extractor(load_preset(tiny_bundle / "tiny.toml")).load()
    extract([root / "tree"], root / "store", extractor=extractor)
    result = train_head([root / "store"], root / "head.safetensors", epochs=3, hidden=16, batch_size=8)
    detector = Detector.load(result.path, device="cpu", batch_size=8)
    return {"head": result.path, "detector": detector, "root": root}


def image_bytes(seed: int = 0, size: tuple[int, int] = (96, 64), fmt: str = "PNG") -> bytes:
    """A random image encoded as ``fmt``."""
    buffer = io.BytesIO()
    random_image(np.random.default_rng(seed), *size).save(buffer, fmt)
    return buffer.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes whose PNG header announces ``width x height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 4096)  # the start of an all-black image; the rest never needs decoding
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def files(*uploads: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart file fields named ``files`` for TestClient.post."""
    return [("files", (name, data, "application/octet-stream")) for name, data in uploads]


def error_of(response) -> dict:
    """The ``{"code", "message"}`` of an error response, checking the body has that shape only."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]
