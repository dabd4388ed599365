"""The decoding lanes' pieces on their own: the pixel budget, header peeks, memory release."""

from __future__ import annotations

import asyncio

import pytest

from tidy_detect.serve import decode
from tidy_detect.serve.decode import DecodePool, PixelBudget, header_pixels, release_freed_memory

from tests.serve.conftest import image_bytes, png_bomb


def test_a_smaller_image_passes_one_that_does_not_fit_yet():
    async def scenario():
        budget = PixelBudget(100)
        order = []
        held = await budget.acquire(70)

        async def take(name, pixels):
            cost = await budget.acquire(pixels)
            order.append(name)
            return cost

        big = asyncio.ensure_future(take("big", 60))  # 70 + 60 > 100: waits
        small = asyncio.ensure_future(take("small", 20))  # fits beside the 70: goes first
        await asyncio.sleep(0.01)
        assert order == ["small"] and budget.used == 90 and budget.waiting == 1
        budget.release(held)
        await asyncio.sleep(0.01)
        assert order == ["small", "big"] and budget.used == 80
        budget.release(await small)
        budget.release(await big)
        assert budget.used == 0

    asyncio.run(scenario())


def test_a_starving_image_is_not_passed_any_more(monkeypatch):
    monkeypatch.setattr(decode, "STARVATION_S", 0.05)

    async def scenario():
        budget = PixelBudget(100)
        held = await budget.acquire(70)
        big = asyncio.ensure_future(budget.acquire(60))
        await asyncio.sleep(0.1)  # the big one has waited past STARVATION_S
        small = asyncio.ensure_future(budget.acquire(20))
        await asyncio.sleep(0.01)
        assert not small.done()  # would fit, but the starving one goes first
        budget.release(held)
        await asyncio.sleep(0.01)
        assert big.done() and small.done() and budget.used == 80

    asyncio.run(scenario())


def test_an_image_larger_than_the_whole_budget_still_runs_alone():
    async def scenario():
        budget = PixelBudget(100)
        assert await budget.acquire(10_000) == 100 and budget.used == 100

    asyncio.run(scenario())


def test_a_cancelled_waiter_takes_nothing():
    async def scenario():
        budget = PixelBudget(100)
        held = await budget.acquire(100)
        waiter = asyncio.ensure_future(budget.acquire(50))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        budget.release(held)
        assert budget.used == 0

    asyncio.run(scenario())


def test_header_pixels_without_decoding():
    assert header_pixels(image_bytes(size=(96, 64))) == 96 * 64
    assert header_pixels(png_bomb()) == 100_000 * 100_000
    assert header_pixels(b"not an image") == 0


def test_release_freed_memory_is_safe_anywhere():
    assert release_freed_memory() in (True, False)


def test_small_images_skip_a_full_budget(served):
    """With the large lane's budget all taken, a small image still decodes (its own lane)."""

    async def scenario():
        pool = DecodePool(decode_pixels=1000, decode_workers=1, small_image_pixels=96 * 64)
        pool.start()
        try:
            await pool.budget.acquire(1000)
            data = image_bytes(size=(96, 64))
            [pixels] = await pool.pixels([data])
            small = await asyncio.wait_for(pool.decode(data, "s.png", pixels, max_pixels=10**8, reduce_max_side=0,
                                                       view_size=32), timeout=10)
            assert small.result.width == 96
            large = asyncio.ensure_future(pool.decode(image_bytes(size=(97, 64)), "l.png", 97 * 64, max_pixels=10**8,
                                                      reduce_max_side=0, view_size=32))
            await asyncio.sleep(0.2)
            assert not large.done()  # waits for the budget
            pool.budget.release(1000)
            assert (await asyncio.wait_for(large, timeout=10)).result.width == 97
        finally:
            pool.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("pixels", [0, 10**9])
def test_unreadable_or_oversized_headers_go_to_the_small_lane(pixels):
    """load_image refuses those from the header, so they never wait for (or take) budget."""

    async def scenario():
        pool = DecodePool(decode_pixels=10, decode_workers=1, small_image_pixels=1)
        pool.start()
        try:
            await pool.budget.acquire(10)
            data = png_bomb() if pixels else b"junk"
            out = await asyncio.wait_for(pool.decode(data, "x", pixels, max_pixels=10**8, reduce_max_side=0,
                                                     view_size=32), timeout=10)
            assert out.result.kind in ("too-large", "unsupported")
        finally:
            pool.stop()

    asyncio.run(scenario())
