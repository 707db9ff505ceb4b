"""Dynamic batching (docs/architecture.md, "Life of a request"), after TEI's core/queue.rs and core/infer.rs,
with fair scheduling across requests.

A handler first asks for room (`Batcher.admit`, a 429 decided before any tokenising), tokenises its
request, then submits its items (one text each) and awaits the result. `concurrent_batches` runner
threads (one on a GPU) take batches from the queue: each picks the next batch as soon as its last one
has run, runs it in one `InferenceSession.run` and hands the outputs to the event loop, which answers
the requests. While batches run the event loop keeps accepting and tokenising requests, which form
the next batch; a busy event loop delays answers, never the runtime.

Fairness: queued requests wait in a round-robin line, least recently served first. A batch looks at
most `max_batch_size / queued requests` items of each request (at least one), always includes the
front request's oldest item, and adds the others that pad best with it. So a request of 1,000 texts
gets its share of every batch, not the runtime: a one-text request that arrives behind it waits for
about one batch, not for 1,000 texts. Fair per request, not per client: a client that sends many
requests at once gets a share for each (per-client limits belong to a proxy or rate limiter).

The queue is shared by the event loop and the runner threads under one lock; futures are completed on
the event loop only. Tests drive it with a fake runtime.
"""

import asyncio
import contextlib
import functools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
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
# How much nicer than the event loop the runner threads are (lower_this_threads_priority).
RUNNER_NICENESS = 10


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
    deadline: float  # loop time, for the waiter on the event loop
    # The same deadline and the moments of the request's life on time.perf_counter's clock, which the
    # runner threads read (an event loop's time, uvloop's, is cached once per turn of the loop).
    expires_at: float
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


def lower_this_threads_priority() -> None:
    """Raise the calling thread's niceness by RUNNER_NICENESS (Linux, where a thread has its own).

    Runs are throughput work; the event loop is latency work (reading requests, refusing, answering).
    When runs keep every core busy, a loop at the same priority waited for a core as long as it ran
    (3.0 s of 2.9 s under a flood); niced runners let it in at once (0.7 s), and served as many texts."""
    if sys.platform == "linux":
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + RUNNER_NICENESS)


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
        # The queue is shared by the event loop (admit, submit, drop) and the runner threads (pick):
        # every change to it, and every read of it that decides something, holds this lock.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever the queue or arrivals change
        # Requests with items still to pick, least recently served first (the round-robin line).
        self._line: deque[QueuedRequest] = deque()
        self._queued_items = 0
        self._queued_tokens = 0
        self._reserved_items = 0  # admitted requests being tokenised, counted before they queue
        self._reserved_tokens = 0
        self._arriving = 0
        self._running: list[list[_Item]] = []  # batches in ONNX Runtime now
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued_items(self) -> int:
        return self._queued_items

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._line and not self._running

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for number in range(self.limits.concurrent_batches):
            threading.Thread(target=self._runner, name=f"inference_{number}", daemon=True).start()

    async def stop(self) -> None:
        """Fail every queued request and every request of a batch still running (UNHEALTHY); the runner
        threads end once their run in progress, if any, returns (its result is dropped)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            abandoned = [item.request for batch in self._running for item in batch] + list(self._line)
        for request in abandoned:
            request.fail(ServiceError(ErrorType.UNHEALTHY, "the service is shutting down"))
            self._drop(request)

    def refuses(self, items: int, tokens: int | None = None) -> bool:
        """Whether a request of at least `items` inputs and `tokens` tokens (by default one per input)
        would be refused now: asked before its body is read (`items` 1) or validated, so that a 429
        stays cheap."""
        with self._lock:
            return self._no_room(items, items if tokens is None else tokens)

    def _no_room(self, items: int, tokens: int) -> bool:
        # An empty queue takes any one request, so a request larger than max_queue_tokens is slow but
        # never refused forever.
        held_items = self._queued_items + self._reserved_items
        held_tokens = self._queued_tokens + self._reserved_tokens
        return held_items > 0 and (
            held_items + items > self._max_queue_items or held_tokens + tokens > self._max_queue_tokens
        )

    @contextlib.contextmanager
    def admit(self, items: int, tokens: int) -> Iterator[Reservation]:
        """Hold queue room for a request about to be tokenised: `items` texts of at most `tokens` tokens
        in all. Raises OVERLOADED at once if the queue cannot take them, so a 429 costs no tokenising.
        The room is released on exit unless `submit` took it over. While held, the request counts as
        arriving: with max_wait_ms > 0 a runner may wait for it (a lone request on an idle server
        announces nobody else and never waits)."""
        with self._lock:
            if self._no_room(items, tokens):
                raise overloaded()
            reservation = Reservation(items, tokens)
            self._reserved_items += items
            self._reserved_tokens += tokens
            self._arriving += 1
        try:
            yield reservation
        finally:
            with self._changed:
                self._arriving -= 1
                self._release(reservation)
                self._changed.notify_all()

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
        loop = asyncio.get_running_loop()
        request = QueuedRequest(
            future=loop.create_future(),
            deadline=deadline,
            expires_at=time.perf_counter() + (deadline - loop.time()),
            enqueued_at=time.perf_counter(),
            outputs=[None] * len(token_ids),
            remaining=len(token_ids),
        )
        # A request's items wait shortest first: a batch sees only each request's share of them (16 of a
        # lone 1,000-text request on a CPU), so in arrival order a big request's batches padded badly and
        # ran 6 items at a time on average; its answer needs all of them anyway.
        items = sorted((_Item(request, index, ids) for index, ids in enumerate(token_ids)), key=_length)
        tokens = sum(len(ids) for ids in token_ids)
        with self._changed:
            if reservation is None:
                if self._no_room(len(token_ids), tokens):
                    raise overloaded()
            else:
                self._release(reservation)
            if not token_ids:  # nothing to run (validation keeps this from happening): answered at once
                request.future.set_result(InferenceResult([], 0.0, 0.0))
                return request
            request.pending.extend(items)
            self._line.append(request)
            self._queued_items += len(token_ids)
            self._queued_tokens += tokens
            self._publish_queue()
            self._changed.notify()
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
            self._drop(request)

    async def infer(self, token_ids: Sequence[list[int]], deadline: float) -> InferenceResult:
        """submit, then wait: for callers that tokenised without a reservation."""
        return await self.wait(self.submit(token_ids, deadline))

    def _drop(self, request: QueuedRequest) -> None:
        """Take a request's unpicked items out of the queue (it is answered, or nobody waits for it)."""
        with self._lock:
            self._unqueue(request)

    def _unqueue(self, request: QueuedRequest) -> None:
        if not request.pending:
            return
        self._queued_items -= len(request.pending)
        self._queued_tokens -= sum(item.length for item in request.pending)
        request.pending.clear()
        with contextlib.suppress(ValueError):
            self._line.remove(request)
        self._publish_queue()

    def _publish_queue(self) -> None:
        self._metrics.queue_items.set(self._queued_items)
        self._metrics.queue_tokens.set(self._queued_tokens)

    def _runner(self) -> None:
        """One runner thread: take the next batch, run it, hand the results to the event loop, again.
        limits.concurrent_batches of them share the queue, so with two one batch's Python work (padding,
        delivering results) overlaps another's inference instead of leaving a core idle. Picking the
        batch here rather than on the event loop keeps the runtime busy while the loop is not free: under
        a flood of refusals each turn of the loop is long, and batches picked on the loop starved the
        admitted work (BENCHMARKS.md, "Fair scheduling")."""
        assert self._loop is not None
        loop = self._loop
        lower_this_threads_priority()
        while True:
            with self._changed:
                batch = self._take_batch()
                if batch is None:
                    return
                self._running.append(batch)
            try:
                delivery = self._run(batch)
            finally:
                with self._lock:
                    self._running.remove(batch)
            try:
                loop.call_soon_threadsafe(delivery)
            except RuntimeError:  # the event loop is closed: nobody waits for these results
                return

    def _take_batch(self) -> list[_Item] | None:
        """The next batch, once there is one (None when stopping); called holding the lock."""
        while True:
            while not self._line and not self._stopping:
                self._changed.wait()
            if self._stopping:
                return None
            self._wait_for_arrivals()
            self._drop_expired()
            if self._line:
                break
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

    def _drop_expired(self) -> None:
        now = time.perf_counter()
        for request in list(self._line):
            # Answered (timed out, disconnected, failed with another item) or past its deadline (its
            # waiter answers 504 then): nothing of it is worth running.
            if request.future.done() or now >= request.expires_at:
                self._unqueue(request)

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

    def _wait_for_arrivals(self) -> None:
        """With max_wait_ms, wait (holding the lock's condition) while admitted requests are still being
        tokenised and the batch is not full yet."""
        if self.limits.max_wait_ms <= 0:
            return
        until = time.monotonic() + self.limits.max_wait_ms / 1000
        while self._arriving > 0 and self._queued_items < self.limits.max_batch_size and not self._stopping:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._changed.wait(left)

    def _run(self, batch: list[_Item]) -> Callable[[], None]:
        """Run `batch` on this thread; -> what the event loop then does with the outcome (deliver each
        item's output, or fail the batch's requests)."""
        input_ids, attention_mask = pad_to_longest([item.token_ids for item in batch], self._pad_id)
        started_at = time.perf_counter()
        for item in batch:
            if item.request.started_at is None:
                item.request.started_at = started_at
            self._metrics.queue_wait.observe(started_at - item.request.enqueued_at)
        run_started = time.perf_counter()
        try:
            outputs = self._runtime.run(input_ids, attention_mask)
            run_seconds = time.perf_counter() - run_started
            rows = outputs.embeddings.shape[0]
            if rows != len(batch) or (outputs.logits is not None and outputs.logits.shape[0] != len(batch)):
                raise RuntimeError(f"the model returned {rows} rows for a batch of {len(batch)}")
        except Exception as exc:
            # Only this batch's requests fail; the runner carries on with the next batch.
            logger.exception("batch of %d items failed", len(batch))
            error = ServiceError(ErrorType.BACKEND, f"inference failed: {type(exc).__name__}: {exc}")
            return functools.partial(_fail_all, batch, error)
        self._metrics.inference_duration.observe(run_seconds)
        finished_at = time.perf_counter()
        padded_tokens = input_ids.size
        self._metrics.batch_size.observe(len(batch))
        self._metrics.batch_tokens.observe(padded_tokens)
        self._metrics.batch_padding_ratio.observe(1 - int(attention_mask.sum()) / padded_tokens)
        return functools.partial(_deliver_all, batch, outputs, finished_at)


def _deliver_all(batch: list[_Item], outputs: ModelOutputs, finished_at: float) -> None:
    for row, item in enumerate(batch):
        logits = None if outputs.logits is None else outputs.logits[row]
        item.request.deliver(item.index, ItemOutput(outputs.embeddings[row], logits), finished_at)


def _fail_all(batch: list[_Item], error: ServiceError) -> None:
    for item in batch:
        item.request.fail(error)
