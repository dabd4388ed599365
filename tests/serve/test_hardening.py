"""The service under hostile or heavy input: decode once, pixel budgets, reduction, bad bodies,
no server paths in responses, and the results folder's retention."""

from __future__ import annotations

import io
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the web service needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the test extra)")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from tidy_detect.errors import ModelLoadError  # noqa: E402
from tidy_detect.images import LoadedImage, load_image, reduce_for_models  # noqa: E402
from tidy_detect.serve import ServeSettings, create_app  # noqa: E402
from tidy_detect.serve import decode as decode_module  # noqa: E402

from tests.serve.conftest import error_of, files, image_bytes  # noqa: E402


def make_client(served, **settings) -> TestClient:
    return TestClient(create_app(served["detector"], ServeSettings(max_wait_ms=5, **settings)))


# -- decode once ---------------------------------------------------------------------------------------

def test_each_upload_is_decoded_once_and_the_models_get_that_image(served, monkeypatch):
    import tidy_detect.detect as detect_module

    decoded = []
    real_load = decode_module.load_image

    def counting_load(source, **kwargs):
        decoded.append(kwargs.get("name"))
        return real_load(source, **kwargs)

    def no_second_decode(*args, **kwargs):
        raise AssertionError("the detector decoded an upload again")

    seen = []
    real_predict_loaded = served["detector"].predict_loaded

    def spy(entries, captions=None):
        seen.extend(image for _, image in entries)
        return real_predict_loaded(entries, captions)

    monkeypatch.setattr(decode_module, "load_image", counting_load)
    monkeypatch.setattr(detect_module, "load_image", no_second_decode)
    monkeypatch.setattr(served["detector"], "predict_loaded", spy)
    uploads = [("a.png", image_bytes(seed=1)), ("b.png", image_bytes(seed=2)), ("c.txt", b"text")]
    with make_client(served) as client:
        response = client.post("/v1/detect", files=files(*uploads))
    assert response.status_code == 200, response.text
    assert sorted(decoded) == ["a.png", "b.png", "c.txt"]  # each once, the bad one included
    assert len(seen) == 2 and all(isinstance(image, LoadedImage) for image in seen)
    monkeypatch.undo()
    expected = served["detector"].predict([uploads[0][1], uploads[1][1]], names=["a.png", "b.png"])
    assert response.json()["records"][:2] == expected


def test_predict_is_predict_loaded_after_decoding(served):
    detector = served["detector"]
    data = image_bytes(seed=4)
    loaded = load_image(data, name="x.png")
    assert detector.predict([data], names=["x.png"]) == detector.predict_loaded(
        [("x.png", loaded)], provenance=[detector.read_provenance(data)])


# -- pixel budgets ----------------------------------------------------------------------------------------

def test_a_request_over_its_pixel_budget_is_refused_before_decoding(served, monkeypatch):
    monkeypatch.setattr(decode_module, "load_image", lambda *a, **k: pytest.fail("decoded despite the budget"))
    with make_client(served, max_request_pixels=10_000) as client:
        response = client.post("/v1/detect", files=files(("a.png", image_bytes(seed=1)), ("b.png", image_bytes(seed=2))))
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "too_many_pixels"
    assert "12,288 pixels together, over this server's limit of 10,000 per request" in error["message"]


def test_the_budgets_are_in_info(served):
    with make_client(served, decode_pixels=5_000_000, small_image_pixels=1234) as client:
        info = client.get("/v1/info").json()
    assert info["limits"]["max_request_pixels"] == 400_000_000 and info["limits"]["reduce_max_side"] == 2048
    assert info["decoding"]["decode_pixels"] == 5_000_000 and info["decoding"]["small_image_pixels"] == 1234


def test_a_small_request_is_not_stuck_behind_a_full_budget(served):
    """The large lane's budget all taken (a huge decode in progress): a small image still goes through."""
    with make_client(served, small_image_pixels=100 * 100) as client:
        budget = client.app.state.service.decoder.budget
        client.portal.call(budget.acquire, budget.total)
        result = []
        post = threading.Thread(target=lambda: result.append(
            client.post("/v1/detect", files=files(("small.png", image_bytes(size=(96, 64)))))), daemon=True)
        post.start()
        post.join(20)
        answered_while_full = bool(result)
        client.portal.call(budget.release, budget.total)  # lets a wrongly waiting request finish too
        post.join(20)
    assert answered_while_full
    assert result[0].status_code == 200 and result[0].json()["records"][0]["error"] is None


# -- reduction ---------------------------------------------------------------------------------------------

def wide_image(width: int = 1800, height: int = 300) -> bytes:
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_reduced_images_report_original_size_and_boxes(served):
    data = wide_image()
    with make_client(served, reduce_max_side=256) as client:
        record = client.post("/v1/detect", files=files(("wide.png", data))).json()["records"][0]
    assert record["error"] is None and (record["width"], record["height"]) == (1800, 300)
    view = served["detector"].extractor.clip.view_size
    expected = served["detector"].predict_loaded([("wide.png", reduce_for_models(load_image(data), 256, view))],
                                                 provenance=[served["detector"].read_provenance(data)])[0]
    assert record == expected  # what the models saw is the reduced image, scored the same way
    boxes = [o["box"] for o in record["objects"]]
    assert boxes, "the tiny grounder (box threshold 0) should find something"
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 <= x1 <= 1800 + 1 and 0 <= y0 <= y1 <= 300 + 1
    # In original pixels: the boxes found on the reduced image, times its scale (1800 / 256).
    import dataclasses

    from tidy_detect.data.inputs import ImageItem

    reduced = reduce_for_models(load_image(data), 256, view)
    raw = served["detector"].extractor.process([ImageItem("wide.png")], [dataclasses.replace(reduced, scale=1.0)])
    expected_boxes = [[v * reduced.scale for v in box] for box in raw[0]["boxes"]]
    assert reduced.scale == pytest.approx(1800 / 256)
    assert np.allclose(boxes, expected_boxes, atol=0.01)


def test_reduction_can_be_turned_off(served):
    data = wide_image(600, 100)
    with make_client(served, reduce_max_side=0) as client:
        record = client.post("/v1/detect", files=files(("w.png", data))).json()["records"][0]
    assert record == served["detector"].predict([data], names=["w.png"])[0]


# -- bad bodies --------------------------------------------------------------------------------------------

def post_raw(client: TestClient, body: bytes, content_type: str):
    return client.post("/v1/detect", content=body, headers={"content-type": content_type})


@pytest.mark.parametrize("boundary, fragment", [
    ("b" * 300, "1 to 70 characters (RFC 2046), got 300"),
    ("b" * 71, "got 71"),
    ("bad\\boundary", "may hold only letters"),
])
def test_a_bad_boundary_is_400(served, boundary, fragment):
    part = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n').encode()
    with make_client(served) as client:
        response = post_raw(client, part + image_bytes() + f"\r\n--{boundary}--\r\n".encode(),
                            f"multipart/form-data; boundary={boundary}")
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "bad_multipart" and fragment in error["message"]


@pytest.mark.parametrize("body, status, code", [
    (b"--b\r\nno colon here\r\n\r\ndata\r\n--b--\r\n", 400, "bad_multipart"),
    (b'--b\r\nContent-Disposition: form-data; name="files"; filename="a"\r\nX: ' + b"y" * 20_000
     + b"\r\n\r\ndata\r\n--b--\r\n", 400, "bad_multipart"),
    (b"--b\r\nContent-Disposition: ;;;===\r\n\r\ndata\r\n--b--\r\n", 422, "unexpected_field"),
    (b"--b\r\n\r\ndata\r\n--b--\r\n", 422, "unexpected_field"),
    (b'--b\r\nContent-Disposition: form-data; name="files"; filename="n"\r\nContent-Type: multipart/mixed; '
     b'boundary=inner\r\n\r\n--inner\r\n\r\nx\r\n--inner--\r\n\r\n--b--\r\n', 415, "unsupported_image"),
    (b'--b\r\nContent-Disposition: form-data; name="files"; filename="e.png"\r\n\r\n\r\n--b--\r\n', 422,
     "corrupt_image"),
    (b"garbage without any boundary", 400, "bad_multipart"),
])
def test_hostile_multipart_bodies_are_4xx(served, body, status, code):
    with make_client(served) as client:
        response = post_raw(client, body, "multipart/form-data; boundary=b")
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code


def test_a_bad_content_length_is_400_at_the_app(served):
    from tests.serve.test_api import asgi_post

    app = create_app(served["detector"], ServeSettings())
    status, body, pulled = asgi_post(app, [b""], {"content-type": "multipart/form-data; boundary=b",
                                                  "content-length": "12abc"})
    assert status == 400 and body["error"]["code"] == "bad_request" and pulled == 0


def test_an_unexpected_error_does_not_leak_its_text(served, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret path /srv/models/clip")

    with make_client(served) as client:
        monkeypatch.setattr(client.app.state.service, "decode_and_score", broken)
        response = TestClient(client.app, raise_server_exceptions=False).post(
            "/v1/detect", files=files(("a.png", image_bytes())))
    assert response.status_code == 500
    message = error_of(response)["message"]
    assert "RuntimeError" in message and "incident" in message and "/srv" not in message


# -- no server paths ----------------------------------------------------------------------------------------

ABSOLUTE = re.compile(r"(^|[\s'\"(=])/(tmp|home|root|usr|srv|var|opt|work)\b")


def strings(data):
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for key, value in data.items():
            yield key
            yield from strings(value)
    elif isinstance(data, list):
        for value in data:
            yield from strings(value)


def assert_no_paths(body, *folders: str) -> None:
    text = json.dumps(body)
    for folder in folders:
        assert folder not in text
    assert not [s for s in strings(body) if ABSOLUTE.search(s)], text


def test_responses_name_models_without_server_paths(served, tiny_bundle):
    folder = str(tiny_bundle)
    assert folder in json.dumps(served["detector"].info())  # the detector knows where its models are
    with make_client(served) as client:
        info = client.get("/v1/info").json()
        detection = client.post("/v1/detect", files=files(("a.png", image_bytes()), ("b.txt", b"x"))).json()
        health = client.get("/healthz").json()
    for body in (info, detection, health):
        assert_no_paths(body, folder, str(served["root"]))
    assert detection["model"]["models"]["clip"] == "local:clip"
    assert detection["model"]["models"]["weights"]["clip"] == served["detector"].metadata["extraction"]["clip"]["weights"]


def test_hub_ids_are_kept():
    from tidy_detect.serve.public import public_source

    assert public_source("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"
    assert public_source("/srv/models/clip-vit-large-patch14/") == "local:clip-vit-large-patch14"
    assert public_source("./models/blip2") == "local:blip2"
    assert public_source(None) is None


def test_a_failed_load_is_reported_without_paths(tmp_path):
    folder = tmp_path / "models" / "clip"

    def loader():
        raise ModelLoadError(f"clip: no weights in {folder} (looked for {folder}/model.safetensors)")

    with TestClient(create_app(settings=ServeSettings(), loader=loader)) as client:
        for _ in range(200):
            if client.get("/healthz").json()["status"] != "loading":
                break
            threading.Event().wait(0.05)
        health = client.get("/healthz").json()
        info = client.get("/v1/info").json()
    assert health["status"] == "failed" and "local:clip" in health["error"] and "local:model.safetensors" in health["error"]
    for body in (health, info):
        assert_no_paths(body, str(tmp_path))


# -- results retention ---------------------------------------------------------------------------------------

def test_results_folder_keeps_the_newest(served, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    old = folder / f"20000101T000000000000Z-{'0' * 32}.json"  # far past any max age
    old.write_text("{}")
    mine = folder / "notes.txt"  # not named like a result: never touched
    mine.write_text("keep me")
    ids = []
    with make_client(served, results_dir=folder, results_keep=3, results_max_age_days=365) as client:
        assert not old.exists()  # removed at start
        for seed in range(5):
            ids.append(client.post("/v1/detect", files=files(("a.png", image_bytes(seed)))).json()["request_id"])
    names = sorted(p.name for p in folder.iterdir())
    assert mine.exists() and len(names) == 4
    assert [n.split("-")[1][:-5] for n in names if n.endswith(".json")] == ids[-3:]


def test_results_retention_settings_validate():
    from tidy_detect.errors import ConfigError

    with pytest.raises(ConfigError, match="results_keep must be an integer >= 0, got -1"):
        ServeSettings(results_keep=-1)
    with pytest.raises(ConfigError, match="results_max_age_days must be a number of seconds >= 0"):
        ServeSettings(results_max_age_days=-2)
    assert ServeSettings(results_keep=0, results_max_age_days=0).results_keep == 0


def test_memory_summary_names_the_worst_request():
    text = ServeSettings().memory_summary()
    assert "worst request holds about 0.29 GiB" in text and "0.98 GiB server-wide" in text


def test_results_path_type(tmp_path):
    assert isinstance(ServeSettings(results_dir=str(tmp_path)).results_dir, Path)
