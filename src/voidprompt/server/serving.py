"""The uvicorn server behind ``voidprompt serve``, with bounds on connections.

uvicorn closes a keep-alive connection that stays silent after a response, and answers 503 to
requests beyond ``limit_concurrency``, but it never closes a connection that has not finished
sending a request: an idle socket, or a client sending its head a byte at a time (slowloris),
stays open for as long as the client likes, and so do their file descriptors. The protocol here
adds what is missing:

- a deadline for each request's head (:attr:`Limits.header_timeout`), counted from the moment
  the connection opens or the previous response ends, however many bytes arrive meanwhile;
- a minimum body rate (:attr:`Limits.min_body_rate` bytes per second after the same grace);
- at most :attr:`Limits.max_connections` open connections: one beyond them is answered 503 and
  closed at once.

A connection that misses a deadline is closed without an answer, as uvicorn closes an expired
keep-alive connection. A request being handled (a generation that takes minutes) has no deadline.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from voidprompt.server.limits import Limits

__all__ = ["guarded_protocol", "uvicorn_config"]

# How often a request body's arrival is checked against the minimum rate.
BODY_CHECK_INTERVAL = 0.25

_BUSY_BODY = b'{"detail":"too many open connections to this server; try again shortly"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


def uvicorn_config(
    app: Any, *, host: str, port: int, limits: Limits, log_level: str = "info"
) -> uvicorn.Config:
    """uvicorn's settings for ``app``, with ``limits``' connection bounds."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(limits),
        # uvicorn counts open connections and running requests against this: above the cap, so
        # that admitted connections are served, while requests whose client left (a generation
        # still running) stay bounded too.
        limit_concurrency=2 * limits.max_connections,
        timeout_keep_alive=limits.keep_alive_timeout,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_graceful_shutdown=5,
    )


def guarded_protocol(limits: Limits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the deadlines and the connection cap of ``limits``."""
    refused = itertools.count(1)  # per server: a flood is logged once per thousand refusals

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._deadline: asyncio.TimerHandle | None = None
            self._body_received = 0
            self._body_started = 0.0
            over = len(self.connections) >= limits.max_connections
            super().connection_made(transport)
            if over:
                count = next(refused)
                if count % 1000 == 1:
                    self.logger.warning(
                        "refused a connection (%d so far): %d are open already (--max-connections)",
                        count,
                        limits.max_connections,
                    )
                self.transport.write(_BUSY)
                self.transport.close()
                return
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_deadline()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._body_received += len(data)
            super().data_received(data)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's head is complete: its body may follow
                self._cancel_deadline()
                self._body_started = self.loop.time()
                self._body_received = 0
                self._deadline = self.loop.call_later(BODY_CHECK_INTERVAL, self._check_body)

        def on_response_complete(self) -> None:
            # Armed first: uvicorn's own handler may go straight on to a pipelined request.
            self._await_head()
            super().on_response_complete()

        def _await_head(self) -> None:
            self._cancel_deadline()
            self._deadline = self.loop.call_later(limits.header_timeout, self._head_expired)

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_expired(self) -> None:
            self._deadline = None
            self._drop()

        def _check_body(self) -> None:
            self._deadline = None
            cycle = self.cycle
            if cycle is None or not cycle.more_body or cycle.response_complete or self.transport.is_closing():
                return
            if self.flow.read_paused:
                # The application is not reading yet (its buffer is full): not the client's delay.
                self._body_started = self.loop.time()
                self._body_received = 0
            else:
                late = self.loop.time() - self._body_started - limits.header_timeout
                if late > 0 and self._body_received < limits.min_body_rate * late:
                    self._drop()
                    return
            self._deadline = self.loop.call_later(BODY_CHECK_INTERVAL, self._check_body)

        def _drop(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
