"""The upload gate hands freed memory back only after large buffers: trimming after every small
request hands back the pages the next forward pass reuses (and faults in again)."""

from __future__ import annotations

import asyncio

from seglock.app import memory
from seglock.app.imageio import UploadGate


def test_only_a_slot_that_held_a_large_buffer_trims(monkeypatch):
    trims: list[int] = []
    monkeypatch.setattr(memory, "trim", lambda: trims.append(1))
    gate = UploadGate(slots=2, queue=4)

    async def through_a_slot(*sizes: int) -> None:
        async with gate.slot() as slot:
            for size in sizes:
                slot.holds(size)

    asyncio.run(through_a_slot(100_000, 256 * 256 * 3))  # a 256 px upload and its decode
    assert trims == []
    asyncio.run(through_a_slot(1000, memory.TRIM_ABOVE_BYTES))  # a large decode
    assert trims == [1]
    asyncio.run(through_a_slot())  # nothing noted: nothing large held
    assert trims == [1]

