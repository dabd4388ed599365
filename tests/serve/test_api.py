"""The HTTP API on the tiny bundle, through FastAPI's test client: records, limits, errors, API key."""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the web service needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the test extra)")

from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from tidy_detect import __version__  # noqa: E402
from tidy_detect.cli import app as cli_app  # noqa: E402
from tidy_detect.errors import ConfigError, ModelLoadError  # noqa: E402
from tidy_detect.serve import ServeSettings, create_app  # noqa: E402

from tests.serve.conftest import error_of, files, image_bytes, png_bomb  # noqa: E402

RECORD_KEYS = {"path", "sha256", "width", "height", "p_fake", "label", "caption", "objects", "global_discrepancy", "stage",
               "error", "random_weights", "provenance"}


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served["detector"], ServeSettings(max_wait_ms=5))) as test_client:
        yield test_client


def make_client(served, **settings) -> TestClient:
    return TestClient(create_app(served["detector"], ServeSettings(**settings)))


# -- service routes ----------------------------------------------------------------------------------

def test_healthz_info_page_and_openapi(client, served):
    assert client.get("/healthz").json() == {"status": "ready"}
    info = client.get("/v1/info").json()
    assert info["package_version"] == __version__ and info["status"] == "ready"
    extraction = served["detector"].metadata["extraction"]
    assert info["models"] == {"clip": "local:clip", "captioner": "blip2", "captioner_model": "local:blip2",
                              "grounder": "grounding-dino", "grounder_model": "local:grounding-dino",
                              "weights": {part: extraction[part]["weights"] for part in ("clip", "captioner", "grounder")}}
    assert info["head"]["representation"]["kind"] == "both" and info["head"]["hyperparameters"]["hidden"] == 16
    assert "stores" not in info["head"]["training_data"]  # no server-side paths
    assert info["thresholds"]["p_fake"] == 0.5 and "box" in info["thresholds"]
    assert info["limits"] == {"max_upload_bytes": 20 * 1024 * 1024, "max_files": 16, "max_pixels": 100_000_000,
                              "max_pending": 256, "max_request_pixels": 400_000_000, "reduce_max_side": 2048}
    assert info["batching"]["max_batch"] == 8 and info["api_key_required"] is False
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.split("<footer>")[0].replace("http://www.w3.org/2000/svg", "")  # no CDN
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "/v1/info" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_info_records_and_summary_say_random_weights_on_the_tiny_bundle(client):
    info = client.get("/v1/info").json()
    assert info["random_weights"] is True and info["random_weight_models"] == ["clip", "captioner", "grounder"]
    body = client.post("/v1/detect", files=files(("photo.png", image_bytes(seed=11)))).json()
    assert body["model"]["random_weights"] is True and body["model"]["random_weight_models"]
    assert body["records"][0]["random_weights"] is True
    props = client.get("/openapi.json").json()["components"]["schemas"]["DetectionRecord"]["properties"]
    assert props["random_weights"]["type"] == "boolean" and "random weights" in props["random_weights"]["description"]


def test_models_without_the_mark_are_not_called_random(served, monkeypatch):
    """A stand-in for a server on real models: the detector knows of no random-weight model."""
    monkeypatch.setattr(served["detector"], "random_weight_models", [])
    with make_client(served, max_wait_ms=5) as real:
        info = real.get("/v1/info").json()
        assert info["random_weights"] is False and info["random_weight_models"] == []
        body = real.post("/v1/detect", files=files(("photo.png", image_bytes(seed=12)))).json()
        assert body["model"]["random_weights"] is False and body["records"][0]["random_weights"] is False


def test_unknown_route_is_a_json_error(client):
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"
    assert client.get("/v1/detect").status_code == 405


# -- detection -----------------------------------------------------------------------------------------

def test_single_file_gives_the_cli_record(client, served, tmp_path):
    data = image_bytes(seed=1)
    response = client.post("/v1/detect", files=files(("photo.png", data)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"request_id", "records", "model"} and response.headers["x-request-id"] == body["request_id"]
    assert body["model"]["package_version"] == __version__ and body["model"]["threshold"] == 0.5
    [record] = body["records"]
    assert set(record) == RECORD_KEYS and record["path"] == "photo.png" and record["error"] is None
    assert record == served["detector"].predict([data], names=["photo.png"])[0]
    # and what `tidy-detect detect --format json` prints for the same file, apart from its path
    (tmp_path / "photo.png").write_bytes(data)
    cli = CliRunner().invoke(cli_app, ["detect", str(tmp_path / "photo.png"), "--head", str(served["head"]),
                                       "--format", "json"])
    assert cli.exit_code == 0, cli.output
    [cli_record] = json.loads(cli.stdout)
    assert {k: v for k, v in cli_record.items() if k != "path"} == {k: v for k, v in record.items() if k != "path"}


def test_several_files_in_upload_order_with_a_bad_one_in_its_record(client, served):
    uploads = [("a.png", image_bytes(seed=2)), ("notes.txt", b"not an image at all"),
               ("b.jpg", image_bytes(seed=3, fmt="JPEG")), ("bomb.png", png_bomb()),
               ("cut.png", image_bytes(seed=4)[:200]), ("a.png", image_bytes(seed=5))]
    response = client.post("/v1/detect", files=files(*uploads))
    assert response.status_code == 200, response.text
    records = response.json()["records"]
    assert [r["path"] for r in records] == [name for name, _ in uploads]
    assert all(set(r) == RECORD_KEYS for r in records)
    errors = [r["error"] for r in records]
    assert errors[0] is None and errors[2] is None and errors[5] is None
    assert "notes.txt: not an image" in errors[1]
    assert "bomb.png: 100000x100000" in errors[3] and "over the limit" in errors[3]
    assert errors[4].startswith("cut.png: ") and records[4]["p_fake"] is None and records[4]["objects"] == []
    # two uploads named alike are still told apart
    assert records[0]["sha256"] != records[5]["sha256"]
    expected = served["detector"].predict([uploads[0][1], uploads[5][1]], names=["x", "y"])
    assert [records[0]["p_fake"], records[5]["p_fake"]] == [r["p_fake"] for r in expected]
    assert records[1] == served["detector"].predict([uploads[1][1]], names=["notes.txt"])[0]


def test_concurrent_requests_are_micro_batched(served):
    uploads = [image_bytes(seed=10 + i, size=(48, 40)) for i in range(8)]
    expected = served["detector"].predict(uploads, names=[f"img{i}.png" for i in range(8)])
    barrier = threading.Barrier(8)
    with make_client(served, max_batch=8, max_wait_ms=300) as test_client:
        def post(i: int):
            barrier.wait()
            return test_client.post("/v1/detect", files=files((f"img{i}.png", uploads[i])))

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
        batching = test_client.get("/v1/info").json()["batching"]
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["records"][0]["p_fake"] for r in responses] == [e["p_fake"] for e in expected]
    assert batching["images"] == 8 and batching["largest_batch"] > 1 and batching["batches"] < 8


# -- limits and errors -----------------------------------------------------------------------------------

def asgi_post(app, chunks, headers: dict[str, str]) -> tuple[int, dict, int]:
    """POST straight to the ASGI app, one body chunk per ``receive``: (status, JSON body, chunks pulled).

    The test client reads a whole request body before the app sees it, so it cannot show how much
    of a body the server pulls; this can.
    """
    pulled = 0
    chunks = list(chunks)
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/detect", "raw_path": b"/v1/detect", "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


BOUNDARY = "tidyboundary"
PART_HEAD = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="big.bin"\r\n'
             f'Content-Type: application/octet-stream\r\n\r\n').encode()


def test_upload_over_the_limit_is_refused_from_content_length(served):
    app = create_app(served["detector"], ServeSettings(max_upload_bytes=4096))
    chunks = [PART_HEAD] + [b"\0" * 65536] * 100
    status, body, pulled = asgi_post(app, chunks, {"content-type": f"multipart/form-data; boundary={BOUNDARY}",
                                                   "content-length": str(100 * 65536 + 200)})
    assert status == 413 and body["error"]["code"] == "upload_too_large" and pulled == 0  # nothing read
    assert "the request body is 6,553,800 bytes, over this server's limit of 4,096 bytes" in body["error"]["message"]
    with make_client(served, max_upload_bytes=4096) as test_client:  # and through a real HTTP client
        response = test_client.post("/v1/detect", files=files(("big.png", image_bytes(size=(200, 200)))))
    assert response.status_code == 413 and error_of(response)["code"] == "upload_too_large"


def test_upload_over_the_limit_is_refused_while_streaming(served):
    """Without Content-Length (chunked), the body is read only until it passes the limit."""
    app = create_app(served["detector"], ServeSettings(max_upload_bytes=256 * 1024))
    chunks = [PART_HEAD] + [b"\0" * 65536] * 1000 + [f"\r\n--{BOUNDARY}--\r\n".encode()]  # 64 MiB in all
    status, body, pulled = asgi_post(app, chunks, {"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert status == 413 and body["error"]["code"] == "upload_too_large"
    assert "more than 262,144 bytes" in body["error"]["message"]
    assert pulled == 5  # the part's headers and three 64 KiB chunks fit; the fourth passes the limit


def test_too_many_files(served):
    with make_client(served, max_files=2) as test_client:
        response = test_client.post("/v1/detect", files=files(*[(f"{i}.png", image_bytes(i)) for i in range(3)]))
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "too_many_files" and "more than 2 files" in error["message"]


def test_more_images_than_the_queue_takes_is_busy(served):
    with make_client(served, max_pending=2) as test_client:
        response = test_client.post("/v1/detect", files=files(*[(f"{i}.png", image_bytes(i)) for i in range(3)]))
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        error = error_of(response)
        assert error["code"] == "busy" and "over the server's limit of 2" in error["message"]
        assert test_client.post("/v1/detect", files=files(("a.png", image_bytes()))).status_code == 200


@pytest.mark.parametrize("name, data, status, code, message", [
    ("bomb.png", png_bomb(), 422, "image_too_large", "bomb.png: 100000x100000 = 10,000,000,000 pixels"),
    ("notes.txt", b"hello", 415, "unsupported_image", "notes.txt: not an image"),
    ("cut.jpg", image_bytes(size=(200, 200), fmt="JPEG")[:2000], 422, "corrupt_image", "cut.jpg: the file is truncated"),
    ("empty.png", b"", 422, "corrupt_image", "empty.png: the file is empty"),
])
def test_a_bad_single_file_gets_an_error_status(client, name, data, status, code, message):
    response = client.post("/v1/detect", files=files((name, data)))
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["code"] == code and message in error["message"]


def test_max_pixels_setting(served):
    with make_client(served, max_pixels=1000) as test_client:
        assert test_client.get("/v1/info").json()["limits"]["max_pixels"] == 1000
        response = test_client.post("/v1/detect", files=files(("wide.png", image_bytes(size=(50, 30)))))
        assert response.status_code == 422
        error = error_of(response)
        assert error["code"] == "image_too_large" and "1,500 pixels is over the limit of 1,000" in error["message"]
        assert "at most 1,000 pixels per image" in error["message"] and "raise max_pixels" not in error["message"]
        small = test_client.post("/v1/detect", files=files(("small.png", image_bytes(size=(30, 30)))))
        assert small.status_code == 200 and small.json()["records"][0]["error"] is None


@pytest.mark.parametrize("kwargs, status, code", [
    ({"data": {"x": "1"}}, 415, "not_multipart"),
    ({"content": b"{}", "headers": {"content-type": "application/json"}}, 415, "not_multipart"),
    ({"data": {"note": "hi"}, "files": files(("a.png", image_bytes()))}, 422, "unexpected_field"),
    ({"content": b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\nabc",
      "headers": {"content-type": "multipart/form-data; boundary=b"}}, 400, "bad_multipart"),
    ({"content": b"--b--\r\n", "headers": {"content-type": "multipart/form-data; boundary=b"}}, 422, "no_files"),
])
def test_malformed_requests(client, kwargs, status, code):
    response = client.post("/v1/detect", **kwargs)
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code


def test_uploads_never_touch_the_disk(served, tmp_path, monkeypatch):
    """Starlette would spool uploads over 1 MiB to a temporary file; this server keeps them in memory."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    monkeypatch.chdir(tmp_path)
    big = image_bytes(seed=7, size=(800, 700))
    assert len(big) > 1024 * 1024
    with make_client(served) as test_client:
        assert test_client.post("/v1/detect", files=files(("big.png", big))).status_code == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"] and not list(spool.iterdir())


def test_results_dir_gets_the_records_and_no_image(served, tmp_path):
    folder = tmp_path / "results"
    with make_client(served, results_dir=folder) as test_client:
        body = test_client.post("/v1/detect", files=files(("a.png", image_bytes(1)), ("b.txt", b"x"))).json()
    [written] = list(folder.iterdir())
    assert written.name.endswith(f"-{body['request_id']}.json")
    saved = json.loads(written.read_text())
    assert saved["records"] == body["records"] and saved["request_id"] == body["request_id"]


# -- API key -----------------------------------------------------------------------------------------------

def test_api_key_guards_every_v1_route(served):
    with make_client(served, api_key="s3cret") as test_client:
        for method, path in (("get", "/v1/info"), ("post", "/v1/detect")):
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"},
                            {"Authorization": "Basic czNjcmV0"}):
                response = getattr(test_client, method)(path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert error_of(response)["code"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"
        assert "no API key given" in error_of(test_client.get("/v1/info"))["message"]
        assert "the API key given is wrong" in error_of(test_client.get("/v1/info", headers={"X-API-Key": "x"}))["message"]
        assert test_client.get("/v1/info", headers={"X-API-Key": "s3cret"}).json()["api_key_required"] is True
        ok = test_client.post("/v1/detect", headers={"Authorization": "Bearer s3cret"},
                              files=files(("a.png", image_bytes())))
        assert ok.status_code == 200
        for open_path in ("/", "/healthz", "/docs", "/openapi.json", "/static/app.js"):
            assert test_client.get(open_path).status_code == 200, open_path
        schemes = test_client.get("/openapi.json").json()["components"]["securitySchemes"]
        assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}


def test_a_refused_key_stops_before_the_body_is_read(served):
    app = create_app(served["detector"], ServeSettings(api_key="k"))
    status, body, pulled = asgi_post(app, [PART_HEAD, b"\0" * 1024],
                                     {"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert status == 401 and body["error"]["code"] == "unauthorized" and pulled == 0


# -- readiness -----------------------------------------------------------------------------------------------

def test_healthz_says_loading_until_the_loader_returns(served):
    release = threading.Event()

    def loader():
        release.wait(10)
        return served["detector"]

    with TestClient(create_app(settings=ServeSettings(), loader=loader)) as test_client:
        assert test_client.get("/healthz").status_code == 503
        assert test_client.get("/healthz").json() == {"status": "loading"}
        response = test_client.post("/v1/detect", files=files(("a.png", image_bytes())))
        assert response.status_code == 503 and error_of(response)["code"] == "loading"
        assert response.headers["retry-after"] == "5"
        release.set()
        for _ in range(200):
            if test_client.get("/healthz").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert test_client.get("/healthz").json() == {"status": "ready"}
        assert test_client.post("/v1/detect", files=files(("a.png", image_bytes()))).status_code == 200


def test_healthz_reports_a_failed_load():
    def loader():
        raise ModelLoadError("clip: no weights in /nowhere")

    with TestClient(create_app(settings=ServeSettings(), loader=loader)) as test_client:
        for _ in range(200):
            if test_client.get("/healthz").json()["status"] != "loading":
                break
            threading.Event().wait(0.05)
        response = test_client.get("/healthz")
        assert response.status_code == 503
        # the server's paths stay in its log
        assert response.json() == {"status": "failed", "error": "clip: no weights in local:nowhere"}
        assert error_of(test_client.get("/v1/info"))["code"] == "load_failed"


@pytest.mark.parametrize("kwargs, message", [
    ({"max_files": 0}, "max_files must be an integer >= 1, got 0"),
    ({"max_upload_bytes": -5}, "max_upload_bytes must be an integer >= 1, got -5"),
    ({"max_pixels": 0}, "max_pixels must be an integer >= 1 or None, got 0"),
    ({"max_wait_ms": -1.0}, "max_wait_ms must be between 0 and 60000, got -1.0"),
    ({"api_key": " "}, "api_key must not be empty"),
])
def test_settings_validate_themselves(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ServeSettings(**kwargs)
