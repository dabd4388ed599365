"""Micro-batching: images from concurrent requests share one model call.

Requests put their images on an asyncio queue and await one future per image. A collector task on
the event loop takes the first waiting image, then more until ``max_batch`` images are together or
``max_wait_ms`` have passed since the first one arrived, and hands the batch to a single worker
thread. The model therefore never runs on the event loop, and only one batch is on the model at a
time (a model call already uses every core; two at once would only fight over them).

Images that queued up while the worker was busy go into the next batch at once, without waiting for
the clock: under load batches fill up by themselves and the wait costs nothing. With
``max_batch=1`` (or ``max_wait_ms=0`` and no load) every image is its own model call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from tidy_detect.errors import ConfigError, TidyError

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class BatcherBusyError(TidyError):
    """More images are waiting for the model than the batcher accepts."""


class BatcherClosedError(TidyError):
    """The batcher is not running (not started yet, or shut down)."""


@dataclass
class _Job(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued: float  # loop.time() when queued: the batch's deadline counts from its first job


@dataclass
class BatcherStats:
    """Counters of what the batcher did, for ``GET /v1/info`` and the load benchmark."""

    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    model_seconds: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "images": self.images, "largest_batch": self.largest_batch,
                "mean_batch_size": round(self.images / self.batches, 3) if self.batches else 0.0,
                "model_seconds": round(self.model_seconds, 3),
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class MicroBatcher(Generic[T, R]):
    """Collects items from concurrent callers into batches for one function run in a worker thread.

    Args:
        fn: called in the worker thread with a list of items; returns one result per item, in order.
        max_batch: most items per call (>= 1; 1 means no batching).
        max_wait_ms: how long the first item of a batch waits for more (>= 0).
        max_pending: most items waiting in the queue; :meth:`submit` refuses more with
            :class:`BatcherBusyError` instead of queueing without bound.
        thread_name: name of the worker thread (shows in stack dumps and profilers).

    Call :meth:`start` on the running event loop before :meth:`submit`, and :meth:`close` at the end.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_batch: int = 8, max_wait_ms: float = 20.0,
                 max_pending: int = 256, thread_name: str = "tidy-detect-model") -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not isinstance(max_wait_ms, (int, float)) or max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_pending = max_pending
        self.thread_name = thread_name
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[_Job[T]] | None = None
        self._getter: asyncio.Task | None = None  # a queue.get() kept across timeouts, so no job is lost
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: list[_Job[T]] = []

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def pending(self) -> int:
        """Items queued and not yet handed to the worker."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the collector on the running loop and the worker thread."""
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"{self.thread_name}-collector")

    async def close(self) -> None:
        """Stop collecting; callers still waiting get :class:`BatcherClosedError`."""
        waiting = list(self._in_flight)  # read first: the collector clears it when cancelled
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        getter = self._getter
        if getter is not None:
            if getter.done() and not getter.cancelled() and getter.exception() is None:
                waiting.append(getter.result())  # taken off the queue but never batched
            else:
                getter.cancel()
        closed = BatcherClosedError("the server is shutting down; retry the request")
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for job in waiting:
            if not job.future.done():
                job.future.set_exception(closed)
        if self._executor is not None:
            # A batch already on the model finishes in the background; nobody waits for it.
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._task = self._getter = self._executor = None
        self._in_flight = []

    def ensure_room(self, count: int) -> None:
        """Raise :class:`BatcherBusyError` when ``count`` more items would pass ``max_pending``
        (a caller that submits its items one by one checks for all of them first)."""
        waiting = self._queue.qsize() if self._queue is not None else 0
        if waiting + count > self.max_pending:
            raise BatcherBusyError(
                f"{waiting} images are already waiting for the model and this request adds "
                f"{count}, over the server's limit of {self.max_pending}; retry in a moment")

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue items (each may land in a different batch) and return their results, in order.

        Raises:
            BatcherClosedError: the batcher is not running.
            BatcherBusyError: taking the items would put more than ``max_pending`` in the queue.
            Exception: whatever ``fn`` raised for a batch holding one of the items.
        """
        if not self.running or self._queue is None:
            raise BatcherClosedError("the model worker is not running (the server is starting or shutting down)")
        if not items:
            return []
        self.ensure_room(len(items))
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future = loop.create_future()
            self._queue.put_nowait(_Job(item, future, loop.time()))
            futures.append(future)
        # gather cancels the futures if the caller is cancelled; the collector then skips them.
        return list(await asyncio.gather(*futures))

    # -- the collector (event loop) and the worker (thread) ---------------------------------------

    async def _next(self, timeout: float | None) -> _Job[T] | None:
        assert self._queue is not None
        if self._getter is None:
            self._getter = asyncio.ensure_future(self._queue.get())
        # asyncio.wait (not wait_for) leaves the getter running on timeout, so a job that arrives
        # just as the timeout fires is picked up next time rather than dropped.
        done, _ = await asyncio.wait({self._getter}, timeout=timeout)
        if not done:
            return None
        job, self._getter = self._getter.result(), None
        return job

    def _next_nowait(self) -> _Job[T] | None:
        assert self._queue is not None
        if self._getter is not None:
            if not self._getter.done():
                return None
            job, self._getter = self._getter.result(), None
            return job
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            assert first is not None
            batch = [first]
            deadline = first.enqueued + self.max_wait
            while len(batch) < self.max_batch:
                job = self._next_nowait()
                if job is None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    job = await self._next(remaining)
                    if job is None:
                        break
                batch.append(job)
            live = [job for job in batch if not job.future.done()]  # callers that gave up are skipped
            if not live:
                continue
            self._in_flight = live
            try:
                results, seconds = await loop.run_in_executor(self._executor, self._run_batch,
                                                              [job.item for job in live])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one failed batch fails its callers, not the server
                log.exception("model call on a batch of %d failed", len(live))
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            finally:
                self._in_flight = []
            self._count(len(live), seconds)
            for job, result in zip(live, results):
                if not job.future.done():
                    job.future.set_result(result)

    def _run_batch(self, items: list[T]) -> tuple[Sequence[R], float]:
        started = time.perf_counter()
        results = self.fn(items)
        if len(results) != len(items):
            raise RuntimeError(f"the batch function returned {len(results)} results for {len(items)} items")
        return results, time.perf_counter() - started

    def _count(self, size: int, seconds: float) -> None:
        # Updated on the event loop only, so readers there never see a half-updated record.
        stats = self.stats
        stats.model_seconds += seconds
        stats.batches += 1
        stats.images += size
        stats.largest_batch = max(stats.largest_batch, size)
        stats.sizes[size] = stats.sizes.get(size, 0) + 1
