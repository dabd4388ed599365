"""Decoding uploads under a memory budget: each upload decoded once, in a bounded pool, then reduced.

Decoding is the one step whose memory an upload controls: a 300 KB single-colour PNG can announce
100M pixels, which Pillow holds at 4 bytes per pixel (and twice that for a moment). So:

- every image's pixel count is read from its header first (cheap), and a request whose images add
  up to more than ``max_request_pixels`` is refused before anything is decoded;
- **small lane**: images of at most ``small_image_pixels`` decode in one thread of their own,
  outside any budget (one small image at a time is a few tens of MB), so a small request never
  waits behind large ones;
- **large lane**: larger images decode in ``decode_workers`` threads, each first taking its
  pixels from a server-wide budget (``decode_pixels``). An image that does not fit waits; a later
  one that fits may go first (no strict FIFO), unless the oldest waiter has waited
  ``STARVATION_S`` (then the budget goes to it as it frees up);
- the decoded image is reduced (:func:`tidy_detect.images.reduce_for_models`) in the same thread,
  the full-size pixels are dropped, and glibc is asked to return freed memory to the system
  (:func:`release_freed_memory`): the models' allocator setting keeps freed memory otherwise.

What the models get is that reduced :class:`~tidy_detect.images.LoadedImage`; nothing decodes the
bytes a second time.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import functools
import io
import logging
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from tidy_detect.errors import ImageError
from tidy_detect.images import LoadedImage, load_image, pixel_limit_lifted, reduce_for_models

log = logging.getLogger(__name__)

STARVATION_S = 5.0  # a large image waiting this long stops smaller ones from passing it
TRIM_ABOVE_PIXELS = 4_000_000  # returning memory to the system costs a few ms: only after large images


@functools.lru_cache(maxsize=1)
def _malloc_trim():  # type: ignore[no-untyped-def]
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Give the memory freed so far back to the system (glibc ``malloc_trim(0)``); a no-op elsewhere.

    Pillow allocates pixels with malloc, and once a model is loaded glibc is set to keep freed
    memory (:func:`tidy_detect.models.optimize.reuse_freed_memory`), so without this a decoded
    100M-pixel image would stay resident after it is reduced. Returns whether anything was trimmed.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def header_pixels(data: bytes) -> int:
    """Pixels an image's header announces, without decoding; 0 when the header cannot be read
    (the decode then fails with the proper :class:`ImageError`)."""
    from PIL import Image

    try:
        # Pillow refuses to open headers over twice its own limit; ours is checked when decoding.
        with warnings.catch_warnings(), pixel_limit_lifted():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Exception:  # any unreadable header: load_image gives the real message
        return 0
    return max(0, width) * max(0, height)


@dataclass
class Decoded:
    """What one decode gives: the image for the models (reduced) or why there is none."""

    result: LoadedImage | ImageError
    seconds: float


def decode_upload(data: bytes, name: str, *, max_pixels: int, reduce_max_side: int, view_size: int) -> Decoded:
    """Decode once, reduce, drop the full-size pixels (run in a lane's thread)."""
    started = time.perf_counter()
    try:
        loaded = load_image(data, max_pixels=max_pixels, name=name)
    except ImageError as exc:
        return Decoded(exc, time.perf_counter() - started)
    full_pixels = loaded.width * loaded.height
    reduced = reduce_for_models(loaded, reduce_max_side, view_size)
    del loaded  # the only reference to the full-size pixels, unless nothing was reduced
    if full_pixels > TRIM_ABOVE_PIXELS:
        release_freed_memory()
    return Decoded(reduced, time.perf_counter() - started)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed while the thread decoded: nothing left to release into
        pass


class PixelBudget:
    """Pixels that may be in decoding at once, shared by every request (event-loop side only)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiters: collections.deque[tuple[int, float, asyncio.Future]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, future in self._waiters if not future.done())

    def _starving(self, now: float) -> bool:
        return bool(self._waiters) and now - self._waiters[0][1] > STARVATION_S

    async def acquire(self, pixels: int) -> int:
        """Wait until ``pixels`` (capped at the total) fit; returns what was taken, for :meth:`release`."""
        cost = min(max(pixels, 1), self.total)
        loop = asyncio.get_running_loop()
        if self.used + cost <= self.total and not self._starving(loop.time()):
            self.used += cost
            return cost
        future = loop.create_future()
        self._waiters.append((cost, loop.time(), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted just as the caller gave up
                self.release(cost)
            raise
        return cost

    def release(self, cost: int) -> None:
        self.used -= cost
        self._wake()

    def _wake(self) -> None:
        now = asyncio.get_running_loop().time()
        kept: collections.deque[tuple[int, float, asyncio.Future]] = collections.deque()
        blocked = False
        while self._waiters:
            cost, since, future = self._waiters.popleft()
            if future.done():
                continue
            if not blocked and self.used + cost <= self.total:
                self.used += cost
                future.set_result(None)
                continue
            # The oldest waiter, once starving, gets the next free pixels: nobody passes it.
            blocked = blocked or (not kept and now - since > STARVATION_S)
            kept.append((cost, since, future))
        self._waiters = kept


class DecodePool:
    """The two decoding lanes and the pixel budget of one server.

    Args:
        decode_pixels: the large lane's server-wide budget.
        decode_workers: threads of the large lane.
        small_image_pixels: at most this many pixels go to the small lane.
    """

    def __init__(self, decode_pixels: int, decode_workers: int, small_image_pixels: int) -> None:
        self.budget = PixelBudget(decode_pixels)
        self.small_image_pixels = small_image_pixels
        self.decode_workers = decode_workers
        self._large: ThreadPoolExecutor | None = None
        self._small: ThreadPoolExecutor | None = None
        self.decoded = 0
        self.decode_seconds = 0.0

    def start(self) -> None:
        if self._large is None:
            self._large = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="tidy-decode-large")
            self._small = ThreadPoolExecutor(1, thread_name_prefix="tidy-decode-small")

    def stop(self) -> None:
        for pool in (self._large, self._small):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._large = self._small = None

    async def pixels(self, uploads: Sequence[bytes]) -> list[int]:
        """Header pixel counts of the uploads (read in the small lane: some headers take parsing)."""
        assert self._small is not None, "DecodePool.start() first"
        return await asyncio.get_running_loop().run_in_executor(self._small, lambda: [header_pixels(d) for d in uploads])

    async def decode(self, data: bytes, name: str, pixels: int, *, max_pixels: int, reduce_max_side: int,
                     view_size: int) -> Decoded:
        """Decode one upload in its lane (``pixels`` from :meth:`pixels`)."""
        assert self._large is not None and self._small is not None, "DecodePool.start() first"
        job = functools.partial(decode_upload, data, name, max_pixels=max_pixels, reduce_max_side=reduce_max_side,
                                view_size=view_size)
        # Over max_pixels, load_image refuses from the header: cheap, whatever the size.
        if pixels <= self.small_image_pixels or pixels > max_pixels:
            decoded = await asyncio.wrap_future(self._small.submit(job))
        else:
            cost = await self.budget.acquire(pixels)
            loop = asyncio.get_running_loop()
            try:
                future = self._large.submit(job)
            except BaseException:
                self.budget.release(cost)
                raise
            # Released when the thread is done, not when this coroutine is: a cancelled request
            # must not free pixels that are still being decoded.
            future.add_done_callback(lambda _: _call_soon(loop, self.budget.release, cost))
            decoded = await asyncio.wrap_future(future)
        self.decoded += 1
        self.decode_seconds += decoded.seconds
        return decoded

    def stats(self) -> dict[str, object]:
        return {"decode_pixels": self.budget.total, "decode_pixels_in_use": self.budget.used,
                "decode_waiting": self.budget.waiting, "decode_workers": self.decode_workers,
                "small_image_pixels": self.small_image_pixels, "decoded": self.decoded,
                "decode_seconds": round(self.decode_seconds, 3)}
