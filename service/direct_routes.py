"""The inference routes' direct path: the service middleware hands a JSON request for one of these
routes straight to the route's function, past FastAPI's layers.

At one text per request, FastAPI and Starlette between the ASGI server and the route (their
middlewares, routing, dependency solving, request and response objects) took a third of the event
loop's time (BENCHMARKS.md, "Concurrency 1, one text"). The path here does what those layers do for
these routes, with the same functions: the body parsed by `parse_json` and validated by
`validate_body` (the 422s FastAPI gives), the route's own function, the error handlers of
service/error_handlers.py. The routes stay declared on FastAPI's router too, for the OpenAPI document
and for every request this path does not take (another method, a body that is not declared JSON).
"""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, NamedTuple

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from service.batcher import overloaded
from service.error_handlers import on_service_error, on_validation_error
from service.errors import ServiceError, openai_shaped
from service.middleware import REQUESTED_MODEL, SERVED_MODEL
from service.routes import (
    classify,
    cohere_rerank,
    cohere_v2_rerank,
    embed,
    openai_embeddings,
    parse_json,
    predict,
    rerank,
    similarity,
    validate_body,
)
from service.schemas import (
    ClassifyRequest,
    CohereRerankRequest,
    CohereV2RerankRequest,
    EmbedRequest,
    OpenAIEmbeddingRequest,
    PredictRequest,
    RerankRequest,
    SimilarityRequest,
)
from service.state import ServiceState

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Handler = Callable[[Any, Request, ServiceState], Awaitable[Response]]


class DirectRoute(NamedTuple):
    body_model: type[BaseModel]
    handler: Handler
    # The body's member that holds the inputs, measured for an early 429 when it is a list of texts (a
    # reranker's texts are measured without their query: a lower bound, as the early 429 needs).
    inputs_field: str


DIRECT_ROUTES: dict[str, DirectRoute] = {
    "/embed": DirectRoute(EmbedRequest, embed, "inputs"),
    "/classify": DirectRoute(ClassifyRequest, classify, "inputs"),
    "/predict": DirectRoute(PredictRequest, predict, "inputs"),
    "/similarity": DirectRoute(SimilarityRequest, similarity, "inputs"),
    "/rerank": DirectRoute(RerankRequest, rerank, "texts"),
    "/v1/embeddings": DirectRoute(OpenAIEmbeddingRequest, openai_embeddings, "input"),
    "/v1/rerank": DirectRoute(CohereRerankRequest, cohere_rerank, "documents"),
    "/v2/rerank": DirectRoute(CohereV2RerankRequest, cohere_v2_rerank, "documents"),
}


def takes_direct_path(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    """A POST to a direct route whose body is declared JSON (`application/json` or
    `application/*+json`, as FastAPI reads it); any other body FastAPI reads as bytes and answers its
    own 422, so those go the FastAPI way."""
    if scope["method"] != "POST" or scope["path"] not in DIRECT_ROUTES:
        return False
    media_type = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
    return media_type == b"application/json" or (
        media_type.startswith(b"application/") and media_type.endswith(b"+json")
    )


def text_inputs(payload: Any, inputs_field: str) -> list[str]:
    """A parsed body's inputs when they are texts (a text or a list of texts); none otherwise (token
    IDs, or a body that validation will refuse)."""
    inputs = payload.get(inputs_field) if isinstance(payload, dict) else None
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, list) and set(map(type, inputs)) == {str}:  # C speed: on a flood's path
        return inputs
    return []


async def serve_direct(scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    """Answer the request as its FastAPI route would. A request of texts the queue has no room for is
    refused (429) once they are measured (as admission measures them, service/batcher.py), before its
    body is validated: under a flood of big requests, validating each refused one cost more than
    parsing it. An unexpected exception
    propagates to the server-error middleware around this one, whose handler answers the documented
    500."""
    request = Request(scope, receive)
    route = DIRECT_ROUTES[scope["path"]]
    state: ServiceState = scope["app"].state.service
    try:
        payload = parse_json(body)
        texts = text_inputs(payload, route.inputs_field)
        refusing = state.refusing_model(scope[REQUESTED_MODEL], openai_shaped(scope["path"]), texts)
        if refusing is not None:
            scope[SERVED_MODEL] = refusing
            raise overloaded()
        response = await route.handler(validate_body(route.body_model, payload), request, state)
    except ServiceError as error:
        response = await on_service_error(request, error)
    except RequestValidationError as error:
        response = await on_validation_error(request, error)
    await response(scope, receive, send)
