"""One client connection to one serving runner: a ZeroMQ DEALER (CurveZMQ with the client's keys), the
wait for its TCP connection, and one call at a time (a REQUEST or STATUS, then its Reply; the TOKENS of a
streaming call on the way). `Client` (client.py) keeps one per server and fails over between them.
"""

from __future__ import annotations

import itertools
import socket
import time
from dataclasses import replace

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..errors import PeerError, Timeout
from .protocol import ArrayRules, Kind
from .schema import Reply, Request, Status, Tokens, decode_record, encode_record

REPLY_RULES = ArrayRules(1 << 36, max_arrays=16)  # what a client accepts back from an authenticated server


class ServerLost(PeerError, code="server_lost"):
    """The serving runner closed the connection, stopped answering, or never answered: another server may."""


class Connection:
    """To the runner serving at `address` ("tcp://HOST:PORT"), authenticated by the cluster's client-port key
    (keys.ClientKeys.server: every serving runner answers with it). `server_rank`: the device it is, when
    known (for messages only)."""

    def __init__(self, address: str, keys, server_rank: int | None, dead_after: float, ping_every: float):
        self.address, self.keys, self.server_rank = address, keys, server_rank
        self.dead_after, self.ping_every = dead_after, ping_every
        self.ctx = zmq.Context.instance()
        self.sock = self.monitor = None
        self._answered = False
        self._calls = itertools.count(1)

    def _socket(self) -> tuple[zmq.Socket, zmq.Socket]:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.SNDTIMEO, int(1000 * self.dead_after))  # a send with no connection to go to: _send
        if self.keys is not None:
            s.curve_secretkey, s.curve_publickey = self.keys.secret, self.keys.public
            s.curve_serverkey = self.keys.server
        m = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED |
                                 zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_SUCCEEDED |
                                 zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED)
        try:
            s.connect(self.address)
            self._await_connection(m)
        except zmq.ZMQError as e:
            _close(s, m)
            raise ServerLost(f"cannot connect to {self.address.removeprefix('tcp://')}: {e}") from None
        except ServerLost:
            _close(s, m)
            raise
        return s, m

    def _await_connection(self, monitor: zmq.Socket) -> None:
        """Wait for the socket's TCP connection (its monitor's CONNECTED event), at most `dead_after`
        seconds: a refused connection (CONNECT_RETRIED first: nothing listens on that port) or none at all
        raises ServerLost, instead of ZeroMQ retrying silently until the request's timeout."""
        host_port = self.address.removeprefix("tcp://")
        deadline = time.monotonic() + self.dead_after
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(max(1, int(1000 * left))):
                break
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                return
            if event == zmq.EVENT_CONNECT_RETRIED:
                host = host_port.rpartition(":")[0].strip("[]")
                try:
                    socket.getaddrinfo(host, None)
                except socket.gaierror as e:
                    raise ServerLost(f"cannot resolve the host '{host}' of {host_port}: {e.strerror}") from None
                raise ServerLost(f"connection refused by {host_port}: nothing listens there (is a runner "
                                 f"serving clients with --serve {host_port.rpartition(':')[2]}?)")
        raise ServerLost(f"no TCP connection to {host_port} within {self.dead_after:g} s (host down or "
                         f"unreachable, or a firewall drops the connection)")

    def connect(self):
        if self.sock is None:
            self.sock, self.monitor = self._socket()

    def reset(self):
        if self.sock is not None:
            _close(self.sock, self.monitor)
        self.sock = self.monitor = None
        self._answered = False

    def call(self, message: Request | Status, timeout: float, watch: bool = True, on_tokens=None) -> Reply:
        """Send one message and wait for its Reply (at most `timeout` seconds; with `watch`, STATUS pings and
        ServerLost after `dead_after` seconds of silence); Tokens of the same call go to on_tokens(tokens)."""
        self.connect()
        call = next(self._calls)
        self._send(encode_record(replace(message, call=call)))
        t0 = heard = time.monotonic()
        next_ping, poller = t0 + self.ping_every, zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            now = time.monotonic()
            if now - t0 >= timeout:
                self.reset()
                raise Timeout(f"no reply from {self.address} within {timeout:g} s")
            if watch and now - heard >= self.dead_after:
                self.reset()
                raise ServerLost(f"the coordinator at {self.address} stopped responding: no answer for "
                                 f"{self.dead_after:g} s")
            if watch and now >= next_ping:
                self._send(encode_record(Status(call=0)))
                next_ping = now + self.ping_every
            wait = min([t0 + timeout] + ([next_ping, heard + self.dead_after] if watch else [])) - now
            events = dict(poller.poll(max(1, int(1000 * wait))))
            if self.monitor in events:
                failure = self._on_event(recv_monitor_message(self.monitor)["event"])
                if failure is not None:
                    self.reset()
                    raise failure
            if self.sock in events:
                rec = decode_record(self.sock.recv_multipart(), None, REPLY_RULES, kinds=(Kind.REPLY, Kind.TOKENS))
                heard, self._answered = time.monotonic(), True
                if rec.call == call:
                    if isinstance(rec, Tokens):
                        if on_tokens is not None:
                            on_tokens(rec)
                        continue
                    return rec


    def _on_event(self, event: int) -> Exception | None:
        """What a monitor event of this connection means for the call: the error to raise, or None."""
        if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            return PeerError(_refused(self.address, self.keys))
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # the server holds our key: a later close is the server
            self._answered = True                     # going away
        if event == zmq.EVENT_DISCONNECTED:
            if not self._answered and self.keys is None:
                return PeerError(_refused(self.address, None))
            if not self._answered:
                return PeerError(f"{self.address} closed the connection before any answer: the CURVE handshake "
                                 f"failed (not this cluster's client-port key: client keys of another export or "
                                 f"another `prism keys` run)")
            return ServerLost(f"{self.address} closed the connection (the coordinator stopped, or the message "
                              f"was over its size limit)")
        return None

    def _send(self, parts: list) -> None:
        """Send, waiting at most `dead_after` seconds for a connection to take the message (a DEALER whose
        handshakes keep failing has none, and a plain send would wait for ever): then the reason the
        monitor saw, or ServerLost."""
        try:
            self.sock.send_multipart(parts)
        except zmq.Again:
            failure = None
            while failure is None and self.monitor.poll(0):
                failure = self._on_event(recv_monitor_message(self.monitor)["event"])
            self.reset()
            raise failure or ServerLost(f"{self.address} took no message within {self.dead_after:g} s: no "
                                        f"connection to it completed") from None

    def close(self) -> None:
        self.reset()


def _refused(address: str, keys) -> str:
    """Why a server dropped this client before answering anything: its key, or plain text (no keys) sent to a
    runner that speaks CurveZMQ."""
    where = address.removeprefix("tcp://")
    if keys is None:
        return (f"{where} closed the connection before any answer: this client speaks plain text (--insecure), and "
                f"a runner started without --insecure accepts only CurveZMQ clients: give --keys EXPORT_DIR/client")
    return (f"{where} refused this client's key (CURVE handshake failed): is it in the serving device's "
            f"keys/clients?")


def _close(sock: zmq.Socket, monitor: zmq.Socket | None) -> None:
    """Close a DEALER and its monitor. The monitor is disabled first: closing a monitored socket leaves
    libzmq's side of the monitor alive (it keeps its inproc address and counts against the context's
    1,023 sockets), so a long-lived process that connects often ends with "Too many open files"."""
    if monitor is not None:
        sock.disable_monitor()
        monitor.close(linger=0)
    sock.close(linger=0)
