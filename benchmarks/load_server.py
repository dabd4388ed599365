#!/usr/bin/env python
"""Load benchmark of the web service: N concurrent clients on loopback, micro-batching on and off.

For each mode the script starts ``tidy-detect serve`` as its own process on 127.0.0.1 (by default
with a tiny random-weight bundle and a head trained on it here, offline; or any ``--head``), waits
until ``/healthz`` says ready, sends a short warm-up, then lets ``--clients`` clients post one image
per request until ``--requests`` requests are done or ``--duration`` seconds have passed, whichever
comes first. It reports requests/s, latency percentiles, errors, the server's mean batch size and
its memory (resident set after loading, peak while under load, and the process's high-water mark),
then the detector's own throughput when called directly with batches of ``max_batch`` and of 1
(what the server approaches with batching on and off).

    python benchmarks/load_server.py                      # tiny bundle, 8 clients, 200 requests per mode
    python benchmarks/load_server.py --clients 16 --requests 400 --duration 60
    python benchmarks/load_server.py --head heads/tidy.safetensors --device cuda --image-size 512

Needs the ``serve`` extra and httpx (``pip install -e '.[serve,test]'``). Timings on a shared
machine vary from run to run; compare the modes of one run rather than numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import httpx

MODES = {"on": "micro-batching on", "off": "micro-batching off (max-batch 1, max-wait 0)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", type=Path, help="head checkpoint to serve (default: a tiny one built here)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (1-256; default 8)")
    parser.add_argument("--requests", type=int, default=200, help="most requests per mode (default 200)")
    parser.add_argument("--duration", type=float, default=60.0, help="most seconds of load per mode (default 60)")
    parser.add_argument("--warmup", type=int, default=8, help="requests sent before measuring (default 8)")
    parser.add_argument("--modes", default="on,off", help="on, off or on,off (default)")
    parser.add_argument("--max-batch", type=int, default=8, help="--max-batch of the server with batching on")
    parser.add_argument("--max-wait-ms", type=float, default=20.0, help="--max-wait-ms with batching on")
    parser.add_argument("--image-size", type=int, default=256, help="side of the random JPEGs sent (default 256)")
    parser.add_argument("--images", type=int, default=16, help="distinct images cycled through (default 16)")
    parser.add_argument("--device", default="cpu", help="--device of the server (default cpu)")
    parser.add_argument("--work", type=Path, help="folder for the tiny bundle, head and server logs "
                                                  "(default: a temporary folder, removed at the end)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /healthz ready")
    parser.add_argument("--no-reference", action="store_true", help="skip the direct Detector.predict reference")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256:
        parser.error(f"--clients must be between 1 and 256, got {args.clients}")
    if args.requests < 1 or args.duration <= 0:
        parser.error("--requests must be >= 1 and --duration > 0")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes takes on, off or on,off; got {args.modes!r}")
    args.modes = modes
    return args


# -- inputs -------------------------------------------------------------------------------------------

def build_tiny_head(work: Path) -> Path:
    """A tiny random-weight bundle and a head trained on 16 random images (offline, ~15 s on 2 cores)."""
    import numpy as np
    from PIL import Image

    from tidy_detect.config import load_preset
    from tidy_detect.features.extractor import extract
    from tidy_detect.models.tiny import make_tiny_bundle
    from tidy_detect.training import train_head

    head = work / "head.safetensors"
    if head.is_file():
        return head
    preset = make_tiny_bundle(work / "tiny", seed=0)
    rng = np.random.default_rng(0)
    for label in ("0_real", "1_fake"):
        folder = work / "tree" / "gen" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(8):
            w, h = (int(v) for v in rng.integers(48, 160, 2))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    extract([work / "tree"], work / "store", load_preset(preset))
    train_head([work / "store"], head, epochs=5, hidden=32, batch_size=8)
    return head


def make_images(count: int, size: int) -> list[tuple[str, bytes]]:
    """Distinct random JPEGs (noise compresses badly, so these are as large as real photos of the size)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    images = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        images.append((f"load{i}.jpg", buffer.getvalue()))
    return images


# -- the server process ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, in bytes, from /proc (Linux)."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


class ServerProcess:
    """``tidy-detect serve`` in a child process on a free loopback port."""

    def __init__(self, head: Path, log_path: Path, *, max_batch: int, max_wait_ms: float, device: str,
                 extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # max-pending is raised so that overload shows as latency, not as 503s
        command = [sys.executable, "-m", "tidy_detect.cli", "serve", "--head", str(head), "--host", "127.0.0.1",
                   "--port", str(self.port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                   "--device", device, "--max-pending", "4096", "--log-level", "warning", *extra_args]
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        env.pop("TIDY_DETECT_API_KEY", None)
        self._log = log_path.open("w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}; log: {self.log_path}\n"
                                 f"{self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the server was not ready after {timeout:.0f} s; log: {self.log_path}")

    def memory(self) -> dict[str, int]:
        return proc_memory(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# -- the load ------------------------------------------------------------------------------------------

async def run_load(base: str, images: list[tuple[str, bytes]], clients: int, max_requests: int, duration: float,
                   memory_probe: Any) -> dict[str, Any]:
    """``clients`` concurrent clients, one image per request, until the request count or the time is up."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    issued = 0
    peak_rss = 0
    done = asyncio.Event()

    async def sample_memory() -> None:
        nonlocal peak_rss
        while not done.is_set():
            peak_rss = max(peak_rss, memory_probe().get("VmRSS", 0))
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        deadline = started + duration

        async def one_client() -> None:
            nonlocal issued
            while issued < max_requests and time.perf_counter() < deadline:
                name, data = images[issued % len(images)]
                issued += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post("/v1/detect", files=[("files", (name, data, "image/jpeg"))])
                    if response.status_code != 200:
                        errors[f"HTTP {response.status_code}"] += 1
                    elif response.json()["records"][0]["error"] is not None:
                        errors["record error"] += 1
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                latencies.append(time.perf_counter() - t0)

        sampler = asyncio.ensure_future(sample_memory())
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - started
        done.set()
        await sampler
    latencies.sort()
    return {"requests": len(latencies), "errors": dict(errors), "seconds": wall,
            "requests_per_s": len(latencies) / wall if wall else 0.0,
            "p50_ms": 1000 * percentile(latencies, 50), "p95_ms": 1000 * percentile(latencies, 95),
            "max_ms": 1000 * latencies[-1] if latencies else 0.0, "peak_rss_under_load": peak_rss}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(round(q / 100 * len(sorted_values) + 0.4999)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def run_mode(mode: str, head: Path, images: list[tuple[str, bytes]], args: argparse.Namespace, work: Path
             ) -> dict[str, Any]:
    max_batch, max_wait = (args.max_batch, args.max_wait_ms) if mode == "on" else (1, 0.0)
    server = ServerProcess(head, work / f"server-{mode}.log", max_batch=max_batch, max_wait_ms=max_wait,
                           device=args.device)
    try:
        ready_after = server.wait_ready(args.startup_timeout)
        idle = server.memory().get("VmRSS", 0)
        if args.warmup:
            asyncio.run(run_load(server.base, images, min(args.clients, args.warmup), args.warmup, args.duration,
                                 server.memory))
        before = httpx.get(f"{server.base}/v1/info", timeout=10).json()["batching"]
        result = asyncio.run(run_load(server.base, images, args.clients, args.requests, args.duration, server.memory))
        after = httpx.get(f"{server.base}/v1/info", timeout=10).json()["batching"]
        memory = server.memory()
    finally:
        server.stop()
    batches = after["batches"] - before["batches"]
    scored = after["images"] - before["images"]
    result.update(mode=mode, max_batch=max_batch, max_wait_ms=max_wait, ready_after_s=ready_after, idle_rss=idle,
                  peak_rss_process=memory.get("VmHWM", 0), batches=batches,
                  mean_batch=scored / batches if batches else 0.0, largest_batch=after["largest_batch"])
    return result


def reference(head: Path, images: list[tuple[str, bytes]], max_batch: int, device: str) -> dict[str, float]:
    """Images/s of Detector.predict called directly, in batches of max_batch and of 1 (no HTTP)."""
    from tidy_detect.detect import Detector

    detector = Detector.load(head, device=device, batch_size=max_batch)
    data = [d for _, d in images]
    names = [n for n, _ in images]
    detector.predict(data[:max_batch], names=names[:max_batch])  # warm-up
    out = {}
    for size in (max_batch, 1):
        started = time.perf_counter()
        for start in range(0, len(data), size):
            detector.predict(data[start:start + size], names=names[start:start + size])
        out[f"batch_{size}"] = len(data) / (time.perf_counter() - started)
    return out


def mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB" if value else "n/a"


def report(results: list[dict[str, Any]], ref: dict[str, float] | None, args: argparse.Namespace) -> str:
    lines = [f"load: {args.clients} clients, up to {args.requests} requests or {args.duration:g} s per mode, "
             f"one {args.image_size}x{args.image_size} JPEG per request, loopback, device {args.device}, "
             f"{os.cpu_count()} CPUs", ""]
    header = (f"{'mode':<34} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} "
              f"{'mean batch':>10} {'RSS idle':>9} {'RSS peak load':>13} {'VmHWM':>9}")
    lines += [header, "-" * len(header)]
    for r in results:
        label = f"{MODES[r['mode']].split(' (')[0]} ({r['max_batch']}, {r['max_wait_ms']:g} ms)"
        errors = sum(r["errors"].values())
        lines.append(f"{label:<34} {r['requests']:>8} {errors:>6} {r['requests_per_s']:>7.2f} {r['p50_ms']:>8.1f} "
                     f"{r['p95_ms']:>8.1f} {r['max_ms']:>8.1f} {r['mean_batch']:>10.2f} {mib(r['idle_rss']):>9} "
                     f"{mib(r['peak_rss_under_load']):>13} {mib(r['peak_rss_process']):>9}")
        if r["errors"]:
            lines.append(f"    errors: {r['errors']}")
    if ref:
        lines += ["", "direct Detector.predict (no HTTP, same images): "
                  + ", ".join(f"{k.replace('_', ' ')}: {v:.2f} images/s" for k, v in ref.items())]
    lines += ["", "(mode: max-batch, max-wait; RSS peak load: highest resident set sampled during the load; "
              "VmHWM: the server process's high-water mark, model loading included)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = None
    if args.work is None:
        temporary = tempfile.TemporaryDirectory(prefix="tidy-load-")
        work = Path(temporary.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    try:
        if args.head is None:
            print("building the tiny bundle and a head (offline) ...", file=sys.stderr)
        head = args.head or build_tiny_head(work)
        images = make_images(args.images, args.image_size)
        results = []
        for mode in args.modes:
            print(f"measuring {MODES[mode]} ...", file=sys.stderr)
            results.append(run_mode(mode, head, images, args, work))
        ref = None if args.no_reference else reference(head, images, args.max_batch, args.device)
        print(report(results, ref, args))
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "results": results, "reference": ref}, indent=2))
    finally:
        if temporary is not None:
            temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
