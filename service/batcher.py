"""Dynamic batching (docs/architecture.md, "Life of a request"), after TEI's core/queue.rs and core/infer.rs.

Handlers tokenise their request, hand its items (one text each) to `Batcher.infer` and await the
result. One asyncio task, the batching loop, owns the queue: as soon as the runtime is free it takes
the oldest live item plus the queued items whose lengths pad best with it, within the padded-token
and item budgets, and runs them in one `InferenceSession.run` on a dedicated thread. While that runs
the event loop keeps accepting and tokenising requests, which form the next batch.

Pure asyncio and numpy: tests drive it with a fake runtime.
"""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from bundle.contract import pad_to_longest
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics
from service.runtime import ModelOutputs
from service.settings import BatchLimits

logger = logging.getLogger("service.batcher")

# How many queued items (in arrival order) the loop looks at to pick a batch, in multiples of
# max_batch_size: enough to group similar lengths, bounded so a long queue costs no more per batch.
LOOKAHEAD_BATCHES = 4


class Runtime(Protocol):
    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> ModelOutputs: ...


@dataclass(frozen=True)
class ItemOutput:
    embedding: np.ndarray  # (dim,)
    logits: np.ndarray | None  # (num_labels,)


@dataclass(frozen=True)
class InferenceResult:
    outputs: list[ItemOutput]  # in input order
    queue_seconds: float  # from enqueue to the start of the request's first batch
    inference_seconds: float  # from the start of its first batch to the end of its last


@dataclass
class _Request:
    future: asyncio.Future[InferenceResult]
    deadline: float  # loop time
    enqueued_at: float
    outputs: list[ItemOutput | None]
    remaining: int
    started_at: float | None = None

    def deliver(self, index: int, output: ItemOutput, finished_at: float) -> None:
        self.outputs[index] = output
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            assert self.started_at is not None
            outputs = [output for output in self.outputs if output is not None]
            self.future.set_result(
                InferenceResult(outputs, self.started_at - self.enqueued_at, finished_at - self.started_at)
            )

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass
class _Item:
    request: _Request
    index: int  # position in the request's inputs
    token_ids: list[int] = field(repr=False)

    @property
    def length(self) -> int:
        return len(self.token_ids)


def pick_batch(
    items: list[_Item], max_batch_tokens: int, max_batch_size: int, max_padding: float = 1.0
) -> list[_Item]:
    """Choose the batch from `items` (arrival order): always the oldest item, so nothing starves, plus
    neighbours in length order, each time the one that adds the least padding, while the batch's padded
    size (items x longest) stays within max_batch_tokens, its item count within max_batch_size, and its
    padding (the share of padded tokens that are padding) within max_padding."""
    by_length = sorted(range(len(items)), key=lambda position: items[position].length)
    anchor = by_length.index(0)
    low, high = anchor, anchor + 1  # the batch is by_length[low:high]
    longest = real = items[0].length

    def fits(count: int, longest: int, real: int) -> bool:
        padded = count * longest
        return padded <= max_batch_tokens and (padded - real) <= max_padding * padded

    while high - low < max_batch_size:
        count = high - low
        # A shorter item is padded up to the current longest; a longer one pads every item already in.
        left = items[by_length[low - 1]].length if low > 0 else None
        right = items[by_length[high]].length if high < len(items) else None
        left_fits = left is not None and fits(count + 1, longest, real + left)
        right_fits = right is not None and fits(count + 1, right, real + right)
        if left_fits and (not right_fits or longest - left <= (right - longest) * count):
            low -= 1
            real += left
        elif right_fits:
            high += 1
            longest = right
            real += right
        else:
            break
    return [items[position] for position in sorted(by_length[low:high])]


class Batcher:
    def __init__(
        self, runtime: Runtime, limits: BatchLimits, max_queue_items: int, pad_id: int, metrics: Metrics
    ) -> None:
        self._runtime = runtime
        self.limits = limits
        self._max_queue_items = max_queue_items
        self._pad_id = pad_id
        self._metrics = metrics
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._arriving = 0  # requests being tokenised that will enqueue shortly
        self._running = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_items(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        return not self._queue and not self._running

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batching-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._queue:
            item.request.fail(ServiceError(ErrorType.UNHEALTHY, "the service is shutting down"))
        self._queue.clear()
        self._metrics.queue_items.set(0)
        self._executor.shutdown(wait=False)  # a run in progress ends on its own

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce a request that is being tokenised, so that with max_wait_ms > 0 the loop may wait
        for it; a lone request on an idle server announces nobody else and never waits."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def infer(self, token_ids: list[list[int]], deadline: float) -> InferenceResult:
        """Queue one request's items and wait for all of them. Raises ServiceError: OVERLOADED when the
        queue is full, TIMEOUT when the deadline (loop time) passes, BACKEND when its batch failed.
        Cancelling the caller (client gone) drops its items that have not run yet."""
        if len(self._queue) + len(token_ids) > self._max_queue_items:
            raise ServiceError(ErrorType.OVERLOADED, "the queue is full, retry later")
        loop = asyncio.get_running_loop()
        request = _Request(
            future=loop.create_future(),
            deadline=deadline,
            enqueued_at=loop.time(),
            outputs=[None] * len(token_ids),
            remaining=len(token_ids),
        )
        self._queue.extend(_Item(request, index, ids) for index, ids in enumerate(token_ids))
        self._metrics.queue_items.set(len(self._queue))
        self._wake.set()
        try:
            async with asyncio.timeout_at(deadline):
                # Awaiting the future directly: a timeout or a cancelled caller cancels it, and the
                # loop skips the items of a cancelled request.
                return await request.future
        except TimeoutError:
            raise ServiceError(
                ErrorType.TIMEOUT, "the request deadline passed before its batch ran"
            ) from None

    async def _loop(self) -> None:
        while True:
            try:
                batch = await self._next_batch()
                if batch:
                    await self._run(batch)
            except Exception:
                # A bug here must not end the only consumer of the queue (every later request would
                # then time out); the items in hand time out at their deadline, the rest are served.
                logger.exception("batching loop error, continuing")

    async def _next_batch(self) -> list[_Item]:
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
        await self._wait_for_arrivals()
        window = [
            self._queue.popleft()
            for _ in range(min(len(self._queue), LOOKAHEAD_BATCHES * self.limits.max_batch_size))
        ]
        now = asyncio.get_running_loop().time()
        live = []
        for item in window:
            if item.request.future.done():
                continue  # timed out, disconnected, or failed with another item
            if now >= item.request.deadline:
                item.request.fail(
                    ServiceError(ErrorType.TIMEOUT, "the request deadline passed before its batch ran")
                )
                continue
            live.append(item)
        batch = pick_batch(live, *self.limits.budget) if live else []
        chosen = {id(item) for item in batch}
        self._queue.extendleft(reversed([item for item in live if id(item) not in chosen]))
        self._metrics.queue_items.set(len(self._queue))
        return batch

    async def _wait_for_arrivals(self) -> None:
        if self.limits.max_wait_ms <= 0:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + self.limits.max_wait_ms / 1000
        while self._arriving > 0 and len(self._queue) < self.limits.max_batch_size and loop.time() < until:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), until - loop.time())

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        self._running = True
        try:
            input_ids, attention_mask = pad_to_longest([item.token_ids for item in batch], self._pad_id)
            started_at = loop.time()
            for item in batch:
                if item.request.started_at is None:
                    item.request.started_at = started_at
                self._metrics.queue_wait.observe(started_at - item.request.enqueued_at)
            run_started = time.perf_counter()
            outputs = await loop.run_in_executor(self._executor, self._runtime.run, input_ids, attention_mask)
            self._metrics.inference_duration.observe(time.perf_counter() - run_started)
            rows = outputs.embeddings.shape[0]
            if rows != len(batch) or (outputs.logits is not None and outputs.logits.shape[0] != len(batch)):
                raise RuntimeError(f"the model returned {rows} rows for a batch of {len(batch)}")
        except asyncio.CancelledError:
            for item in batch:  # stop() during a run: answer its requests rather than leave them hanging
                item.request.fail(ServiceError(ErrorType.UNHEALTHY, "the service is shutting down"))
            raise
        except Exception as exc:
            # Only this batch's requests fail; the loop carries on with the next batch.
            logger.exception("batch of %d items failed", len(batch))
            error = ServiceError(ErrorType.BACKEND, f"inference failed: {type(exc).__name__}: {exc}")
            for item in batch:
                item.request.fail(error)
            return
        finally:
            self._running = False
        finished_at = loop.time()
        padded_tokens = input_ids.size
        self._metrics.batch_size.observe(len(batch))
        self._metrics.batch_tokens.observe(padded_tokens)
        self._metrics.batch_padding_ratio.observe(1 - int(attention_mask.sum()) / padded_tokens)
        for row, item in enumerate(batch):
            logits = None if outputs.logits is None else outputs.logits[row]
            item.request.deliver(item.index, ItemOutput(outputs.embeddings[row], logits), finished_at)
