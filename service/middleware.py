"""Pure ASGI middleware in front of every route: request metrics, the API key, the payload limit and the
body's deadline.

Every response passes here, so this is the one place that counts requests and rejections
(encoder_rejected_total, by the reason the error table gives the response's status).

Each model's routes are also served under /models/{name}/ (for example /models/search/embed): this
layer takes the prefix off the path before routing, and leaves the name in the scope for the route
to resolve (`REQUESTED_MODEL`), so TEI clients given the base URL http://host/models/search work
unchanged; the route leaves the name of the model that answered (`SERVED_MODEL`) for the metrics.

Pure ASGI (not BaseHTTPMiddleware) because it runs on every request and must not add a task hop, and
because a body over the limit has to be refused while it streams in, before the app reads it. A JSON
request for an inference route is then answered by the direct path (service/direct_routes.py), past
FastAPI's layers; every other request goes on to the FastAPI app. The body
is read here, under body_timeout_s, and replayed to the app: a client that stops sending gets 408
instead of holding the request open (the headers' deadline is service/http_protocol.py's).
"""

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.batcher import overloaded
from service.errors import ErrorType, ServiceError, error_response_parts, openai_shaped
from service.metrics import INFERENCE_ROUTES, MODEL_ROUTES, Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Routes that queue work: refused with 429 before their body is read while the queue is full.
INFERENCE_PATHS = frozenset(INFERENCE_ROUTES)

MODEL_PREFIX = "/models/"
# Scope keys: the model named by the path prefix (None without one), and the model that answered.
REQUESTED_MODEL = "encoder.requested_model"
SERVED_MODEL = "encoder.served_model"

# Whether `model`'s queue (None: the default model's) refuses a request of these texts (none: the body
# is not read yet); the model's name if so (service/state.py). The second argument says the request
# names its model in its body.
RefusalCheck = Callable[[str | None, bool, list[str]], str | None]
# The inference routes' direct path (service/direct_routes.py): whether a request takes it (from its
# scope and headers), and the handler that answers it, given the body read here.
DirectCheck = Callable[[Scope, dict[bytes, bytes]], bool]
DirectHandler = Callable[[Scope, Receive, Send, bytes], Awaitable[None]]


def split_model_path(path: str) -> tuple[str | None, str]:
    """("search", "/embed") for /models/search/embed; (None, path) for a path without a model prefix,
    or one whose rest is not a model's route (left for the router to answer 404)."""
    if not path.startswith(MODEL_PREFIX):
        return None, path
    name, _, rest = path.removeprefix(MODEL_PREFIX).partition("/")
    route = "/" + rest
    if not name or route not in MODEL_ROUTES:
        return None, path
    return name, route


# Reachable without the API key: probes, the scraper, and the API documentation.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


class ServiceMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        api_key: str | None,
        max_payload_bytes: int,
        body_timeout_s: float,
        refusing_model: RefusalCheck,
        takes_direct_path: DirectCheck,
        serve_direct: DirectHandler,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_payload_bytes = max_payload_bytes
        self.body_timeout_s = body_timeout_s
        self.refusing_model = refusing_model
        self.takes_direct_path = takes_direct_path
        self.serve_direct = serve_direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        requested, path = split_model_path(scope["path"])
        if requested is not None:
            scope = dict(scope, path=path, raw_path=path.encode())
        scope[REQUESTED_MODEL] = requested
        status = 500  # if the app dies before answering, the server answers 500 (a backend error)

        async def send_and_observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            error = self._check_headers(path, headers)
            if error is None and path in INFERENCE_PATHS:
                # Under a flood most requests arrive while the queue is full: answering them before
                # reading and parsing their body keeps a 429 cheap (the pipeline admits the others).
                full = self.refusing_model(requested, openai_shaped(path), [])
                if full is not None:
                    scope[SERVED_MODEL] = full
                    error = overloaded()
            body = None
            if error is None and has_body(headers):
                receive, body, error = await self._read_body(receive)
            if error is not None:
                await self.send_error(error, path, send_and_observe)
            elif body and self.takes_direct_path(scope, headers):
                await self.serve_direct(scope, receive, send_and_observe, body)
            else:
                await self.app(scope, receive, send_and_observe)
        finally:
            model = scope.get(SERVED_MODEL) or requested
            self.metrics.observe_response(path, status, time.perf_counter() - started, model)

    def _check_headers(self, path: str, headers: dict[bytes, bytes]) -> ServiceError | None:
        if self.api_key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return ServiceError(
                    ErrorType.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer)"
                )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_payload_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> ServiceError:
        return ServiceError(
            ErrorType.PAYLOAD_TOO_LARGE, f"request body exceeds max_payload_bytes ({self.max_payload_bytes})"
        )

    async def _read_body(self, receive: Receive) -> tuple[Receive, bytes, ServiceError | None]:
        """Read the whole body, up to the size limit and within body_timeout_s; -> a receive that
        replays it, the body, or the error."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # gone before the body was complete
                        return (
                            receive,
                            b"",
                            ServiceError(ErrorType.CLIENT_DISCONNECTED, "the client closed the connection"),
                        )
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_payload_bytes:  # a chunked body declares no size up front
                        return receive, b"", self._too_large()
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            message = f"the request body did not arrive within body_timeout_s ({self.body_timeout_s:g} s)"
            return receive, b"", ServiceError(ErrorType.REQUEST_TIMEOUT, message)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, body, None

    async def send_error(self, error: ServiceError, path: str, send: Send) -> None:
        status, headers, body = error_response_parts(error, path)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def has_body(headers: dict[bytes, bytes]) -> bool:
    declared = headers.get(b"content-length")
    if declared is not None:
        return declared != b"0"
    return b"transfer-encoding" in headers
