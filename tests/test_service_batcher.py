"""The dynamic batcher with a fake runtime: no model, no HTTP."""

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from bundle.runtime import ModelOutputs
from service.batcher import RUNNER_NICENESS, Batcher, InferenceResult, pick_batch
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics
from service.settings import BatchLimits

PAD_ID = 0
FILLER_ID = 1


def item_ids(marker: int, length: int) -> list[int]:
    """Token ids whose first id identifies the item and whose length is `length`."""
    return [marker] + [FILLER_ID] * (length - 1)


class FakeRuntime:
    """Echoes each row's first token id and length as its 'embedding'; can be held closed, or fail."""

    def __init__(self, fail_marker: int | None = None, drop_a_row: bool = False) -> None:
        self.batches: list[list[int]] = []  # markers of the items of each batch, in row order
        self.padded_shapes: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()
        self.fail_marker = fail_marker
        self.drop_a_row = drop_a_row
        self.runs_started = 0
        self.run_starts = threading.Semaphore(0)  # released once per run started
        self.lock = threading.Lock()

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> ModelOutputs:
        with self.lock:
            self.runs_started += 1
        self.run_starts.release()
        self.running.set()
        assert self.gate.wait(10), "test never opened the gate"
        self.batches.append(input_ids[:, 0].tolist())
        self.padded_shapes.append(input_ids.shape)
        if self.fail_marker is not None and self.fail_marker in input_ids[:, 0]:
            raise RuntimeError("model exploded")
        embeddings = np.stack([input_ids[:, 0], attention_mask.sum(axis=1)], axis=1).astype(np.float32)
        if self.drop_a_row:
            embeddings = embeddings[:-1]
        return ModelOutputs(embeddings=embeddings, logits=None)


def limits(
    max_batch_tokens: int = 1000,
    max_batch_size: int = 8,
    max_wait_ms: float = 0.0,
    concurrent_batches: int = 1,
) -> BatchLimits:
    return BatchLimits(
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        concurrent_batches=concurrent_batches,
    )


@asynccontextmanager
async def started(
    runtime: FakeRuntime,
    batch_limits: BatchLimits,
    max_queue_items: int = 1000,
    max_queue_tokens: int = 100_000,
) -> AsyncIterator[Batcher]:
    metrics = Metrics().add_model("tiny")
    batcher = Batcher(runtime, batch_limits, max_queue_items, max_queue_tokens, PAD_ID, metrics)
    batcher.start()
    try:
        yield batcher
    finally:
        runtime.gate.set()
        await batcher.stop()


def deadline(seconds: float = 10.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def hold_runtime(
    batcher: Batcher, runtime: FakeRuntime, marker: int = 99
) -> asyncio.Task[InferenceResult]:
    """Occupy the runtime with one request, so that what is queued next waits and batches up."""
    runtime.gate.clear()
    task = asyncio.create_task(batcher.infer([item_ids(marker, 3)], deadline()))
    while not runtime.running.is_set():
        await asyncio.sleep(0.001)
    return task


def one_item_requests(batcher: Batcher, lengths: dict[int, int]) -> list[asyncio.Task[InferenceResult]]:
    """One request of one item per marker, `lengths[marker]` tokens long, each on a task of its own."""
    return [
        asyncio.create_task(batcher.infer([item_ids(marker, length)], deadline()))
        for marker, length in lengths.items()
    ]


async def let_tasks_run() -> None:
    # Yield the event loop a few times so that tasks just created enqueue (or cancel) their items;
    # deterministic, unlike a wall-clock sleep.
    for _ in range(20):
        await asyncio.sleep(0)


def markers(result: InferenceResult) -> list[int]:
    return [int(output.embedding[0]) for output in result.outputs]


def run(coroutine_factory: Callable[[], Any]) -> Any:
    return asyncio.run(coroutine_factory())


def test_lone_request_runs_at_once_in_a_batch_of_one() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        # Even with a wait window, nobody else is arriving, so the lone request must not wait for it.
        # The window outlasts the request's deadline: had the request waited in it, it would have
        # timed out (504) instead of being served.
        async with started(runtime, limits(max_wait_ms=60_000)) as batcher:
            result = await batcher.infer([item_ids(7, 5)], deadline(10))
        assert markers(result) == [7]
        assert runtime.batches == [[7]]
        assert [int(output.embedding[1]) for output in result.outputs] == [5]

    run(scenario)


def test_queued_items_flush_in_full_batches_and_return_in_input_order() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(max_batch_size=4)) as batcher:
            first = await hold_runtime(batcher, runtime)
            many = asyncio.create_task(
                batcher.infer([item_ids(marker, 4) for marker in range(10, 20)], deadline())
            )
            await let_tasks_run()
            assert batcher.queued_items == 10
            runtime.gate.set()
            result = await many
            await first
        assert markers(result) == list(range(10, 20))
        assert [len(batch) for batch in runtime.batches] == [1, 4, 4, 2]

    run(scenario)


def test_a_requests_items_wait_shortest_first() -> None:
    """A batch sees only a request's share of its items (here all 4 of a batch): taken shortest first,
    a request of mixed lengths runs in batches of similar lengths, not padded to its longest each time."""

    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(max_batch_size=4)) as batcher:
            first = await hold_runtime(batcher, runtime)
            lengths = [5, 50, 6, 48, 7, 49, 8, 47]
            mixed = asyncio.create_task(
                batcher.infer([item_ids(marker, length) for marker, length in enumerate(lengths)], deadline())
            )
            await let_tasks_run()
            runtime.gate.set()
            await first
            assert markers(await mixed) == list(range(8))  # answered in input order all the same
        assert [sorted(batch) for batch in runtime.batches[1:]] == [[0, 2, 4, 6], [1, 3, 5, 7]]

    run(scenario)


def test_token_budget_caps_padded_tokens_per_batch() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(max_batch_tokens=30, max_batch_size=100)) as batcher:
            first = await hold_runtime(batcher, runtime)
            tasks = one_item_requests(batcher, dict.fromkeys(range(20, 27), 10))
            await let_tasks_run()
            runtime.gate.set()
            await asyncio.gather(first, *tasks)
        assert all(rows * seq <= 30 for rows, seq in runtime.padded_shapes)
        assert [len(batch) for batch in runtime.batches[1:]] == [3, 3, 1]

    run(scenario)


def test_batches_group_similar_lengths_without_starving_the_oldest() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(max_batch_tokens=100, max_batch_size=8)) as batcher:
            first = await hold_runtime(batcher, runtime)
            # Arrival order: short, long, short, long. In arrival order the batches would be
            # [5, 50] and [6, 48] (padding 45 + 42); by length they are [5, 6] and [48, 50].
            lengths = {1: 5, 2: 50, 3: 6, 4: 48}
            tasks = one_item_requests(batcher, lengths)
            await let_tasks_run()
            runtime.gate.set()
            await asyncio.gather(first, *tasks)
        assert [sorted(batch) for batch in runtime.batches[1:]] == [[1, 3], [2, 4]]

    run(scenario)


def test_pick_batch_always_includes_the_oldest_item() -> None:
    class Item:
        def __init__(self, length: int) -> None:
            self.length = length

    items = [Item(length) for length in (90, 5, 5, 5, 5)]
    batch = pick_batch(items, max_batch_tokens=100, max_batch_size=8)  # type: ignore[arg-type]
    assert batch[0] is items[0] and len(batch) == 1


def test_pick_batch_keeps_padding_within_max_padding() -> None:
    class Item:
        def __init__(self, length: int) -> None:
            self.length = length

    items = [Item(length) for length in (10, 20, 10, 11)]
    unlimited = pick_batch(items, max_batch_tokens=1000, max_batch_size=8)  # type: ignore[arg-type]
    assert len(unlimited) == 4
    # 10, 10, 11 pad to 33 tokens (3 of padding, 9%); adding 20 would make 80 tokens, 39 of padding.
    limited = pick_batch(items, max_batch_tokens=1000, max_batch_size=8, max_padding=0.15)  # type: ignore[arg-type]
    assert [item.length for item in limited] == [10, 10, 11]


def test_request_past_its_deadline_times_out_and_never_runs() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits()) as batcher:
            first = await hold_runtime(batcher, runtime)
            with pytest.raises(ServiceError) as raised:
                await batcher.infer([item_ids(31, 4)], deadline(0.05))
            assert raised.value.error_type is ErrorType.TIMEOUT
            runtime.gate.set()
            await first
            result = await batcher.infer([item_ids(32, 4)], deadline())
        assert markers(result) == [32]
        assert all(31 not in batch for batch in runtime.batches)

    run(scenario)


def test_cancelled_request_is_dropped_before_it_runs() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits()) as batcher:
            first = await hold_runtime(batcher, runtime)
            gone = asyncio.create_task(batcher.infer([item_ids(41, 4), item_ids(42, 4)], deadline()))
            kept = asyncio.create_task(batcher.infer([item_ids(43, 4)], deadline()))
            await let_tasks_run()
            gone.cancel()  # what the handler does when the client disconnects
            await let_tasks_run()
            runtime.gate.set()
            await first
            assert markers(await kept) == [43]
        assert all(41 not in batch and 42 not in batch for batch in runtime.batches)

    run(scenario)


def test_a_failing_batch_fails_only_its_requests_and_the_loop_keeps_serving() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime(fail_marker=66)
        async with started(runtime, limits(max_batch_size=2)) as batcher:
            first = await hold_runtime(batcher, runtime)
            doomed = asyncio.create_task(batcher.infer([item_ids(66, 4)], deadline()))
            neighbour = asyncio.create_task(batcher.infer([item_ids(67, 4)], deadline()))
            later = asyncio.create_task(batcher.infer([item_ids(68, 4)], deadline()))
            await let_tasks_run()
            runtime.gate.set()
            await first
            for task in (doomed, neighbour):  # same batch of two: both fail
                with pytest.raises(ServiceError) as raised:
                    await task
                assert raised.value.error_type is ErrorType.BACKEND
            assert markers(await later) == [68]
            assert markers(await batcher.infer([item_ids(69, 4)], deadline())) == [69]

    run(scenario)


def test_wrong_number_of_output_rows_is_a_backend_error() -> None:
    async def scenario() -> None:
        async with started(FakeRuntime(drop_a_row=True), limits()) as batcher:
            with pytest.raises(ServiceError) as raised:
                await batcher.infer([item_ids(71, 4), item_ids(72, 4)], deadline())
        assert raised.value.error_type is ErrorType.BACKEND

    run(scenario)


def test_full_queue_refuses_with_overloaded() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(), max_queue_items=4) as batcher:
            first = await hold_runtime(batcher, runtime)
            queued = asyncio.create_task(batcher.infer([item_ids(81, 4)] * 3, deadline()))
            await let_tasks_run()
            with pytest.raises(ServiceError) as raised:
                await batcher.infer([item_ids(82, 4)] * 2, deadline())
            assert raised.value.error_type is ErrorType.OVERLOADED
            runtime.gate.set()
            await asyncio.gather(first, queued)

    run(scenario)


def test_max_wait_lets_a_batch_wait_for_requests_still_being_tokenised() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(max_wait_ms=10_000)) as batcher:
            tokenised = asyncio.Event()

            async def late_arrival() -> InferenceResult:
                with batcher.admit(items=1, tokens=4) as reservation:
                    await tokenised.wait()  # tokenising until the test lets it finish
                    queued = batcher.submit([item_ids(92, 4)], deadline(), reservation)
                return await batcher.wait(queued)

            late = asyncio.create_task(late_arrival())
            await let_tasks_run()  # the late request has announced itself
            early = asyncio.create_task(batcher.infer([item_ids(91, 4)], deadline()))
            await let_tasks_run()
            assert runtime.batches == []  # the early item waits for the announced one
            tokenised.set()
            assert markers(await early) == [91]
            assert markers(await late) == [92]
        assert runtime.batches == [[91, 92]]

    run(scenario)


def test_stop_fails_running_and_queued_requests_as_unhealthy() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        batcher = Batcher(runtime, limits(), 100, 10_000, PAD_ID, Metrics().add_model("tiny"))
        batcher.start()
        running = await hold_runtime(batcher, runtime)
        queued = asyncio.create_task(batcher.infer([item_ids(95, 4)], deadline()))
        await let_tasks_run()
        await batcher.stop()  # while one batch runs and another request waits in the queue
        runtime.gate.set()  # the abandoned run's thread may finish now; nobody reads its result
        for task in (running, queued):
            with pytest.raises(ServiceError) as raised:
                await task
            assert raised.value.error_type is ErrorType.UNHEALTHY
        assert batcher.queued_items == 0
        assert all(95 not in batch for batch in runtime.batches)

    run(scenario)


def test_one_text_requests_are_not_starved_by_a_big_request() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(max_batch_size=4)) as batcher:
            first = await hold_runtime(batcher, runtime)
            big = asyncio.create_task(
                batcher.infer([item_ids(marker, 4) for marker in range(100, 200)], deadline())
            )
            await let_tasks_run()
            small = one_item_requests(batcher, dict.fromkeys((1, 2, 3), 4))
            await let_tasks_run()
            assert batcher.queued_items == 103
            runtime.gate.set()
            results = await asyncio.gather(first, big, *small)
        # Arrival order would run the 100 big items first (25 batches of 4) and the small ones last. Four
        # requests share a batch of 4: one item each, so every small request runs in the first batch.
        assert sorted(runtime.batches[1]) == [1, 2, 3, 100]
        assert markers(results[1]) == list(range(100, 200))  # the big request still gets all, in order
        assert sum(len(batch) for batch in runtime.batches) == 104

    run(scenario)


def test_requests_take_turns_least_recently_served_first() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(max_batch_size=4)) as batcher:
            first = await hold_runtime(batcher, runtime)
            tasks = [
                asyncio.create_task(
                    batcher.infer([item_ids(base + index, 4) for index in range(8)], deadline())
                )
                for base in (10, 20, 30)
            ]
            await let_tasks_run()
            runtime.gate.set()
            await asyncio.gather(first, *tasks)
        # Three requests share batches of 4: each gets its share (4 // 3 = one item) of every batch, so
        # no request goes a batch without an item while it has items queued.
        left = {1: 8, 2: 8, 3: 8}
        for batch in runtime.batches[1:]:
            owners = [marker // 10 for marker in batch]
            assert {owner for owner, count in left.items() if count} <= set(owners), runtime.batches
            for owner in owners:
                left[owner] -= 1
        assert left == {1: 0, 2: 0, 3: 0}

    run(scenario)


def test_a_big_request_gets_its_share_and_whole_batches_once_alone() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(max_batch_size=4)) as batcher:
            first = await hold_runtime(batcher, runtime)
            big = asyncio.create_task(
                batcher.infer([item_ids(marker, 4) for marker in range(100, 110)], deadline())
            )
            small = asyncio.create_task(batcher.infer([item_ids(1, 4)], deadline()))
            await let_tasks_run()
            runtime.gate.set()
            await asyncio.gather(first, big, small)
        # Two requests: a share of 2 each, so the small one runs in the first batch; once the big one is
        # alone its batches are full again.
        assert sorted(runtime.batches[1]) == [1, 100, 101]
        assert [len(batch) for batch in runtime.batches[2:]] == [4, 4]

    run(scenario)


def test_a_refusal_is_known_from_the_input_count_before_any_request_is_read() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(), max_queue_items=4, max_queue_tokens=100) as batcher:
            first = await hold_runtime(batcher, runtime)
            assert not batcher.refuses(4)  # the running request holds no queue room
            queued = asyncio.create_task(batcher.infer([item_ids(70, 4)] * 3, deadline()))
            await let_tasks_run()
            assert not batcher.refuses(1)  # one more item fits
            assert batcher.refuses(2)
            with batcher.admit(items=1, tokens=4):
                assert batcher.refuses(1)  # a request being tokenised holds the last place
            assert not batcher.refuses(1)
            with batcher.admit(items=0, tokens=88):
                assert batcher.refuses(1)  # the tokens are spent: 12 queued + 88 of 100
            runtime.gate.set()
            await asyncio.gather(first, queued)

    run(scenario)


def test_admission_refuses_before_any_tokenising_and_releases_its_room() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(), max_queue_items=10, max_queue_tokens=100) as batcher:
            first = await hold_runtime(batcher, runtime)
            with batcher.admit(items=8, tokens=40) as reservation:
                # While the first request is being tokenised its room is held: no second one fits.
                with pytest.raises(ServiceError) as raised, batcher.admit(items=4, tokens=4):
                    pass
                assert raised.value.error_type is ErrorType.OVERLOADED
                queued = batcher.submit([item_ids(50, 5)] * 8, deadline(), reservation)
            assert batcher.queued_items == 8 and batcher.queued_tokens == 40
            # The same bound in tokens: 2 more items fit, 70 more tokens do not.
            with pytest.raises(ServiceError) as raised, batcher.admit(items=2, tokens=70):
                pass
            assert raised.value.error_type is ErrorType.OVERLOADED
            with batcher.admit(items=2, tokens=10):
                pass  # released on exit without submitting (a 422 after tokenising, say)
            with batcher.admit(items=2, tokens=60):
                pass
            runtime.gate.set()
            await first
            assert markers(await batcher.wait(queued)) == [50] * 8
        assert batcher.queued_items == 0 and batcher.queued_tokens == 0

    run(scenario)


def test_an_empty_queue_takes_a_request_larger_than_its_token_bound() -> None:
    async def scenario() -> None:
        async with started(FakeRuntime(), limits(), max_queue_tokens=10) as batcher:
            result = await batcher.infer([item_ids(61, 8)] * 3, deadline())  # 24 tokens
        assert markers(result) == [61] * 3

    run(scenario)


def test_with_two_run_slots_a_second_batch_runs_while_the_first_is_in_the_runtime() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(concurrent_batches=2)) as batcher:
            first = await hold_runtime(batcher, runtime)
            second = asyncio.create_task(batcher.infer([item_ids(51, 4)], deadline()))
            async with asyncio.timeout(10):  # the gate is still closed: both runs are in at once
                while runtime.runs_started < 2:
                    await asyncio.sleep(0.001)
            third = asyncio.create_task(batcher.infer([item_ids(52, 4)], deadline()))
            await let_tasks_run()
            assert runtime.runs_started == 2 and batcher.queued_items == 1  # no third slot
            runtime.gate.set()
            assert markers(await second) == [51] and markers(await third) == [52]
            await first
        assert sorted(runtime.batches) == [[51], [52], [99]]

    run(scenario)


def test_an_abandoned_request_is_answered_499_and_its_items_never_run() -> None:
    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits()) as batcher:
            first = await hold_runtime(batcher, runtime)
            client_gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queued = batcher.submit([item_ids(61, 4), item_ids(62, 4)], deadline())
            waiting = asyncio.create_task(batcher.wait(queued, client_gone))
            await let_tasks_run()
            client_gone.set_result(None)
            with pytest.raises(ServiceError) as raised:
                await waiting
            assert raised.value.error_type is ErrorType.CLIENT_DISCONNECTED
            assert batcher.queued_items == 0
            runtime.gate.set()
            await first
        assert all(61 not in batch and 62 not in batch for batch in runtime.batches)

    run(scenario)


def test_batches_keep_running_while_the_event_loop_is_blocked() -> None:
    """The runner threads pick and run batches without the event loop: with the loop blocked, as a
    flood of refusals keeps it, the queued batches still run; only their answers wait for the loop."""

    async def scenario() -> None:
        runtime = FakeRuntime()
        async with started(runtime, limits(max_batch_size=2)) as batcher:
            first = await hold_runtime(batcher, runtime)
            queued = one_item_requests(batcher, dict.fromkeys(range(100, 106), 4))
            await let_tasks_run()
            runtime.gate.set()
            # Blocks the event loop's thread until the held run and three batches of two have started.
            assert all(runtime.run_starts.acquire(timeout=10) for _ in range(4))
            results = await asyncio.gather(first, *queued)
        assert [markers(result) for result in results[1:]] == [[n] for n in range(100, 106)]
        assert sorted(len(batch) for batch in runtime.batches) == [1, 2, 2, 2]

    run(scenario)


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own niceness is Linux's")
def test_runner_threads_yield_the_cpu_to_the_event_loop() -> None:
    async def scenario() -> None:
        async with started(FakeRuntime(), limits(concurrent_batches=2)) as batcher:
            assert markers(await batcher.infer([item_ids(7, 4)], deadline())) == [7]
            loop_niceness = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            runners = [thread for thread in threading.enumerate() if thread.name.startswith("inference_")]
            assert len(runners) >= 2
            for runner in runners:
                assert runner.native_id is not None
                niceness = os.getpriority(os.PRIO_PROCESS, runner.native_id)
                assert niceness == min(19, loop_niceness + RUNNER_NICENESS)

    run(scenario)
