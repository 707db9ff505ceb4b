"""Pure ASGI middleware in front of every route: request metrics, the API key and the payload limit.

Every response passes here, so this is the one place that counts requests and rejections
(encoder_rejected_total, by the reason the error table gives the response's status).

Pure ASGI (not BaseHTTPMiddleware) because it runs on every request and must not add a task hop, and
because a body over the limit has to be refused while it streams in, before the app reads it.
"""

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.errors import ErrorType, ServiceError, error_response_parts, reject_reason
from service.metrics import OTHER_ROUTE, ROUTES, Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Reachable without the API key: probes, the scraper, and the API documentation.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, api_key: str | None, max_payload_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None
        self.max_payload_bytes = max_payload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        started = time.perf_counter()
        status = 500  # if the app dies before answering, the server answers 500 (a backend error)

        async def send_and_observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            error = self._check_headers(path, headers)
            if error is None and b"content-length" not in headers and scope["method"] in ("POST", "PUT"):
                receive, error = await self._buffer_chunked_body(receive)
            if error is not None:
                await self.send_error(error, path, send_and_observe)
            else:
                await self.app(scope, receive, send_and_observe)
        finally:
            route = path if path in ROUTES else OTHER_ROUTE
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - started)
            if (reason := reject_reason(status)) is not None:
                self.metrics.rejected.labels(reason=reason).inc()

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

    async def _buffer_chunked_body(self, receive: Receive) -> tuple[Receive, ServiceError | None]:
        """A body without Content-Length (chunked) is read here, up to the limit, then replayed."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive, None  # client gone: let the app see the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_payload_bytes:
                return receive, self._too_large()
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return replay, None

    async def send_error(self, error: ServiceError, path: str, send: Send) -> None:
        status, headers, body = error_response_parts(error, path)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
