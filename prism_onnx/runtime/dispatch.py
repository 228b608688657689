"""Every message a runner gets from its peers and from its own worker, checked before it has any effect.

A peer message is first checked on its own: a means frame's header and sizes (wire.check_means), a control
message's framing, arrays and fields (schema.decode_record: the kind's typed record). Then against its
sender: with CurveZMQ the authenticated key names the device (a message claiming another device is
refused), and every message but HELLO must come on the connection of that device's live session
(membership.py). Only then does it reach the worker or the coordinator. A refused message is counted and
gets one rate-limited log line. The worker's messages for this device's own coordinator arrive as typed
objects (Result, Tokens, worker.Batched), in process.

Sans-IO: PeerMessages sees the rest of the runner only through what it is given (a receiver of records,
`handle(record, session, key_rank, now)` and `handle_means`, and `Effects`), so tests drive it with plain
objects.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import FrameError, PrismError
from .membership import Verdict
from .protocol import Kind
from .schema import (Abort, Attempt, Hello, Refuse, Result, Tokens, coordinator_of, decode_record, encode_record,
                     peer_rules)
from .wire import check_means
from .jobs import Batched, Job

PEER_JSON = 1 << 16  # the JSON part of a peer's control message
log = logging.getLogger("prism.run")


@dataclass
class Effects:
    """What a peer message may do to the runner: each a callable, given by the host (or a test)."""

    submit: Callable[[Job], bool]  # queue a START's job in the worker
    abort: Callable[[int, str], None]  # the worker drops a request
    deliver_means: Callable  # (header, parts, nbytes, now): a frame to its lane's exchange (FrameError: refused)
    reply_peer: Callable[[bytes, list], None]  # (session, parts): answer on the peer port (REFUSE)
    fatal: Callable[[str], None]  # stop the runner with this reason
    coordinator: object | None = None  # coordinator.Coordinator when this runner serves clients
    refused_by: Callable[[int], None] = lambda q: None  # peer q refused our HELLO (it knows why it cannot join)


class PeerMessages:
    def __init__(self, rank: int, limits, export_tag: int, membership, counters, effects: Effects):
        self.rank, self.limits, self.tag, self.m, self.counters, self.fx = \
            rank, limits, export_tag, membership, counters, effects
        self.rules = peer_rules(limits)

    def _reject(self, category: str, why: str, nbytes: int, who: str) -> None:
        self.counters.reject(category, why, nbytes, who)

    # ------------------------------------------------------------------------------------ the peer port
    def on_peer(self, session: bytes, user: str | None, parts: list, now: float | None = None) -> None:
        """One message on the peer port: `user` the authenticated name of its key ("device-K"; None without
        CurveZMQ), `session` its connection's routing id."""
        now = time.monotonic() if now is None else now
        nbytes = sum(len(p) for p in parts)
        key_rank = int(user[7:]) if user and user.startswith("device-") and user[7:].isdigit() else None
        head = bytes(parts[0][:4]) if parts and len(parts[0]) >= 4 else b""
        kind = "means" if head == b"PRSM" else "control"
        try:
            if kind == "means":
                self._means(session, key_rank, parts, nbytes, now)
            else:
                self.handle(decode_record(parts, self.limits, self.rules, max_json=PEER_JSON), session, key_rank, now)
        except PrismError as e:
            self._reject(f"{kind} message", str(e), nbytes, user or "an unauthenticated peer")

    def handle(self, rec, session: bytes, key_rank: int | None, now: float) -> None:
        """A decoded peer record, checked against its sender, to its effect."""
        if isinstance(rec, Hello):
            return self._hello(session, key_rank, rec, now)
        if isinstance(rec, Attempt):
            self._sender(rec.coordinator, key_rank, session)
            if self.rank not in rec.ranks:
                raise FrameError(f"START of request {rec.request} for a plan of devices {list(rec.ranks)}, not of "
                                 f"this device")
            if not self.fx.submit(Job(rec, now + rec.budget_s)):
                raise FrameError(f"START of request {rec.request}: the worker queue is full")
        elif isinstance(rec, (Result, Tokens)):
            if self.fx.coordinator is None:
                raise FrameError(f"{type(rec).__name__.upper()} sent to a device that does not coordinate")
            self._sender(rec.rank, key_rank, session)
            if coordinator_of(rec.request) != self.rank:
                raise FrameError(f"a result of request {rec.request}, which this device does not coordinate")
            (self.fx.coordinator.on_result if isinstance(rec, Result) else self.fx.coordinator.on_tokens)(rec, now)
        elif isinstance(rec, Abort):
            if key_rank is not None:
                self._sender(key_rank, key_rank, session)
            elif not any(self.m.is_session(q, session) for q in self.m.peers):
                raise FrameError("ABORT from a connection that is no live peer's")
            self.fx.abort(rec.request, rec.reason)
        else:
            raise FrameError(f"unexpected {type(rec).__name__.upper()} from a peer")
        self.counters.accept(type(rec).__name__.lower())

    def _sender(self, claimed: int, key_rank: int | None, session: bytes) -> None:
        if key_rank is not None and claimed != key_rank:
            raise FrameError(f"message claims to come from device {claimed} but carries device {key_rank}'s key")
        if not self.m.is_session(claimed, session):
            raise FrameError(f"message for device {claimed} on a connection that is not its live session")

    def _means(self, session: bytes, key_rank: int | None, parts: list, nbytes: int, now: float) -> None:
        L = self.limits
        h = check_means(parts, wire_dtype=L.wire_dtype, hidden=L.hidden, max_rows=L.max_rows, max_batch=L.max_batch)
        if h.src not in self.m.peers:
            raise FrameError(f"frame from device {h.src}, which is no peer of this device")
        self._sender(h.src, key_rank, session)
        if coordinator_of(h.request) >= L.devices:
            raise FrameError(f"frame of request {h.request}, which no device of this export coordinates")
        self.fx.deliver_means(h, parts, nbytes, now)  # its lane's exchange: addressed here? the inbox's bounds
        self.counters.accept("means")

    def _hello(self, session: bytes, key_rank: int | None, hello: Hello, now: float) -> None:
        v: Verdict = self.m.on_hello(hello, now, session, key_rank)
        if v.note:
            log.info("device %d: %s", self.rank, v.note)
        if v.refuse:
            self.counters.reject("hello", v.refuse, 0, f"device {hello.rank}")
            self.fx.reply_peer(session, encode_record(Refuse(self.rank, v.refuse[:2000])))
        if v.fatal:
            self.fx.fatal(v.fatal)
        if v.accept:
            self.counters.accept("hello")

    # -------------------------------------------------------------------- REFUSE on our own connections
    def on_refused(self, q: int, parts: list) -> None:
        """A message on our own connection to peer q: only a REFUSE of our HELLO comes back there."""
        try:
            rec = decode_record(parts, self.limits, kinds=(Kind.REFUSE,), max_json=PEER_JSON)
        except PrismError as e:
            return self._reject("reply from a peer", str(e), sum(len(p) for p in parts), f"device {q}")
        reason = f"device {rec.sender} refused device {self.rank} at the handshake: {rec.reason}"
        self.fx.refused_by(q)
        if self.m.on_refuse(reason):
            self.fx.fatal(reason)
        else:
            self.counters.log.warning("%s (ignored: this cluster is already running)", reason)

    # -------------------------------------------------------------------------- the worker's own records
    def on_local(self, record, now: float | None = None) -> None:
        """A Result, Tokens or Batched from this device's worker, for this device's coordinator."""
        now = time.monotonic() if now is None else now
        c = self.fx.coordinator
        if isinstance(record, Batched):
            c.on_batch(record.request, list(record.members), now)
        elif isinstance(record, Tokens):
            c.on_tokens(record, now)
        else:
            c.on_result(record, now)
