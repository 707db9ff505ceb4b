"""FastAPI exception handlers: every exception a route can raise becomes a ServiceError, rendered by
service/errors.py (the error table). Rejections are counted by the middleware, from the status."""

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ErrorType, ServiceError, error_body, error_headers

logger = logging.getLogger("service.error_handlers")


def error_response(error: ServiceError, path: str) -> JSONResponse:
    return JSONResponse(error_body(error, path), error.error_type.status, headers=error_headers(error))


async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc, request.url.path)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A request body that does not parse or fails its schema: 422, naming the first field at fault."""
    assert isinstance(exc, RequestValidationError)
    if isinstance(exc.__cause__, json.JSONDecodeError):
        # FastAPI's own message gives only a character offset; line and column are what an editor shows.
        decode = exc.__cause__
        message = f"malformed JSON: {decode.msg} at line {decode.lineno} column {decode.colno}"
        return error_response(ServiceError(ErrorType.VALIDATION, message), request.url.path)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    # ("body", "inputs", 3) -> "inputs.3": the client knows it sent a body.
    where = ".".join(str(part) for part in first["loc"] if part != "body")
    param = str(first["loc"][-1]) if first["loc"] else None
    error = ServiceError(ErrorType.VALIDATION, f"{where}: {first['msg']}" if where else first["msg"], param)
    return error_response(error, request.url.path)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route 404, wrong method 405) in the service's JSON shape."""
    assert isinstance(exc, StarletteHTTPException)
    error_type = ErrorType.for_status(exc.status_code) or ErrorType.VALIDATION
    return error_response(ServiceError(error_type, str(exc.detail)), request.url.path)


async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    error = ServiceError(ErrorType.BACKEND, f"internal error: {type(exc).__name__}")
    return error_response(error, request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
