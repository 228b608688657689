"""`prism run`: the runner on one board. onnxruntime + numpy + pyzmq, no torch.

This module wires the parts together and runs the I/O loop; each part is its own module:
    transport.py    sockets, CurveZMQ (ZAP), size limits, the worker's outbox
    membership.py   heartbeats, liveness, readiness, rank and export checks (pure logic)
    coordinator.py  client requests -> devices -> reply, failures and expiry (pure logic)
    worker.py       the worker: run_device for each request attempt, in lanes (lanes.py: one per coordinator,
                    up to --max-inflight jobs at once within a lane), bounded means inboxes (exchange.py)
    dispatch.py     every message from a peer: checked (schema.py, wire.py) before it has any effect

Every runner may serve clients (--serve): whichever receives a request coordinates it, over the devices
that are members now (membership.members: the live ones), and reruns it when one of them is lost.

Threads: the I/O thread (this loop: every socket, the coordinator, the heartbeats) and one per lane.
Nothing a message contains can stop the loop: a message that fails a check is rejected (counted, one
rate-limited log line), and an unexpected exception while handling one is counted as an internal error.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
import time
import uuid
from pathlib import Path

import zmq

from ..errors import BundleError, PrismError
from .bundle import DeviceBundle
from .clientport import ClientPort
from .coordinator import Coordinator
from .counters import BUGS, Counters
from .device import Engine, Requests, export_tag
from .dispatch import Effects, PeerMessages
from .exchange import inbox_for
from .keys import RunnerKeys, loose_permissions, with_local_client
from .membership import HEARTBEAT_S, Membership
from .schema import MAX_DEVICES, encode_record
from .settings import RunnerSettings
from .status import runner_status
from .split import SplitPolicy, parse_split
from .transport import ENVELOPE, LOCAL, Transport
from .worker import Worker, ZmqExchange

log = logging.getLogger("prism.run")
REFUSAL_GRACE_S = 3.0  # a runner that refuses a peer at start-up keeps sending HELLOs (its export id) this long,
# or until that peer's own REFUSE shows it has decided too: both name the cause, whatever message was lost


def local_host(bind: str) -> str:
    """Where a process on this machine reaches a socket bound to `bind` ('*' and 0.0.0.0: loopback)."""
    return "127.0.0.1" if bind in ("*", "0.0.0.0", "") else bind


def load_keys(bundle: DeviceBundle, rank: int, keys: str | Path | None, insecure: bool) -> RunnerKeys | None:
    if insecure:
        log.warning("device %d runs WITHOUT authentication or encryption (--insecure): anyone who can reach its "
                    "ports can send it requests and frames, and read its traffic", rank)
        return None
    k = RunnerKeys.load(keys or bundle.keys_dir, rank, bundle.devices, bundle.export_id)
    for secret in (k.folder / f"device-{rank}.key_secret", k.folder / "server.key_secret"):
        if loose_permissions(secret):
            log.warning("%s is readable by other users: chmod 600 it", secret)
    return k


def split_policy(split: str | None, bundle: DeviceBundle) -> SplitPolicy | None:
    """`prism run --split` -> the coordinator's policy (None: the default, see Coordinator.split)."""
    if split is None:
        return None
    mode, weights = parse_split(split, bundle.devices)
    return SplitPolicy(mode, weights)


class DeviceHost:
    def __init__(self, bundle: str | Path, settings: RunnerSettings):
        """One runner of `bundle` (a device-K folder) as `settings` say. With settings.http, it also accepts a
        client key made in memory (keys.with_local_client) for the HTTP server in this process
        (`self.local_client_keys`; the client port is reachable from this machine at
        `self.local_client_address`)."""
        s = self.settings = settings
        self.bundle = b = DeviceBundle.load(bundle)  # every sha256 and the export id, recomputed
        self.rank = b.rank if s.rank is None else int(s.rank)
        if self.rank != b.rank:
            raise BundleError(f"{bundle} is the bundle of device {b.rank}, not of rank {self.rank}")
        if b.devices > MAX_DEVICES:
            raise PrismError(f"this export has {b.devices} devices; the runtime supports up to {MAX_DEVICES}")
        addrs = s.check(b.devices, self.rank)
        self.serve, self.peer_timeout, self.limits = s.serve, s.peer_timeout, b.limits
        policy = split_policy(s.split, b)  # a bad --split is refused before anything binds
        self.stop, self.fatal, self.fatal_at, self.refused_by = threading.Event(), None, None, set()
        self.counters = Counters(log)
        peer_addrs = {q: f"tcp://{h}:{p}" for q, (h, p) in enumerate(addrs) if q != self.rank}
        runner_keys, self.local_client_keys = load_keys(b, self.rank, s.keys, s.insecure), None
        if s.http is not None and runner_keys is not None:
            runner_keys, self.local_client_keys = with_local_client(runner_keys)
        self.bind_host = s.bind or addrs[self.rank][0]
        self.local_client_address = f"{local_host(self.bind_host)}:{s.serve}" if s.serve is not None else None
        self.membership = Membership(self.rank, peer_addrs, b.export_id, b.handshake_settings, uuid.uuid4().hex[:12],
                                     serving=s.serve is not None, dead_after=s.heartbeat_timeout,
                                     peer_list=tuple(f"{h}:{p}" for h, p in addrs))
        self.transport = t = Transport(
            rank=self.rank, peers=peer_addrs, port=addrs[self.rank][1], bind=self.bind_host,
            serve=s.serve, keys=runner_keys, max_peer_bytes=self.limits.max_message_bytes,
            max_client_bytes=self.limits.max_client_bytes, counters=self.counters)
        self.engine = Engine(b, s.threads, providers=s.providers, optimization=s.optimization, slowdown=s.slowdown)
        L = self.limits

        def lane_exchange() -> ZmqExchange:  # each lane's own endpoint: inbox, outbox socket
            inbox = inbox_for(L.max_batch, L.max_rows, L.hidden, L.wire_dtype, b.devices, s.inflight)
            return ZmqExchange(self.rank, t.new_outbox(), inbox=inbox, **self.engine.exchange_kwargs(s.timeout))

        self.worker = Worker(self.engine, self.rank, lane_exchange, Requests(b) if s.serve is not None else None,
                             on_internal_error=lambda: self.counters.event("internal_errors"),
                             max_cache_bytes=int(s.max_cache_mb * 2**20), inflight=s.inflight,
                             batch_wait=s.batch_wait_ms / 1e3 if s.serve is not None else 0.0, batch_pad=s.batch_pad)
        self.coordinator = self.client_port = None
        if s.serve is not None:
            self.coordinator = Coordinator(b, self.rank, self.membership, t.send_peer, None, self.worker.submit,
                                           timeout=s.timeout, min_devices=s.min_devices, abort_local=self.worker.abort,
                                           hold_s=s.heartbeat_timeout + HEARTBEAT_S, split=policy)
            self.client_port = ClientPort(t, self.coordinator, self.limits, self.counters, self.status,
                                          max_inflight=s.max_client_inflight, max_queued=s.max_client_queue)
        effects = Effects(self.worker.submit, self.worker.abort, self.worker.deliver_means,
                          lambda session, parts: t.reply(t.peer_in, session, parts), self._set_fatal, self.coordinator,
                          refused_by=self.refused_by.add)
        self.peer_messages = PeerMessages(self.rank, self.limits, export_tag(b.export_id), self.membership,
                                          self.counters, effects)

    def _set_fatal(self, reason: str) -> None:
        """No cluster can form with a peer (another export, other keys, another --peers): stop, after a grace
        (REFUSAL_GRACE_S) in which this runner's HELLOs still tell that peer why."""
        if self.fatal is None:
            log.error("%s", reason)
            self.fatal, self.fatal_at = reason, time.monotonic()

    def _done(self, now: float) -> bool:
        """Stop now? SIGINT/SIGTERM, or a fatal refusal whose peer has refused us too (or whose grace ended)."""
        if self.stop.is_set():
            return True
        return self.fatal is not None and (bool(self.refused_by) or now - self.fatal_at > REFUSAL_GRACE_S)

    # ------------------------------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Serve until stopped (SIGINT/SIGTERM set `stop`). Returns the process exit code. SIGUSR1 writes every
        thread's stack to stderr (faulthandler), for a runner that seems stuck."""
        if hasattr(faulthandler, "register"):
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        self.worker.start(self.stop)
        t, poller = self.transport, zmq.Poller()
        for sock in t.sockets():
            poller.register(sock, zmq.POLLIN)
        handlers = {t.peer_in: self._on_peer, t.outbox_in: self._on_outbox,
                    t.clients: self.client_port.on_message if self.client_port else None,
                    **{m: self._on_monitor for m in t.monitors},
                    **{sock: self._on_refused(q) for q, sock in t.out.items()}}
        started, next_hello, was_ready = time.monotonic(), 0.0, False
        log.info("device %d/%d up on port %s (export %s)%s%s", self.rank, self.bundle.devices,
                 t.peer_in.last_endpoint.decode(), self.bundle.export_id[:12],
                 f", serving clients on port {self.serve}" if self.serve else "",
                 f", CurveZMQ (key set {t.keys.keyset.digest[:12]})" if t.keys and t.keys.keyset else
                 ", CurveZMQ" if t.keys else ", NOT authenticated (--insecure)")
        try:
            while not self._done(time.monotonic()):
                now = time.monotonic()
                if now >= next_hello:
                    self._hello(now)
                    next_hello = now + HEARTBEAT_S
                self._tick(now)
                if self.membership.ever_ready and not was_ready:
                    was_ready = True
                    log.info("device %d ready: all %d peers connected", self.rank, len(self.membership.peers))
                elif not was_ready and now - started > self.peer_timeout and self.fatal is None:
                    missing = [f"{q} ({self.membership.peers[q].address})" for q in self.membership.missing(now)]
                    log.error("device %d: peer(s) %s did not come up within %g s", self.rank, ", ".join(missing),
                              self.peer_timeout)
                    return 1
                for sock, _ in poller.poll(max(1, int(1000 * min(0.05, next_hello - now)))):
                    self._guarded(handlers[sock], sock)
                if self.coordinator:
                    self.coordinator.expire(time.monotonic())
                    self.client_port.expire(time.monotonic())
                self.worker.lanes.expire(time.monotonic())
                t.summary.flush()
        finally:
            self.stop.set()
            self.worker.lanes.join(timeout=2)
            t.close(linger_ms=1000 if self.fatal else 0)  # a fatal refusal reaches the peer it refused
        if self.fatal:
            log.error("device %d stopped: no cluster can form with its peers (the refusal above)", self.rank)
            return 1
        log.info("device %d stopped", self.rank)
        return 0

    def _guarded(self, handler, sock) -> None:
        try:
            handler(sock)
        except Exception as e:  # a bug: never let a message stop the runner
            self.counters.event("internal_errors")
            BUGS.error(e, f"device {self.rank}: internal error while handling a message (the runner keeps serving)")

    def _on_peer(self, sock) -> None:
        session, user, parts = self.transport.recv(sock)
        self.peer_messages.on_peer(session, user, parts)

    def _on_refused(self, q: int):
        return lambda sock: self.peer_messages.on_refused(q, sock.recv_multipart())

    def _on_outbox(self, sock) -> None:
        """The worker's messages: forwarded to their peer, or (a wake-up) its records for our coordinator."""
        frames = sock.recv_multipart(copy=False)
        dst, request = ENVELOPE.unpack(frames[0].bytes)
        if dst == LOCAL:
            return self.peer_messages.on_local(self.transport.local.get_nowait())
        if not self.transport.send_peer(dst, frames[1:]):
            why = f"device {self.rank} cannot send to device {dst}: not connected"
            self.worker.abort(request, why)
            if self.coordinator:
                self.coordinator.on_send_failed(request, dst, why, time.monotonic())

    def _on_monitor(self, m) -> None:
        ev = self.transport.on_monitor(m)
        if ev is None:
            return
        if ev.what == "peer_closed":
            self.membership.on_disconnect(ev.peer, now=time.monotonic())
        elif ev.what == "peer_handshake":
            self.membership.on_handshake(ev.peer)
        elif ev.what == "peer_keys":
            v = self.membership.on_key_failure(ev.peer, ev.detail, certain=ev.certain)
            if v.note:
                log.warning("device %d: %s", self.rank, v.note)
            if v.fatal:
                self._set_fatal(v.fatal)
        elif self.client_port is not None:
            self.client_port.on_event(ev)

    def _hello(self, now: float) -> None:
        msg = encode_record(self.membership.hello(now, self.health))
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

    def status(self, now: float) -> dict:
        """The runner's STATUS (operator view): status.runner_status."""
        return runner_status(self, now)
