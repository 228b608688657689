"""`prism run`: the runner on one board. onnxruntime + numpy + pyzmq, no torch.

Threads and sockets (a ZeroMQ socket is only ever used by one thread):
    main (I/O) thread   ROUTER `peer_in` bound on this device's port: means frames and control messages from
                        peers; one `ctl` DEALER per peer for HELLO heartbeats and START; the client ROUTER
                        (`--serve`), when this device coordinates. It also runs the coordinator.
    worker thread       runs requests one at a time, in the order the coordinator started them (`run_device`),
                        sending means on its own `data` DEALER per peer and reading the ones the I/O thread
                        queues for it; results go to the coordinator.

Handshake: every runner sends HELLO (rank, export id, instance nonce) to every peer twice a second. A
HELLO from another export, or claiming a rank that a live runner holds, is answered with REFUSE; a
runner refused during start-up exits 1. A runner is ready once every peer has been heard from.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from ..errors import BundleError, FrameError, PeerError, PrismError
from .bundle import DeviceBundle
from ..program import DeviceResult, RequestStats, gather_outputs, own_slice, run_device
from .device import Engine, Requests, check_outputs
from .exchange import Abort, Exchange, Traffic
from .protocol import Kind, decode, encode, kind_of

log = logging.getLogger("prism.run")

HEARTBEAT_S = 0.5
ALIVE_S = 3.0  # a peer not heard from for this long counts as gone
SEND_WAIT_S = 1.0  # how long a send may wait for a (re)connecting peer before the peer counts as down


def send_within(sock: zmq.Socket, parts, seconds: float) -> bool:
    """Send without blocking longer than `seconds` (sockets use IMMEDIATE: no queueing for absent peers)."""
    if not sock.poll(int(1000 * seconds), zmq.POLLOUT):
        return False
    try:
        sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        return True
    except zmq.Again:
        return False


def parse_peers(peers: str) -> list[tuple[str, int]]:
    out = []
    for item in peers.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise PrismError(f"--peers: '{item}' is not HOST:PORT")
        out.append((host, int(port)))
    return out


def max_message_bytes(manifest) -> int:
    """Largest array part a legitimate message of this bundle can carry (inputs, means or outputs)."""
    spec, s = manifest.model, manifest.settings
    B, N, D = s.max_batch, s.max_seq_len, max(spec.hidden_size, spec.row_width)
    widest = max([D] + [int(o.shape[-1]) for g in manifest.graphs.values() for o in g.outputs
                        if isinstance(o.shape[-1], int)])
    per_token_in = 4 * spec.num_channels * spec.patch_size ** 2 if spec.input_kind == "image" else 8
    return max(B * N * widest * 4, B * N * per_token_in, B * N * 8) + (1 << 16)


@dataclass
class Peer:
    rank: int
    address: str
    nonce: str | None = None
    last_seen: float = 0.0
    heard_us: bool = False  # its last HELLO says it hears our HELLOs: both directions work
    ready: bool = False  # its last HELLO says it hears, and is heard by, all its peers
    rejected_frames: int = 0

    def alive(self, now: float) -> bool:
        return self.nonce is not None and now - self.last_seen < ALIVE_S and self.heard_us


@dataclass
class Job:
    request: int
    coordinator: int
    attention_mask: np.ndarray
    own_inputs: dict[str, np.ndarray]
    deadline: float
    outputs: set[str] | None = None


@dataclass
class Pending:
    """A client request the coordinator is running."""

    client: bytes
    t0: float
    deadline: float
    plan: object = None
    results: dict[int, tuple[dict, dict]] = field(default_factory=dict)


class ZmqExchange(Exchange):
    """Means leave on the worker's data DEALERs and arrive through the I/O thread's `inbox`."""

    def __init__(self, rank: int, data: dict[int, zmq.Socket], inbox: queue.Queue, **kw):
        super().__init__(rank, **kw)
        self.data, self.inbox = data, inbox

    def _send(self, dst, parts):
        if not send_within(self.data[dst], parts, self.timeout):  # a restarted peer may still be reconnecting
            raise PeerError(f"device {self.rank} cannot send to device {dst}: not connected")

    def _recv(self, timeout):
        try:
            return self.inbox.get(timeout=min(timeout, 0.5))
        except queue.Empty:
            return None


class DeviceHost:
    def __init__(self, bundle: str | Path, *, rank: int | None, peers: str, serve: int | None = None,
                 threads: int = 1, timeout: float = 10.0, peer_timeout: float = 60.0, bind: str = "*"):
        self.bundle = DeviceBundle.load(bundle)
        m = self.manifest = self.bundle.manifest
        self.rank = self.bundle.rank if rank is None else int(rank)
        if self.rank != self.bundle.rank:
            raise BundleError(f"{bundle} is the bundle of device {self.bundle.rank}, not of rank {self.rank}")
        addrs = parse_peers(peers)
        if len(addrs) != m.devices:
            raise PrismError(f"--peers lists {len(addrs)} devices, this export has {m.devices}")
        self.peers = {q: Peer(q, f"tcp://{h}:{p}") for q, (h, p) in enumerate(addrs) if q != self.rank}
        self.port = addrs[self.rank][1]
        self.serve, self.timeout, self.peer_timeout = serve, float(timeout), float(peer_timeout)
        self.nonce = uuid.uuid4().hex[:12]
        self.engine = Engine(self.bundle, threads)
        self.requests = Requests(self.bundle) if serve is not None else None
        self.max_bytes = max_message_bytes(m)
        self.max_client_bytes = max(self.max_bytes, 32 << 20)  # image files can be larger than their pixels
        self.ready = False
        self.stop = threading.Event()
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.inbox: queue.Queue = queue.Queue(maxsize=4096)
        self.pending: dict[int, Pending] = {}
        self.aborted: deque[int] = deque(maxlen=1024)  # requests the coordinator gave up on
        self.ids = itertools.count(time.time_ns() // 1000)  # increasing across coordinator restarts
        self.fatal: str | None = None

        ctx = self.ctx = zmq.Context()
        self.peer_in = ctx.socket(zmq.ROUTER)
        self.peer_in.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)
        self.peer_in.setsockopt(zmq.LINGER, 0)
        try:
            self.peer_in.bind(f"tcp://{bind}:{self.port}")
        except zmq.ZMQError as e:
            raise PeerError(f"cannot listen on port {self.port} ({e}): is another runner already device "
                            f"{self.rank} on this host?") from None
        self.ctl = {q: self._dealer(f"ctl-{self.rank}-{self.nonce}", p.address) for q, p in self.peers.items()}
        self.data = {q: self._dealer(f"data-{self.rank}-{self.nonce}", p.address) for q, p in self.peers.items()}
        self.results_in = ctx.socket(zmq.PULL)  # the worker's results, when this device coordinates
        self.results_in.bind(f"inproc://results-{self.nonce}")
        self.results_out = ctx.socket(zmq.PUSH)
        self.results_out.connect(f"inproc://results-{self.nonce}")
        self.clients = None
        if serve is not None:
            self.clients = ctx.socket(zmq.ROUTER)
            self.clients.setsockopt(zmq.LINGER, 0)
            self.clients.setsockopt(zmq.MAXMSGSIZE, self.max_client_bytes)
            try:
                self.clients.bind(f"tcp://{bind}:{serve}")
            except zmq.ZMQError as e:
                raise PeerError(f"cannot serve clients on port {serve}: {e}") from None
        self.exchange = ZmqExchange(self.rank, self.data, self.inbox, **self.engine.exchange_kwargs(self.timeout))

    def _dealer(self, identity: str, address: str) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, identity.encode())
        s.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer that is not connected: fail fast instead
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        s.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # only REFUSE comes back on these
        s.connect(address)
        return s

    # ------------------------------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Serve until stopped (SIGINT/SIGTERM set `stop`). Returns the process exit code."""
        worker = threading.Thread(target=self._worker, name="prism-worker", daemon=True)
        worker.start()
        poller = zmq.Poller()
        for s in [self.peer_in, self.results_in, *self.ctl.values()] + ([self.clients] if self.clients else []):
            poller.register(s, zmq.POLLIN)
        started, last_hello = time.monotonic(), 0.0
        log.info("device %d/%d up on port %d (export %s)%s", self.rank, self.manifest.devices, self.port,
                 self.manifest.export_id[:12], f", serving clients on port {self.serve}" if self.serve else "")
        try:
            while not self.stop.is_set() and self.fatal is None:
                now = time.monotonic()
                if now - last_hello >= HEARTBEAT_S:
                    self._hello()
                    last_hello = now
                if not self.ready:
                    if all(p.alive(now) for p in self.peers.values()):
                        self.ready = True
                        log.info("device %d ready: all %d peers connected", self.rank, len(self.peers))
                    elif now - started > self.peer_timeout:
                        missing = [f"{p.rank} ({p.address})" for p in self.peers.values() if not p.alive(now)]
                        log.error("device %d: peer(s) %s did not come up within %g s", self.rank,
                                  ", ".join(missing), self.peer_timeout)
                        return 1
                for sock, _ in poller.poll(100):
                    if sock is self.peer_in:
                        self._on_peer_message(self.peer_in.recv_multipart(copy=True))
                    elif sock is self.results_in:
                        self._on_result(self.rank, *self._decode(self.results_in.recv_multipart())[1:])
                    elif sock is self.clients:
                        self._on_client(self.clients.recv_multipart())
                    else:
                        self._on_refuse(sock.recv_multipart())
                self._expire()
        finally:
            self.stop.set()
            worker.join(timeout=2)
            self.ctx.destroy(linger=0)
        if self.fatal:
            log.error("%s", self.fatal)
            return 1
        log.info("device %d stopped", self.rank)
        return 0

    def _decode(self, parts, limit: int | None = None):
        return decode(parts, limit or self.max_bytes)

    def _reject(self, why: str, nbytes: int):
        self.exchange.traffic.rejected_frames += 1
        log.warning("device %d rejected a message (%d bytes): %s", self.rank, nbytes, why)

    def _send_ctl(self, q: int, parts, wait: float = 0.0) -> bool:
        return send_within(self.ctl[q], parts, wait)

    # ------------------------------------------------------------------------------------------ handshake
    def _hello(self):
        meta = {"rank": self.rank, "nonce": self.nonce, "export_id": self.manifest.export_id,
                "devices": self.manifest.devices, "serving": self.serve is not None,
                "heard_from": sorted(q for q, p in self.peers.items() if p.nonce is not None),
                "ready": self.ready,
                "rejected_frames": self.exchange.traffic.rejected_frames}
        msg = encode(Kind.HELLO, meta)
        for q, peer in self.peers.items():
            # IMMEDIATE sockets refuse to send without a live connection: the runner at q's address is gone
            if not self._send_ctl(q, msg) and peer.last_seen:
                log.warning("device %d: lost the connection to device %d", self.rank, q)
                peer.last_seen, peer.heard_us, peer.ready = 0.0, False, False

    def _on_hello(self, identity: bytes, meta: dict):
        def refuse(reason):
            log.error("device %d refused a runner: %s", self.rank, reason)
            self.peer_in.send_multipart([identity, *encode(Kind.REFUSE, {"reason": reason, "from": self.rank})])

        rank, nonce = meta.get("rank"), str(meta.get("nonce"))
        if meta.get("export_id") != self.manifest.export_id:
            reason = (f"bundle from another export: device {rank} runs export {str(meta.get('export_id'))[:12]}, "
                      f"device {self.rank} runs {self.manifest.export_id[:12]}")
            if not self.ready:  # no cluster can form; a running cluster ignores the stranger instead
                self.fatal = f"device {self.rank} refused device {rank} at the handshake: {reason}"
            return refuse(reason)
        if rank == self.rank:
            return refuse(f"two runners claim rank {rank}")
        if rank not in self.peers:
            return refuse(f"rank {rank} is not in 0..{self.manifest.devices - 1}")
        if meta.get("serving") and self.serve is not None:
            return refuse(f"devices {rank} and {self.rank} both serve clients; only one may")
        peer, now = self.peers[rank], time.monotonic()
        if peer.nonce not in (None, nonce):
            if peer.alive(now):
                return refuse(f"two runners claim rank {rank} (a live one is already connected)")
            log.warning("device %d: device %d restarted", self.rank, rank)
        elif peer.nonce is None:
            log.info("device %d: device %d connected", self.rank, rank)
        peer.nonce, peer.last_seen = nonce, now
        peer.heard_us = self.rank in meta.get("heard_from", [])
        peer.ready = bool(meta.get("ready"))
        peer.rejected_frames = int(meta.get("rejected_frames", 0))

    def _on_refuse(self, parts):
        try:
            kind, meta, _ = self._decode(parts)
        except FrameError as e:
            return self._reject(str(e), sum(len(p) for p in parts))
        if kind != Kind.REFUSE:
            return self._reject(f"unexpected {kind.name} on a peer connection", sum(len(p) for p in parts))
        reason = f"device {meta.get('from')} refused device {self.rank} at the handshake: {meta.get('reason')}"
        if self.ready:
            log.warning("%s (ignored: this cluster is already running)", reason)
        else:
            self.fatal = reason

    # ------------------------------------------------------------------------------------- peer messages
    def _on_peer_message(self, frames: list[bytes]):
        identity, parts = frames[0], frames[1:]
        nbytes = sum(len(p) for p in parts)
        kind = kind_of(parts)
        if kind == "means":
            try:
                self.inbox.put_nowait(parts)
            except queue.Full:
                self._reject("means inbox full", nbytes)
            return
        if kind == "garbage":
            return self._reject("not a PRISM message", nbytes)
        try:
            k, meta, arrays = self._decode(parts)
            if k == Kind.HELLO:
                self._on_hello(identity, meta)
            elif k == Kind.START:
                self._on_start(meta, arrays)
            elif k == Kind.RESULT:
                self._on_result(int(meta["rank"]), meta, arrays)
            elif k == Kind.ABORT:
                self._abort_local(int(meta["request"]), str(meta.get("reason", "")))
            else:
                self._reject(f"unexpected {k.name} from a peer", nbytes)
        except (FrameError, KeyError, TypeError, ValueError) as e:
            self._reject(f"{type(e).__name__}: {e}", nbytes)

    def _on_start(self, meta: dict, arrays: dict):
        mask = arrays.pop("attention_mask")
        outputs = meta.get("outputs")
        self.jobs.put(Job(int(meta["request"]), int(meta["coordinator"]), mask, arrays,
                          time.monotonic() + float(meta["budget_s"]), set(outputs) if outputs else None))

    def _abort_local(self, request: int, reason: str):
        """Skip the request if still queued; wake the worker if it is waiting for the request's means."""
        self.aborted.append(request)
        try:
            self.inbox.put_nowait(Abort(request, reason))
        except queue.Full:
            pass

    def _abort(self, request: int, reason: str):
        """Coordinator: a request failed; tell every device to drop it."""
        msg = encode(Kind.ABORT, {"request": request, "reason": reason})
        for q in self.peers:
            self._send_ctl(q, msg)
        self._abort_local(request, reason)

    # ------------------------------------------------------------------------------------------- worker
    def _worker(self):
        while not self.stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            meta, arrays = {"request": job.request, "rank": self.rank, "ok": False}, {}
            try:
                if time.monotonic() > job.deadline:
                    raise PeerError(f"request {job.request} expired before device {self.rank} could start it")
                if job.request in self.aborted:
                    raise PeerError(f"request {job.request} was aborted before device {self.rank} started it")
                plan = self.manifest.plan(job.attention_mask)
                res: DeviceResult = run_device(self.manifest.program, self.engine, plan, self.rank, job.own_inputs,
                                               self.exchange, job.request, job.outputs)
                meta.update(ok=True, timings=res.timings, traffic=res.traffic.to_dict())
                arrays = res.outputs
            except PrismError as e:
                meta["error"] = str(e)
                meta["traffic"] = self.exchange.finish(job.request).to_dict()
                log.error("device %d: request %d failed: %s", self.rank, job.request, e)
            except Exception as e:  # a bug: report it, keep serving
                meta["error"] = f"device {self.rank} internal error: {type(e).__name__}: {e}"
                meta["traffic"] = self.exchange.finish(job.request).to_dict()
                log.exception("device %d: request %d crashed", self.rank, job.request)
            msg = encode(Kind.RESULT, meta, arrays)
            if job.coordinator == self.rank:
                self.results_out.send_multipart(msg)
            elif not send_within(self.data[job.coordinator], msg, self.timeout):
                log.error("device %d: coordinator %d unreachable, result of request %d lost", self.rank,
                          job.coordinator, job.request)

    # -------------------------------------------------------------------------------------- coordinator
    def _reply(self, client: bytes, meta: dict, arrays: dict | None = None):
        self.clients.send_multipart([client, *encode(Kind.REPLY, meta, arrays)])

    def _on_client(self, frames: list[bytes]):
        client, parts = frames[0], frames[1:]
        try:
            kind, meta, arrays = self._decode(parts, self.max_client_bytes)
        except FrameError as e:
            self._reject(f"client message: {e}", sum(len(p) for p in parts))
            return self._reply(client, {"ok": False, "error": f"malformed request: {e}"})
        now = time.monotonic()
        if kind == Kind.STATUS:
            return self._reply(client, self.status(now))
        if kind != Kind.REQUEST:
            return self._reply(client, {"ok": False, "error": f"unexpected {kind.name}"})
        missing = [q for q, p in self.peers.items() if not (p.alive(now) and p.ready)]
        if missing or not self.ready:
            return self._reply(client, {"ok": False, "error": f"devices {missing} are not connected"})
        try:
            inputs = self.requests.model_inputs(**self._request_inputs(meta, arrays))
            token_inputs, plan = self.requests.prepare(inputs)
            want = check_outputs(self.manifest.model, meta.get("outputs"))
        except PrismError as e:
            return self._reply(client, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        request = next(self.ids)
        budget = self.timeout * (self.manifest.model.num_layers + 2)
        for p in range(plan.devices):
            own = own_slice(token_inputs, plan, p)
            if p == self.rank:
                self.jobs.put(Job(request, self.rank, plan.attention_mask, own, now + budget, want))
                continue
            msg = encode(Kind.START, {"request": request, "coordinator": self.rank, "budget_s": budget,
                                      "outputs": sorted(want) if want else None},
                         {"attention_mask": np.asarray(plan.attention_mask, np.int64), **own})
            if not self._send_ctl(p, msg, SEND_WAIT_S):
                self._abort(request, f"device {p} is not connected")
                self._reply(client, {"ok": False, "error": f"device {p} is not connected"})
                return
        self.pending[request] = Pending(client, now, now + budget, plan)

    @staticmethod
    def _request_inputs(meta: dict, arrays: dict) -> dict:
        import io

        if meta.get("texts"):
            return {"texts": [str(t) for t in meta["texts"]]}
        images = [io.BytesIO(arrays[k].tobytes()) for k in sorted(arrays) if k.startswith("image_")]
        if images:
            return {"images": images}
        keep = ("input_ids", "attention_mask", "pixel_values")
        return {k: np.array(arrays[k]) for k in keep if k in arrays}

    def _on_result(self, rank: int, meta: dict, arrays: dict):
        p = self.pending.get(int(meta["request"]))
        if p is None:
            return  # already answered (an error came first) or expired
        if not meta.get("ok"):
            del self.pending[int(meta["request"])]
            self._abort(int(meta["request"]), meta.get("error", "device failed"))
            return self._reply(p.client, {"ok": False, "error": meta.get("error", "device failed")})
        p.results[rank] = (meta, dict(arrays))
        if len(p.results) == self.manifest.devices:
            del self.pending[int(meta["request"])]
            self._reply(p.client, *self._assemble(p))

    def _assemble(self, p: Pending) -> tuple[dict, dict]:
        """The devices' results -> the client's outputs (program.gather_outputs) and stats (RequestStats)."""
        results = [DeviceResult(r, arrays, meta["timings"], Traffic.from_dict(meta["traffic"], self.exchange.layers))
                   for r, (meta, arrays) in p.results.items()]
        stats = RequestStats.of(results, p.plan, latency_ms=1e3 * (time.monotonic() - p.t0))
        return {"ok": True, "stats": stats.to_dict()}, gather_outputs(self.manifest.program, results)

    def _expire(self):
        now = time.monotonic()
        for request, p in list(self.pending.items()):
            if now > p.deadline:
                del self.pending[request]
                missing = [q for q in range(self.manifest.devices) if q not in p.results]
                self._abort(request, f"timed out waiting for devices {missing}")
                self._reply(p.client, {"ok": False, "error": f"request timed out waiting for devices {missing}"})

    def status(self, now: float) -> dict:
        return {
            "ok": True, "ready": self.ready and all(p.alive(now) and p.ready for p in self.peers.values()),
            "export_id": self.manifest.export_id, "devices": self.manifest.devices, "coordinator": self.rank,
            "connected": sorted([self.rank] + [q for q, p in self.peers.items() if p.alive(now)]),
            "rejected_frames": {str(self.rank): self.exchange.traffic.rejected_frames,
                                **{str(q): p.rejected_frames for q, p in self.peers.items()}},
            "pending": len(self.pending),
        }
