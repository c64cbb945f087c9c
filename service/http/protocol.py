"""The HTTP/1.1 connection protocol uvicorn runs (its httptools one), with what uvicorn has no setting for: a deadline
on receiving a request's headers (slow clients holding connections open), and its own rejections of unparseable
requests answered in the JSON error envelope instead of plain text.

Passed to uvicorn as `http=` by `service/cli.py` (`uvicorn_options`); the app itself never sees these requests.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.http.errors import ApiError

_REASONS = {400: b"Bad Request", 408: b"Request Timeout"}


def _envelope_response(error: ApiError) -> bytes:
    """A complete HTTP/1.1 response carrying the error envelope, closing the connection."""
    body = json.dumps(error.body()).encode()
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (error.status, _REASONS[error.status]),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
        body,
    ])


class EnvelopeHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and JSON rejections; `header_timeout_s` is set on the
    subclass `protocol_class` makes."""

    header_timeout_s: float = 30.0
    _header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a client that connects and sends nothing is timed out too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()  # each request on a kept-alive connection (idle time is uvicorn's keep-alive)

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()  # from here the body deadline (body_timeout_s, in the middleware) applies
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # never write into another request's response
            self.transport.write(_envelope_response(ApiError(
                408, "header_timeout",
                f"the request headers did not arrive within {self.header_timeout_s:g} s (header_timeout_s)",
            )))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse (a malformed request line or header, a URL over about
        64 KB), in the envelope."""
        self._disarm_header_timer()
        self.transport.write(_envelope_response(ApiError(
            400, "invalid_http_request", f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}); check the request "
            "line and headers, and keep the URL under max_url_bytes",
        )))
        self.transport.close()


def protocol_class(header_timeout_s: float) -> type[EnvelopeHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=` option, with the configured header deadline."""
    return type("EnvelopeHttpToolsProtocol", (EnvelopeHttpToolsProtocol,), {"header_timeout_s": header_timeout_s})
