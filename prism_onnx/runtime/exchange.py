"""Exchange points: at each point the device program declares (`attn_in.i` or `kv.i`, see program.py),
every device sends its rows to its receivers and gathers those of its sources. This is the only traffic per
layer.

One receive path for every transport: a frame that arrives (from the network, through the runner's
dispatch; or in memory, from another endpoint of a LocalHub) is checked once, on its header (`accept`:
sizes against the bundle's limits, addressed to this device and export), and waits in the endpoint's Inbox,
kept by (request, exchange point) and bounded in bytes per source and in total, until the gather of that
point takes it; there its payload is decoded and its counts checked against the request's plan. Frames of a
finished request are dropped; a frame no request here ever gathers is dropped when it is older than the
exchange timeout (`Inbox.expire`). The endpoint counts the bytes it sends and accepts, per request and per
exchange point. Subclasses only move bytes: `LocalExchange` (in memory, for the in-process executor) and
`ZmqExchange` (runtime/lanes.py: out through the lane's outbox socket).

Several requests may run through one endpoint at once (a lane's threads, `prism run --max-inflight`):
each thread takes only its own request's frames from the inbox; counters are guarded by a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import FrameError, PeerError
from ..plan import Plan
from .counters import RateLimitedLog
from .wire import MeansFrame, MeansHeader, check_means, decode_payload, encode_means, frame_nbytes

log = logging.getLogger("prism.exchange")
rate_limited = RateLimitedLog(log)


class RecentIds:
    """The last `size` request ids marked (e.g. finished here): membership test, oldest forgotten first."""

    def __init__(self, size: int = 4096):
        self.size, self._ids = size, OrderedDict()

    def add(self, request: int) -> None:
        self._ids[request] = None
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __contains__(self, request: int) -> bool:
        return request in self._ids


@dataclass(frozen=True)
class Abort:
    """Put in a device's inbox by its I/O thread: the coordinator gave up on `request`."""

    request: int
    reason: str


@dataclass
class Traffic:
    """Bytes one device sent and received, per exchange point (`layers` of them, one per layer), measured
    on the frames' payloads."""

    layers: int
    sent: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    rejected_frames: int = 0
    rejected_bytes: int = 0

    def __post_init__(self):
        self.sent = self.sent or [0] * self.layers
        self.received = self.received or [0] * self.layers

    def to_dict(self) -> dict:
        return {"bytes_sent": sum(self.sent), "bytes_received": sum(self.received),
                "per_layer": {"sent": list(self.sent), "received": list(self.received)},
                "rejected_frames": self.rejected_frames}

    @classmethod
    def from_dict(cls, d: dict, layers: int) -> "Traffic":
        """Inverse of to_dict (a device's traffic as its RESULT message reports it)."""
        return cls(layers, [int(x) for x in d["per_layer"]["sent"]], [int(x) for x in d["per_layer"]["received"]],
                   int(d.get("rejected_frames", 0)))


class Inbox:
    """The means frames one exchange endpoint has received and not yet used: each frame's header passed its
    checks on arrival (`Exchange.accept`: sizes against the bundle's limits, addressed to this device, this
    export, an exchange point it has), kept by (request, exchange point) until that point's gather takes it,
    bounded in bytes per source and in total. An abort goes to the request it names; frames of a finished
    request are dropped, also those that arrive later."""

    def __init__(self, per_source: int, total: int, remember: int = 4096):
        self.per_source, self.total = per_source, total
        self._frames: dict[tuple[int, int], deque] = {}  # (request, point) -> (header, parts, nbytes, arrival)
        self._bytes: dict[int, int] = {}  # source -> bytes held
        self._aborts: dict[int, Abort] = {}
        self._finished = RecentIds(remember)
        self._cv = threading.Condition()

    def put(self, h: MeansHeader, parts: list, nbytes: int, now: float) -> str | None:
        """Keep a frame, or return why not."""
        with self._cv:
            if h.request in self._finished:
                return None  # a late frame of a request finished here: nothing waits for it
            if self._bytes.get(h.src, 0) + nbytes > self.per_source:
                return f"inbox holds {self._bytes[h.src]} bytes from device {h.src}, the limit is {self.per_source}"
            if sum(self._bytes.values()) + nbytes > self.total:
                return f"inbox full ({self.total} bytes)"
            self._frames.setdefault((h.request, h.layer), deque()).append((h, parts, nbytes, now))
            self._bytes[h.src] = self._bytes.get(h.src, 0) + nbytes
            self._cv.notify_all()
        return None

    def abort(self, a: Abort) -> None:
        with self._cv:
            self._aborts[a.request] = a
            self._cv.notify_all()

    def take(self, request: int, point: int, timeout: float):
        """The next frame of `request` at exchange point `point` (header, parts, nbytes), an Abort of the
        request, or None after `timeout` seconds."""
        key = (request, point)
        with self._cv:
            self._cv.wait_for(lambda: request in self._aborts or self._frames.get(key), timeout)
            if request in self._aborts:
                return self._aborts.pop(request)
            frames = self._frames.get(key)
            if not frames:
                return None
            h, parts, nbytes, _ = frames.popleft()
            if not frames:
                del self._frames[key]
            self._bytes[h.src] -= nbytes
            return h, parts, nbytes

    def finish(self, request: int) -> None:
        """The request is done on this device: drop its frames and those that arrive later."""
        with self._cv:
            for key in [k for k in self._frames if k[0] == request]:
                for h, _, nbytes, _ in self._frames.pop(key):
                    self._bytes[h.src] -= nbytes
            self._aborts.pop(request, None)
            self._finished.add(request)

    def expire(self, now: float, max_age: float, keep=()) -> int:
        """Drop frames older than max_age, except those of the requests in `keep` (running or queued here)."""
        dropped = 0
        with self._cv:
            for key in [k for k in self._frames if k[0] not in keep]:
                frames = self._frames[key]
                old = [it for it in frames if now - it[3] > max_age]
                for h, _, nbytes, _ in old:
                    self._bytes[h.src] -= nbytes
                dropped += len(old)
                frames = deque(it for it in frames if now - it[3] <= max_age)
                if frames:
                    self._frames[key] = frames
                else:
                    del self._frames[key]
        return dropped

    @property
    def nbytes(self) -> int:
        return sum(self._bytes.values())


def inbox_for(max_batch: int, max_rows: int, width: int, wire_dtype: str, devices: int, inflight: int = 1) -> Inbox:
    """An Inbox bounded for an export: per source, a few of its largest frames per request in flight (a
    source runs at most one exchange point ahead), and that for every other device in total."""
    per_source = (4 * frame_nbytes(max_batch, max_rows, width, wire_dtype) + (1 << 16)) * max(1, inflight)
    return Inbox(per_source=per_source, total=per_source * max(1, devices - 1))


class Exchange:
    """One device's endpoint of the exchange points: it sends its rows to its receivers (`send`), and takes
    its sources' rows from its Inbox (`gather`); frames enter the inbox through `accept` (checked once)."""

    def __init__(self, rank: int, *, wire_dtype: str, width: int, points: list[str], export_tag: int, max_rows: int,
                 max_batch: int, timeout: float = 30.0, inbox: Inbox | None = None, devices: int = 2):
        """width: values per row at every point; points: the exchange point names, in program order; inbox:
        where received frames wait (default: one bounded for `devices` devices, one request in flight)."""
        self.rank = rank
        self.wire_dtype, self.width, self.points = wire_dtype, width, list(points)
        self.layers = len(self.points)
        self.export_tag, self.max_rows, self.max_batch = export_tag, max_rows, max_batch
        self.timeout = timeout
        self.inbox = inbox or inbox_for(max_batch, max_rows, width, wire_dtype, devices)
        self.traffic = Traffic(self.layers)  # totals since start
        self._per_request: dict[int, Traffic] = {}  # the same counts, attributed to each request
        self._lock = threading.Lock()

    # ---- transport hook
    def _send(self, dst: int, parts: list) -> None:
        raise NotImplementedError

    # ---- the exchange
    def send(self, request: int, point: int, rows: np.ndarray, plan: Plan) -> None:
        """Send my rows [B, S, W] at exchange point `point` to every device that receives from me: to each,
        the rows the plan routes to it (Plan.rows_to: with a halo window, its window rows and the means
        outside it)."""
        for dst in plan.receivers(self.rank):
            mine = rows[:, plan.rows_to(self.rank, dst)]
            parts = encode_means(MeansFrame(request, point, self.rank, dst, self.export_tag,
                                            plan.counts_to(self.rank, dst), mine), self.wire_dtype)
            self._send(dst, parts)
            self._count("sent", request, point, sum(len(p) for p in parts))

    def accept(self, parts: list, nbytes: int, now: float) -> MeansHeader:
        """A frame that arrived: its header checked against the bundle's limits and this endpoint (FrameError
        otherwise), then kept in the inbox until its gather (FrameError when the inbox refuses it)."""
        h = check_means(parts, wire_dtype=self.wire_dtype, hidden=self.width, max_rows=self.max_rows,
                        max_batch=self.max_batch)
        self.admit(h, parts, nbytes, now)
        return h

    def admit(self, h: MeansHeader, parts: list, nbytes: int, now: float) -> None:
        """A frame whose header and sizes `check_means` accepted (`accept`, or the runner's dispatch, which
        also checks its sender): for this endpoint? then into the inbox (FrameError otherwise)."""
        if h.dst != self.rank or h.export_tag != self.export_tag or not 0 <= h.layer < self.layers \
                or h.src == self.rank:
            raise FrameError(f"frame addressed to device {h.dst} of export tag {h.export_tag:08x}, exchange point "
                             f"{h.layer}, from device {h.src}: not for this device")
        why = self.inbox.put(h, parts, nbytes, now)
        if why:
            raise FrameError(why)

    def gather(self, request: int, point: int, plan: Plan) -> np.ndarray:
        """The rows [B, R, W] of my sources at exchange point `point`, in device order (waits for them)."""
        sources = plan.sources(self.rank)
        got: dict[int, MeansFrame] = {}
        deadline = time.monotonic() + self.timeout
        while len(got) < len(sources):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [q for q in sources if q not in got]
                raise PeerError(f"device {self.rank}, request {request}, exchange {self.points[point]}: no means "
                                f"from device(s) {missing} within {self.timeout:g} s")
            item = self.inbox.take(request, point, min(remaining, 0.5))
            if item is None:
                continue
            if isinstance(item, Abort):
                raise PeerError(f"request {request} aborted by the coordinator: {item.reason}")
            h, parts, nbytes = item
            if h.src not in sources or h.src in got:
                self._reject(nbytes, f"unexpected or duplicate frame from device {h.src}")
                continue
            f = decode_payload(h, parts, self.wire_dtype)
            expected = plan.counts_to(h.src, self.rank)
            if f.counts.shape != expected.shape or not np.array_equal(f.counts, expected):
                self._reject(nbytes, f"frame from device {h.src} has counts {f.counts.shape} that do not match the "
                                     f"plan {expected.shape}")
                continue
            self._count("received", request, point, nbytes)
            got[h.src] = f
        rows = [got[q].means for q in sources]
        return np.concatenate(rows, axis=1) if rows else np.zeros((plan.batch, 0, self.width), np.float32)

    def finish(self, request: int) -> Traffic:
        """Request done (or failed) on this device: drop its frames and any that arrive later. Returns the
        bytes this request moved through this device."""
        self.inbox.finish(request)
        with self._lock:
            return self._per_request.pop(request, Traffic(self.layers))

    def _count(self, direction: str, request: int, layer: int, nbytes: int) -> None:
        with self._lock:
            for t in (self.traffic, self._per_request.setdefault(request, Traffic(self.layers))):
                getattr(t, direction)[layer] += nbytes

    def _reject(self, nbytes: int, why: str) -> None:
        with self._lock:
            self.traffic.rejected_frames += 1
            self.traffic.rejected_bytes += nbytes
        rate_limited.warning("device %d rejected a frame (%d bytes): %s", self.rank, nbytes, why)


class LocalHub:
    """In-memory transport for P devices in one process (the in-process executor): a frame one endpoint sends
    enters the receiver's inbox through its `accept`, as a frame from the network does."""

    def __init__(self, devices: int, **kw):
        self.endpoints = [LocalExchange(self, p, devices=devices, **kw) for p in range(devices)]


class LocalExchange(Exchange):
    def __init__(self, hub: LocalHub, rank: int, **kw):
        super().__init__(rank, **kw)
        self.hub = hub

    def _send(self, dst, parts):
        parts = [bytes(p) for p in parts]
        receiver = self.hub.endpoints[dst]
        try:
            receiver.accept(parts, sum(len(p) for p in parts), time.monotonic())
        except FrameError as e:
            receiver._reject(sum(len(p) for p in parts), str(e))
