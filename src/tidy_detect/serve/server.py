"""The HTTP server around the app: uvicorn with connection limits and timeouts.

uvicorn (0.54, h11) holds a connection as long as its client likes: one that never finishes its
headers, or declares a longer body than it sends, stays open forever, and enough of them exhaust
the process's open files. :class:`GuardedH11Protocol`, uvicorn's own h11 protocol with a few
hooks, adds what nginx has (``client_header_timeout``, ``client_body_timeout``, ``keepalive_timeout``,
``worker_connections`` with reuse of idle connections):

- a cap on open connections (``max_connections``, and below the open-file limit); at the cap the
  oldest idle connection (waiting for headers, or idle between keep-alive requests) is closed for
  the new one; with none idle, the new one gets 503 and is closed;
- ``header_timeout`` from the connection's start, or from a request's first byte, to its last
  header line: 408 (a plain close if nothing was sent at all);
- ``body_timeout`` between body chunks and ``body_total_timeout`` for the whole body: 408;
- uvicorn's own keep-alive timeout (``keepalive_timeout``) for idle connections;
- a malformed request gets a JSON 400 (uvicorn answers in plain text);
- "out of open files" from ``accept()`` and uvicorn's per-request warnings are logged one line at a
  time, at most once per ``LOG_EVERY_S`` with a count, instead of one traceback per attempt.

:func:`bind_socket` binds the port before anything else, so a taken port fails at once.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import socket
import time
from typing import Any, Callable, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from tidy_detect.errors import ConfigError

log = logging.getLogger(__name__)

RESERVE_FDS = 512  # open files kept for everything but connections: model files, logs, results, threads
LOG_EVERY_S = 10.0
EMFILE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


# -- open files and the listening socket -----------------------------------------------------------

def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; returns the soft limit now."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    except (ValueError, OSError):
        return soft


def connection_cap(max_connections: int, open_files: int, reserve: int = RESERVE_FDS) -> int:
    """The cap on open connections: the setting, but below the open-file limit by ``reserve``."""
    return max(1, min(max_connections, open_files - reserve))


def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port``.

    Raises:
        ConfigError: the port is taken, the address is not this machine's, or binding is not allowed.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} cannot be resolved ({exc.strerror}); give an IP address or a known "
                          f"host name") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart without waiting out TIME_WAIT
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port} on {host} is already in use (another server listens there); stop it "
                              f"or choose another --port") from None
        if exc.errno == errno.EACCES:
            raise ConfigError(f"--port {port} on {host}: permission denied (ports below 1024 need privileges); "
                              f"choose a port >= 1024") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); check --host and --port") from None
    sock.set_inheritable(True)
    return sock


# -- log lines without floods -----------------------------------------------------------------------

class RateLimitedLog:
    """One line per ``every`` seconds for a repeated event, with how many were not logged."""

    def __init__(self, logger: logging.Logger, every: float = LOG_EVERY_S) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[str, float] = {}
        self._skipped: collections.Counter[str] = collections.Counter()

    def __call__(self, key: str, message: str, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.every:
            self._skipped[key] += 1
            return
        skipped, self._skipped[key] = self._skipped[key], 0
        self._last[key] = now
        suffix = f" ({skipped} more in the last {self.every:g} s)" if skipped else ""
        self.logger.log(level, "%s%s", message, suffix)


class _RateLimitFilter(logging.Filter):
    """Rate-limits uvicorn's per-request warnings ("Invalid HTTP request received.")."""

    MESSAGES = ("Invalid HTTP request received.", "Exceeded concurrency limit.", "Unsupported upgrade request.")

    def __init__(self, every: float = LOG_EVERY_S) -> None:
        super().__init__()
        self.every = every
        self._last: dict[str, float] = {}
        self._skipped: collections.Counter[str] = collections.Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message not in self.MESSAGES:
            return True
        now = time.monotonic()
        if now - self._last.get(message, -1e9) < self.every:
            self._skipped[message] += 1
            return False
        skipped, self._skipped[message] = self._skipped[message], 0
        self._last[message] = now
        if skipped:
            record.msg, record.args = f"{message} ({skipped} more in the last {self.every:g} s)", ()
        return True


def install_loop_guards(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's "accept() out of system resource" as one rate-limited line, not a traceback each."""
    limited = RateLimitedLog(log)
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in EMFILE_ERRNOS and "accept" in context.get("message", ""):
            limited("accept", f"cannot accept a connection: {exc.strerror} (the open-file limit is reached; "
                              f"lower max_connections or raise ulimit -n)")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def install_log_filters() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _RateLimitFilter) for f in logger.filters):
        logger.addFilter(_RateLimitFilter())
    # python-multipart warns once per malformed body; the client gets the error, the log needs no line each
    logging.getLogger("python_multipart").setLevel(logging.ERROR)


# -- the protocol -------------------------------------------------------------------------------------

def raw_response(status: int, code: str, message: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with the API's JSON error body."""
    reasons = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}
    body = json.dumps({"error": {"code": code, "message": message}}).encode("utf-8")
    head = (f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class ConnectionRegistry:
    """The connections of one server, idle ones in the order they became idle (oldest first)."""

    def __init__(self, cap: int, header_timeout: float, body_timeout: float, body_total_timeout: float) -> None:
        self.cap = cap
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.body_total_timeout = body_total_timeout
        self.idle: collections.OrderedDict[GuardedH11Protocol, None] = collections.OrderedDict()
        self.counts: collections.Counter[str] = collections.Counter()

    def oldest_idle(self, besides: Any) -> GuardedH11Protocol | None:
        for connection in self.idle:
            if connection is not besides:
                return connection
        return None


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap, header and body timeouts and JSON 400s.

    Built per server by :func:`protocol_class`, which binds the :class:`ConnectionRegistry`.
    """

    registry: ClassVar[ConnectionRegistry]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind: str | None = None
        self._body_deadline = 0.0
        self._request_bytes = False  # any byte of the next request received

    # -- state ---------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A request is in progress (headers received, response not finished)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self, kind: str, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer, self._timer_kind = self.loop.call_later(delay, callback), kind

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_kind = None

    def _update(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        registry = self.registry
        if self.busy:
            registry.idle.pop(self, None)
            if self.conn.their_state is h11.SEND_BODY:
                if self._timer_kind != "body":
                    self._body_deadline = self.loop.time() + registry.body_total_timeout
                    self._arm_body()
            elif self._timer_kind is not None:
                self._disarm()  # whole request received: the app takes its time
        else:
            if self._timer_kind == "body":
                self._disarm()
            if self not in registry.idle:
                registry.idle[self] = None
                self._request_bytes = False
            elif self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                # Nothing of a next request buffered (say, the rest of a body drained after an early
                # answer): an idle connection, closed quietly if the header timer fires.
                self._request_bytes = False

    def _arm_body(self) -> None:
        remaining = self._body_deadline - self.loop.time()
        self._arm("body", max(0.0, min(self.registry.body_timeout, remaining)), self._body_timed_out)

    # -- uvicorn's hooks -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        registry = self.registry
        if len(self.connections) > registry.cap:
            victim = registry.oldest_idle(besides=self)
            if victim is None:
                registry.counts["refused"] += 1
                self._close_with(raw_response(503, "too_many_connections",
                                              f"this server holds its limit of {registry.cap:,} connections, all "
                                              f"busy; retry in a moment"))
                return
            registry.counts["evicted"] += 1
            victim._close_with(None)
        registry.idle[self] = None
        self._arm("header", registry.header_timeout, self._header_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.registry.idle.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            if self._timer_kind is None:  # the first byte of a request on a kept-alive connection
                self._arm("header", self.registry.header_timeout, self._header_timed_out)
            self._request_bytes = True
        elif self._timer_kind == "body":
            self._arm_body()
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._update()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update()

    def send_400_response(self, msg: str) -> None:
        self._close_with(raw_response(400, "bad_request",
                                      "the HTTP request is malformed (request line, a header, or Content-Length "
                                      "and Transfer-Encoding); send a well-formed HTTP/1.1 request"))

    # -- closing -------------------------------------------------------------------------------------

    def _close_with(self, response: bytes | None) -> None:
        """Answer ``response`` (raw bytes) if given, and close; the app, if running, sees a disconnect."""
        self._disarm()
        self.registry.idle.pop(self, None)
        self.connections.discard(self)
        if self.transport.is_closing():
            return
        if response is not None:
            self.transport.write(response)
        if self.cycle is not None and not self.cycle.response_complete:
            # The app's sends become no-ops and its receive() returns http.disconnect.
            self.cycle.response_started = self.cycle.response_complete = True
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _header_timed_out(self) -> None:
        self._timer = self._timer_kind = None
        self.registry.counts["header_timeouts"] += 1
        if not self._request_bytes:  # nothing sent: a preconnect or an idle socket, close quietly
            self._close_with(None)
            return
        self._close_with(raw_response(408, "header_timeout",
                                      f"the request headers did not arrive within {self.registry.header_timeout:g} s"))

    def _body_timed_out(self) -> None:
        self._timer = self._timer_kind = None
        self.registry.counts["body_timeouts"] += 1
        registry = self.registry
        late = "the whole body" if self.loop.time() >= self._body_deadline else "the next chunk of the body"
        limit = registry.body_total_timeout if late == "the whole body" else registry.body_timeout
        started = self.cycle is not None and self.cycle.response_started
        self._close_with(None if started else raw_response(
            408, "body_timeout", f"{late} did not arrive within {limit:g} s (is Content-Length larger than the body?)"))


def protocol_class(cap: int, header_timeout: float, body_timeout: float, body_total_timeout: float
                   ) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with its own registry, for ``uvicorn.Config(http=...)``."""
    registry = ConnectionRegistry(cap, header_timeout, body_timeout, body_total_timeout)
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"registry": registry})


def build_server(app: Any, settings: Any, *, log_level: str = "info", open_files: int | None = None) -> Any:
    """A ``uvicorn.Server`` for ``app`` with the protocol and timeouts of ``settings`` (a ServeSettings).

    Run it with ``server.run(sockets=[bind_socket(host, port)])``. Its ``protocol.registry`` counts
    evictions, refusals and timeouts.
    """
    import uvicorn

    class GuardedServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            install_loop_guards(asyncio.get_running_loop())
            install_log_filters()
            await super().startup(sockets=sockets)

    limit = open_files if open_files is not None else raise_open_file_limit()
    cap = connection_cap(settings.max_connections, limit)
    protocol = protocol_class(cap, settings.header_timeout, settings.body_timeout, settings.body_total_timeout)
    config = uvicorn.Config(app, http=protocol, log_level=log_level, workers=1, timeout_graceful_shutdown=10,
                            timeout_keep_alive=settings.keepalive_timeout, lifespan="on", ws="none")
    server = GuardedServer(config)
    server.protocol = protocol  # type: ignore[attr-defined]
    if cap < settings.max_connections:
        log.warning("at most %d connections (the open-file limit is %d); raise ulimit -n for more", cap, limit)
    return server
