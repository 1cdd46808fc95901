"""The connector's start-up steps run together (cdc.connector.lifecycle._together): the error raised
is the one the steps one after another would raise, and no step is left running into the teardown."""

from __future__ import annotations

import asyncio

import pytest

from cdc.connector.lifecycle import _together


def test_steps_run_together_all_finish_and_the_first_failure_in_order_is_raised():
    finished: list[str] = []

    async def scenario() -> None:
        producer_failed = asyncio.Event()

        async def slot() -> None:
            await producer_failed.wait()  # fails after the producer did
            finished.append("slot")
            raise ValueError("slot")

        async def producer() -> None:
            finished.append("producer")
            producer_failed.set()
            raise KeyError("producer")

        async def reads() -> str:
            await producer_failed.wait()
            await asyncio.sleep(0)
            finished.append("reads")
            return "read"

        with pytest.raises(ValueError, match="slot"):
            await _together(slot(), producer(), reads())

    asyncio.run(scenario())
    assert sorted(finished) == ["producer", "reads", "slot"]


def test_steps_that_all_succeed_give_their_results_in_order():
    async def value(v: int) -> int:
        await asyncio.sleep(0)
        return v

    assert asyncio.run(_together(value(1), value(2), value(3))) == [1, 2, 3]
