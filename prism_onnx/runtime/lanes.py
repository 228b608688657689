"""Lanes: a device runs the requests of each coordinator in a lane of their own.

Any runner may coordinate (serve clients), so a device can hold requests of several coordinators at once.
Within one coordinator's lane, requests run one at a time in the order that coordinator started them:
every device receives a coordinator's STARTs on one connection, in one order, so no two devices ever wait
for each other's *other* request. Lanes of different coordinators run side by side (a thread each), so
two coordinators never deadlock each other, whatever order their STARTs reach the devices in.

Each lane has its own exchange endpoint (ZmqExchange: its own Inbox, stash and finished-request mark) and
its own outbox socket. A means frame, an ABORT or a RESULT reaches the right lane by its request id, which
names the coordinator (messages.request_id).

Vocabulary:
    lane        the queue, thread and exchange endpoint of one coordinator's requests on this device
    job         one request attempt this device computes (worker.Job, or worker.PrepareJob on the coordinator)
    members     a job's `ranks`: the devices of its plan
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable

from .exchange import Abort, Exchange
from .messages import coordinator_of
from .wire import MEANS_HEADER

MAX_QUEUED = 64


class Inbox:
    """Means frames for one lane, bounded in bytes per source and in total; aborts jump the queue."""

    def __init__(self, per_source: int, total: int):
        self.per_source, self.total = per_source, total
        self._items: deque = deque()  # (src, parts, nbytes, arrival)
        self._bytes: dict[int, int] = {}
        self._aborts: deque[Abort] = deque(maxlen=256)
        self._cv = threading.Condition()

    def put(self, src: int, parts: list, nbytes: int, now: float) -> str | None:
        """Queue a frame, or return why not."""
        with self._cv:
            if self._bytes.get(src, 0) + nbytes > self.per_source:
                return f"inbox holds {self._bytes[src]} bytes from device {src}, the limit is {self.per_source}"
            if sum(self._bytes.values()) + nbytes > self.total:
                return f"inbox full ({self.total} bytes)"
            self._items.append((src, parts, nbytes, now))
            self._bytes[src] = self._bytes.get(src, 0) + nbytes
            self._cv.notify()
        return None

    def abort(self, a: Abort) -> None:
        with self._cv:
            self._aborts.append(a)
            self._cv.notify()

    def get(self, timeout: float):
        with self._cv:
            if not self._items and not self._aborts:
                self._cv.wait(timeout)
            if self._aborts:
                return self._aborts.popleft()
            if not self._items:
                return None
            src, parts, nbytes, _ = self._items.popleft()
            self._bytes[src] -= nbytes
            return parts

    def expire(self, now: float, max_age: float) -> int:
        """Drop frames older than max_age (the I/O thread calls this while the lane is idle)."""
        with self._cv:
            keep = [it for it in self._items if now - it[3] <= max_age]
            dropped = len(self._items) - len(keep)
            if dropped:
                self._items = deque(keep)
                self._bytes = {}
                for src, _, n, _ in keep:
                    self._bytes[src] = self._bytes.get(src, 0) + n
            return dropped

    @property
    def nbytes(self) -> int:
        return sum(self._bytes.values())


class ZmqExchange(Exchange):
    """Means leave through the lane's outbox (the I/O thread forwards them) and arrive through its Inbox."""

    def __init__(self, rank: int, outbox, inbox: Inbox, **kw):
        super().__init__(rank, **kw)
        self.outbox, self.inbox = outbox, inbox

    def _send(self, dst, parts):
        self.outbox.send(dst, MEANS_HEADER.unpack(bytes(parts[0]))[3], parts)

    def _recv(self, timeout):
        return self.inbox.get(min(timeout, 0.5))


class Lane:
    """One coordinator's jobs on this device: a queue, the job running now, the ids aborted."""

    def __init__(self, coordinator: int, exchange: ZmqExchange):
        self.coordinator, self.exchange = coordinator, exchange
        self.jobs: queue.Queue = queue.Queue(MAX_QUEUED)
        self.aborted: deque = deque(maxlen=1024)
        self.current = None  # the job running now (set and cleared by the lane's thread)
        self.thread: threading.Thread | None = None

    @property
    def idle(self) -> bool:
        return self.current is None and self.jobs.empty()

    def abort(self, request: int, reason: str) -> None:
        """Skip the request if queued, wake the lane's thread if it waits for the request's means."""
        self.aborted.append(request)
        current = self.current
        if current is not None and current.request == request:
            self.exchange.inbox.abort(Abort(request, reason))

    def jobs_now(self) -> list:
        current = self.current
        return list(self.jobs.queue) + ([current] if current is not None else [])


class Lanes:
    """The lanes of one device, made on first use (at most one per device of the export); `run(lane)` is
    the body of each lane's thread. Called from the I/O thread, except `run`."""

    def __init__(self, make_exchange: Callable[[], ZmqExchange], run: Callable[[Lane, threading.Event], None],
                 devices: int):
        self.make_exchange, self.run, self.devices = make_exchange, run, devices
        self.lanes: dict[int, Lane] = {}
        self.stop: threading.Event | None = None

    def start(self, stop: threading.Event) -> None:
        self.stop = stop
        for lane in self.lanes.values():
            self._start(lane)

    def _start(self, lane: Lane) -> None:
        if lane.thread is None and self.stop is not None:
            lane.thread = threading.Thread(target=self.run, args=(lane, self.stop), daemon=True,
                                           name=f"prism-lane-{lane.coordinator}")
            lane.thread.start()

    def lane(self, coordinator: int) -> Lane:
        if not 0 <= coordinator < self.devices:
            raise ValueError(f"no device {coordinator} coordinates here")
        lane = self.lanes.get(coordinator)
        if lane is None:
            lane = self.lanes[coordinator] = Lane(coordinator, self.make_exchange())
            self._start(lane)
        return lane

    def of(self, request: int) -> Lane:
        return self.lane(coordinator_of(request))

    def join(self, timeout: float) -> None:
        for lane in self.lanes.values():
            if lane.thread is not None:
                lane.thread.join(timeout)

    @property
    def idle(self) -> bool:
        return all(lane.idle for lane in self.lanes.values())

    def expire(self, now: float) -> None:
        """Drop inbox frames that waited longer than the exchange timeout, in lanes with nothing to run."""
        for lane in self.lanes.values():
            if lane.idle:
                lane.exchange.inbox.expire(now, lane.exchange.timeout)

    @property
    def rejected_frames(self) -> int:
        return sum(lane.exchange.traffic.rejected_frames for lane in self.lanes.values())

    @property
    def inbox_bytes(self) -> int:
        return sum(lane.exchange.inbox.nbytes for lane in self.lanes.values())
