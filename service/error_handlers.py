"""FastAPI exception handlers: every exception a route can raise becomes a ServiceError, rendered by
service/errors.py (the error table). Rejections are counted by the middleware, from the status."""

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ErrorType, ServiceError, error_body, error_headers

logger = logging.getLogger("service.error_handlers")


def error_response(error: ServiceError, path: str) -> JSONResponse:
    """The error's JSON for a request to `path` (the scope's: what routing saw, which decides the
    shape; building `request.url` for it cost a fifth of a refusal under a flood)."""
    return JSONResponse(error_body(error, path), error.error_type.status, headers=error_headers(error))


async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc, request.scope["path"])


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A request body that does not parse or fails its schema: 422, naming the first field at fault."""
    assert isinstance(exc, RequestValidationError)
    if isinstance(exc.__cause__, json.JSONDecodeError):
        # FastAPI's own message gives only a character offset; line and column are what an editor shows.
        decode = exc.__cause__
        message = f"malformed JSON: {decode.msg} at line {decode.lineno} column {decode.colno}"
        return error_response(ServiceError(ErrorType.VALIDATION, message), request.scope["path"])
    message, field = describe_validation_errors(list(exc.errors()))
    return error_response(ServiceError(ErrorType.VALIDATION, message, field), request.scope["path"])


JSON_TYPE_NAMES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "dict": "object"}
PYTHON_TO_JSON = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    dict: "object",
}


def json_type_name(member: str) -> str:
    """A union member's name as a client reads it: "list[str]" -> "array of strings"."""
    if member.startswith("list[") and member.endswith("]"):
        first, _, rest = json_type_name(member[5:-1]).partition(" ")
        return f"array of {first}s{' ' + rest if rest else ''}"
    return JSON_TYPE_NAMES.get(member, member)


def is_union_member(part: object) -> bool:
    return isinstance(part, str) and (part in JSON_TYPE_NAMES or "[" in part)


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One message naming the first field at fault, and that field (OpenAI's `param`).

    A union field fails once per member, each error located under the member's name (("inputs", "str"),
    ("inputs", "list[str]", 0)). The member that got furthest is the one the client meant: its error
    is reported without the member's name ("inputs.0: ..."); if none got past the type, the message
    says what was expected ("inputs: expected string or array of strings, got integer")."""
    if not errors:
        return "invalid request", None
    locs = [[part for part in error["loc"] if part != "body"] for error in errors]  # the client knows
    first, loc = errors[0], locs[0]
    member_at = next(
        (position for position, part in enumerate(loc) if position and is_union_member(part)), None
    )
    if member_at is not None:
        members = [
            index
            for index, other in enumerate(locs)
            if other[:member_at] == loc[:member_at]
            and len(other) > member_at
            and is_union_member(other[member_at])
        ]
        deepest = max(members, key=lambda index: len(locs[index]))
        if len(locs[deepest]) == member_at + 1:  # every member failed on the type itself
            expected = " or ".join(json_type_name(str(locs[index][member_at])) for index in members)
            got = PYTHON_TO_JSON.get(type(first["input"]), "null")
            return f"{'.'.join(map(str, loc[:member_at]))}: expected {expected}, got {got}", str(loc[0])
        first, loc = errors[deepest], locs[deepest][:member_at] + locs[deepest][member_at + 1 :]
    where = ".".join(str(part) for part in loc)
    return (f"{where}: {first['msg']}" if where else first["msg"]), (str(loc[0]) if loc else None)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route 404, wrong method 405) in the service's JSON shape."""
    assert isinstance(exc, StarletteHTTPException)
    error_type = ErrorType.for_status(exc.status_code) or ErrorType.VALIDATION
    return error_response(ServiceError(error_type, str(exc.detail)), request.scope["path"])


async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.scope["path"])
    error = ServiceError(ErrorType.BACKEND, f"internal error: {type(exc).__name__}")
    return error_response(error, request.scope["path"])


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
