#!/usr/bin/env python
"""Hostile-client benchmark of the web service: load, memory bombs, idle and slow connections, bad input.

Starts ``tidy-detect serve`` as its own process on 127.0.0.1 (by default on a tiny random-weight
bundle and a head trained on it here, offline, with the helpers of ``load_server.py``), then runs
each case against it, one after the other, and prints one table row per case: what status was
expected and what came back, latency percentiles, and the server's resident memory before the
case, at its peak (sampled every 50 ms from /proc/PID/status) and after. Everything stays on
loopback, every case is bounded in count and time, and the server is stopped at the end.

    python benchmarks/attack_server.py                           # every case, full counts (~10 min on 2 cores)
    python benchmarks/attack_server.py --quick                   # smaller counts (~2 min)
    python benchmarks/attack_server.py --cases huge,idle,disclosure

Cases (``--cases``, comma-separated): load, huge, huge8, idle, slowloris, short-body, long-boundary,
not-multipart, too-many-files, oversized, bomb, truncated, bad-content-length, bad-part-headers,
nested-multipart, zero-byte, disclosure. The server runs with its defaults except
``--max-request-pixels 1600000000`` (so the 16 x 100M-pixel request is decoded rather than refused
from its headers) and, to keep the run short, 5 s header and body timeouts.

Targets: no 5xx; under the 16 x 10000x10000 request at most 1.5 GB above idle and a concurrent
small request answered within 5 s; with 20,000 idle connections a normal request within 2 s.
Linux only (/proc, file limits). Needs the ``serve`` extra and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_server import ServerProcess, build_tiny_head, make_images, percentile, proc_memory, run_load  # noqa: E402

CASES = ("load", "huge", "huge8", "idle", "slowloris", "short-body", "long-boundary", "not-multipart",
         "too-many-files", "oversized", "bomb", "truncated", "bad-content-length", "bad-part-headers",
         "nested-multipart", "zero-byte", "disclosure")
SERVER_ARGS = ["--max-request-pixels", "1600000000", "--header-timeout", "5", "--body-timeout", "5",
               "--body-total-timeout", "30"]
MAX_CASE_S = 900.0  # no request waits longer than this (8 x 16 huge images take ~520 s on 2 cores)


@dataclass
class Counts:
    """How big each case is; --quick shrinks them."""

    load_requests: int = 10_000
    load_clients: int = 32
    huge_images: int = 16
    huge_requests: int = 8
    idle_connections: int = 20_000
    slow_connections: int = 200

    @classmethod
    def quick(cls) -> "Counts":
        return cls(load_requests=200, load_clients=8, huge_images=4, huge_requests=2, idle_connections=2_000,
                   slow_connections=20)


@dataclass
class Row:
    case: str
    expected: str
    statuses: collections.Counter = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    note: str = ""
    rss: tuple[int, int, int] = (0, 0, 0)
    ok: bool = True


# -- inputs ---------------------------------------------------------------------------------------------

def single_colour_png(side: int, rgb: tuple[int, int, int]) -> bytes:
    """A ``side`` x ``side`` RGB PNG of one colour, written row by row (Pillow would need the pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes(rgb) * side
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(side: int = 100_000) -> bytes:
    """A few hundred bytes announcing ``side`` x ``side`` pixels."""
    png = single_colour_png(8, (0, 0, 0))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return png[:16] + ihdr + crc + png[33:]


def small_jpeg() -> bytes:
    return make_images(1, 256)[0][1]


def multipart(files: list[tuple[str, bytes]], boundary: str = "attackboundary") -> tuple[bytes, str]:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
             f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# -- measuring --------------------------------------------------------------------------------------------

class MemorySampler:
    """The server's VmRSS every 50 ms in a thread, between start() and stop()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        return proc_memory(self.pid).get("VmRSS", 0)

    def start(self) -> int:
        self.peak, before = 0, self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return before

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.peak


def timed_post(client: httpx.Client, content: bytes, content_type: str, row: Row, **headers: str) -> httpx.Response | None:
    started = time.perf_counter()
    try:
        response = client.post("/v1/detect", content=content, headers={"content-type": content_type, **headers})
        row.statuses[str(response.status_code)] += 1
        return response
    except httpx.HTTPError as exc:
        row.statuses[type(exc).__name__] += 1
        return None
    finally:
        row.latencies.append(time.perf_counter() - started)


def raw_exchange(port: int, data: bytes, *, trickle: float = 0.0, wait: float = 60.0) -> tuple[str, float]:
    """Send raw bytes (one byte per ``trickle`` seconds if set) and return the status the server
    answers ("closed" for a close without answer) and the seconds it took."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            if trickle:
                for k in range(len(data)):
                    sock.sendall(data[k:k + 1])
                    sock.settimeout(trickle)
                    try:
                        reply = sock.recv(65536)
                        if reply or reply == b"":
                            return _status_of(reply), time.perf_counter() - started
                    except socket.timeout:
                        continue
            else:
                sock.sendall(data)
            sock.settimeout(wait)
            reply = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return "reset", time.perf_counter() - started
        except socket.timeout:
            return "no answer", time.perf_counter() - started
    return _status_of(reply), time.perf_counter() - started


def _status_of(reply: bytes) -> str:
    if not reply:
        return "closed"
    line = reply.split(b"\r\n", 1)[0].split()
    return line[1].decode() if len(line) > 1 else "garbage"


# -- the cases ---------------------------------------------------------------------------------------------

class Attack:
    def __init__(self, server: ServerProcess, counts: Counts, work: Path, model_folders: list[str]) -> None:
        self.server = server
        self.port = server.port
        self.counts = counts
        self.work = work
        self.model_folders = model_folders
        self.client = httpx.Client(base_url=server.base, timeout=MAX_CASE_S)
        self.small = small_jpeg()

    def huge_body(self, count: int) -> tuple[bytes, str]:
        cache = self.work / "huge10000.png"
        if not cache.is_file():
            cache.write_bytes(single_colour_png(10_000, (200, 30, 40)))
        data = cache.read_bytes()
        return multipart([(f"huge{i}.png", data) for i in range(count)])

    def small_requests_during(self, busy: Callable[[], bool], row: Row) -> None:
        """Small requests one after the other while ``busy()``; their latencies go to ``row``."""
        body, kind = multipart([("small.jpg", self.small)])
        with httpx.Client(base_url=self.server.base, timeout=60) as client:
            time.sleep(0.5)  # let the large request reach the decoder first
            while busy():
                started = time.perf_counter()
                response = client.post("/v1/detect", content=body, headers={"content-type": kind})
                row.latencies.append(time.perf_counter() - started)
                row.statuses[f"small {response.status_code}"] += 1
                time.sleep(0.2)

    def case_load(self, row: Row) -> None:
        images = make_images(16, 256)
        result = asyncio.run(run_load(self.server.base, images, self.counts.load_clients, self.counts.load_requests,
                                      MAX_CASE_S, self.server.memory))
        ok = result["requests"] - sum(result["errors"].values())
        row.statuses["200"] += ok
        for key, value in result["errors"].items():
            row.statuses[key.replace("HTTP ", "")] += value
        row.latencies = [result["p50_ms"] / 1000, result["p95_ms"] / 1000]  # already percentiles
        row.note = f"{result['requests_per_s']:.1f} req/s, {self.counts.load_clients} clients"

    def _huge(self, row: Row, requests: int) -> None:
        body, kind = self.huge_body(self.counts.huge_images)
        done = threading.Event()
        big = Row("big", "")

        def one() -> None:
            with httpx.Client(base_url=self.server.base, timeout=MAX_CASE_S) as client:
                timed_post(client, body, kind, big)

        with ThreadPoolExecutor(requests + 1) as pool:
            small = pool.submit(self.small_requests_during, lambda: not done.is_set(), row)
            futures = [pool.submit(one) for _ in range(requests)]
            for future in futures:
                future.result()
            done.set()
            small.result()
        row.statuses.update({f"big {k}": v for k, v in big.statuses.items()})
        small_worst = max(row.latencies) if row.latencies else 0.0
        row.note = (f"{requests} x {self.counts.huge_images} PNGs of 10000x10000 ({len(body) / 2**20:.2f} MiB each); "
                    f"big done in {max(big.latencies):.1f} s; latencies are the concurrent small requests' "
                    f"(worst {small_worst:.2f} s)")
        row.ok = small_worst <= 5.0

    def case_huge(self, row: Row) -> None:
        self._huge(row, 1)

    def case_huge8(self, row: Row) -> None:
        self._huge(row, self.counts.huge_requests)

    def case_idle(self, row: Row) -> None:
        count = self.counts.idle_connections
        halves = [count // 2, count - count // 2]
        children = [subprocess.Popen([sys.executable, __file__, "--child-idle", str(self.port), str(n), "120"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for n in halves]
        opened = 0
        try:
            for child in children:
                line = child.stdout.readline().strip()  # "opened N" once all its connections are made
                opened += int(line.split()[1]) if line.startswith("opened") else 0
            body, kind = multipart([("small.jpg", self.small)])
            for _ in range(5):
                with httpx.Client(base_url=self.server.base, timeout=30) as client:  # a fresh connection each
                    timed_post(client, body, kind, row)
                    started = time.perf_counter()
                    status = client.get("/healthz").status_code
                    row.latencies.append(time.perf_counter() - started)
                    row.statuses[str(status)] += 1
        finally:
            for child in children:
                child.stdin.close()
            for child in children:
                try:
                    child.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    child.kill()
        row.note = f"{opened:,} idle connections opened by 2 processes, then 5 x (POST + GET) on new connections"
        row.ok = bool(row.latencies) and max(row.latencies) <= 2.0

    def case_slowloris(self, row: Row) -> None:
        request = b"GET /healthz HTTP/1.1\r\nHost: attack\r\nX-Pad: " + b"a" * 40 + b"\r\n\r\n"
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda _: raw_exchange(self.port, request, trickle=1.0, wait=60),
                                    range(self.counts.slow_connections)))
        for status, seconds in results:
            row.statuses[status] += 1
            row.latencies.append(seconds)
        row.note = f"{self.counts.slow_connections} connections sending headers at 1 byte/s"

    def case_short_body(self, row: Row) -> None:
        body, kind = multipart([("a.jpg", self.small)])
        head = (f"POST /v1/detect HTTP/1.1\r\nHost: attack\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body) + 100_000}\r\n\r\n").encode()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: raw_exchange(self.port, head + body, wait=60), range(16)))
        for status, seconds in results:
            row.statuses[status] += 1
            row.latencies.append(seconds)
        row.note = "16 requests declaring 100 kB more than they send"

    def _post_cases(self, row: Row, bodies: list[tuple[bytes, str]], note: str) -> None:
        for content, kind in bodies:
            timed_post(self.client, content, kind, row)
        row.note = note

    def case_long_boundary(self, row: Row) -> None:
        boundary = "b" * 300
        self._post_cases(row, [multipart([("a.jpg", self.small)], boundary)] * 5, "a 300-character boundary")

    def case_not_multipart(self, row: Row) -> None:
        self._post_cases(row, [(b'{"files": []}', "application/json"), (self.small, "image/jpeg"),
                               (b"files=x", "application/x-www-form-urlencoded")], "JSON, a bare image, a form")

    def case_too_many_files(self, row: Row) -> None:
        self._post_cases(row, [multipart([(f"{i}.jpg", self.small) for i in range(17)])] * 3, "17 files")

    def case_oversized(self, row: Row) -> None:
        self._post_cases(row, [multipart([("big.bin", os.urandom(21 * 2**20))])] * 2, "a 21 MiB body")

    def case_bomb(self, row: Row) -> None:
        self._post_cases(row, [multipart([("bomb.png", png_bomb())])] * 5, "a PNG header announcing 100000x100000")

    def case_truncated(self, row: Row) -> None:
        cut = self.small[: len(self.small) // 3]
        self._post_cases(row, [multipart([("cut.jpg", cut)])] * 5, "a JPEG cut to a third")

    def case_bad_content_length(self, row: Row) -> None:
        for value in (b"abc", b"-1", b"1, 2", b"99999999999999999999999"):
            request = b"POST /v1/detect HTTP/1.1\r\nHost: attack\r\nContent-Length: " + value + b"\r\n\r\n"
            status, seconds = raw_exchange(self.port, request, wait=30)
            row.statuses[status] += 1
            row.latencies.append(seconds)
        row.note = "Content-Length abc, -1, '1, 2', 10^23"

    def case_bad_part_headers(self, row: Row) -> None:
        b = "hb"
        bodies = [f"--{b}\r\nno colon here\r\n\r\ndata\r\n--{b}--\r\n",
                  f"--{b}\r\nContent-Disposition: form-data; name=files; filename=\"a.jpg\"\r\nX: " + "y" * 20_000 +
                  f"\r\n\r\ndata\r\n--{b}--\r\n",
                  f"--{b}\r\nContent-Disposition: ;;;===\r\n\r\ndata\r\n--{b}--\r\n"]
        self._post_cases(row, [(body.encode(), f"multipart/form-data; boundary={b}") for body in bodies],
                         "a header without colon, a 20 kB header, a garbled Content-Disposition")

    def case_nested_multipart(self, row: Row) -> None:
        inner, inner_kind = multipart([("a.jpg", self.small)], "inner")
        outer = (f'--outer\r\nContent-Disposition: form-data; name="files"; filename="nested"\r\n'
                 f'Content-Type: {inner_kind}\r\n\r\n').encode() + inner + b"\r\n--outer--\r\n"
        self._post_cases(row, [(outer, "multipart/form-data; boundary=outer")] * 3, "a multipart inside a file part")

    def case_zero_byte(self, row: Row) -> None:
        self._post_cases(row, [multipart([("empty.png", b"")])] * 3, "an empty file")

    def case_disclosure(self, row: Row) -> None:
        body, kind = multipart([("a.jpg", self.small), ("bad.txt", b"not an image")])
        texts = []
        for method, path in (("get", "/v1/info"), ("get", "/healthz"), ("post", "/v1/detect")):
            started = time.perf_counter()
            if method == "get":
                response = self.client.get(path)
            else:
                response = self.client.post(path, content=body, headers={"content-type": kind})
            row.latencies.append(time.perf_counter() - started)
            row.statuses[str(response.status_code)] += 1
            texts.append(response.text)
        found = [folder for folder in self.model_folders if any(folder in text for text in texts)]
        row.note = ("no server path in /v1/info, /healthz, /v1/detect" if not found
                    else f"server paths disclosed: {found}")
        row.ok = not found


EXPECTED = {"load": "200", "huge": "200 (small 200 < 5 s)", "huge8": "200 (small 200 < 5 s)",
            "idle": "200 < 2 s", "slowloris": "408", "short-body": "408", "long-boundary": "400",
            "not-multipart": "415", "too-many-files": "413", "oversized": "413", "bomb": "422", "truncated": "422",
            "bad-content-length": "400", "bad-part-headers": "400/422", "nested-multipart": "415",
            "zero-byte": "422", "disclosure": "200, no path"}


def run_case(attack: Attack, name: str, sampler: MemorySampler) -> Row:
    row = Row(name, EXPECTED[name])
    before = sampler.start()
    started = time.perf_counter()
    try:
        getattr(attack, "case_" + name.replace("-", "_"))(row)
    except Exception as exc:  # a failed case is a row, not the end of the run
        row.statuses[f"error {type(exc).__name__}"] += 1
        row.note = str(exc)[:200]
        row.ok = False
    peak = sampler.stop()
    time.sleep(1.0)
    row.rss = (before, peak, sampler.rss())
    if any(k.split()[-1].startswith("5") for k in row.statuses):
        row.ok = False
    print(f"  {name}: {dict(row.statuses)} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return row


def table(rows: list[Row], idle_rss: int) -> str:
    def mb(v: int) -> str:
        return f"{v / 1e6:,.0f}"

    header = (f"{'case':<18} {'expected':<22} {'observed':<34} {'p50 ms':>8} {'p95 ms':>8} "
              f"{'RSS before':>10} {'peak MB':>8} {'after':>7} {'ok':>3}  note")
    lines = [header, "-" * len(header)]
    for r in rows:
        lat = sorted(r.latencies)
        if r.case == "load":
            p50, p95 = (lat[0], lat[1]) if len(lat) == 2 else (0.0, 0.0)
        else:
            p50, p95 = percentile(lat, 50), percentile(lat, 95)
        observed = ", ".join(f"{k} x{v}" for k, v in sorted(r.statuses.items()))
        lines.append(f"{r.case:<18} {r.expected:<22} {observed:<34} {1000 * p50:>8.0f} {1000 * p95:>8.0f} "
                     f"{mb(r.rss[0]):>10} {mb(r.rss[1]):>8} {mb(r.rss[2]):>7} {'yes' if r.ok else 'NO':>3}  {r.note}")
    lines.append("")
    lines.append(f"RSS in MB (10^6 bytes); the server's idle RSS after loading was {mb(idle_rss)} MB. "
                 f"Server: tidy-detect serve {' '.join(SERVER_ARGS)}")
    return "\n".join(lines)


# -- the idle-connection child process ---------------------------------------------------------------------

def child_idle(port: int, count: int, hold: float) -> int:
    """Open ``count`` connections and send nothing; print "opened N"; hold until stdin closes or ``hold`` s."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    deadline = time.monotonic() + 60
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            sock = socket.socket()
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            socks.append(sock)
        except OSError:
            sock.close()
    print(f"opened {len(socks)}", flush=True)
    waiter = threading.Thread(target=sys.stdin.read, daemon=True)
    waiter.start()
    waiter.join(hold)
    for sock in socks:
        sock.close()
    return 0


# -- main ------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="smaller counts (for tests and a first look)")
    parser.add_argument("--head", type=Path, help="head checkpoint to serve (default: a tiny one built here)")
    parser.add_argument("--work", type=Path, help="folder for the tiny bundle, inputs and the server log "
                                                  "(default: a temporary folder, removed at the end)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /healthz ready")
    parser.add_argument("--json", type=Path, help="also write the rows here as JSON")
    parser.add_argument("--child-idle", nargs=3, metavar=("PORT", "COUNT", "HOLD_S"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_idle:
        return args
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        parser.error(f"--cases takes a subset of {', '.join(CASES)}; got {unknown or 'nothing'}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_idle:
        port, count, hold = args.child_idle
        return child_idle(int(port), int(count), float(hold))
    counts = Counts.quick() if args.quick else Counts()
    temporary = None
    if args.work is None:
        temporary = tempfile.TemporaryDirectory(prefix="tidy-attack-")
        work = Path(temporary.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    try:
        if args.head is None:
            print("building the tiny bundle and a head (offline) ...", file=sys.stderr)
        head = args.head or build_tiny_head(work)
        from tidy_detect.head import DiscrepancyHead

        extraction = DiscrepancyHead.load(head)[1]["extraction"]
        folders = [str(Path(extraction[p]["source"]).resolve()) for p in ("clip", "captioner", "grounder")
                   if extraction[p].get("source") and Path(extraction[p]["source"]).exists()]
        server = ServerProcess(head, work / "attack-server.log", max_batch=8, max_wait_ms=20.0, device="cpu",
                               extra_args=SERVER_ARGS)
        rows = []
        try:
            server.wait_ready(args.startup_timeout)
            time.sleep(1.0)
            sampler = MemorySampler(server.process.pid)
            idle_rss = sampler.rss()
            attack = Attack(server, counts, work, folders)
            for name in args.cases:
                print(f"case {name} ...", file=sys.stderr)
                rows.append(run_case(attack, name, sampler))
            attack.client.close()
        finally:
            server.stop()
        log_text = (work / "attack-server.log").read_text(errors="replace")
        tracebacks = log_text.count("Traceback")
        print(table(rows, idle_rss))
        print(f"server log: {len(log_text.splitlines())} lines, {tracebacks} tracebacks")
        if args.json:
            args.json.write_text(json.dumps([{"case": r.case, "expected": r.expected, "statuses": dict(r.statuses),
                                              "latencies": r.latencies, "rss": r.rss, "ok": r.ok, "note": r.note}
                                             for r in rows], indent=2))
        return 0 if all(r.ok for r in rows) and not tracebacks else 1
    finally:
        if temporary is not None:
            temporary.cleanup()


if __name__ == "__main__":
    sys.exit(main())
