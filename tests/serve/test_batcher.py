"""The micro-batcher on a fake model: batch formation, routing, errors, limits, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tidy_detect.errors import ConfigError
from tidy_detect.serve.batcher import BatcherBusyError, BatcherClosedError, MicroBatcher


class FakeModel:
    """Records each call's items and thread; answers item * 10 after ``delay`` seconds."""

    def __init__(self, delay: float = 0.0, fail_on: object = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.calls: list[list[int]] = []
        self.threads: set[int] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        if self.fail_on in items:
            raise ValueError(f"model failed on {self.fail_on}")
        return [item * 10 for item in items]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_callers_share_batches_and_get_their_own_results():
    model = FakeModel(delay=0.02)

    async def main():
        batcher = MicroBatcher(model, max_batch=4, max_wait_ms=50)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
        finally:
            await batcher.close()
        return results, batcher.stats

    results, stats = run(main())
    assert results == [[i * 10] for i in range(10)]
    assert max(len(call) for call in model.calls) == 4 and sum(map(len, model.calls)) == 10
    assert stats.batches == len(model.calls) <= 4 and stats.images == 10 and stats.largest_batch == 4


def test_one_request_of_several_items_keeps_its_order_across_batches():
    model = FakeModel()

    async def main():
        batcher = MicroBatcher(model, max_batch=3, max_wait_ms=5)
        await batcher.start()
        try:
            return await batcher.submit(list(range(8)))
        finally:
            await batcher.close()

    assert run(main()) == [i * 10 for i in range(8)]
    assert [len(call) for call in model.calls] == [3, 3, 2]


def test_max_batch_one_means_no_batching():
    model = FakeModel(delay=0.005)

    async def main():
        batcher = MicroBatcher(model, max_batch=1, max_wait_ms=0)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit([i]) for i in range(6)))
        finally:
            await batcher.close()

    assert run(main()) == [[i * 10] for i in range(6)]
    assert all(len(call) == 1 for call in model.calls) and len(model.calls) == 6


def test_the_model_runs_in_one_worker_thread_not_on_the_event_loop():
    model = FakeModel()

    async def main():
        batcher = MicroBatcher(model, max_batch=2, max_wait_ms=1)
        await batcher.start()
        try:
            await asyncio.gather(*(batcher.submit([i]) for i in range(5)))
        finally:
            await batcher.close()
        return threading.get_ident()

    loop_thread = run(main())
    assert len(model.threads) == 1 and loop_thread not in model.threads


def test_a_lone_request_waits_at_most_max_wait():
    model = FakeModel()

    async def main():
        batcher = MicroBatcher(model, max_batch=8, max_wait_ms=30)
        await batcher.start()
        try:
            started = time.perf_counter()
            await batcher.submit([1])
            return time.perf_counter() - started
        finally:
            await batcher.close()

    assert 0.025 <= run(main()) < 1.0


def test_a_failing_batch_fails_only_its_callers():
    model = FakeModel(fail_on=3)

    async def main():
        batcher = MicroBatcher(model, max_batch=1, max_wait_ms=0)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit([i]) for i in range(5)), return_exceptions=True)
        finally:
            await batcher.close()

    results = run(main())
    assert isinstance(results[3], ValueError) and "model failed on 3" in str(results[3])
    assert [r for i, r in enumerate(results) if i != 3] == [[0], [10], [20], [40]]


def test_busy_and_closed():
    model = FakeModel(delay=0.05)

    async def main():
        batcher = MicroBatcher(model, max_batch=1, max_wait_ms=0, max_pending=3)
        with pytest.raises(BatcherClosedError, match="not running"):
            await batcher.submit([1])
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit([0]))
        await asyncio.sleep(0.01)  # the first item is on the model, the queue is empty
        with pytest.raises(BatcherBusyError, match="over the server's limit of 3"):
            await batcher.submit([1, 2, 3, 4])
        waiting = asyncio.ensure_future(batcher.submit([1, 2]))
        await asyncio.sleep(0)
        await batcher.close()
        with pytest.raises(BatcherClosedError, match="shutting down"):
            await waiting
        with pytest.raises(BatcherClosedError):
            await first
        assert not batcher.running

    run(main())


def test_cancelled_callers_are_skipped():
    model = FakeModel(delay=0.05)

    async def main():
        batcher = MicroBatcher(model, max_batch=4, max_wait_ms=0)
        await batcher.start()
        try:
            busy = asyncio.ensure_future(batcher.submit([0]))
            await asyncio.sleep(0.01)
            gone = asyncio.ensure_future(batcher.submit([1]))
            kept = asyncio.ensure_future(batcher.submit([2]))
            await asyncio.sleep(0)
            gone.cancel()
            assert await kept == [20] and await busy == [0]
        finally:
            await batcher.close()

    run(main())
    assert [1] not in model.calls and all(1 not in call for call in model.calls)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch": 0}, "max_batch must be an integer >= 1, got 0"),
    ({"max_wait_ms": -1}, "max_wait_ms must be >= 0, got -1"),
    ({"max_pending": 0}, "max_pending must be an integer >= 1, got 0"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MicroBatcher(FakeModel(), **kwargs)
