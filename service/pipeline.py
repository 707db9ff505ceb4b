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
from service.batcher import InferenceResult, overloaded
from service.bundle_loader import LoadedModel
from service.errors import ErrorType, ServiceError
from service.registry import ServedVersion
from service.state import ServiceState
from service.tokenization import PairCut, TextInput, TextTokenizer, TokenizedInputs, TruncationSide

# One model input: a text, a pair of texts (/predict), or token IDs used as given.
ModelInput = TextInput | list[int]

# A request with at most this many characters is tokenised on the event loop: that takes a fraction of a
# millisecond, less than the hop to a worker thread and back (BENCHMARKS.md, "One text per request").
INLINE_TOKENIZE_CHARS = 1024


@dataclass(frozen=True)
class Encoded:
    result: InferenceResult
    token_count: int
    tokenize_seconds: float
    started: float  # perf_counter when the handler began
    model: str  # the served name
    version: str  # the version that computed the result

    @property
    def model_id(self) -> str:
        """`model` of an OpenAI answer: the name and the version that served it."""
        return f"{self.model}@{self.version}"

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
            "x-model-name": self.model,
            "x-model-version": self.version,
        }


def check_dimensions(dimensions: int | None, model: LoadedModel) -> None:
    # Checked before the model runs, so an invalid request costs no inference.
    dim = model.manifest.embedding.dim
    if dimensions is not None and dimensions > dim:
        raise ServiceError(
            ErrorType.VALIDATION, f"dimensions {dimensions} exceeds the model's {dim}", "dimensions"
        )


def check_embedder(model: LoadedModel) -> None:
    """422 before any inference if the model does not embed texts (a reranker reads pairs)."""
    if "embedding" not in model.manifest.heads:
        raise ServiceError(
            ErrorType.VALIDATION, "this model is a reranker, not an embedding model; use /rerank"
        )


def check_reranker(model: LoadedModel) -> None:
    if model.manifest.reranker is None:
        raise ServiceError(ErrorType.VALIDATION, "this model has no reranker head; serve a rerank bundle")


def check_query(query: str, model: LoadedModel) -> None:
    """422 if a reranker's query leaves no room for a passage: queries are never cut."""
    room = model.tokenizer.pair_room(query)
    if room < 1:
        raise ServiceError(
            ErrorType.VALIDATION,
            f"the query is too long: with the pair's special tokens it leaves no room for a passage "
            f"within max_seq_len ({model.manifest.max_seq_len} tokens); queries are never truncated",
            "query",
        )


def check_classifier(top_k: int | None, model: LoadedModel) -> ClassifierSpec:
    """The model's classifier; 422 before any inference if it has none or top_k is too big."""
    classifier = model.manifest.classifier
    if classifier is None:
        use = "/rerank" if model.manifest.reranker is not None else "/embed"
        raise ServiceError(ErrorType.VALIDATION, f"this model has no classifier; use {use}")
    if top_k is not None and top_k > len(classifier.labels):
        raise ServiceError(
            ErrorType.VALIDATION, f"top_k {top_k} exceeds the {len(classifier.labels)} labels", "top_k"
        )
    return classifier


def resolve_prompt(prompt_name: str | None, model: LoadedModel) -> str | None:
    """The text to prepend for `prompt_name` (None: the model's default prompt, if it has one); 422 for
    a name the model does not have."""
    embedding = model.manifest.embedding
    if prompt_name is None:
        return embedding.prompts.get(embedding.default_prompt_name) if embedding.default_prompt_name else None
    if prompt_name not in embedding.prompts:
        known = f"its prompts are {sorted(embedding.prompts)}" if embedding.prompts else "it has no prompts"
        raise ServiceError(
            ErrorType.VALIDATION,
            f"prompt_name {prompt_name!r} is not a prompt of this model; {known}",
            "prompt_name",
        )
    return embedding.prompts[prompt_name]


def check_token_ids(batch: list[list[int]], model: LoadedModel) -> None:
    """422 naming the input if a token ID is outside the vocabulary: the graph would index past its
    embedding table."""
    vocab_size = model.vocab_size
    for position, token_ids in enumerate(batch):
        if (largest := max(token_ids)) >= vocab_size:
            raise ServiceError(
                ErrorType.VALIDATION,
                f"input {position} has token ID {largest}, outside the vocabulary "
                f"(IDs 0 to {vocab_size - 1})",
            )


def check_batch_size(count: int, state: ServiceState) -> None:
    if count > state.settings.max_client_batch:
        raise ServiceError(
            ErrorType.VALIDATION,
            f"{count} inputs, more than max_client_batch ({state.settings.max_client_batch})",
        )


def check_inputs(
    inputs: list[ModelInput], truncate: bool, state: ServiceState, model: LoadedModel
) -> list[ModelInput]:
    """The inputs with texts cut to max_input_chars, or 422 if a text is too long to cut or a token ID
    is outside the vocabulary (their number is the caller's to check first: `check_batch_size`)."""
    check_token_ids([item for item in inputs if isinstance(item, list)], model)
    limit = state.settings.max_input_chars
    for position, item in enumerate(inputs):
        for text in texts_of(item):
            if len(text) > limit and not truncate:
                raise ServiceError(
                    ErrorType.VALIDATION,
                    f"input {position} has {len(text)} characters, more than max_input_chars "
                    f"({limit}), and truncate is false",
                )
    # Far longer than max_seq_len tokens anyway: cutting by characters first bounds the tokenizer's work.
    return [cut_texts(item, limit) for item in inputs]


def texts_of(item: ModelInput) -> tuple[str, ...]:
    if isinstance(item, str):
        return (item,)
    return item if isinstance(item, tuple) else ()


def cut_texts(item: ModelInput, limit: int) -> ModelInput:
    if isinstance(item, str):
        return item[:limit]
    if isinstance(item, tuple):
        return (item[0][:limit], item[1][:limit])
    return item


def with_prompt(inputs: list[ModelInput], prompt: str | None) -> list[ModelInput]:
    """The prompt before each text; pairs (/predict) and token IDs are left as they are."""
    return [prompt + item if prompt and isinstance(item, str) else item for item in inputs]


def tokenize(
    tokenizer: TextTokenizer,
    inputs: list[ModelInput],
    side: TruncationSide,
    pair_cut: PairCut = "longest_first",
) -> TokenizedInputs:
    """Token IDs for every input, in order: texts and pairs through the tokenizer, token IDs as given,
    cut to max_seq_len on the same side."""
    encoded = tokenizer.encode([item for item in inputs if not isinstance(item, list)], side, pair_cut)
    encoded_ids, encoded_truncated = iter(encoded.token_ids), iter(encoded.truncated)
    token_ids, truncated = [], []
    limit = tokenizer.max_seq_len
    for item in inputs:
        if isinstance(item, list):
            token_ids.append(item[-limit:] if side == "left" else item[:limit])
            truncated.append(len(item) > limit)
        else:
            token_ids.append(next(encoded_ids))
            truncated.append(next(encoded_truncated))
    return TokenizedInputs(token_ids, truncated)


async def wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def encode(
    state: ServiceState,
    request: Request,
    served: ServedVersion,
    inputs: list[ModelInput],
    truncate: bool,
    side: TruncationSide = "right",
    prompt: str | None = None,
    pair_cut: PairCut = "longest_first",
) -> Encoded:
    """Validate, tokenise and run `inputs` (texts, pairs or token IDs; `prompt` goes before each text;
    `pair_cut` says which text of a pair is cut) on the `served` version, which it holds (a lease)
    until the result is in, so that a reload releases that version only after this request. Raises
    ServiceError, CLIENT_DISCONNECTED included: a client that goes away has its queued items dropped
    instead of computed for nobody."""
    started = time.perf_counter()
    model, batcher, metrics = served.model, served.batcher, served.metrics
    check_batch_size(len(inputs), state)
    if batcher.refuses(len(inputs)):  # before the per-text checks: under a flood, 429s stay cheap
        raise overloaded()
    inputs = with_prompt(check_inputs(inputs, truncate, state, model), prompt)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.settings.request_timeout_s
    state.in_flight += 1
    served.acquire()
    try:
        # Admission first: a full queue answers 429 before any tokenising (Batcher.admit).
        with batcher.admit(len(inputs), model.tokenizer.token_bound(inputs)) as reservation:
            tokenize_started = time.perf_counter()
            if sum(len(text) for item in inputs for text in texts_of(item)) <= INLINE_TOKENIZE_CHARS:
                tokenized = tokenize(model.tokenizer, inputs, side, pair_cut)
            else:
                try:
                    async with asyncio.timeout_at(deadline):  # the deadline covers tokenising too
                        tokenized = await asyncio.to_thread(tokenize, model.tokenizer, inputs, side, pair_cut)
                except TimeoutError:
                    raise ServiceError(
                        ErrorType.TIMEOUT, "the request deadline passed while its inputs were tokenised"
                    ) from None
            tokenize_seconds = time.perf_counter() - tokenize_started
            metrics.tokenize_duration.observe(tokenize_seconds)
            if not truncate and any(tokenized.truncated):
                position = tokenized.truncated.index(True)
                raise ServiceError(
                    ErrorType.VALIDATION,
                    f"input {position} is longer than max_seq_len ({model.manifest.max_seq_len} tokens) "
                    "and truncate is false",
                )
            token_count = sum(len(ids) for ids in tokenized.token_ids)
            queued = batcher.submit(tokenized.token_ids, deadline, reservation)
        # A client that goes away has its items that have not run dropped (CLIENT_DISCONNECTED).
        disconnect = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            result = await batcher.wait(queued, disconnect)  # raises the request's ServiceError (504, 500)
        finally:
            disconnect.cancel()
        # Counted once served, so that rejected requests (e.g. 429s under overload) do not inflate them.
        metrics.input_tokens.inc(token_count)
        metrics.truncated_inputs.inc(sum(tokenized.truncated))
        return Encoded(result, token_count, tokenize_seconds, started, served.name, served.version)
    finally:
        served.release()
        state.in_flight -= 1
