"""The dynamic batcher: correct masks per request, real batching, bounded queue, clean shutdown."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from seglock.app.engine import DynamicBatcher, EngineStopped, ModelRunner, Overloaded, autocast_dtype
from seglock.models.device import resolve_device


class ArgmaxOfInput(nn.Module):
    """Logits = the input itself, so the mask is the argmax over the input's channels."""

    def forward(self, x):
        return x


class Gate(nn.Module):
    """Blocks the forward pass until released, to fill the queue deterministically."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def forward(self, x):
        self.entered.set()
        self.release.wait(10)
        return x


def one_hot_input(cls: int, channels=3, size=4) -> torch.Tensor:
    x = torch.zeros(channels, size, size)
    x[cls] = 1.0
    return x


def runner(module) -> ModelRunner:
    return ModelRunner(module, torch.device("cpu"))


def test_each_request_gets_its_own_mask_and_requests_are_batched():
    batcher = DynamicBatcher(runner(ArgmaxOfInput()), name="m", max_batch=8, max_wait_ms=50, queue_size=64)

    async def main():
        return await asyncio.gather(*(batcher.submit(one_hot_input(i % 3)) for i in range(24)))

    masks = asyncio.run(main())
    batcher.close()
    for i, mask in enumerate(masks):
        assert mask.dtype == np.uint8 and mask.shape == (4, 4)
        assert (mask == i % 3).all()
    assert batcher.stats.items == 24
    assert batcher.stats.batches < 24  # concurrent requests shared forward passes


def test_full_queue_answers_overloaded_at_once():
    gate = Gate()
    batcher = DynamicBatcher(runner(gate), name="m", max_batch=1, max_wait_ms=0, queue_size=2)

    async def main():
        first = asyncio.ensure_future(batcher.submit(one_hot_input(0)))
        await asyncio.to_thread(gate.entered.wait, 5)  # the worker holds the first request
        queued = [asyncio.ensure_future(batcher.submit(one_hot_input(1))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(one_hot_input(2))
        gate.release.set()
        return await asyncio.gather(first, *queued)

    masks = asyncio.run(main())
    batcher.close()
    assert [int(m[0, 0]) for m in masks] == [0, 1, 1]


def test_close_finishes_queued_work_and_refuses_new_work():
    batcher = DynamicBatcher(runner(ArgmaxOfInput()), name="m", max_batch=4, max_wait_ms=1, queue_size=16)

    async def main():
        pending = [asyncio.ensure_future(batcher.submit(one_hot_input(2))) for _ in range(6)]
        await asyncio.sleep(0)
        await asyncio.to_thread(batcher.close)
        with pytest.raises(EngineStopped):
            await batcher.submit(one_hot_input(0))
        return await asyncio.gather(*pending)

    masks = asyncio.run(main())
    assert all((m == 2).all() for m in masks)


class RecordsThreads(nn.Module):
    """Logits = the input; remembers the name of each thread that ran it."""

    def __init__(self):
        super().__init__()
        self.threads: list[str] = []

    def forward(self, x):
        self.threads.append(threading.current_thread().name)
        return x


def test_run_sync_runs_on_the_worker_thread_that_serves_requests():
    # a warm-up must warm the thread that serves: on a GPU each thread's first forward is slow
    module = RecordsThreads()
    batcher = DynamicBatcher(runner(module), name="m", max_batch=4, max_wait_ms=1, queue_size=8)
    masks = batcher.run_sync([one_hot_input(1), one_hot_input(2)])
    served = asyncio.run(batcher.submit(one_hot_input(0)))
    batcher.close()
    assert masks.shape == (2, 4, 4) and (masks[0] == 1).all() and (masks[1] == 2).all()
    assert (served == 0).all()
    assert set(module.threads) == {"seglock-batcher-m"}
    assert batcher.stats.items == 3
    with pytest.raises(EngineStopped):
        batcher.run_sync([one_hot_input(0)])


def test_a_close_that_races_a_submit_never_leaves_it_unanswered():
    # the interleaving that lost a request: close() ran whole between submit's check and its put,
    # so the job landed behind the stop marker, after the worker had gone
    batcher = DynamicBatcher(runner(ArgmaxOfInput()), name="m", max_batch=2, max_wait_ms=0, queue_size=8)
    put = batcher._queue.put_nowait
    closer = threading.Thread(target=batcher.close)

    def close_then_put(job):
        if closer.ident is None:  # the first put only
            closer.start()
            closer.join(0.5)  # as long as close() may take, unless it waits for this submit
        put(job)

    batcher._queue.put_nowait = close_then_put

    async def main():
        try:
            return await asyncio.wait_for(batcher.submit(one_hot_input(1)), 10)
        except EngineStopped:
            return None

    mask = asyncio.run(main())
    closer.join(10)
    assert not closer.is_alive()
    assert mask is not None and (mask == 1).all()  # accepted before the close, so answered


def test_a_failing_forward_fails_its_requests_not_the_worker():
    class Flaky(nn.Module):
        calls = 0

        def forward(self, x):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("boom")
            return x

    batcher = DynamicBatcher(runner(Flaky()), name="m", max_batch=1, max_wait_ms=0, queue_size=4)

    async def main():
        with pytest.raises(RuntimeError):
            await batcher.submit(one_hot_input(0))
        return await batcher.submit(one_hot_input(1))

    mask = asyncio.run(main())
    batcher.close()
    assert (mask == 1).all()


def test_swap_replaces_the_module_for_later_batches():
    class Constant(nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.cls = cls

        def forward(self, x):
            out = torch.zeros_like(x)
            out[:, self.cls] = 1
            return out

    batcher = DynamicBatcher(runner(Constant(0)), name="m", max_batch=1, max_wait_ms=0)
    before = asyncio.run(batcher.submit(one_hot_input(1)))
    batcher.runner.swap(Constant(2))
    after = asyncio.run(batcher.submit(one_hot_input(1)))
    batcher.close()
    assert (before == 0).all() and (after == 2).all()


def test_device_and_precision_choices_on_cpu():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert autocast_dtype("auto", torch.device("cpu")) is None
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            resolve_device("cuda")


def test_invalid_batcher_settings_are_refused():
    with pytest.raises(ValueError):
        DynamicBatcher(runner(ArgmaxOfInput()), name="m", max_batch=0)


def test_a_batch_does_not_wait_for_requests_that_may_come():
    batcher = DynamicBatcher(runner(ArgmaxOfInput()), name="m", max_batch=8, max_wait_ms=5000, queue_size=8)

    async def one() -> float:
        started = asyncio.get_running_loop().time()
        await batcher.submit(one_hot_input(1))
        return asyncio.get_running_loop().time() - started

    elapsed = asyncio.run(one())
    batcher.close()
    assert elapsed < 2.5  # not the 5 s max wait: nothing was on its way
    assert (batcher.stats.batches, batcher.stats.items) == (1, 1)


def test_a_batch_waits_for_a_request_still_arriving():
    batcher = DynamicBatcher(runner(ArgmaxOfInput()), name="m", max_batch=8, max_wait_ms=5000, queue_size=8)

    async def two():
        with batcher.arriving() as arrival:  # a second request is being decoded
            first = asyncio.ensure_future(batcher.submit(one_hot_input(0)))
            await asyncio.sleep(0.3)  # its decode takes a while; the batch holds for it
            second = await batcher.submit(one_hot_input(2), arrival)
        return await first, second

    first, second = asyncio.run(two())
    batcher.close()
    assert (first == 0).all() and (second == 2).all()
    assert (batcher.stats.batches, batcher.stats.items) == (1, 2)  # one forward pass for both


def test_a_request_that_fails_on_its_way_stops_holding_the_batch():
    batcher = DynamicBatcher(runner(ArgmaxOfInput()), name="m", max_batch=8, max_wait_ms=5000, queue_size=8)

    async def failing_arrival() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(batcher.submit(one_hot_input(1)))
        with pytest.raises(ValueError), batcher.arriving():
            await asyncio.sleep(0.2)
            raise ValueError("a broken upload")  # closes its arrival: the batch runs without it
        await first
        return loop.time() - started

    elapsed = asyncio.run(failing_arrival())
    batcher.close()
    assert elapsed < 2.5 and (batcher.stats.batches, batcher.stats.items) == (1, 1)


class SpinPerImage(nn.Module):
    """Logits = the input; a forward of a batch of n spins `cost_ms(n)` CPU milliseconds per image, so
    the cost per image of every batch size is known (timed by the thread's CPU clock, as the runner does)."""

    def __init__(self, cost_ms):
        super().__init__()
        self.cost_ms = cost_ms

    def forward(self, x):
        until = time.thread_time() + self.cost_ms(len(x)) * len(x) / 1000
        while time.thread_time() < until:
            pass
        return x


def test_cheapest_batch_is_the_largest_within_tolerance_of_the_cheapest_per_image(one_thread):
    probe = torch.rand(8, 3, 4, 4)
    # batch 4 costs least per image, batch 8 a third more (its activations leave the cache, say)
    dearer_large = ModelRunner(SpinPerImage({1: 3.0, 2: 2.0, 4: 1.0, 8: 1.33}.get), torch.device("cpu"), probe=probe)
    chosen, per_image = dearer_large.cheapest_batch(8)
    assert chosen == 4
    assert sorted(per_image) == [1, 2, 4, 8]
    assert per_image[4] < per_image[8] and per_image[4] < per_image[2] < per_image[1]
    # every size the same per image: the largest (fewer forward passes, the same work)
    flat = ModelRunner(SpinPerImage(lambda batch: 1.0), torch.device("cpu"), probe=probe)
    assert flat.cheapest_batch(8)[0] == 8
    # a max batch that is not a power of two is a candidate itself; nothing above it is timed
    assert sorted(flat.cheapest_batch(6)[1]) == [1, 2, 4, 6]
    assert flat.cheapest_batch(1) == (1, {})


def test_cheapest_batch_is_max_batch_without_a_probe():
    assert ModelRunner(ArgmaxOfInput(), torch.device("cpu")).cheapest_batch(8) == (8, {})


class RecordsBatchSizes(nn.Module):
    """Logits = the input; remembers the batch size of every forward."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return x


def test_padded_batches_run_at_the_probes_size_and_answer_only_their_own_images():
    probe = torch.rand(6, 3, 4, 4)
    batch = torch.stack([one_hot_input(i % 3) for i in range(4)])
    module = RecordsBatchSizes()
    padded = ModelRunner(module, torch.device("cpu"), probe=probe, pad_batches=True)
    assert padded.pad_to == 6
    module.sizes.clear()
    masks, scores = padded.predict_scored(batch, score=True)
    assert module.sizes == [6]
    assert masks.shape == (4, 4, 4) and scores.shape == (4, 4, 4)
    assert [int(mask[0, 0]) for mask in masks] == [0, 1, 2, 0]
    assert np.array_equal(masks, ModelRunner(ArgmaxOfInput(), torch.device("cpu")).predict(batch))
    module.sizes.clear()
    padded.predict(torch.rand(6, 3, 4, 4))  # a full batch as it is
    padded.predict(torch.rand(7, 3, 4, 4))  # a larger one (another bound than the probe's) too
    assert module.sizes == [6, 7]


def test_only_an_accelerator_pads_by_default():
    assert ModelRunner(ArgmaxOfInput(), torch.device("cpu"), probe=torch.rand(8, 3, 4, 4)).pad_to == 0
    assert ModelRunner(ArgmaxOfInput(), torch.device("cpu"), pad_batches=True).pad_to == 0  # no probe: no size
