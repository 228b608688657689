"""The client port of a serving runner (--serve): who asked, their share, what they may see, and where
their replies go.

    message   bound to the connection it came on (clients.ClientSessions: ZeroMQ's own routing ids only);
              checked (schema.decode_record: a REQUEST's values by admission.py); a REQUEST goes through
              the client's share (tenants.Tenants) to the coordinator, a STATUS is answered at once
    reply     to the connection that asked, while it is open; dropped (counted as `replies_dropped`) when
              that connection closed, whoever holds its routing id or descriptor since
    STATUS    a client sees the cluster's state, its own requests and its share; an operator (a device's
              own key on the client port, or this runner's HTTP server) sees everything: every client's
              requests and shares, the counters and every device's health. Without CurveZMQ (--insecure)
              nobody is authenticated, so everyone sees everything

The transport's client-port monitor is drained before every message and every reply, so the opening and
closing of connections are known in the order they happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import ErrorInfo, FrameError, PrismError
from .admission import request_rules
from .clients import ClientSessions, is_operator
from .keys import LOCAL_CLIENT
from .protocol import Kind, peek_call
from .replies import error_reply
from .schema import Reply, Request, decode_record, encode_record
from .tenants import Tenants

CLIENT_VIEW = ("ready", "export_id", "devices", "coordinator", "connected", "members", "min_devices", "secure",
               "split", "peers")


class ClientPort:
    def __init__(self, transport, coordinator, limits, counters, status: Callable[[float], dict], *,
                 max_inflight: int, max_queued: int):
        self.t, self.coordinator, self.counters, self.status = transport, coordinator, counters, status
        self.sessions = ClientSessions()
        self.tenants = Tenants(coordinator.on_request, self._send, max_inflight, max_queued,
                               total_inflight=coordinator.max_pending, max_wait=coordinator.budget)
        coordinator.reply = self.tenants.reply  # every answer of the coordinator passes the client's share
        self.rules = {Kind.REQUEST: request_rules(limits)}

    def drain(self) -> None:
        """Connections opened and closed on the client port until now (its monitor's events)."""
        for ev in self.t.pending_events(self.t.client_monitor):
            self.on_event(ev)

    def on_event(self, ev) -> None:
        if ev.what == "client_opened":
            self.sessions.opened(ev.fd)
        elif ev.what == "client_closed":
            self.sessions.closed(ev.fd)

    def on_message(self, sock) -> None:
        self.drain()
        routing_id, user, fd, address, parts = self.t.recv_client(sock)
        name, nbytes = user or f"insecure@{address or 'unknown'}", sum(len(p) for p in parts)
        ref = self.sessions.identify(routing_id, name, fd)
        if isinstance(ref, str):  # answered on the connection it came on (ZeroMQ gave it that id just now)
            self.counters.reject("client message", ref, nbytes, name)
            reply = error_reply(peek_call(parts), ErrorInfo.of(FrameError(ref)))
            return self.t.reply(self.t.clients, routing_id, encode_record(reply))
        try:
            rec = decode_record(parts, self.coordinator.limits, self.rules, kinds=(Kind.REQUEST, Kind.STATUS))
        except PrismError as e:
            self.counters.reject("client message", str(e), nbytes, name)
            return self._send(ref, error_reply(peek_call(parts), ErrorInfo.of(e)))
        now = time.monotonic()
        if isinstance(rec, Request):
            self.counters.accept("request")
            return self.tenants.on_request(ref, rec, now)
        self.counters.accept("status")
        self._send(ref, Reply(call=rec.call, status=self.view(ref.client, now)))

    def _send(self, ref, record) -> None:
        self.drain()
        if not self.sessions.deliverable(ref):  # the connection that asked is gone
            self.counters.event("replies_dropped")
            return
        self.t.reply(self.t.clients, ref.routing_id, encode_record(record))

    def view(self, client: str, now: float) -> dict:
        """STATUS as `client` may see it."""
        full = self.status(now)
        share = {**self.tenants.usage(client)[client], **self.tenants.limits()}
        if is_operator(client) or client == LOCAL_CLIENT or self.t.keys is None:  # --insecure: no one is anyone
            return {**full, "client": client, "share": share, "clients": self.tenants.usage(),
                    "connections": len(self.sessions.epochs)}
        mine = [r for r in full["requests"] if r.get("client") == client]
        return {**{k: full[k] for k in CLIENT_VIEW if k in full}, "client": client, "share": share,
                "pending": len(mine), "requests": mine}

    def expire(self, now: float) -> None:
        self.tenants.expire(now)
