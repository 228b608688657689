"""Fair shares of one coordinator between its clients (keys): no client can starve another.

Every client (clients.py: a key name) may have at most `max_inflight` requests admitted to the coordinator
(planned, queued in the worker or running) and at most `max_queued` more waiting here; a request beyond
both is refused at once with Busy naming the client's share, while other clients are served. Requests
waiting here are admitted in turn, one client after another (round robin), as admitted ones are answered,
within `total_inflight` requests admitted for all clients together (the coordinator's own bound) and
`total_queued` waiting. A request that waits longer than `max_wait` seconds is answered Busy.

    on_request   a checked REQUEST of a client: admitted, queued, or refused (Busy)
    reply        the coordinator's callable to answer a client: a final Reply releases that client's share
                 and admits the next waiting request; Tokens (streaming) pass through
    expire       waiting requests past `max_wait`

Sans-IO: it sees the coordinator only through `admit(client, request, now)` and answers through `send`
(client, record); tests drive it with plain functions and numbers for `now`.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import Busy, ErrorInfo
from .replies import error_reply
from .schema import Reply, Request

MAX_CLIENT_INFLIGHT = 8
MAX_CLIENT_QUEUED = 16
TOTAL_QUEUED = 64


@dataclass
class Tenants:
    admit: Callable  # (client ref, Request, now): the coordinator takes the request (coordinator.on_request)
    send: Callable  # (client ref, Reply | Tokens): to the client's connection
    max_inflight: int = MAX_CLIENT_INFLIGHT
    max_queued: int = MAX_CLIENT_QUEUED
    total_inflight: int = 32
    total_queued: int = TOTAL_QUEUED
    max_wait: float = 60.0
    clock: Callable[[], float] = time.monotonic  # the time of admissions made when another request ends
    inflight: Counter = field(default_factory=Counter)  # client -> requests admitted, not yet answered
    waiting: dict = field(default_factory=dict)  # client -> deque of (ref, request, since)
    turn: deque = field(default_factory=deque)  # clients with waiting requests, in round-robin order
    _pumping: bool = False

    @property
    def admitted(self) -> int:
        return sum(self.inflight.values())

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def on_request(self, ref, req: Request, now: float) -> None:
        c = ref.client
        if self.inflight[c] < self.max_inflight and self.admitted < self.total_inflight and c not in self.waiting:
            return self._admit(ref, req, now)
        mine = len(self.waiting.get(c, ()))
        if mine >= self.max_queued or self.queued >= self.total_queued:
            why = (f"busy: client '{c}' has {self.inflight[c]} requests running and {mine} waiting, its share "
                   f"(--max-client-inflight {self.max_inflight}, --max-client-queue {self.max_queued})"
                   if mine >= self.max_queued else
                   f"busy: {self.queued} requests of all clients are waiting (at most {self.total_queued})")
            return self.send(ref, error_reply(req.call, ErrorInfo.of(Busy(why))))
        if c not in self.waiting:
            self.waiting[c] = deque()
            self.turn.append(c)
        self.waiting[c].append((ref, req, now))

    def _admit(self, ref, req: Request, now: float) -> None:
        self.inflight[ref.client] += 1
        self.admit(ref, req, now)

    def reply(self, ref, record) -> None:
        """The coordinator's answer to a client: sent; a final Reply ends one of that client's requests."""
        if isinstance(record, Reply) and self.inflight[ref.client] > 0:
            self.inflight[ref.client] -= 1
            if not self.inflight[ref.client]:
                del self.inflight[ref.client]
        self.send(ref, record)
        if isinstance(record, Reply):
            self.pump()

    def pump(self) -> None:
        """Admit waiting requests, one client after another, while shares allow (not re-entered)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            skipped = 0
            while self.turn and skipped < len(self.turn) and self.admitted < self.total_inflight:
                c = self.turn[0]
                self.turn.rotate(-1)
                if self.inflight[c] >= self.max_inflight:
                    skipped += 1
                    continue
                skipped = 0
                ref, req, _ = self.waiting[c].popleft()
                if not self.waiting[c]:
                    del self.waiting[c]
                    self.turn.remove(c)
                self._admit(ref, req, self.clock())
        finally:
            self._pumping = False

    def expire(self, now: float) -> None:
        for c in list(self.waiting):
            q = self.waiting[c]
            while q and now - q[0][2] > self.max_wait:
                ref, req, since = q.popleft()
                self.send(ref, error_reply(req.call, ErrorInfo.of(Busy(
                    f"busy: waited {now - since:.0f} s behind client '{c}''s {self.inflight[c]} running requests"))))
            if not q:
                del self.waiting[c]
                self.turn.remove(c)

    def usage(self, client: str | None = None) -> dict:
        """{client: {"inflight", "waiting"}} of every client (client None), or of one."""
        names = sorted(set(self.inflight) | set(self.waiting)) if client is None else [client]
        return {c: {"inflight": self.inflight.get(c, 0), "waiting": len(self.waiting.get(c, ()))} for c in names}

    def limits(self) -> dict:
        return {"max_client_inflight": self.max_inflight, "max_client_queue": self.max_queued,
                "total_inflight": self.total_inflight, "total_queued": self.total_queued}
