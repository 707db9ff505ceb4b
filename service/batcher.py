"""Dynamic batching (docs/architecture.md, "Life of a request"), after TEI's core/queue.rs and core/infer.rs,
with fair scheduling across requests.

A handler first asks for room (`Batcher.admit`, a 429 decided before any tokenising), tokenises its
request, then submits its items (one text each) and awaits the result. `concurrent_batches` asyncio
tasks (one on a GPU), the runners, take batches from the queue: each picks the next batch as soon as
its last one is delivered and runs it in one `InferenceSession.run` on a thread of its own. While
batches run the event loop keeps accepting and tokenising requests, which form the next batch.

Fairness: queued requests wait in a round-robin line, least recently served first. A batch looks at
most `max_batch_size / queued requests` items of each request (at least one), always includes the
front request's oldest item, and adds the others that pad best with it. So a request of 1,000 texts
gets its share of every batch, not the runtime: a one-text request that arrives behind it waits for
about one batch, not for 1,000 texts. Fair per request, not per client: a client that sends many
requests at once gets a share for each (per-client limits belong to a proxy or rate limiter).

Pure asyncio and numpy: tests drive it with a fake runtime.
"""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bundle.contract import pad_to_longest
from bundle.runtime import ModelOutputs
from service.errors import ErrorType, ServiceError
from service.metrics import ModelMetrics
from service.settings import BatchLimits

logger = logging.getLogger("service.batcher")

# How many queued items the loop looks at to pick a batch, in multiples of max_batch_size: enough to
# group similar lengths, bounded so a long queue costs no more per batch.
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
class Reservation:
    """Queue room held for a request between admission and submission (while it is tokenised)."""

    items: int
    tokens: int
    held: bool = True


@dataclass(eq=False)
class QueuedRequest:
    future: asyncio.Future[InferenceResult]
    deadline: float  # loop time
    enqueued_at: float
    outputs: list[ItemOutput | None]
    remaining: int  # items without an output yet
    pending: deque["_Item"] = field(default_factory=deque)  # items not yet picked for a batch
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


@dataclass(eq=False)
class _Item:
    request: QueuedRequest
    index: int  # position in the request's inputs
    token_ids: list[int] = field(repr=False)

    @property
    def length(self) -> int:
        return len(self.token_ids)


def _length(item: _Item) -> int:
    return item.length


def overloaded() -> ServiceError:
    return ServiceError(ErrorType.OVERLOADED, "the queue is full, retry later")


def _timeout_error() -> ServiceError:
    return ServiceError(ErrorType.TIMEOUT, "the request deadline passed before its batch ran")


def pick_batch(
    items: list[_Item], max_batch_tokens: int, max_batch_size: int, max_padding: float = 1.0
) -> list[_Item]:
    """Choose the batch from `items` (the scheduling order): always the first item, so nothing starves, plus
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
        self,
        runtime: Runtime,
        limits: BatchLimits,
        max_queue_items: int,
        max_queue_tokens: int,
        pad_id: int,
        metrics: ModelMetrics,
    ) -> None:
        self._runtime = runtime
        self.limits = limits
        self._max_queue_items = max_queue_items
        self._max_queue_tokens = max_queue_tokens
        self._pad_id = pad_id
        self._metrics = metrics
        # Requests with items still to pick, least recently served first (the round-robin line).
        self._line: deque[QueuedRequest] = deque()
        self._queued_items = 0
        self._queued_tokens = 0
        self._reserved_items = 0  # admitted requests being tokenised, counted before they queue
        self._reserved_tokens = 0
        self._arriving = 0
        self._wake = asyncio.Event()
        self._running = 0  # batches in ONNX Runtime now, at most limits.concurrent_batches
        self._executor = ThreadPoolExecutor(
            max_workers=limits.concurrent_batches, thread_name_prefix="inference"
        )
        self._runners: list[asyncio.Task[None]] = []

    @property
    def queued_items(self) -> int:
        return self._queued_items

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def idle(self) -> bool:
        return not self._line and not self._running

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._runners = [
            loop.create_task(self._runner(), name=f"batch-runner-{number}")
            for number in range(self.limits.concurrent_batches)
        ]

    async def stop(self) -> None:
        for task in self._runners:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for request in list(self._line):
            request.fail(ServiceError(ErrorType.UNHEALTHY, "the service is shutting down"))
            self._drop(request)
        self._executor.shutdown(wait=False)  # a run in progress ends on its own

    def refuses(self, items: int, tokens: int | None = None) -> bool:
        """Whether a request of at least `items` inputs and `tokens` tokens (by default one per input)
        would be refused now: asked before its body is read (`items` 1) or validated, so that a 429
        stays cheap."""
        return self._no_room(items, items if tokens is None else tokens)

    def _no_room(self, items: int, tokens: int) -> bool:
        # An empty queue takes any one request, so a request larger than max_queue_tokens is slow but
        # never refused forever.
        held_items = self._queued_items + self._reserved_items
        held_tokens = self._queued_tokens + self._reserved_tokens
        return held_items > 0 and (
            held_items + items > self._max_queue_items or held_tokens + tokens > self._max_queue_tokens
        )

    def _check_room(self, items: int, tokens: int) -> None:
        if self._no_room(items, tokens):
            raise overloaded()

    @contextlib.contextmanager
    def admit(self, items: int, tokens: int) -> Iterator[Reservation]:
        """Hold queue room for a request about to be tokenised: `items` texts of at most `tokens` tokens
        in all. Raises OVERLOADED at once if the queue cannot take them, so a 429 costs no tokenising.
        The room is released on exit unless `submit` took it over. While held, the request counts as
        arriving: with max_wait_ms > 0 the loop may wait for it (a lone request on an idle server
        announces nobody else and never waits)."""
        self._check_room(items, tokens)
        reservation = Reservation(items, tokens)
        self._reserved_items += items
        self._reserved_tokens += tokens
        self._arriving += 1
        try:
            yield reservation
        finally:
            self._arriving -= 1
            self._release(reservation)

    def _release(self, reservation: Reservation) -> None:
        if reservation.held:
            reservation.held = False
            self._reserved_items -= reservation.items
            self._reserved_tokens -= reservation.tokens

    def submit(
        self, token_ids: Sequence[list[int]], deadline: float, reservation: Reservation | None = None
    ) -> QueuedRequest:
        """Queue one request's items (taking over its reservation, if any); `wait` gives the result.
        Without a reservation, raises OVERLOADED when the queue cannot take them."""
        if reservation is None:
            self._check_room(len(token_ids), sum(len(ids) for ids in token_ids))
        else:
            self._release(reservation)
        loop = asyncio.get_running_loop()
        request = QueuedRequest(
            future=loop.create_future(),
            deadline=deadline,
            enqueued_at=loop.time(),
            outputs=[None] * len(token_ids),
            remaining=len(token_ids),
        )
        if not token_ids:  # nothing to run (validation keeps this from happening): answered at once
            request.future.set_result(InferenceResult([], 0.0, 0.0))
            return request
        # A request's items wait shortest first: a batch sees only each request's share of them (16 of a
        # lone 1,000-text request on a CPU), so in arrival order a big request's batches padded badly and
        # ran 6 items at a time on average; its answer needs all of them anyway.
        items = sorted((_Item(request, index, ids) for index, ids in enumerate(token_ids)), key=_length)
        request.pending.extend(items)
        self._line.append(request)
        self._queued_items += len(token_ids)
        self._queued_tokens += sum(len(ids) for ids in token_ids)
        self._publish_queue()
        self._wake.set()
        return request

    async def wait(
        self, request: QueuedRequest, abandoned: asyncio.Future[None] | None = None
    ) -> InferenceResult:
        """The submitted request's result. Raises ServiceError: TIMEOUT when the deadline (loop time)
        passes, BACKEND when its batch failed, CLIENT_DISCONNECTED when `abandoned` (the client going
        away) completes first. Whatever ends the wait, a cancelled caller included, drops the request's
        items that have not run yet. No task of its own: one request is one task, however it ends."""
        waiting: set[asyncio.Future[Any]] = (
            {request.future} if abandoned is None else {request.future, abandoned}
        )
        try:
            timeout = request.deadline - asyncio.get_running_loop().time()
            await asyncio.wait(waiting, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
            if request.future.done():
                return request.future.result()  # raises the request's ServiceError (BACKEND, TIMEOUT)
            if abandoned is not None and abandoned.done():
                raise ServiceError(ErrorType.CLIENT_DISCONNECTED, "the client closed the connection")
            raise _timeout_error()
        finally:
            request.future.cancel()
            if request.pending:
                self._drop(request)

    async def infer(self, token_ids: Sequence[list[int]], deadline: float) -> InferenceResult:
        """submit, then wait: for callers that tokenised without a reservation."""
        return await self.wait(self.submit(token_ids, deadline))

    def _drop(self, request: QueuedRequest) -> None:
        """Take a request's unpicked items out of the queue (it is answered, or nobody waits for it)."""
        self._queued_items -= len(request.pending)
        self._queued_tokens -= sum(item.length for item in request.pending)
        request.pending.clear()
        with contextlib.suppress(ValueError):
            self._line.remove(request)
        self._publish_queue()

    def _publish_queue(self) -> None:
        self._metrics.queue_items.set(self._queued_items)
        self._metrics.queue_tokens.set(self._queued_tokens)

    async def _runner(self) -> None:
        # limits.concurrent_batches runners take batches from the one queue, each running its batch on
        # an executor thread of its own, so with two one batch's Python work (padding, delivering
        # results) overlaps another's inference instead of leaving a core idle. A runner picks its next
        # batch in the same turn of the event loop as it delivers the last one: under a flood of
        # refusals each turn of the loop is long, and a batch that waited several turns to be picked
        # starved the admitted work (BENCHMARKS.md, "Fair scheduling").
        while True:
            try:
                batch = await self._next_batch()
                if batch:
                    await self._run(batch)
            except Exception:
                # A bug here must not end a consumer of the queue (every later request would then time
                # out); the items in hand time out at their deadline, the rest are served.
                logger.exception("batch runner error, continuing")

    async def _next_batch(self) -> list[_Item]:
        while not self._line:
            self._wake.clear()
            await self._wake.wait()
        await self._wait_for_arrivals()
        self._drop_expired(asyncio.get_running_loop().time())
        if not self._line:
            return []
        batch = pick_batch(self._window(), *self.limits.budget)
        served: set[int] = set()
        for item in batch:
            item.request.pending.remove(item)  # among the request's first few: a short scan
            served.add(id(item.request))
        # Served requests go to the back of the line, in their order; the others move up.
        waiting = [request for request in self._line if id(request) not in served]
        again = [request for request in self._line if id(request) in served and request.pending]
        self._line = deque(waiting + again)
        self._queued_items -= len(batch)
        self._queued_tokens -= sum(item.length for item in batch)
        self._publish_queue()
        return batch

    def _drop_expired(self, now: float) -> None:
        for request in list(self._line):
            if request.future.done():  # timed out, disconnected, or failed with another item
                self._drop(request)
            elif now >= request.deadline:
                request.fail(_timeout_error())
                self._drop(request)

    def _window(self) -> list[_Item]:
        """The candidates for the next batch, in round-robin order: each request's oldest item from the
        front of the line backwards, then each one's second, and so on, up to each request's share.
        The share is a cap, not only a floor: measured (BENCHMARKS.md, "Fair scheduling"), filling the
        room it leaves with more of a big request's items tripled the one-text requests' p50."""
        share = max(1, self.limits.max_batch_size // len(self._line))
        size = LOOKAHEAD_BATCHES * self.limits.max_batch_size
        window: list[_Item] = []
        for turn in range(share):
            for request in self._line:
                if turn < len(request.pending):
                    window.append(request.pending[turn])
                    if len(window) == size:
                        return window
        return window

    async def _wait_for_arrivals(self) -> None:
        if self.limits.max_wait_ms <= 0:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + self.limits.max_wait_ms / 1000
        while self._arriving > 0 and self._queued_items < self.limits.max_batch_size and loop.time() < until:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), until - loop.time())

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        self._running += 1
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
            self._running -= 1
        finished_at = loop.time()
        padded_tokens = input_ids.size
        self._metrics.batch_size.observe(len(batch))
        self._metrics.batch_tokens.observe(padded_tokens)
        self._metrics.batch_padding_ratio.observe(1 - int(attention_mask.sum()) / padded_tokens)
        for row, item in enumerate(batch):
            logits = None if outputs.logits is None else outputs.logits[row]
            item.request.deliver(item.index, ItemOutput(outputs.embeddings[row], logits), finished_at)
