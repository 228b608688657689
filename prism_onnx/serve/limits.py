"""Bounds of the HTTP server: how many connections, how long a request may take to arrive, how many bodies
are read at once and how large each may be. A client that is slow on purpose (slowloris), or many large
bodies at once, cost the runner's process a bounded number of sockets and bytes.

    max_connections   connections (or requests) served at once: a request that comes while that many others
                      are open gets uvicorn's own 503 at once ("Service Unavailable", connection closed):
                      uvicorn's `limit_concurrency` of max_connections + 1 (it counts the new one too)
    header_timeout    a connection that has not sent a whole request line and headers this many seconds
                      after it opened (or after the first byte of a next request on a kept-alive one) gets
                      408 and is closed: uvicorn has no such timeout, so `LimitedH11` (uvicorn's h11 protocol
                      with a timer) adds it; an idle kept-alive connection is closed after uvicorn's
                      `timeout_keep_alive`
    body_timeout      a request body must arrive whole within this many seconds of the endpoint starting to
                      read it (408, connection closed)
    max_body_bytes    a body declared longer (Content-Length) is refused with 413 before any byte of it is
                      read, a chunked one as soon as it grows past it; either way the connection is closed
    max_bodies        bodies being read at once; a request that waits longer than body_timeout for its turn
                      gets 503

Every refusal is counted in `prism_http_refused_total{reason}` (metrics.py) and said in one log line per
reason a minute (runtime.counters.FailureSummary).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..runtime.counters import CauseLog, FailureSummary

log = logging.getLogger("prism.http")
BUGS = CauseLog(log)  # the HTTP server's own errors: one ERROR line per cause a minute, tracebacks at DEBUG
_SLOW = b"the request headers did not arrive in time\n"
TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: " + \
    str(len(_SLOW)).encode() + b"\r\n\r\n" + _SLOW


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 64
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_body_bytes: int = 16 << 20
    max_bodies: int = 4
    keep_alive: int = 5  # uvicorn's timeout_keep_alive: seconds an idle kept-alive connection stays open

    @classmethod
    def of(cls, settings) -> "HttpLimits":
        """The limits `prism run` was given (runtime.settings.RunnerSettings: --http-*)."""
        return cls(settings.http_max_connections, settings.http_header_timeout, settings.http_body_timeout,
                   int(settings.http_max_body_mb * (1 << 20)), settings.http_max_bodies)


class Refusals:
    """What the limits refused: counted (metrics, by reason) and summed up in the log once a minute."""

    def __init__(self, metrics=None):
        self.metrics, self.summary = metrics, FailureSummary(log)

    def __call__(self, reason: str, host: str | None, why: str) -> None:
        if self.metrics is not None:
            self.metrics.refused.labels(reason).inc()
        self.summary.record("HTTP port", host, why)


def limited_protocol(limits: HttpLimits, refusals: Refusals) -> type:
    """uvicorn's h11 protocol with a timeout on a request's line and headers (limits.header_timeout)."""

    class LimitedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(limits.header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and data:
                self._arm()  # bytes of a request whose headers are not complete yet (also a kept-alive one's)
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                refusals("header_timeout", self.client[0] if self.client else None,
                         f"no complete request headers within {limits.header_timeout:g} s (--http-header-timeout)")
                self.transport.write(TIMEOUT_408)
                self.transport.close()

    return LimitedH11
