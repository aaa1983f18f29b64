"""The asynchronous client: awaitable futures, gather, and friends inside a
running asyncio event loop, which stays responsive while they wait."""

from __future__ import annotations

import asyncio
import time

import pytest

import rdask
from rdask import Client


def slow_inc(x, delay=0.5):
    time.sleep(delay)
    return x + 1


def boom(x):
    raise ValueError(f"boom {x}")


def test_await_futures_and_gather_in_a_running_loop(cluster):
    async def main():
        async with Client(cluster.scheduler_address, asynchronous=True, set_as_default=False) as client:
            assert client.asynchronous
            assert await client.submit(slow_inc, 1, 0.0) == 2
            futures = client.map(slow_inc, range(4), delay=0.5, pure=False)
            # The loop keeps running while the values are computed.
            ticks = 0
            done = asyncio.ensure_future(client.gather(futures))
            while not done.done():
                ticks += 1
                await asyncio.sleep(0.01)
            assert await done == [1, 2, 3, 4]
            assert ticks >= 20, f"the event loop was blocked ({ticks} ticks)"
            assert await futures[0].result() == 1
            info = await client.scheduler_info()
            assert info["n_workers"] >= 1
            await client.wait_for_workers(1)
            with pytest.raises(ValueError, match="boom 3") as e:
                await client.submit(boom, 3)
            assert any("Remote traceback" in n for n in getattr(e.value, "__notes__", []))
        return True

    assert asyncio.run(main())


def test_client_can_be_awaited_and_closed_with_await(cluster):
    async def main():
        client = await Client(cluster.scheduler_address, asynchronous=True, set_as_default=False)
        assert await asyncio.gather(*[client.submit(slow_inc, i, 0.0) for i in range(3)]) == [1, 2, 3]
        await client.close()
        return client.status

    assert asyncio.run(main()) == "closed"


def test_a_synchronous_result_shows_the_remote_traceback(client):
    with pytest.raises(ValueError, match="boom 1") as e:
        client.submit(boom, 1).result()
    assert any("Remote traceback" in n and "boom" in n for n in getattr(e.value, "__notes__", [])), e.value.__notes__
