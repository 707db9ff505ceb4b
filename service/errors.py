"""The one error type of the service and its mapping to HTTP (docs/architecture.md, "Error table").

Every failure a client can see is a `ServiceError` carrying an `ErrorType`; this module is the only
place that turns one into a status code and a JSON body, and the only one that knows which status
counts as which reason of encoder_rejected_total. TEI routes get `{"error", "error_type"}`, OpenAI
routes (`/v1/*`) get `{"error": {"message", "type", "param", "code"}}`.
"""

import json
from enum import Enum


class ErrorType(Enum):
    # value: (HTTP status, OpenAI error "type", reason label of encoder_rejected_total or None)
    VALIDATION = (422, "invalid_request_error", "validation")
    PAYLOAD_TOO_LARGE = (413, "invalid_request_error", "payload_too_large")
    # The client was too slow sending its headers or body (header_timeout_s, body_timeout_s).
    REQUEST_TIMEOUT = (408, "invalid_request_error", "request_timeout")
    # Not HTTP/1.1 as the parser reads it: a bad Content-Length, chunk framing or request line.
    MALFORMED_HTTP = (400, "invalid_request_error", "malformed_http")
    OVERLOADED = (429, "rate_limit_error", "queue_full")
    UNAUTHORIZED = (401, "authentication_error", "unauthorized")
    NOT_FOUND = (404, "invalid_request_error", None)
    METHOD_NOT_ALLOWED = (405, "invalid_request_error", None)
    TIMEOUT = (504, "timeout_error", "timeout")
    UNHEALTHY = (503, "service_unavailable_error", "unhealthy")
    BACKEND = (500, "server_error", "backend")
    # nginx's code for "client closed request": counted and logged, never seen by the (gone) client.
    CLIENT_DISCONNECTED = (499, "client_closed_request", "client_disconnected")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def openai_type(self) -> str:
        return self.value[1]

    @property
    def reject_reason(self) -> str | None:
        return self.value[2]

    @property
    def tei_name(self) -> str:
        # TEI spells its error types in CamelCase: Validation, Overloaded, Backend...
        return "".join(part.capitalize() for part in self.name.split("_"))

    @classmethod
    def for_status(cls, status: int) -> "ErrorType | None":
        """The entry with this status; each status appears once in the table."""
        return next((error_type for error_type in cls if error_type.status == status), None)


def reject_reason(status: int) -> str | None:
    """The reason label of encoder_rejected_total for a response status; None for a non-rejection."""
    error_type = ErrorType.for_status(status)
    return error_type.reject_reason if error_type else None


class ServiceError(Exception):
    def __init__(
        self, error_type: ErrorType, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.param = param
        self.code = code  # OpenAI's `code` when it names more than the type (`model_not_found`)


# Seconds a client should wait after a 429 before retrying; a batch on CPU takes tens of ms,
# so one second lets a full queue drain substantially.
RETRY_AFTER_SECONDS = 1


def openai_shaped(path: str) -> bool:
    """The OpenAI-style routes (/v1/embeddings, Cohere's /v1/rerank and /v2/rerank): errors in OpenAI's
    shape, and the model named in the body."""
    return path.startswith(("/v1/", "/v2/"))


def error_body(error: ServiceError, path: str) -> dict[str, object]:
    if openai_shaped(path):
        return {
            "error": {
                "message": error.message,
                "type": error.error_type.openai_type,
                "param": error.param,
                "code": error.code or error.error_type.tei_name,
            }
        }
    return {"error": error.message, "error_type": error.error_type.tei_name}


def error_headers(error: ServiceError) -> dict[str, str]:
    if error.error_type is ErrorType.OVERLOADED:
        return {"retry-after": str(RETRY_AFTER_SECONDS)}
    if error.error_type is ErrorType.UNAUTHORIZED:
        return {"www-authenticate": "Bearer"}
    if error.error_type in (ErrorType.REQUEST_TIMEOUT, ErrorType.MALFORMED_HTTP):
        # The rest of the request may never come, or cannot be told from the next one: close.
        return {"connection": "close"}
    return {}


def error_response_parts(error: ServiceError, path: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, raw headers and body, for places that speak ASGI directly (the middleware)."""
    body = json.dumps(error_body(error, path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.encode(), value.encode()) for name, value in error_headers(error).items()]
    return error.error_type.status, headers, body
