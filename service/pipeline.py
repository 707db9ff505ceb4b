"""The encode pipeline behind every inference route (docs/architecture.md, "Life of a request"):
check the request against the limits, tokenise off the event loop, queue the items with the batcher,
and wait for them or for the client to go away, whichever comes first.

Everything here raises ServiceError; the routes only shape what it returns.
"""

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from fastapi import Request

from bundle import ClassifierSpec
from service.batcher import InferenceResult
from service.bundle_loader import LoadedModel
from service.errors import ErrorType, ServiceError
from service.state import ServiceState

# A request with at most this many characters is tokenised on the event loop: that takes a fraction of a
# millisecond, less than the hop to a worker thread and back (BENCHMARKS.md, "One text per request").
INLINE_TOKENIZE_CHARS = 1024


@dataclass(frozen=True)
class Encoded:
    result: InferenceResult
    token_count: int
    tokenize_seconds: float
    started: float  # perf_counter when the handler began

    def embeddings(self) -> np.ndarray:
        return np.stack([output.embedding for output in self.result.outputs])  # (N, dim)

    def logits(self) -> np.ndarray:
        return np.stack([output.logits for output in self.result.outputs])  # (N, labels)

    def timing_headers(self) -> dict[str, str]:
        total = time.perf_counter() - self.started
        return {
            "x-total-time": str(round(total * 1000)),
            "x-tokenization-time": str(round(self.tokenize_seconds * 1000)),
            "x-queue-time": str(round(self.result.queue_seconds * 1000)),
            "x-inference-time": str(round(self.result.inference_seconds * 1000)),
            "x-compute-tokens": str(self.token_count),
        }


def check_dimensions(dimensions: int | None, model: LoadedModel) -> None:
    # Checked before the model runs, so an invalid request costs no inference.
    dim = model.manifest.embedding.dim
    if dimensions is not None and dimensions > dim:
        raise ServiceError(
            ErrorType.VALIDATION, f"dimensions {dimensions} exceeds the model's {dim}", "dimensions"
        )


def check_classifier(top_k: int | None, model: LoadedModel) -> ClassifierSpec:
    """The model's classifier; 422 before any inference if it has none or top_k is too big."""
    classifier = model.manifest.classifier
    if classifier is None:
        raise ServiceError(ErrorType.VALIDATION, "this model has no classifier; use /embed")
    if top_k is not None and top_k > len(classifier.labels):
        raise ServiceError(
            ErrorType.VALIDATION, f"top_k {top_k} exceeds the {len(classifier.labels)} labels", "top_k"
        )
    return classifier


def check_inputs(texts: list[str], truncate: bool, state: ServiceState) -> list[str]:
    """The texts cut to max_input_chars, or 422 if there are too many or one is too long to cut."""
    settings = state.settings
    if len(texts) > settings.max_client_batch:
        raise ServiceError(
            ErrorType.VALIDATION,
            f"{len(texts)} inputs, more than max_client_batch ({settings.max_client_batch})",
        )
    for position, text in enumerate(texts):
        if len(text) > settings.max_input_chars and not truncate:
            raise ServiceError(
                ErrorType.VALIDATION,
                f"input {position} has {len(text)} characters, more than max_input_chars "
                f"({settings.max_input_chars}), and truncate is false",
            )
    # Far longer than max_seq_len tokens anyway: cutting by characters first bounds the tokenizer's work.
    return [text[: settings.max_input_chars] for text in texts]


async def wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def encode(state: ServiceState, request: Request, texts: list[str], truncate: bool) -> Encoded:
    """Validate, tokenise and run `texts`. Raises ServiceError, CLIENT_DISCONNECTED included: a client
    that goes away has its queued items dropped instead of computed for nobody."""
    started = time.perf_counter()
    model, batcher = state.ready_model()
    texts = check_inputs(texts, truncate, state)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.settings.request_timeout_s
    state.in_flight += 1
    try:
        # Admission first: a full queue answers 429 before any tokenising (Batcher.admit).
        with batcher.admit(len(texts), model.tokenizer.token_bound(texts)) as reservation:
            tokenize_started = time.perf_counter()
            if sum(len(text) for text in texts) <= INLINE_TOKENIZE_CHARS:
                tokenized = model.tokenizer.encode(texts)
            else:
                try:
                    async with asyncio.timeout_at(deadline):  # the deadline covers tokenising too
                        tokenized = await asyncio.to_thread(model.tokenizer.encode, texts)
                except TimeoutError:
                    raise ServiceError(
                        ErrorType.TIMEOUT, "the request deadline passed while its inputs were tokenised"
                    ) from None
            tokenize_seconds = time.perf_counter() - tokenize_started
            state.metrics.tokenize_duration.observe(tokenize_seconds)
            if not truncate and any(tokenized.truncated):
                position = tokenized.truncated.index(True)
                raise ServiceError(
                    ErrorType.VALIDATION,
                    f"input {position} is longer than max_seq_len ({model.manifest.max_seq_len} tokens) "
                    "and truncate is false",
                )
            token_count = sum(len(ids) for ids in tokenized.token_ids)
            queued = batcher.submit(tokenized.token_ids, deadline, reservation)
        inference = asyncio.ensure_future(batcher.wait(queued))
        disconnect = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait((inference, disconnect), return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_gone = not inference.done()
            # Whichever is still pending goes: a cancelled request has its queued items dropped.
            inference.cancel()
            queued.future.cancel()
            disconnect.cancel()
        if client_gone:
            raise ServiceError(ErrorType.CLIENT_DISCONNECTED, "the client closed the connection")
        result = inference.result()  # raises the request's ServiceError (504, 500)
        # Counted once served, so that rejected requests (e.g. 429s under overload) do not inflate them.
        state.metrics.input_tokens.inc(token_count)
        state.metrics.truncated_inputs.inc(sum(tokenized.truncated))
        return Encoded(result, token_count, tokenize_seconds, started)
    finally:
        state.in_flight -= 1
