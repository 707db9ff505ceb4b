"""The HTTP routes that run the model, and the service's own (health, readiness, info, metrics). Each
one parses its body (pydantic, service/schemas.py), calls the encode pipeline (service/pipeline.py)
and the post-processing (service/postprocess.py), and shapes the answer; status codes come only from
the error table (service/errors.py). The tokenizer's routes are in service/tokenizer_routes.py.

TEI's `POST /` answers as the route of the model's kind (`ROOT_ROUTES`).

Each route answers for one model (`route_model`): the one named by the OpenAI `model` field, or by the
path's /models/{name}/ prefix (service/middleware.py), or else the default model.
"""

import json
import os
import uuid
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from bundle import Manifest
from service.errors import ErrorType, ServiceError
from service.middleware import REQUESTED_MODEL, SERVED_MODEL
from service.pipeline import (
    Encoded,
    ModelInput,
    check_classifier,
    check_dimensions,
    check_embedder,
    check_query,
    check_reranker,
    encode,
    resolve_prompt,
)
from service.postprocess import (
    base64_rows,
    embedding_matrix,
    label_scores,
    ranked,
    relevance_scores,
    similarities,
    top_labels,
)
from service.registry import ServedVersion
from service.responses import json_response
from service.schemas import (
    BatchingInfo,
    ClassifyRequest,
    ClassifyResponse,
    CohereRerankRequest,
    CohereRerankResponse,
    CohereV2RerankRequest,
    CohereV2RerankResponse,
    EmbedRequest,
    EmbedResponse,
    Info,
    OpenAIEmbeddingRequest,
    OpenAIEmbeddingResponse,
    OpenAIError,
    PredictRequest,
    PredictResponse,
    RerankRequest,
    RerankResponse,
    SimilarityParameters,
    SimilarityRequest,
    SimilarityResponse,
    Status,
    TEIClassifierModel,
    TEIClassifierType,
    TEIEmbeddingModel,
    TEIEmbeddingType,
    TEIError,
    TEIRerankerType,
    TruncationDirection,
    as_list,
    cut_side,
    pair_batch,
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
    ErrorType.NOT_FOUND,
    ErrorType.OVERLOADED,
    ErrorType.BACKEND,
    ErrorType.UNHEALTHY,
    ErrorType.TIMEOUT,
)
TEI_ERRORS: dict[int | str, dict[str, Any]] = {
    error.status: {"model": TEIError} for error in INFERENCE_ERRORS
}
OPENAI_ERRORS = {error.status: {"model": OpenAIError} for error in INFERENCE_ERRORS}


async def service_state(request: Request) -> ServiceState:
    # async: FastAPI runs a plain `def` dependency on its thread pool, a thread hop per request.
    return request.app.state.service


State = Annotated[ServiceState, Depends(service_state)]


def route_model(state: ServiceState, request: Request, name: str | None = None) -> ServedVersion:
    """The model version that answers this request: `name` (the OpenAI `model` field), else the one the
    path's /models/{name}/ prefix names, else the default model; 404 for a model that is not served."""
    served = state.ready_model(name or request.scope.get(REQUESTED_MODEL))
    request.scope[SERVED_MODEL] = served.name  # the middleware's `model` label
    return served


router = APIRouter()


@router.post("/embed", response_model=EmbedResponse, responses=TEI_ERRORS)
async def embed(body: EmbedRequest, request: Request, state: State) -> Response:
    """Embeddings, Hugging Face text-embeddings-inference compatible: L2-normalised unless
    normalize is false, whatever the model (TEI's default)."""
    served = route_model(state, request)
    check_embedder(served.model)
    check_dimensions(body.dimensions, served.model)
    prompt = resolve_prompt(body.prompt_name, served.model)
    side = cut_side(body.truncation_direction)
    encoded = await encode(state, request, served, as_list(body.inputs), body.truncate, side, prompt)
    matrix = embedding_matrix(encoded.embeddings(), body.dimensions, body.normalize)
    return await json_response(matrix, encoded.timing_headers())


@router.post("/classify", response_model=ClassifyResponse, responses=TEI_ERRORS)
async def classify(body: ClassifyRequest, request: Request, state: State) -> Response:
    """Label scores per input, best first (softmax, or sigmoid for multi-label; logits with raw_scores)."""
    served = route_model(state, request)
    classifier = check_classifier(body.top_k, served.model)
    side = cut_side(body.truncation_direction)
    encoded = await encode(state, request, served, as_list(body.inputs), body.truncate, side)
    scores = label_scores(encoded.logits(), classifier.multi_label, body.raw_scores)
    return await json_response(top_labels(scores, classifier.labels, body.top_k), encoded.timing_headers())


@router.post("/predict", response_model=PredictResponse, responses=TEI_ERRORS)
async def predict(body: PredictRequest, request: Request, state: State) -> Response:
    """Label scores in TEI's /predict shape: a text or a pair [text, text] gets its labels, best first;
    a batch ([[text], [text, text], ...]) gets one such list per input."""
    served = route_model(state, request)
    classifier = check_classifier(None, served.model)
    batch, single = pair_batch(body.inputs)
    side = cut_side(body.truncation_direction)
    encoded = await encode(state, request, served, batch, body.truncate, side)
    scores = label_scores(encoded.logits(), classifier.multi_label, body.raw_scores)
    predictions = top_labels(scores, classifier.labels, None)
    return await json_response(predictions[0] if single else predictions, encoded.timing_headers())


@router.post("/similarity", response_model=SimilarityResponse, responses=TEI_ERRORS)
async def similarity(body: SimilarityRequest, request: Request, state: State) -> Response:
    """Cosine similarity of inputs.source_sentence with each of inputs.sentences, in their order."""
    served = route_model(state, request)
    check_embedder(served.model)
    parameters = body.parameters or SimilarityParameters()
    prompt = resolve_prompt(parameters.prompt_name, served.model)
    texts: list[str] = [body.inputs.source_sentence, *body.inputs.sentences]
    side = cut_side(parameters.truncation_direction)
    encoded = await encode(state, request, served, list(texts), parameters.truncate, side, prompt)
    return await json_response(similarities(encoded.embeddings()), encoded.timing_headers())


@router.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, responses=OPENAI_ERRORS)
async def openai_embeddings(body: OpenAIEmbeddingRequest, request: Request, state: State) -> Response:
    """Embeddings, OpenAI API compatible (always L2-normalised, like OpenAI's; the model's default
    prompt, if it has one, goes before each text). `model` names the model (none: the default one);
    the answer's `model` is the name and version that served it ("search@2")."""
    served = route_model(state, request, body.model)
    check_embedder(served.model)
    check_dimensions(body.dimensions, served.model)
    prompt = resolve_prompt(None, served.model)
    encoded = await encode(state, request, served, as_list(body.input), truncate=True, prompt=prompt)
    matrix = embedding_matrix(encoded.embeddings(), body.dimensions, normalize=True)
    vectors: list = base64_rows(matrix) if body.encoding_format == "base64" else list(matrix)
    content = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": vector}
            for index, vector in enumerate(vectors)
        ],
        "model": encoded.model_id,
        "usage": {"prompt_tokens": encoded.token_count, "total_tokens": encoded.token_count},
    }
    return await json_response(content, encoded.timing_headers())


async def rerank_pairs(
    state: ServiceState,
    request: Request,
    served: ServedVersion,
    query: str,
    texts: list[str],
    truncate: bool,
    direction: TruncationDirection = "Right",
) -> Encoded:
    """Run (query, text) pairs through a reranker: 422 before any inference for another kind of model or
    a query too long to leave room for a text; pairs are cut from the text's side only."""
    check_reranker(served.model)
    check_query(query, served.model)
    pairs: list[ModelInput] = [(query, text) for text in texts]
    return await encode(state, request, served, pairs, truncate, cut_side(direction), pair_cut="only_second")


@router.post("/rerank", response_model=RerankResponse, responses=TEI_ERRORS)
async def rerank(body: RerankRequest, request: Request, state: State) -> Response:
    """The relevance of each text to the query, most relevant first (TEI's /rerank): the sigmoid of the
    cross-encoder's logit, or the logit with raw_scores."""
    served = route_model(state, request)
    encoded = await rerank_pairs(
        state, request, served, body.query, body.texts, body.truncate, body.truncation_direction
    )
    logits = encoded.logits()
    scores = relevance_scores(logits, body.raw_scores)
    # Ordered by the logits: sigmoids of large logits round to the same float.
    results = [
        {"index": index, "score": float(scores[index])}
        | ({"text": body.texts[index]} if body.return_text else {})
        for index in ranked(logits[:, 0])
    ]
    return await json_response(results, encoded.timing_headers())


@router.post("/v1/rerank", response_model=CohereRerankResponse, responses=OPENAI_ERRORS)
async def cohere_rerank(body: CohereRerankRequest, request: Request, state: State) -> Response:
    """The `top_n` most relevant documents, Cohere's and Jina's rerank API (what the `cohere` client's
    rerank posts): relevance_score is the sigmoid of the cross-encoder's logit. `model` names the model
    (none: the default one); the answer's `model` is the name and version that served it."""
    texts = body.texts()
    encoded, results = await cohere_results(state, request, body.model, body.query, texts, body.top_n)
    if body.return_documents:
        results = [result | {"document": {"text": texts[result["index"]]}} for result in results]
    content = {
        "id": str(uuid.uuid4()),
        "results": results,
        "model": encoded.model_id,
        "meta": {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}},
        "usage": {"total_tokens": encoded.token_count},
    }
    return await json_response(content, encoded.timing_headers())


@router.post("/v2/rerank", response_model=CohereV2RerankResponse, responses=OPENAI_ERRORS)
async def cohere_v2_rerank(body: CohereV2RerankRequest, request: Request, state: State) -> Response:
    """Cohere's v2 rerank (what `cohere.ClientV2`'s rerank posts): as /v1/rerank, without documents
    echoed back."""
    encoded, results = await cohere_results(
        state, request, body.model, body.query, body.documents, body.top_n
    )
    content = {
        "id": str(uuid.uuid4()),
        "results": results,
        "model": encoded.model_id,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
    }
    return await json_response(content, encoded.timing_headers())


async def cohere_results(
    state: ServiceState, request: Request, model: str | None, query: str, texts: list[str], top_n: int | None
) -> tuple[Encoded, list[dict[str, Any]]]:
    """The `top_n` best of Cohere's rerank results, best first: the sigmoid of the cross-encoder's logit
    (ordered by the logits: sigmoids of large logits round to the same float)."""
    served = route_model(state, request, model)
    encoded = await rerank_pairs(state, request, served, query, texts, truncate=True)
    logits = encoded.logits()
    scores = relevance_scores(logits, raw_scores=False)
    results = [
        {"index": index, "relevance_score": float(scores[index])} for index in ranked(logits[:, 0], top_n)
    ]
    return encoded, results


ModelKind = Literal["embedding", "classifier", "reranker"]


def model_kind(manifest: Manifest) -> ModelKind:
    """What TEI would call the model: a reranker or a classifier by its head, else an embedding model."""
    if manifest.reranker is not None:
        return "reranker"
    return "classifier" if manifest.classifier is not None else "embedding"


RootHandler = Callable[[Any, Request, ServiceState], Awaitable[Response]]
# TEI's router serves POST / as the route of the model's kind; so does this one.
ROOT_ROUTES: dict[ModelKind, tuple[type[BaseModel], RootHandler]] = {
    "embedding": (EmbedRequest, embed),
    "classifier": (PredictRequest, predict),
    "reranker": (RerankRequest, rerank),
}


def parse_body(body_model: type[BaseModel], body: bytes) -> BaseModel:
    """What FastAPI does with a declared body, for the routes that read it themselves (POST /, the
    direct path): the same 422s, through the same handler (service/error_handlers.py)."""
    return validate_body(body_model, parse_json(body))


def parse_json(body: bytes) -> Any:
    """The body's JSON as json.loads (FastAPI's parser) reads it. orjson parses first, 2x faster on a
    big batch; it refuses what json.loads takes (lone surrogate escapes, which then get the schema's 422
    naming the input; NaN; integers past 64 bits), and json.loads decides those, with its error's line
    and column."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except json.JSONDecodeError as error:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", error.pos), "msg": "JSON decode error", "input": {}}]
        ) from error
    except UnicodeDecodeError:
        raise ServiceError(ErrorType.VALIDATION, "the body is not UTF-8 JSON") from None


def validate_body(body_model: type[BaseModel], payload: Any) -> BaseModel:
    try:
        return body_model.model_validate(payload)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None


def _any_of(*names: str) -> dict[str, Any]:
    refs = [{"$ref": f"#/components/schemas/{name}"} for name in names]
    return {"content": {"application/json": {"schema": {"anyOf": refs}}}}


@router.post(
    "/",
    responses={
        200: {"description": "as /embed, /predict or /rerank"}
        | _any_of("EmbedResponse", "PredictResponse", "RerankResponse")
    }
    | TEI_ERRORS,
    openapi_extra={
        "requestBody": {"required": True} | _any_of("EmbedRequest", "PredictRequest", "RerankRequest")
    },
)
async def root(request: Request, state: State) -> Response:
    """TEI's default route, as TEI serves it: /rerank for a reranker, /predict for a model with a
    classifier, /embed otherwise (what Hugging Face's InferenceClient posts to when given the service's
    URL)."""
    served = route_model(state, request)
    body_model, handler = ROOT_ROUTES[model_kind(served.model.manifest)]
    return await handler(parse_body(body_model, await request.body()), request, state)


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


# TEI's names for the variants' number formats.
VARIANT_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}


@router.api_route("/info", methods=["GET", "HEAD"], response_model=Info)
async def info(request: Request, state: State) -> Info:
    """TEI's /info for the model the path names (the default one at /info), with every served model
    described under `models` (at /info; at /models/{name}/info, that model alone)."""
    served = route_model(state, request)
    if request.scope.get(REQUESTED_MODEL) is not None:
        return model_info(served, state)
    every = [model_info(version, state) for version in state.registry.versions()]
    return model_info(served, state).model_copy(update={"models": every})


def model_info(served: ServedVersion, state: ServiceState) -> Info:
    model = served.model
    manifest, settings, limits = model.manifest, state.settings, model.limits
    model_type: TEIClassifierType | TEIEmbeddingType | TEIRerankerType
    if manifest.reranker is not None:
        # One relevance logit, labelled as Hugging Face names an unnamed label.
        model_type = TEIRerankerType(
            reranker=TEIClassifierModel(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        )
    elif manifest.classifier is not None:
        labels = manifest.classifier.labels
        model_type = TEIClassifierType(
            classifier=TEIClassifierModel(
                id2label={str(index): label for index, label in enumerate(labels)},
                label2id={label: index for index, label in enumerate(labels)},
            )
        )
    else:
        model_type = TEIEmbeddingType(embedding=TEIEmbeddingModel(pooling=manifest.embedding.pooling))
    return Info(
        model_id=manifest.name,
        model_sha=manifest.variants[model.variant].sha256,
        model_dtype=VARIANT_DTYPES[model.variant],
        model_type=model_type,
        served_model_name=served.name,
        max_concurrent_requests=settings.max_queue_items,
        max_input_length=manifest.max_seq_len,
        max_batch_tokens=limits.max_batch_tokens,
        max_batch_requests=limits.max_batch_size,
        max_client_batch_size=settings.max_client_batch,
        auto_truncate=True,  # truncate defaults to true here
        # encode_batch spreads each request over the tokenizer's Rust pool, one thread per usable core.
        tokenization_workers=len(os.sched_getaffinity(0)),
        version=SERVICE_VERSION,
        model_name=manifest.name,
        model_version=manifest.version,
        embedding_dim=manifest.embedding.dim,
        matryoshka_dims=manifest.embedding.matryoshka_dims,
        normalize_default=True,
        labels=manifest.classifier.labels if manifest.classifier else [],
        multi_label=manifest.classifier.multi_label if manifest.classifier else False,
        max_seq_len=manifest.max_seq_len,
        variant=model.variant,
        provider=model.runtime.provider,
        intra_op_threads=model.runtime.intra_op_threads,
        prompts=manifest.embedding.prompts,
        default_prompt_name=manifest.embedding.default_prompt_name,
        batching=BatchingInfo(
            max_batch_tokens=limits.max_batch_tokens,
            max_batch_size=limits.max_batch_size,
            max_wait_ms=limits.max_wait_ms,
            max_padding=limits.max_padding,
            concurrent_batches=limits.concurrent_batches,
            max_queue_items=settings.max_queue_items,
            max_client_batch=settings.max_client_batch,
            max_input_chars=settings.max_input_chars,
            max_payload_bytes=settings.max_payload_bytes,
            request_timeout_s=settings.request_timeout_s,
        ),
        service_version=SERVICE_VERSION,
        resident_bytes=model.resident_bytes,
    )


@router.api_route("/metrics", methods=["GET", "HEAD"], response_class=Response)
async def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
