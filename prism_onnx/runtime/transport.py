"""A runner's sockets: CurveZMQ on every one of them, size limits, and nothing else.

    peer_in   ROUTER on this device's port: HELLO, START, RESULT, ABORT and means frames from the peers.
              CURVE server with this device's keypair, ZAP domain "peers": only the other devices' keys.
    out[q]    one DEALER per peer, to q's peer_in (CURVE client, q's public key as server key): everything
              this runner sends to q (heartbeats, STARTs, RESULTs, means) rides one connection, so the
              heartbeat that proves q hears us also proves the path the means take. No fixed routing
              identity: a reconnection is never mistaken for a stale one (see membership.py).
    clients   ROUTER on --serve: CURVE server with the cluster's client-port keypair (the same on every
              runner, so a client knows the key of whichever runner it reaches), ZAP domain "clients": the
              allowed client keys, and the devices' keys (operators).
    outbox    inproc PUSH (one per worker lane) -> PULL (the I/O thread): the worker's messages, each
              with an envelope (destination rank, request id); for this runner's own coordinator a wake-up
              (destination LOCAL) for a typed record waiting in `local`.

Both ROUTERs run with ROUTER_HANDOVER off: a connection that presents a routing id in use is ignored by
ZeroMQ, never given the other one's messages; on the client port each request is also bound to its
connection (clients.py). The ZAP handler is pyzmq's ThreadAuthenticator with one credentials callback per
domain (the key sets of runtime/keys.py); it names each connection ("device-K", "client", "client-NAME"),
and the name comes with every message as its "User-Id". A key it does not hold is refused before any byte
of that peer reaches this runner. Socket monitors report refused connections (FailureSummary: the first
from a host at once, the rest summed up once a minute), connections opened and closed on the client port
(by file descriptor, for clients.py), and handshakes that fail on our own connections to the peers:
that says a peer holds other keys (`MonitorEvent`, for membership). Without keys (--insecure) nothing is
authenticated.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import threading
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from ..errors import PeerError
from .counters import Counters, FailureSummary
from .keys import RunnerKeys

log = logging.getLogger("prism.run")
ENVELOPE = struct.Struct("<iQ")  # outbox: destination rank, request id
INCOMING = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: ("handshake_failed", "its handshake failed"),
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: ("handshake_failed_protocol", "its CURVE handshake failed: it "
                                                  "does not use this port's server key (keys of another export "
                                                  "or another `prism keys` run), or it speaks plain text")}
OUTGOING = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "does not hold device {q}'s key of this key set (it closed our "
                                                  "CURVE handshake)",
            zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refuses this device's key (it holds another key set)",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "does not speak CurveZMQ with this device (started with "
                                                 "--insecure, or not a prism runner)"}


@dataclass(frozen=True)
class MonitorEvent:
    """What a socket monitor reports to the runner: `what` is "peer_closed" (our connection to `peer` closed),
    "peer_keys" (our handshake with `peer` failed: `detail` says how), "peer_handshake" (it succeeded),
    "client_opened" / "client_closed" (a connection on the client port, by file descriptor `fd`)."""

    what: str
    peer: int | None = None
    fd: int | None = None
    detail: str = ""
    certain: bool = False  # "peer_keys": the peer refused our key (it holds another key set), no doubt


class KeyCheck:
    """ZAP credentials callback for one domain: is this public key one we hold? Counts refusals, and says
    each host's once a minute (FailureSummary)."""

    def __init__(self, keys: dict[bytes, str], counters: Counters, port: str, summary: FailureSummary, auth=None):
        self.keys, self.counters, self.port, self.summary, self.auth = keys, counters, port, summary, auth

    def callback(self, domain, z85_key: bytes) -> bool:
        if z85_key in self.keys:
            return True
        self.counters.event("auth_denied")
        self.summary.record(self.port, getattr(self.auth, "address", None),
                            f"an unknown CURVE key ({z85_key.decode(errors='replace')[:12]}...; not one of this "
                            f"port's keys: an unknown or revoked client, or keys of another export)")
        return False


class Authenticator(ThreadAuthenticator):
    def __init__(self, ctx: zmq.Context, names: dict[bytes, str]):
        super().__init__(ctx, log=logging.getLogger("prism.zap"))
        self.names, self.address = names, None

    async def handle_zap_message(self, msg) -> None:
        self.address = bytes(msg[3]).decode(errors="replace") if len(msg) > 3 else None  # for KeyCheck's line
        await super().handle_zap_message(msg)

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(z85.encode(client_public_key), "unknown")


LOCAL = -1  # the envelope's destination of a wake-up: typed records for this runner wait in `Outbox.local`


class Outbox:
    """A lane's end of the outbox: its socket is used by that lane's threads only, one send at a time (a
    ZeroMQ socket is not thread-safe). Records for this runner's own coordinator do not travel as bytes:
    `local(record)` queues the object and sends a wake-up through the same socket, so the I/O thread takes
    it in the order the lane sent everything (a batch's record before its STARTs)."""

    def __init__(self, sock: zmq.Socket, local_queue: queue.SimpleQueue):
        self.sock, self.queue = sock, local_queue
        self._lock = threading.Lock()

    def send(self, dst: int, request: int, parts: list) -> None:
        with self._lock:
            self.sock.send_multipart([ENVELOPE.pack(dst, request), *parts], copy=False)

    def local(self, record) -> None:
        with self._lock:
            self.queue.put(record)
            self.sock.send(ENVELOPE.pack(LOCAL, 0))


def peer_name(fd: int) -> str | None:
    """The address of the TCP connection on descriptor `fd` (None when it closed already)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        s = socket.socket(fileno=dup)  # a copy of the descriptor: closing it leaves ZeroMQ's open
    except OSError:
        os.close(dup)
        return None
    with s:
        try:
            name = s.getpeername()
        except OSError:
            return None
    return str(name[0]) if isinstance(name, tuple) and name else None


class Transport:
    def __init__(self, *, rank: int, peers: dict[int, str], port: int, bind: str, serve: int | None,
                 keys: RunnerKeys | None, max_peer_bytes: int, max_client_bytes: int, counters: Counters):
        self.rank, self.keys, self.counters = rank, keys, counters
        self.summary = FailureSummary(log)
        self.ctx = zmq.Context()
        self.auth = None
        if keys is not None:
            self.auth = Authenticator(self.ctx, keys.user_ids())
            self.auth.start()
            peer_keys = {k: f"device-{q}" for q, k in keys.peers.items()}
            self.auth.configure_curve_callback("peers", KeyCheck(peer_keys, counters, "peer port", self.summary,
                                                                 self.auth))
            self.auth.configure_curve_callback("clients", KeyCheck(keys.client_port_keys(), counters, "client port",
                                                                   self.summary, self.auth))
        self.monitors: dict[zmq.Socket, tuple[str, int | None]] = {}  # monitor -> (label, peer rank of a DEALER)
        self.hosts: dict[tuple[str, int], str | None] = {}  # (port, fd) -> peer address, while open
        self._failed: dict[str, str] = {}  # port -> the handshake failure waiting for its connection's close
        self.peer_in = self._server("peers", max_peer_bytes, 256)
        self._bind(self.peer_in, bind, port, f"is another runner already device {rank} on this host?")
        self.out = {q: self._dealer(q, address) for q, address in peers.items()}
        self.clients = None
        if serve is not None:
            self.clients = self._server("clients", max_client_bytes, 64)
            self._bind(self.clients, bind, serve, "is the port in use?")
        self.outbox_in = self.ctx.socket(zmq.PULL)
        self.outbox_in.bind(f"inproc://outbox-{id(self)}")
        self.local = queue.SimpleQueue()  # records for this runner's coordinator (Outbox.local)

    def new_outbox(self) -> Outbox:
        """An outbox for one worker thread (a lane): ZeroMQ sockets are not shared between threads."""
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(f"inproc://outbox-{id(self)}")
        return Outbox(push, self.local)

    # ------------------------------------------------------------------------------------------- setup
    def _monitor(self, sock: zmq.Socket, name: str, peer: int | None = None) -> zmq.Socket:
        events = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED | \
            (zmq.EVENT_HANDSHAKE_SUCCEEDED if peer is not None else zmq.EVENT_ACCEPTED)
        m = sock.get_monitor_socket(events)
        self.monitors[m] = (name, peer)
        return m

    def _server(self, domain: str, max_bytes: int, hwm: int) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.ROUTER_HANDOVER, 0)  # a routing id in use is never handed to another connection
        if self.keys is not None:
            client_port = domain == "clients"
            s.curve_secretkey = self.keys.server_secret if client_port else self.keys.secret
            s.curve_publickey = self.keys.server_public if client_port else self.keys.public
            s.curve_server = True
            s.zap_domain = domain.encode()
        m = self._monitor(s, "client port" if domain == "clients" else "peer port")
        if domain == "clients":
            self.client_monitor = m
        return s

    @staticmethod
    def _bind(s: zmq.Socket, host: str, port: int, hint: str) -> None:
        try:
            s.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as e:
            raise PeerError(f"cannot listen on {host}:{port} ({e}): {hint}") from None

    def _dealer(self, q: int, address: str) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer that is not connected: fail fast instead
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        s.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # only REFUSE comes back on these
        if self.keys is not None:
            s.curve_secretkey, s.curve_publickey = self.keys.secret, self.keys.public
            s.curve_serverkey = self.keys.peers[q]
        self._monitor(s, f"connection to device {q}", q)
        s.connect(address)
        return s

    def sockets(self) -> list[zmq.Socket]:
        return [self.peer_in, self.outbox_in, *self.out.values(), *self.monitors] + \
            ([self.clients] if self.clients is not None else [])

    # -------------------------------------------------------------------------------------------- I/O
    def recv(self, sock: zmq.Socket) -> tuple[bytes, str | None, list]:
        """(routing id, authenticated name or None, parts as buffers) of one message on a ROUTER."""
        routing_id, user, _, _, parts = self.recv_client(sock)
        return routing_id, user, parts

    def recv_client(self, sock: zmq.Socket) -> tuple[bytes, str | None, int | None, str | None, list]:
        """(routing id, authenticated name or None, the connection's file descriptor, the peer's address,
        parts as buffers) of one message on a ROUTER."""
        frames = sock.recv_multipart(copy=False)
        user = fd = address = None
        if len(frames) > 1:
            try:
                user = frames[1].get("User-Id") if self.keys is not None else None
            except zmq.ZMQError:
                user = None
            try:
                fd, address = frames[1].get(zmq.SRCFD), frames[1].get("Peer-Address")
            except zmq.ZMQError:
                pass
        return frames[0].bytes, user, fd, address, [f.buffer for f in frames[1:]]

    def send_peer(self, q: int, parts: list) -> bool:
        """Non-blocking: False when q is not connected (IMMEDIATE) or its queue is full."""
        try:
            self.out[q].send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def reply(self, sock: zmq.Socket, routing_id: bytes, parts: list) -> None:
        try:  # a ROUTER drops what it cannot deliver (client gone, queue full): never blocks the loop
            sock.send_multipart([routing_id, *parts], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass

    def pending_events(self, m: zmq.Socket) -> list[MonitorEvent]:
        """Every event waiting on monitor `m` now (the client port's, before a message or a reply is handled:
        its connection's opening and closing are known by then)."""
        out = []
        while m.poll(0):
            ev = self.on_monitor(m)
            if ev is not None:
                out.append(ev)
        return out

    def on_monitor(self, m: zmq.Socket) -> MonitorEvent | None:
        """One monitor event: a refused connection is counted and summed up; the rest is reported. None when
        there is none any more: the I/O loop's poll may have seen an event that pending_events() has taken
        since (the client port drains its monitor before each message), and a blocking read would then
        wait for the next connection event, stopping the runner (seen once in CI, under the fuzz test)."""
        if not m.poll(0):
            return None
        ev = recv_monitor_message(m)
        label, peer = self.monitors[m]
        event, value = ev["event"], ev["value"]
        if peer is not None:  # our connection to a peer
            if event == zmq.EVENT_DISCONNECTED:
                return MonitorEvent("peer_closed", peer)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return MonitorEvent("peer_handshake", peer)
            self.counters.event("outgoing_handshake_failed")
            return MonitorEvent("peer_keys", peer, detail=OUTGOING.get(event, "failed the handshake").format(q=peer),
                                certain=event == zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        client_port = label == "client port"
        if event == zmq.EVENT_ACCEPTED:
            self.hosts[(label, value)] = peer_name(value)
            return MonitorEvent("client_opened", fd=value) if client_port else None
        if event in INCOMING:  # said when its connection closes (the next DISCONNECTED): then its host is known
            self.counters.event(INCOMING[event][0])
            self._failed[label] = INCOMING[event][1]
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            pass  # counted and said by KeyCheck, which knows the host
        elif event == zmq.EVENT_DISCONNECTED:
            host = self.hosts.pop((label, value), None)
            why = self._failed.pop(label, None)
            if why is not None:
                self.summary.record(label, host, why)
            return MonitorEvent("client_closed", fd=value) if client_port else None
        return None

    def close(self, linger_ms: int = 0) -> None:
        """Close every socket; `linger_ms` > 0 gives messages already queued (a REFUSE before a fatal
        exit) that long to leave."""
        for m in self.monitors:
            m.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy(linger=linger_ms)
