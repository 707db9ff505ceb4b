"""The HTTP routes. Each one parses its body (pydantic, service/schemas.py), calls the encode pipeline
(service/pipeline.py) and the post-processing (service/postprocess.py), and shapes the answer; status
codes come only from the error table (service/errors.py)."""

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.errors import ErrorType
from service.pipeline import check_classifier, check_dimensions, encode
from service.postprocess import base64_rows, embedding_matrix, label_scores, top_labels
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
from service.state import ServiceState

try:
    SERVICE_VERSION = version("encoder-service")
except PackageNotFoundError:
    SERVICE_VERSION = "0.0.0"

# The errors an inference route can answer with, for the OpenAPI document.
INFERENCE_ERRORS = (
    ErrorType.UNAUTHORIZED,
    ErrorType.PAYLOAD_TOO_LARGE,
    ErrorType.VALIDATION,
    ErrorType.OVERLOADED,
    ErrorType.BACKEND,
    ErrorType.UNHEALTHY,
    ErrorType.TIMEOUT,
)
TEI_ERRORS = {error.status: {"model": TEIError} for error in INFERENCE_ERRORS}
OPENAI_ERRORS = {error.status: {"model": OpenAIError} for error in INFERENCE_ERRORS}


def service_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(service_state)]


def json_response(content: object, headers: dict[str, str] | None = None) -> Response:
    # Rendered directly, numpy arrays included: response_model validation and json.dumps of thousands
    # of floats were the largest costs on the event loop (0.75 ms per 8x256 response; orjson: 0.04 ms).
    body = orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, media_type="application/json", headers=headers)


router = APIRouter()


@router.post("/embed", response_model=EmbedResponse, responses=TEI_ERRORS)
async def embed(body: EmbedRequest, request: Request, state: State) -> Response:
    """Embeddings, Hugging Face text-embeddings-inference compatible."""
    model, _ = state.ready_model()
    check_dimensions(body.dimensions, model)
    encoded = await encode(state, request, as_list(body.inputs), body.truncate)
    normalize = model.manifest.embedding.normalize if body.normalize is None else body.normalize
    matrix = embedding_matrix(encoded.embeddings(), body.dimensions, normalize)
    return json_response(matrix, encoded.timing_headers())


@router.post("/classify", response_model=ClassifyResponse, responses=TEI_ERRORS)
async def classify(body: ClassifyRequest, request: Request, state: State) -> Response:
    """Label scores per input, best first (softmax, or sigmoid for multi-label; logits with raw_scores)."""
    model, _ = state.ready_model()
    classifier = check_classifier(body.top_k, model)
    encoded = await encode(state, request, as_list(body.inputs), body.truncate)
    scores = label_scores(encoded.logits(), classifier.multi_label, body.raw_scores)
    return json_response(top_labels(scores, classifier.labels, body.top_k), encoded.timing_headers())


@router.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, responses=OPENAI_ERRORS)
async def openai_embeddings(body: OpenAIEmbeddingRequest, request: Request, state: State) -> Response:
    """Embeddings, OpenAI API compatible (always L2-normalised, like OpenAI's)."""
    model, _ = state.ready_model()
    check_dimensions(body.dimensions, model)
    encoded = await encode(state, request, as_list(body.input), truncate=True)
    matrix = embedding_matrix(encoded.embeddings(), body.dimensions, normalize=True)
    vectors: list = base64_rows(matrix) if body.encoding_format == "base64" else list(matrix)
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


# HEAD as well as GET on the routes that only read: load balancers and monitors probe with HEAD.
@router.api_route("/health", methods=["GET", "HEAD"], response_model=Status)
async def health() -> Status:
    return Status(status="ok")


@router.api_route(
    "/ready",
    methods=["GET", "HEAD"],
    response_model=Status,
    responses={ErrorType.UNHEALTHY.status: {"model": TEIError}},
)
async def ready(state: State) -> Status:
    state.ready_model()
    return Status(status="ready")


@router.api_route("/info", methods=["GET", "HEAD"], response_model=Info)
async def info(state: State) -> Info:
    model, _ = state.ready_model()
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


@router.api_route("/metrics", methods=["GET", "HEAD"], response_class=Response)
async def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
