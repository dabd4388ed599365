"""Provenance through the web service: /v1/detect records carry the same provenance as the Python API,
hostile uploads are still scored, /v1/info says which checks run, the OpenAPI schema documents it."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the web service needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the test extra)")

from fastapi.testclient import TestClient  # noqa: E402

from tidy_detect.detect import Detector  # noqa: E402
from tidy_detect.head import DiscrepancyHead  # noqa: E402
from tidy_detect.serve import ServeSettings, create_app  # noqa: E402

from tests.serve.conftest import files  # noqa: E402


@pytest.fixture(scope="module")
def service(declared_files, tiny_head, trusted):
    detector = Detector(*DiscrepancyHead.load(tiny_head["head"]), tiny_head["extractor"], provenance=trusted)
    with TestClient(create_app(detector, ServeSettings(max_wait_ms=5))) as client:
        yield {"client": client, "detector": detector, "folder": declared_files["folder"],
               "expected": declared_files["expected"]}


def test_each_upload_gets_the_provenance_of_its_bytes(service):
    folder, expected = service["folder"], service["expected"]
    names = [n for n in sorted(expected) if n != "bomb.png"]
    for start in range(0, len(names), 6):  # several per request, within the file-count limit
        chunk = names[start:start + 6]
        response = service["client"].post("/v1/detect", files=files(*[(n, (folder / n).read_bytes()) for n in chunk]))
        assert response.status_code == 200, response.text
        for name, record in zip(chunk, response.json()["records"]):
            assert record["path"] == name and record["error"] is None and record["p_fake"] is not None
            assert expected[name](record["provenance"]), (name, record["provenance"])
            alone = service["detector"].predict([(folder / name).read_bytes()], names=[name])[0]
            assert record["provenance"] == alone["provenance"]  # the API's, from the same bytes
            assert record["p_fake"] == pytest.approx(alone["p_fake"], abs=1e-4)  # batched with others


def test_an_undecodable_upload_among_others_still_gets_its_provenance(service):
    folder = service["folder"]
    uploads = [("bomb.png", (folder / "bomb.png").read_bytes()), ("plain.png", (folder / "plain.png").read_bytes())]
    bomb, plain = service["client"].post("/v1/detect", files=files(*uploads)).json()["records"]
    assert bomb["error"] and bomb["p_fake"] is None
    assert "inflates to more than the limit" in bomb["provenance"]["error"]
    assert plain["error"] is None and plain["provenance"]["findings"] == []


def test_info_and_schema_describe_provenance(service):
    client = service["client"]
    info = client.get("/v1/info").json()["provenance"]
    assert info["mode"] == "full" and info["trust_anchors"] == "test-root.pem" and info["c2pa"] == "available"
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert "provenance" in schema["DetectionRecord"]["properties"]
    assert "absence of metadata is no evidence" in schema["ProvenanceRecord"]["properties"]["declares_ai"]["description"]
    assert "trusted chain" in schema["ProvenanceFinding"]["properties"]["verified"]["description"]
