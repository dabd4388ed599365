"""The ``serve`` command: its options, the missing-extra message, loading errors, a real server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tidy_detect.cli.serve import SERVE_EXTRA_MESSAGE, register

from tests.serve.conftest import image_bytes

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def serve_app() -> typer.Typer:
    """A typer app holding only ``serve`` (cli.py registers it on the real one)."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    register(app)
    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_help_lists_the_options():
    result = runner.invoke(serve_app(), ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--head", "--host", "--port", "--max-batch", "--max-wait-ms", "--api-key", "--results-dir",
                   "--max-upload-mb", "--max-files", "--max-pixels", "TIDY_DETECT_API_KEY", "--max-request-pixels",
                   "--decode-pixels", "--reduce-max-side", "--max-connections", "--header-timeout", "--body-timeout",
                   "--keepalive-timeout", "--results-keep", "--results-max-age"):
        assert option in result.output, option
    assert "worst request holds about" in " ".join(result.output.split())  # what it costs in memory


def test_a_taken_port_fails_before_loading(served, monkeypatch):
    pytest.importorskip("uvicorn")
    from tidy_detect.detect import Detector

    loads = []
    monkeypatch.setattr(Detector, "load", classmethod(lambda cls, *a, **k: loads.append(a)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = runner.invoke(serve_app(), ["serve", "--head", str(served["head"]), "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert f"--port {port} on 127.0.0.1 is already in use" in " ".join(result.output.split())
    assert not loads and time.monotonic() - started < 10


def test_missing_extra_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    head = tmp_path / "head.safetensors"
    head.write_bytes(b"x")
    result = runner.invoke(serve_app(), ["serve", "--head", str(head)])
    assert result.exit_code == 1
    assert SERVE_EXTRA_MESSAGE in result.output and "uvicorn is not installed" in result.output


def test_missing_head_fails_before_listening(tmp_path):
    pytest.importorskip("uvicorn")
    result = runner.invoke(serve_app(), ["serve", "--head", str(tmp_path / "nope.safetensors")])
    assert result.exit_code == 7 and "no such head checkpoint" in result.output


def test_bad_setting(tmp_path):
    pytest.importorskip("uvicorn")
    result = runner.invoke(serve_app(), ["serve", "--head", str(tmp_path / "h"), "--max-upload-mb", "0"])
    assert result.exit_code == 2 and "--max-upload-mb must be > 0, got 0.0" in result.output


def test_models_that_fail_to_load_stop_the_server(served, tmp_path):
    """The server listens first and loads in the background; a failed load ends it with that error."""
    pytest.importorskip("uvicorn")
    result = runner.invoke(serve_app(), ["serve", "--head", str(served["head"]), "--port", "0",
                                         "--clip", str(tmp_path / "no-clip-here"), "--log-level", "warning"])
    assert result.exit_code in (4, 7), result.output
    assert "no-clip-here" in result.output


@pytest.mark.slow
def test_serve_command_end_to_end(served):
    """``tidy-detect serve`` as a process on loopback: loading, then ready, then a detection, then Ctrl-C."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TIDY_DETECT_API_KEY": "k"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tidy_detect.cli", "serve", "--head", str(served["head"]), "--port", str(port),
         "--max-batch", "4", "--max-wait-ms", "5"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        statuses = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(f"{base}/healthz", timeout=2).json()["status"])
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
            if statuses and statuses[-1] == "ready":
                break
            time.sleep(0.2)
        assert statuses and statuses[-1] == "ready" and set(statuses) <= {"loading", "ready"}
        assert httpx.get(f"{base}/v1/info", timeout=5).status_code == 401  # the key from the environment
        response = httpx.post(f"{base}/v1/detect", headers={"X-API-Key": "k"}, timeout=60,
                              files=[("files", ("a.png", image_bytes(seed=1)))])
        assert response.status_code == 200, response.text
        record = response.json()["records"][0]
        assert record["path"] == "a.png" and record["error"] is None
        assert record == served["detector"].predict([image_bytes(seed=1)], names=["a.png"])[0]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output
    assert "models loaded in" in output and "Application shutdown complete" in output
