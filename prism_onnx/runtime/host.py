"""`prism run`: the runner on one board. onnxruntime + numpy + pyzmq, no torch.

This module wires the parts together and runs the I/O loop; each part is its own module:
    transport.py    sockets, CurveZMQ (ZAP), size limits, the worker's outbox
    membership.py   heartbeats, liveness, readiness, rank and export checks (pure logic)
    coordinator.py  client requests -> devices -> reply, failures and expiry (pure logic)
    worker.py       the worker: run_device for each request attempt, in lanes (lanes.py: one per coordinator,
                    one job at a time within a lane), bounded means inboxes
    dispatch.py     every message from a peer: checked (messages.py, wire.py) before it has any effect

Every runner may serve clients (--serve): whichever receives a request coordinates it, over the devices
that are members now (membership.members: the live ones), and reruns it when one of them is lost.

Threads: the I/O thread (this loop: every socket, the coordinator, the heartbeats) and one per lane.
Nothing a message contains can stop the loop: a message that fails a check is rejected (counted, one
rate-limited log line), and an unexpected exception while handling one is counted as an internal error.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import zmq

from ..errors import BundleError, FrameError, PrismError
from .admission import request_rules
from .bundle import DeviceBundle
from .coordinator import Coordinator
from .counters import Counters
from .device import Engine, Requests
from .dispatch import PeerMessages
from .keys import RunnerKeys, loose_permissions, with_local_client
from .membership import DEAD_AFTER_S, HEARTBEAT_S, Membership
from .messages import MAX_DEVICES
from .protocol import ArrayRules, Kind, decode, encode, peek_call, peek_kind
from .split import SplitPolicy, parse_split
from .transport import Transport
from .wire import frame_nbytes
from .worker import Inbox, Worker, ZmqExchange

log = logging.getLogger("prism.run")


def parse_peers(peers: str) -> list[tuple[str, int]]:
    out = []
    for item in peers.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise PrismError(f"--peers: '{item}' is not HOST:PORT")
        out.append((host, int(port)))
    return out


def local_host(bind: str) -> str:
    """Where a process on this machine reaches a socket bound to `bind` ('*' and 0.0.0.0: loopback)."""
    return "127.0.0.1" if bind in ("*", "0.0.0.0", "") else bind


def load_keys(bundle: DeviceBundle, rank: int, keys: str | Path | None, insecure: bool) -> RunnerKeys | None:
    if insecure:
        log.warning("device %d runs WITHOUT authentication or encryption (--insecure): anyone who can reach its "
                    "ports can send it requests and frames, and read its traffic", rank)
        return None
    k = RunnerKeys.load(keys or bundle.keys_dir, rank, bundle.devices)
    if loose_permissions(k.folder / f"device-{rank}.key_secret"):
        log.warning("%s is readable by other users: chmod 600 it", k.folder / f"device-{rank}.key_secret")
    return k


def split_policy(split: str | None, bundle: DeviceBundle) -> SplitPolicy | None:
    """`prism run --split` -> the coordinator's policy (None: the default, see Coordinator.split)."""
    if split is None:
        return None
    mode, weights = parse_split(split, bundle.devices)
    return SplitPolicy(mode, weights)


class DeviceHost:
    def __init__(self, bundle: str | Path, *, rank: int | None, peers: str, serve: int | None = None,
                 threads: int = 1, timeout: float = 10.0, peer_timeout: float = 60.0, bind: str | None = None,
                 keys: str | Path | None = None, insecure: bool = False, dead_after: float = DEAD_AFTER_S,
                 max_cache_mb: float = 1024.0, min_devices: int = 1, local_client: bool = False,
                 providers=None, optimization: str = "all", split: str | None = None, slowdown: float = 1.0,
                 inflight: int = 1, batch_wait_ms: float = 2.0, batch_pad: bool = False):
        """local_client: also accept a client key made in memory (keys.with_local_client), for the HTTP
        server in this process (`prism run --http`); it is `self.local_client_keys`, and the client port
        is reachable from this machine at `self.local_client_address`. providers, optimization: the
        onnxruntime execution providers and graph optimization level of the device's sessions (Engine).
        inflight: requests of one coordinator this device runs at once (pipelining; lanes.py).
        batch_wait_ms: with serve, how long batching may wait for requests to join (batching.py; 0: off);
        batch_pad: also batch requests of different lengths, padded (changes outputs at CR > 1).
        split: how the coordinator splits requests (split.parse_split: auto, even, or weights; default the
        export's static split if it has one, else auto); slowdown: emulate a slower board (Engine)."""
        self.bundle = b = DeviceBundle.load(bundle)  # every sha256 and the export id, recomputed
        self.rank = b.rank if rank is None else int(rank)
        if self.rank != b.rank:
            raise BundleError(f"{bundle} is the bundle of device {b.rank}, not of rank {self.rank}")
        addrs = parse_peers(peers)
        if len(addrs) != b.devices:
            raise PrismError(f"--peers lists {len(addrs)} devices, this export has {b.devices}")
        if b.devices > MAX_DEVICES:
            raise PrismError(f"this export has {b.devices} devices; the runtime supports up to {MAX_DEVICES}")
        if not 1 <= min_devices <= b.devices:
            raise PrismError(f"--min-devices {min_devices}: must be between 1 and this export's {b.devices} devices")
        self.serve, self.peer_timeout, self.limits = serve, float(peer_timeout), b.limits
        policy = split_policy(split, b)  # a bad --split is refused before anything binds
        if not 1 <= inflight <= 16:
            raise PrismError(f"--max-inflight {inflight}: must be between 1 and 16")
        self.stop, self.fatal = threading.Event(), None
        self.counters = Counters(log)
        peer_addrs = {q: f"tcp://{h}:{p}" for q, (h, p) in enumerate(addrs) if q != self.rank}
        if local_client and serve is None:
            raise PrismError("--http needs --serve PORT: the HTTP server talks to this runner's client port")
        runner_keys, self.local_client_keys = load_keys(b, self.rank, keys, insecure), None
        if local_client and runner_keys is not None:
            runner_keys, self.local_client_keys = with_local_client(runner_keys, self.rank)
        self.bind_host = bind or addrs[self.rank][0]
        self.local_client_address = f"{local_host(self.bind_host)}:{serve}" if serve is not None else None
        self.membership = Membership(self.rank, peer_addrs, b.export_id, b.handshake_settings, uuid.uuid4().hex[:12],
                                     serving=serve is not None, dead_after=dead_after,
                                     peer_list=tuple(f"{h}:{p}" for h, p in addrs))
        self.transport = t = Transport(
            rank=self.rank, peers=peer_addrs, port=addrs[self.rank][1], bind=self.bind_host,
            serve=serve, keys=runner_keys, max_peer_bytes=self.limits.max_message_bytes,
            max_client_bytes=self.limits.max_client_bytes, counters=self.counters)
        self.engine = Engine(b, threads, providers=providers, optimization=optimization, slowdown=slowdown)
        frame = frame_nbytes(self.limits.max_batch, self.limits.max_rows, self.limits.hidden, self.limits.wire_dtype)
        per_source = (4 * frame + (1 << 16)) * inflight

        def lane_exchange() -> ZmqExchange:  # each lane's own endpoint: inbox, stash, outbox socket
            inbox = Inbox(per_source=per_source, total=per_source * max(1, b.devices - 1))
            return ZmqExchange(self.rank, t.new_outbox(), inbox, inflight=inflight,
                               **self.engine.exchange_kwargs(timeout))

        self.worker = Worker(self.engine, self.rank, lane_exchange, Requests(b) if serve is not None else None,
                             on_internal_error=lambda: self.counters.event("internal_errors"),
                             max_cache_bytes=int(max_cache_mb * 2**20), inflight=inflight,
                             batch_wait=batch_wait_ms / 1e3 if serve is not None else 0.0, batch_pad=batch_pad)
        self.coordinator = None
        if serve is not None:
            self.coordinator = Coordinator(b, self.rank, self.membership, t.send_peer, self._reply_client,
                                           self.worker.submit, timeout=timeout, min_devices=min_devices,
                                           abort_local=self.worker.abort, hold_s=dead_after + HEARTBEAT_S,
                                           split=policy)
        self.peer_messages = PeerMessages(self)
        self.client_rules = request_rules(self.limits)

    # ------------------------------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Serve until stopped (SIGINT/SIGTERM set `stop`). Returns the process exit code."""
        self.worker.start(self.stop)
        t, poller = self.transport, zmq.Poller()
        for s in t.sockets():
            poller.register(s, zmq.POLLIN)
        handlers = {t.peer_in: self.peer_messages.on_peer, t.outbox_in: self.peer_messages.on_outbox,
                    t.clients: self._on_client, **{m: self._on_monitor for m in t.monitors},
                    **{s: self.peer_messages.on_dealer(q) for q, s in t.out.items()}}
        started, next_hello, was_ready = time.monotonic(), 0.0, False
        log.info("device %d/%d up on port %s (export %s)%s%s", self.rank, self.bundle.devices,
                 t.peer_in.last_endpoint.decode(), self.bundle.export_id[:12],
                 f", serving clients on port {self.serve}" if self.serve else "",
                 ", CurveZMQ" if t.keys else ", NOT authenticated (--insecure)")
        try:
            while not self.stop.is_set() and self.fatal is None:
                now = time.monotonic()
                if now >= next_hello:
                    self._hello(now)
                    next_hello = now + HEARTBEAT_S
                self._tick(now)
                if self.membership.ever_ready and not was_ready:
                    was_ready = True
                    log.info("device %d ready: all %d peers connected", self.rank, len(self.membership.peers))
                elif not was_ready and now - started > self.peer_timeout:
                    missing = [f"{q} ({self.membership.peers[q].address})" for q in self.membership.missing(now)]
                    log.error("device %d: peer(s) %s did not come up within %g s", self.rank, ", ".join(missing),
                              self.peer_timeout)
                    return 1
                for sock, _ in poller.poll(max(1, int(1000 * min(0.05, next_hello - now)))):
                    self._guarded(handlers[sock], sock)
                if self.coordinator:
                    self.coordinator.expire(time.monotonic())
                self.worker.lanes.expire(time.monotonic())
        finally:
            self.stop.set()
            self.worker.lanes.join(timeout=2)
            t.close(linger_ms=1000 if self.fatal else 0)  # a fatal refusal reaches the peer it refused
        if self.fatal:
            log.error("%s", self.fatal)
            return 1
        log.info("device %d stopped", self.rank)
        return 0

    def _guarded(self, handler, sock) -> None:
        try:
            handler(sock)
        except Exception:  # a bug: never let a message stop the runner
            self.counters.event("internal_errors")
            log.exception("device %d: internal error while handling a message (the runner keeps serving)", self.rank)

    def _on_monitor(self, m) -> None:
        q = self.transport.on_monitor(m)
        if q is not None:
            self.membership.on_disconnect(q, now=time.monotonic())

    def _hello(self, now: float) -> None:
        msg = encode(Kind.HELLO, self.membership.hello(now, self.health))
        for q in self.membership.peers:
            self.transport.send_peer(q, msg)  # IMMEDIATE: dropped while q is not connected

    def _tick(self, now: float) -> None:
        lost, back = self.membership.tick(now)
        for q in lost:
            why = self.membership.describe(q, now)
            log.warning("device %d: lost device %d: %s", self.rank, q, why)
            self.worker.abort_involving(q, f"lost device {q}: {why}")
            if self.coordinator:
                self.coordinator.on_peer_lost(q, why, now)
        for q in back:
            log.info("device %d: device %d is reachable again: it is in the plan of the next requests", self.rank, q)

    @property
    def rejected_total(self) -> int:
        return self.counters.total_rejected + self.worker.lanes.rejected_frames

    @property
    def health(self) -> dict:
        """What this runner refused or failed at: messages rejected by its checks, connections refused by
        CurveZMQ, internal errors (bugs). Sent in every HELLO, shown per device in the coordinator's STATUS."""
        ev = self.counters.events
        return {"rejected": self.rejected_total, "internal_errors": ev["internal_errors"],
                "denied": ev["auth_denied"] + sum(ev[k] for k in ("handshake_failed", "handshake_failed_protocol"))}

    # ------------------------------------------------------------------------------------------ clients
    def _reply_client(self, client: bytes, meta: dict, arrays: dict | None = None, kind: Kind = Kind.REPLY) -> None:
        self.transport.reply(self.transport.clients, client, encode(kind, meta, arrays))

    def _on_client(self, sock) -> None:
        client, user, parts = self.transport.recv(sock)
        kind = peek_kind(parts)
        try:
            _, meta, arrays = decode(parts, self.client_rules if kind == Kind.REQUEST else ArrayRules(0, 0))
        except FrameError as e:
            self.counters.reject("client message", str(e), sum(len(p) for p in parts), user or "")
            return self._reply_client(client, {"ok": False, "error": f"FrameError: {e}", "call": peek_call(parts)})
        call = meta.get("call") if type(meta.get("call")) is int else None
        if kind == Kind.STATUS:
            self.counters.accept("status")
            return self._reply_client(client, {**self.status(time.monotonic()), "call": call})
        if kind != Kind.REQUEST:
            self.counters.reject("client message", f"unexpected {kind.name}", 0, user or "")
            return self._reply_client(client, {"ok": False, "error": f"unexpected {kind.name}", "call": call})
        self.counters.accept("request")
        self.coordinator.on_request(client, meta, arrays, time.monotonic())

    def status(self, now: float) -> dict:
        m = self.membership
        return {
            "ok": True, "ready": m.ready(now), "export_id": self.bundle.export_id, "devices": self.bundle.devices,
            "coordinator": self.rank, "connected": m.connected(now), "members": m.members(now),
            "min_devices": self.coordinator.min_devices if self.coordinator else None,
            "secure": self.transport.keys is not None,
            "rejected_frames": {str(self.rank): self.rejected_total,
                                **{str(q): p.health.get("rejected", 0) for q, p in m.peers.items()}},
            "health": {str(self.rank): self.health, **{str(q): p.health for q, p in m.peers.items()}},
            "pending": len(self.coordinator.pending) if self.coordinator else 0,
            "requests": self.coordinator.describe_pending(now) if self.coordinator else [],
            "split": self.coordinator.split.describe() if self.coordinator else None,
            "counters": {**self.counters.to_dict(), "exchange_rejected": self.worker.lanes.rejected_frames,
                         "inbox_bytes": self.worker.lanes.inbox_bytes},
            "peers": {str(q): m.describe(q, now) for q in m.peers},
        }
