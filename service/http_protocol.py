"""uvicorn's httptools protocol with what uvicorn lacks at the HTTP level (docs/architecture.md, "Life of a
request"): a deadline for the request headers, and the service's JSON errors where uvicorn answers in
plain text.

- A client has `header_timeout_s` from connecting (or from the first byte of its next request on a
  kept-alive connection) to the end of the headers; after that it gets 408 in the documented JSON
  shape and the connection is closed. A slow sender cannot hold a connection, and a task, forever.
  The body's deadline is the middleware's (service/middleware.py), where the response can still be
  counted per route.
- A request the parser rejects (a bad Content-Length, bad chunk framing, a broken request line) gets
  400 in the JSON shape instead of uvicorn's plain text.
- A response's status line and headers leave in the same write as its first body bytes. uvicorn writes
  them separately; a replica killed between the two writes leaves a proxy holding a response head it
  has already passed on and cannot retry, so the client sees a torn response instead of a retried one.

Both are counted in encoder_requests_total (route "other") and encoder_rejected_total.
"""

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from service.errors import ErrorType, ServiceError, error_response_parts
from service.metrics import Metrics


class WholeResponseTransport:
    """The transport one request's cycle writes through: it holds the response head (the first write
    after the response has started) and sends it with the next write, the body. A HEAD request has no
    body write, so its head goes out at once; so does anything written before the response starts
    (`100 Continue`). A response closed before its body (the app failed after starting it) is dropped
    whole: a proxy retries a response that never began, never one cut after its head."""

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self.transport = transport
        self.cycle = cycle
        self.head: bytes | None = None
        self.head_seen = False

    def write(self, data: bytes) -> None:
        if not self.cycle.response_started:
            self.transport.write(data)
        elif not self.head_seen:
            self.head_seen = True
            if self.cycle.scope["method"] == "HEAD":
                self.transport.write(data)
            else:
                self.head = data
        else:
            self.transport.write(self.release_head() + data)

    def release_head(self) -> bytes:
        head, self.head = self.head or b"", None
        return head

    def close(self) -> None:
        self.head = None
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


def service_protocol(header_timeout_s: float, metrics: Metrics) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn.Config(http=...)."""

    class ServiceHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.header_timer: asyncio.TimerHandle | None = None
            self.request_path = ""
            self.waiting_since = 0.0  # loop time the header deadline counts from

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm_header_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.arm_header_timer()

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            self.request_path = self.url.decode("latin-1").partition("?")[0]

        def on_headers_complete(self) -> None:
            self.disarm_header_timer()
            super().on_headers_complete()
            # The cycle's task has been created but has not run yet, so it writes nothing before this.
            if self.cycle is not None:
                self.cycle.transport = WholeResponseTransport(self.transport, self.cycle)  # type: ignore[assignment]

        def arm_header_timer(self) -> None:
            if self.header_timer is None:
                self.waiting_since = self.loop.time()
                self.header_timer = self.loop.call_later(header_timeout_s, self.headers_too_slow)

        def disarm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_too_slow(self) -> None:
            self.header_timer = None
            message = f"the request headers did not arrive within header_timeout_s ({header_timeout_s:g} s)"
            self.answer_and_close(ServiceError(ErrorType.REQUEST_TIMEOUT, message))

        def send_400_response(self, msg: str) -> None:
            message = "malformed HTTP request (request line, headers, Content-Length or chunk framing)"
            self.answer_and_close(ServiceError(ErrorType.MALFORMED_HTTP, message))

        def answer_and_close(self, error: ServiceError) -> None:
            if self.transport.is_closing():
                return
            # Only when no response is under way, so that the answer cannot cut into another one. The
            # app may already be waiting for this request's body: it sees the disconnect.
            responding = (
                self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete
            )
            if not responding and not self.pipeline:
                status, headers, body = error_response_parts(error, self.request_path)
                head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
                self.transport.write(STATUS_LINE[status] + head + b"\r\n" + body)
                metrics.observe_response(self.request_path, status, self.loop.time() - self.waiting_since)
            self.transport.close()

    return ServiceHttpProtocol
