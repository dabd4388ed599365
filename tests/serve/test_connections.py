"""Connection behaviour on a real uvicorn server (ephemeral loopback port, small timeouts):
header and body timeouts, the connection cap, JSON 400s for malformed HTTP."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import Iterator

import pytest

pytest.importorskip("uvicorn", reason="the web service needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")

from tidy_detect.serve import ServeSettings, create_app  # noqa: E402
from tidy_detect.serve.server import bind_socket, build_server, connection_cap  # noqa: E402

from tests.serve.conftest import image_bytes  # noqa: E402


@contextlib.contextmanager
def live_server(served, **settings) -> Iterator[tuple[int, object]]:
    """The app on uvicorn in a thread; yields (port, server)."""
    values = {"header_timeout": 0.5, "body_timeout": 0.5, "body_total_timeout": 5.0, "keepalive_timeout": 5.0,
              "max_wait_ms": 5.0, **settings}
    app = create_app(served["detector"], ServeSettings(**values))
    sock = bind_socket("127.0.0.1", 0)
    server = build_server(app, app.state.service.settings, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    started = time.monotonic()
    sock.settimeout(limit)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - started


def status_and_body(reply: bytes) -> tuple[int, dict, bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head.lower()


def test_slow_headers_get_408_and_a_close(served):
    with live_server(served) as (port, server):
        sock = connect(port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        reply, seconds = read_until_closed(sock)
        status, body, head = status_and_body(reply)
        assert status == 408 and body["error"]["code"] == "header_timeout" and b"connection: close" in head
        assert 0.3 < seconds < 5
        silent = connect(port)  # a connection that sends nothing is closed without a word
        reply, seconds = read_until_closed(silent)
        assert reply == b"" and seconds < 5
        assert server.protocol.registry.counts["header_timeouts"] == 2


def test_a_body_shorter_than_its_content_length_gets_408(served):
    with live_server(served) as (port, server):
        sock = connect(port)
        sock.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 5000\r\n\r\n--b\r\n")
        reply, seconds = read_until_closed(sock)
        status, body, head = status_and_body(reply)
        assert status == 408 and body["error"]["code"] == "body_timeout" and b"connection: close" in head
        assert seconds < 5
        # the server is fine afterwards
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200


def test_a_trickled_body_hits_the_total_timeout(served):
    with live_server(served, body_timeout=2.0, body_total_timeout=1.0) as (port, server):
        sock = connect(port)
        sock.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 5000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"files\"; "
                     b"filename=\"a.png\"\r\n\r\n")
        started = time.monotonic()
        status = None
        sock.settimeout(0.3)
        while time.monotonic() - started < 5:
            try:
                sock.sendall(b"x")  # one byte every 0.3 s: never the 2 s between chunks, but 1 s in all
                reply = sock.recv(65536)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if reply:
                status = int(reply.split()[1])
            break
        assert status == 408 and 0.8 < time.monotonic() - started < 3


def test_idle_connections_are_evicted_for_new_ones(served):
    with live_server(served, max_connections=4, header_timeout=30) as (port, server):
        idle = [connect(port) for _ in range(6)]
        time.sleep(0.2)
        started = time.monotonic()
        response = httpx.post(f"http://127.0.0.1:{port}/v1/detect", files=[("files", ("a.png", image_bytes()))],
                              timeout=20)
        assert response.status_code == 200 and time.monotonic() - started < 10
        closed = 0
        for sock in idle:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except socket.timeout:
                pass
        assert closed >= 3  # the oldest ones made room
        assert server.protocol.registry.counts["evicted"] >= 3


def test_with_every_connection_busy_a_new_one_gets_503(served):
    with live_server(served, max_connections=2, body_timeout=5.0, header_timeout=30) as (port, server):
        busy = []
        for _ in range(2):  # requests in progress: their bodies have not finished
            sock = connect(port)
            sock.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 5000\r\n\r\n--b\r\n")
            busy.append(sock)
        time.sleep(0.3)
        reply, _ = read_until_closed(connect(port))
        status, body, head = status_and_body(reply)
        assert status == 503 and body["error"]["code"] == "too_many_connections" and b"connection: close" in head
        assert server.protocol.registry.counts["refused"] == 1


def test_malformed_http_is_a_json_400(served):
    with live_server(served) as (port, server):
        for request in (b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                        b"NOT HTTP AT ALL\r\n\r\n"):
            sock = connect(port)
            sock.sendall(request)
            reply, _ = read_until_closed(sock)
            status, body, head = status_and_body(reply)
            assert status == 400 and body["error"]["code"] == "bad_request", request


def test_the_cap_stays_below_the_open_file_limit():
    assert connection_cap(4096, 20_000) == 4096
    assert connection_cap(50_000, 20_000) == 20_000 - 512
    assert connection_cap(10, 100) == 1


def test_accept_errors_are_one_line_not_a_traceback_each(caplog):
    import asyncio
    import errno

    from tidy_detect.serve import server as server_module

    loop = asyncio.new_event_loop()
    try:
        server_module.install_loop_guards(loop)
        error = OSError(errno.EMFILE, "Too many open files")
        with caplog.at_level("WARNING", logger="tidy_detect.serve.server"):
            for _ in range(1000):
                loop.call_exception_handler({"message": "socket.accept() out of system resource", "exception": error})
    finally:
        loop.close()
    records = [r for r in caplog.records if "cannot accept a connection" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None


def test_an_early_answer_then_the_drained_body_leaves_an_idle_connection(served):
    """413 from Content-Length, the client sends its body anyway: afterwards the connection is idle,
    so the header timer closes it without a spurious 408."""
    with live_server(served, max_upload_bytes=1000) as (port, server):
        sock = connect(port)
        sock.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 5000\r\n\r\n")
        sock.settimeout(5)
        first = b""
        while not first.endswith(b"}}"):  # the whole 413 (its body may come in a second packet)
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 413")
        sock.sendall(b"x" * 5000)
        rest, seconds = read_until_closed(sock)
        assert rest == b"" and seconds < 5
