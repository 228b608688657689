"""A runner's sockets: CurveZMQ on every one of them, size limits, and nothing else.

    peer_in   ROUTER on this device's port: HELLO, START, RESULT, ABORT and means frames from the peers.
              CURVE server, ZAP domain "peers": only the other devices' public keys get through.
    out[q]    one DEALER per peer, to q's peer_in (CURVE client, q's public key as server key): everything
              this runner sends to q (heartbeats, STARTs, RESULTs, means) rides one connection, so the
              heartbeat that proves q hears us also proves the path the means take. No fixed routing
              identity: a reconnection is never mistaken for a stale one (see membership.py).
    clients   ROUTER on --serve: CURVE server, ZAP domain "clients": only the allowed client keys.
    outbox    inproc PUSH (one per worker lane) -> PULL (the I/O thread): the worker's messages, each
              with an envelope (destination rank, request id); for this runner's own coordinator a wake-up
              (destination LOCAL) for a typed record waiting in `local`.

The ZAP handler is pyzmq's ThreadAuthenticator with one credentials callback per domain (the key sets
of runtime/keys.py); it names each connection ("device-K", "client", "client-NAME"), and the name comes
with every message as its "User-Id". A key it does not hold is refused before any byte of that peer
reaches this runner. Socket monitors count failed handshakes (a wrong or unknown key, plain-text
clients) and say so in a rate-limited log line. Without keys (--insecure) nothing is authenticated.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from ..errors import PeerError
from .counters import Counters
from .keys import RunnerKeys

log = logging.getLogger("prism.run")
ENVELOPE = struct.Struct("<iQ")  # outbox: destination rank, request id
HANDSHAKE_EVENTS = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
                    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed_protocol",
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed_auth"}


class KeyCheck:
    """ZAP credentials callback for one domain: is this public key one we hold? Counts refusals."""

    def __init__(self, keys: dict[bytes, str], counters: Counters, domain: str):
        self.keys, self.counters, self.domain = keys, counters, domain

    def callback(self, domain, z85_key: bytes) -> bool:
        if z85_key in self.keys:
            return True
        self.counters.event("auth_denied")
        self.counters.log.warning("refused a connection to the %s port: unknown CURVE key %s", self.domain,
                                  z85_key.decode(errors="replace")[:12])
        return False


class Authenticator(ThreadAuthenticator):
    def __init__(self, ctx: zmq.Context, names: dict[bytes, str]):
        super().__init__(ctx, log=logging.getLogger("prism.zap"))
        self.names = names

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


class Transport:
    def __init__(self, *, rank: int, peers: dict[int, str], port: int, bind: str, serve: int | None,
                 keys: RunnerKeys | None, max_peer_bytes: int, max_client_bytes: int, counters: Counters):
        self.rank, self.keys, self.counters = rank, keys, counters
        self.ctx = zmq.Context()
        self.auth = None
        if keys is not None:
            names = keys.user_ids()
            self.auth = Authenticator(self.ctx, names)
            self.auth.start()
            peer_keys = {k: f"device-{q}" for q, k in keys.peers.items()}
            client_keys = {k: n for n, k in keys.clients.items()}
            self.auth.configure_curve_callback("peers", KeyCheck(peer_keys, counters, "peer"))
            self.auth.configure_curve_callback("clients", KeyCheck(client_keys, counters, "client"))
        self.monitors: dict[zmq.Socket, tuple[str, int | None]] = {}  # monitor -> (label, peer rank of a DEALER)
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
    def _monitor(self, sock: zmq.Socket, name: str, peer: int | None = None) -> None:
        events = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | (zmq.EVENT_DISCONNECTED if peer is not None else 0)
        self.monitors[sock.get_monitor_socket(events)] = (name, peer)

    def _server(self, domain: str, max_bytes: int, hwm: int) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.keys is not None:
            s.curve_secretkey, s.curve_publickey = self.keys.secret, self.keys.public
            s.curve_server = True
            s.zap_domain = domain.encode()
        self._monitor(s, f"{domain} port")
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
        frames = sock.recv_multipart(copy=False)
        user = None
        if self.keys is not None and len(frames) > 1:
            try:
                user = frames[1].get("User-Id")
            except zmq.ZMQError:
                user = None
        return frames[0].bytes, user, [f.buffer for f in frames[1:]]

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

    def on_monitor(self, m: zmq.Socket) -> int | None:
        """Count a failed handshake; return the peer rank when our connection to that peer closed."""
        ev = recv_monitor_message(m)
        label, peer = self.monitors[m]
        if ev["event"] == zmq.EVENT_DISCONNECTED:
            return peer
        name = HANDSHAKE_EVENTS.get(ev["event"])
        if name and peer is None:  # someone connecting to us
            self.counters.event(name)
            self.counters.log.warning("%s: CURVE handshake failed (%s, %s): a peer or client without this "
                                      "export's keys, or plain text", label, name,
                                      ev.get("endpoint", b"").decode(errors="replace"))
        elif name:  # our connection to a peer
            self.counters.event("outgoing_handshake_failed")
            self.counters.log.warning("%s: CURVE handshake failed (%s): it does not hold this device's key, or "
                                      "this device does not hold its key (keys from another export, or rotated "
                                      "on one board only?)", label, name)
        return None

    def close(self, linger_ms: int = 0) -> None:
        """Close every socket; `linger_ms` > 0 gives messages already queued (a REFUSE before a fatal
        exit) that long to leave."""
        for m in self.monitors:
            m.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy(linger=linger_ms)
