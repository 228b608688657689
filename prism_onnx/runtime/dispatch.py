"""Every message a runner gets from its peers and from its own worker, checked before it has any effect.

A peer message is first checked on its own (wire.py / protocol.py / messages.py: sizes, fields, the
manifest's dtypes and shapes), then against its sender: with CurveZMQ the authenticated key names the
device (a frame claiming another source is refused), and every message but HELLO must come on the
connection of that device's live session (membership.py). Only then does it reach the worker or the
coordinator. A refused message is counted and gets one rate-limited log line.
"""

from __future__ import annotations

import logging
import time

from ..errors import FrameError, PrismError
from .device import export_tag
from .membership import Verdict
from .messages import (check_abort, check_batch, check_refuse, check_result, check_start, check_tokens, coordinator_of,
                       result_rules, start_rules, tokens_rules)
from .protocol import ArrayRules, Kind, decode, encode, kind_of, peek_kind
from .transport import ENVELOPE
from .wire import check_means
from .worker import Job

NO_ARRAYS = ArrayRules(0, 0)
log = logging.getLogger("prism.run")


class PeerMessages:
    def __init__(self, host):
        self.host, self.rank, self.limits = host, host.rank, host.limits
        self.m, self.t, self.counters = host.membership, host.transport, host.counters
        self.tag = export_tag(host.bundle.export_id)
        self.rules = {Kind.START: start_rules(self.limits), Kind.RESULT: result_rules(self.limits),
                      Kind.TOKENS: tokens_rules(self.limits)}

    def _reject(self, category: str, why: str, nbytes: int, who: str) -> None:
        self.counters.reject(category, why, nbytes, who)

    # ------------------------------------------------------------------------------------ the peer port
    def on_peer(self, sock) -> None:
        session, user, parts = self.t.recv(sock)
        nbytes, now = sum(len(p) for p in parts), time.monotonic()
        key_rank = int(user[7:]) if user and user.startswith("device-") and user[7:].isdigit() else None
        who = user or "an unauthenticated peer"
        kind = kind_of(parts)
        try:
            if kind == "means":
                return self._means(session, key_rank, parts, nbytes, now)
            if kind == "garbage":
                raise FrameError("not a PRISM message")
            k = peek_kind(parts)
            _, meta, arrays = decode(parts, self.rules.get(k, NO_ARRAYS), max_json=1 << 16)
            if k == Kind.HELLO:
                return self._hello(session, key_rank, meta, now)
            if k == Kind.START:
                s = check_start(meta, arrays, self.limits)
                self._sender(s.coordinator, key_rank, session)
                if self.rank not in s.ranks:
                    raise FrameError(f"START of request {s.request} for a plan of devices {list(s.ranks)}, "
                                     f"not of this device")
                job = Job(s.request, s.coordinator, s.attention_mask, s.own_inputs, now + s.budget_s, s.outputs,
                          s.generate, s.stream, s.prompt_ids, s.ranks, s.split_weights)
                if not self.host.worker.submit(job):
                    raise FrameError(f"START of request {s.request}: the worker queue is full")
            elif k == Kind.RESULT:
                if self.host.coordinator is None:
                    raise FrameError("RESULT sent to a device that does not coordinate")
                res = check_result(meta, arrays, self.limits)
                self._sender(res.rank, key_rank, session)
                self.host.coordinator.on_result(res, now)
            elif k == Kind.TOKENS:
                if self.host.coordinator is None:
                    raise FrameError("TOKENS sent to a device that does not coordinate")
                tok = check_tokens(meta, arrays, self.limits)
                self._sender(tok.rank, key_rank, session)
                self.host.coordinator.on_tokens(tok, now)
            elif k == Kind.ABORT:
                request, reason = check_abort(meta)
                if key_rank is not None:
                    self._sender(key_rank, key_rank, session)
                elif not any(self.m.is_session(q, session) for q in self.m.peers):
                    raise FrameError("ABORT from a connection that is no live peer's")
                self.host.worker.abort(request, reason)
            else:
                raise FrameError(f"unexpected {k.name} from a peer")
            self.counters.accept(k.name.lower())
        except PrismError as e:
            self._reject(f"{kind} message", str(e), nbytes, who)

    def _sender(self, claimed: int, key_rank: int | None, session: bytes) -> None:
        if key_rank is not None and claimed != key_rank:
            raise FrameError(f"message claims to come from device {claimed} but carries device {key_rank}'s key")
        if not self.m.is_session(claimed, session):
            raise FrameError(f"message for device {claimed} on a connection that is not its live session")

    def _means(self, session: bytes, key_rank: int | None, parts: list, nbytes: int, now: float) -> None:
        L = self.limits
        h = check_means(parts, wire_dtype=L.wire_dtype, hidden=L.hidden, max_rows=L.max_rows, max_batch=L.max_batch)
        if h.dst != self.rank or h.export_tag != self.tag or not 0 <= h.layer < L.layers or h.src not in self.m.peers:
            raise FrameError(f"frame addressed to device {h.dst} of export tag {h.export_tag:08x}, exchange point "
                             f"{h.layer}, from device {h.src}: not for this device")
        self._sender(h.src, key_rank, session)
        if coordinator_of(h.request) >= L.devices:
            raise FrameError(f"frame of request {h.request}, which no device of this export coordinates")
        why = self.host.worker.lanes.of(h.request).exchange.inbox.put(h.src, h.request, parts, nbytes, now)
        if why:
            raise FrameError(why)
        self.counters.accept("means")

    def _hello(self, session: bytes, key_rank: int | None, meta: dict, now: float) -> None:
        v: Verdict = self.m.on_hello(meta, now, session, key_rank)
        if v.note:
            log.info("device %d: %s", self.rank, v.note)
        if v.refuse:
            self.counters.reject("hello", v.refuse, 0, f"device {meta.get('rank')}")
            self.t.reply(self.t.peer_in, session, encode(Kind.REFUSE, {"reason": v.refuse, "from": self.rank}))
        if v.fatal:
            self.host.fatal = v.fatal
        if v.accept:
            self.counters.accept("hello")

    # -------------------------------------------------------------------- REFUSE on our own connections
    def on_dealer(self, q: int):
        def handle(sock) -> None:
            parts = sock.recv_multipart()
            try:
                if peek_kind(parts) != Kind.REFUSE:
                    raise FrameError("only REFUSE comes back on a connection to a peer")
                _, meta, _ = decode(parts, NO_ARRAYS, max_json=1 << 16)
                frm, why = check_refuse(meta, self.limits.devices)
            except PrismError as e:
                return self._reject("reply from a peer", str(e), sum(len(p) for p in parts), f"device {q}")
            reason = f"device {frm} refused device {self.rank} at the handshake: {why}"
            if self.m.on_refuse(reason):
                self.host.fatal = reason
            else:
                self.counters.log.warning("%s (ignored: this cluster is already running)", reason)
        return handle

    # -------------------------------------------------------------------------- the worker's outbox
    def on_outbox(self, sock) -> None:
        frames = sock.recv_multipart(copy=False)
        dst, request = ENVELOPE.unpack(frames[0].bytes)
        parts = frames[1:]
        if dst == self.rank:  # our own RESULT, TOKENS or BATCH, for our coordinator
            buffers = [f.buffer for f in parts]
            kind = peek_kind(buffers)
            if kind == Kind.BATCH:
                _, meta, _ = decode(buffers, NO_ARRAYS)
                return self.host.coordinator.on_batch(*check_batch(meta, self.limits), time.monotonic())
            _, meta, arrays = decode(buffers, self.rules[kind])
            if kind == Kind.TOKENS:
                return self.host.coordinator.on_tokens(check_tokens(meta, arrays, self.limits), time.monotonic())
            return self.host.coordinator.on_result(check_result(meta, arrays, self.limits), time.monotonic())
        if not self.t.send_peer(dst, parts):
            why = f"device {self.rank} cannot send to device {dst}: not connected"
            self.host.worker.abort(request, why)
            if self.host.coordinator:
                self.host.coordinator.on_send_failed(request, dst, why, time.monotonic())
