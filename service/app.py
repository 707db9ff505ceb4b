"""The FastAPI application: lifespan (load the model, run the batcher), routes, and error rendering.

Handlers only validate, tokenise (off the event loop), hand their items to the batcher and shape the
answer; everything about batching lives in service/batcher.py, every status code in service/errors.py.
"""

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import Batcher, InferenceResult
from service.bundle_loader import LoadedModel, load_model
from service.errors import ErrorType, ServiceError, error_body, error_headers
from service.metrics import CLIENT_DISCONNECTED, Metrics
from service.middleware import ServiceMiddleware
from service.schemas import (
    BatchingInfo,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    Info,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    OpenAIError,
    Status,
    TEIError,
    as_list,
)
from service.settings import Settings

logger = logging.getLogger("service.app")

try:
    SERVICE_VERSION = version("encoder-service")
except PackageNotFoundError:
    SERVICE_VERSION = "0.0.0"

# nginx's code for "client closed request": logged and counted, never seen by the (gone) client.
CLIENT_CLOSED_STATUS = 499


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    model: LoadedModel | None = None
    batcher: Batcher | None = None
    ready: bool = False
    draining: bool = False  # set on SIGTERM: /ready answers 503 and new work is refused
    in_flight: int = 0  # inference requests accepted and not yet answered

    @property
    def drained(self) -> bool:
        return self.in_flight == 0 and (self.batcher is None or self.batcher.idle)


@dataclass(frozen=True)
class Encoded:
    result: InferenceResult
    token_count: int
    tokenize_seconds: float
    started: float  # perf_counter when the handler began

    def timing_headers(self) -> dict[str, str]:
        total = time.perf_counter() - self.started
        return {
            "x-total-time": str(round(total * 1000)),
            "x-tokenization-time": str(round(self.tokenize_seconds * 1000)),
            "x-queue-time": str(round(self.result.queue_seconds * 1000)),
            "x-inference-time": str(round(self.result.inference_seconds * 1000)),
            "x-compute-tokens": str(self.token_count),
        }


def service_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(service_state)]


def json_response(content: object, headers: dict[str, str] | None = None) -> Response:
    # Rendered directly, numpy arrays included: response_model validation and json.dumps of thousands
    # of floats were the largest costs on the event loop (0.75 ms per 8x256 response; orjson: 0.04 ms).
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, media_type="application/json", headers=headers)


def ready_model(state: ServiceState) -> tuple[LoadedModel, Batcher]:
    if state.draining:
        raise ServiceError(ErrorType.UNHEALTHY, "the service is shutting down")
    if not state.ready or state.model is None or state.batcher is None:
        raise ServiceError(ErrorType.UNHEALTHY, "the model is not loaded yet")
    return state.model, state.batcher


async def wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def encode(
    state: ServiceState, request: Request, texts: list[str], truncate: bool
) -> Encoded | Response:
    """Validate, tokenise and run `texts`; a Response is returned only when the client went away."""
    started = time.perf_counter()
    model, batcher = ready_model(state)
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
    texts = [text[: settings.max_input_chars] for text in texts]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.request_timeout_s
    state.in_flight += 1
    try:
        with batcher.arriving():
            tokenize_started = time.perf_counter()
            tokenized = await asyncio.to_thread(model.tokenizer.encode, texts)
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
        inference = asyncio.ensure_future(batcher.infer(tokenized.token_ids, deadline))
        disconnect = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait((inference, disconnect), return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_gone = not inference.done()
            # Whichever is still pending goes: a cancelled inference has its queued items dropped.
            inference.cancel()
            disconnect.cancel()
        if client_gone:
            state.metrics.rejected.labels(reason=CLIENT_DISCONNECTED).inc()
            return Response(status_code=CLIENT_CLOSED_STATUS)
        result = inference.result()  # raises the request's ServiceError (429, 504, 500)
        # Counted once served, so that rejected requests (e.g. 429s under overload) do not inflate them.
        state.metrics.input_tokens.inc(token_count)
        state.metrics.truncated_inputs.inc(sum(tokenized.truncated))
        return Encoded(result, token_count, tokenize_seconds, started)
    finally:
        state.in_flight -= 1


def check_dimensions(dimensions: int | None, model: LoadedModel) -> None:
    # Checked before the model runs, so an invalid request costs no inference.
    dim = model.manifest.embedding.dim
    if dimensions is not None and dimensions > dim:
        raise ServiceError(
            ErrorType.VALIDATION, f"dimensions {dimensions} exceeds the model's {dim}", "dimensions"
        )


def embedding_matrix(result: InferenceResult, dimensions: int | None, normalize: bool) -> np.ndarray:
    matrix = np.stack([output.embedding for output in result.outputs])  # (N, dim)
    # Matryoshka: truncate first, then normalise the kept dimensions.
    matrix = matrix[:, :dimensions] if dimensions else matrix
    if normalize:
        norms = np.sqrt(np.einsum("nd,nd->n", matrix, matrix))[:, None]  # (N, 1)
        matrix = matrix / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(matrix, dtype=np.float32)  # orjson serialises contiguous arrays only


router = APIRouter()
TEI_ERRORS = {status: {"model": TEIError} for status in (401, 413, 422, 429, 500, 503, 504)}
OPENAI_ERRORS = {status: {"model": OpenAIError} for status in (401, 413, 422, 429, 500, 503, 504)}


@router.post("/embed", response_model=EmbedResponse, responses=TEI_ERRORS)
async def embed(body: EmbedRequest, request: Request, state: State) -> Response:
    """Embeddings, Hugging Face text-embeddings-inference compatible."""
    model, _ = ready_model(state)
    check_dimensions(body.dimensions, model)
    encoded = await encode(state, request, as_list(body.inputs), body.truncate)
    if isinstance(encoded, Response):
        return encoded
    normalize = model.manifest.embedding.normalize if body.normalize is None else body.normalize
    matrix = embedding_matrix(encoded.result, body.dimensions, normalize)
    return json_response(matrix, encoded.timing_headers())


@router.post("/classify", response_model=ClassifyResponse, responses=TEI_ERRORS)
async def classify(body: ClassifyRequest, request: Request, state: State) -> Response:
    """Label scores per input, best first (softmax, or sigmoid for multi-label; logits with raw_scores)."""
    model, _ = ready_model(state)
    classifier = model.manifest.classifier
    if classifier is None:
        raise ServiceError(ErrorType.VALIDATION, "this model has no classifier; use /embed")
    if body.top_k is not None and body.top_k > len(classifier.labels):
        raise ServiceError(
            ErrorType.VALIDATION, f"top_k {body.top_k} exceeds the {len(classifier.labels)} labels", "top_k"
        )
    encoded = await encode(state, request, as_list(body.inputs), body.truncate)
    if isinstance(encoded, Response):
        return encoded
    logits = np.stack([output.logits for output in encoded.result.outputs])  # (N, labels)
    if body.raw_scores:
        scores = logits
    elif classifier.multi_label:
        scores = 1 / (1 + np.exp(-logits))
    else:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = shifted / shifted.sum(axis=1, keepdims=True)
    top_k = body.top_k or len(classifier.labels)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    predictions = [
        [{"label": classifier.labels[label], "score": float(row[label])} for label in ranking]
        for row, ranking in zip(scores, order, strict=True)
    ]
    return json_response(predictions, encoded.timing_headers())


@router.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, responses=OPENAI_ERRORS)
async def openai_embeddings(body: OpenAIEmbeddingRequest, request: Request, state: State) -> Response:
    """Embeddings, OpenAI API compatible (always L2-normalised, like OpenAI's)."""
    model, _ = ready_model(state)
    check_dimensions(body.dimensions, model)
    encoded = await encode(state, request, as_list(body.input), truncate=True)
    if isinstance(encoded, Response):
        return encoded
    matrix = embedding_matrix(encoded.result, body.dimensions, normalize=True)
    if body.encoding_format == "base64":
        vectors: list = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in matrix]
    else:
        vectors = list(matrix)
    content = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": vector}
            for index, vector in enumerate(vectors)
        ],
        "model": body.model or model.manifest.name,
        "usage": {"prompt_tokens": encoded.token_count, "total_tokens": encoded.token_count},
    }
    return json_response(content, encoded.timing_headers())


@router.get("/health", response_model=Status)
async def health() -> Status:
    return Status(status="ok")


@router.get("/ready", response_model=Status, responses={503: {"model": TEIError}})
async def ready(state: State) -> Status:
    ready_model(state)
    return Status(status="ready")


@router.get("/info", response_model=Info)
async def info(state: State) -> Info:
    model, _ = ready_model(state)
    manifest, settings, limits = model.manifest, state.settings, model.limits
    return Info(
        model_name=manifest.name,
        model_version=manifest.version,
        embedding_dim=manifest.embedding.dim,
        matryoshka_dims=manifest.embedding.matryoshka_dims,
        normalize_default=manifest.embedding.normalize,
        labels=manifest.classifier.labels if manifest.classifier else [],
        multi_label=manifest.classifier.multi_label if manifest.classifier else False,
        max_seq_len=manifest.max_seq_len,
        variant=model.variant,
        provider=model.runtime.provider,
        intra_op_threads=model.runtime.intra_op_threads,
        batching=BatchingInfo(
            max_batch_tokens=limits.max_batch_tokens,
            max_batch_size=limits.max_batch_size,
            max_wait_ms=limits.max_wait_ms,
            max_padding=limits.max_padding,
            max_queue_items=settings.max_queue_items,
            max_client_batch=settings.max_client_batch,
            max_input_chars=settings.max_input_chars,
            max_payload_bytes=settings.max_payload_bytes,
            request_timeout_s=settings.request_timeout_s,
        ),
        service_version=SERVICE_VERSION,
    )


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def error_response(state: ServiceState, error: ServiceError, path: str) -> JSONResponse:
    if error.error_type.reject_reason is not None:
        state.metrics.rejected.labels(reason=error.error_type.reject_reason).inc()
    return JSONResponse(error_body(error, path), error.error_type.status, headers=error_headers(error))


def install_error_handlers(app: FastAPI, state: ServiceState) -> None:
    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(state, exc, request.url.path)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        # ("body", "inputs", 3) -> "inputs.3": the client knows it sent a body.
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        param = str(first["loc"][-1]) if first["loc"] else None
        error = ServiceError(
            ErrorType.VALIDATION, f"{where}: {first['msg']}" if where else first["msg"], param
        )
        return error_response(state, error, request.url.path)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        error_type = {404: ErrorType.NOT_FOUND, 405: ErrorType.METHOD_NOT_ALLOWED}.get(
            exc.status_code, ErrorType.VALIDATION
        )
        return error_response(state, ServiceError(error_type, str(exc.detail)), request.url.path)

    async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        error = ServiceError(ErrorType.BACKEND, f"internal error: {type(exc).__name__}")
        return error_response(state, error, request.url.path)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)


def create_app(settings: Settings, model: LoadedModel | None = None) -> FastAPI:
    """The app for `settings`; `model` is loaded here (in the lifespan) unless the caller already did."""
    state = ServiceState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = model or await asyncio.to_thread(load_model, settings)
        batcher = Batcher(
            loaded.runtime, loaded.limits, settings.max_queue_items, loaded.tokenizer.pad_id, state.metrics
        )
        batcher.start()
        state.model, state.batcher = loaded, batcher
        state.metrics.set_model(
            loaded.manifest.name, loaded.manifest.version, loaded.variant, loaded.runtime.provider
        )
        state.ready = True
        logger.info("ready: %s", loaded.limits)
        yield
        state.ready = False
        await batcher.stop()

    app = FastAPI(
        title="encoder-service",
        version=SERVICE_VERSION,
        description="Embeddings and classification from an ONNX model bundle, with dynamic batching.",
        lifespan=lifespan,
    )
    app.state.service = state
    app.include_router(router)
    install_error_handlers(app, state)
    app.add_middleware(
        ServiceMiddleware,
        metrics=state.metrics,
        api_key=settings.api_key,
        max_payload_bytes=settings.max_payload_bytes,
    )
    return app
