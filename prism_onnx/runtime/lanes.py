"""Lanes: a device runs the requests of each coordinator in a lane of their own.

Any runner may coordinate (serve clients), so a device can hold requests of several coordinators at once.
Within one coordinator's lane, requests start in the order that coordinator started them, at most `slots`
at once (`prism run --max-inflight`: pipelining, so that a device waiting for another's means for one
request computes the next). Every device receives a coordinator's STARTs on one connection, in one order,
and admits them in that order, so the oldest unfinished request is running on every device of its plan
and always progresses: no two devices ever wait for each other's *other* request forever. Lanes of
different coordinators run side by side (threads of their own), so two coordinators never deadlock each
other, whatever order their STARTs reach the devices in.

Each lane has its own exchange endpoint (ZmqExchange: its own Inbox, kept by request, and stash) and its
own outbox socket (shared by the lane's threads: ZeroMQ sockets are not thread-safe, so the outbox
serializes its sends). A means frame, an ABORT or a RESULT reaches the right lane by its request id, which
names the coordinator (messages.request_id).

Vocabulary:
    lane        the queue, threads (`slots`) and exchange endpoint of one coordinator's requests on this device
    job         one request attempt this device computes (worker.Job, or worker.PrepareJob on the coordinator)
    members     a job's `ranks`: the devices of its plan
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable

from .exchange import Abort, Exchange, RecentIds
from .messages import coordinator_of
from .wire import MEANS_HEADER

MAX_QUEUED = 64


class Inbox:
    """Means frames for one lane, kept by request, bounded in bytes per source and in total. A reader takes
    only its own request's frames (`get(request, ...)`), so several requests of the lane can wait at once
    (pipelining); an abort goes to the request it names. Frames of a finished request are dropped."""

    def __init__(self, per_source: int, total: int, remember: int = 4096):
        self.per_source, self.total = per_source, total
        self._frames: dict[int, deque] = {}  # request -> (src, parts, nbytes, arrival), oldest first
        self._bytes: dict[int, int] = {}  # source -> bytes held
        self._aborts: dict[int, Abort] = {}
        self._finished = RecentIds(remember)  # requests finished here
        self._cv = threading.Condition()

    def put(self, src: int, request: int, parts: list, nbytes: int, now: float) -> str | None:
        """Queue a frame, or return why not."""
        with self._cv:
            if request in self._finished:
                return None  # a late frame of a request finished here: nothing waits for it
            if self._bytes.get(src, 0) + nbytes > self.per_source:
                return f"inbox holds {self._bytes[src]} bytes from device {src}, the limit is {self.per_source}"
            if sum(self._bytes.values()) + nbytes > self.total:
                return f"inbox full ({self.total} bytes)"
            self._frames.setdefault(request, deque()).append((src, parts, nbytes, now))
            self._bytes[src] = self._bytes.get(src, 0) + nbytes
            self._cv.notify_all()
        return None

    def abort(self, a: Abort) -> None:
        with self._cv:
            self._aborts[a.request] = a
            self._cv.notify_all()

    def get(self, request: int, timeout: float):
        """The next frame of `request` (its parts), an Abort of it, or None after `timeout` seconds."""
        with self._cv:
            self._cv.wait_for(lambda: request in self._aborts or self._frames.get(request), timeout)
            if request in self._aborts:
                return self._aborts.pop(request)
            frames = self._frames.get(request)
            if not frames:
                return None
            src, parts, nbytes, _ = frames.popleft()
            if not frames:
                del self._frames[request]
            self._bytes[src] -= nbytes
            return parts

    def finish(self, request: int) -> None:
        """The request is done on this device: drop its frames and those that arrive later."""
        with self._cv:
            for src, _, nbytes, _ in self._frames.pop(request, ()):
                self._bytes[src] -= nbytes
            self._aborts.pop(request, None)
            self._finished.add(request)

    def expire(self, now: float, max_age: float, keep=()) -> int:
        """Drop frames older than max_age, except those of the requests in `keep` (running or queued here)."""
        dropped = 0
        with self._cv:
            for request in [r for r in self._frames if r not in keep]:
                frames = self._frames[request]
                old = [it for it in frames if now - it[3] > max_age]
                for src, _, nbytes, _ in old:
                    self._bytes[src] -= nbytes
                dropped += len(old)
                frames = deque(it for it in frames if now - it[3] <= max_age)
                if frames:
                    self._frames[request] = frames
                else:
                    del self._frames[request]
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

    def _recv(self, request, timeout):
        return self.inbox.get(request, min(timeout, 0.5))

    def finish(self, request):
        self.inbox.finish(request)
        return super().finish(request)


class Lane:
    """One coordinator's jobs on this device: a queue, the jobs running now (at most `slots`), the ids
    aborted."""

    def __init__(self, coordinator: int, exchange: ZmqExchange, slots: int = 1):
        self.coordinator, self.exchange, self.slots = coordinator, exchange, slots
        self.jobs: queue.Queue = queue.Queue(MAX_QUEUED)
        self.aborted: deque = deque(maxlen=1024)
        self.running: dict[int, object] = {}  # request id -> the job (set and cleared by the lane's threads)
        self.ready: deque = deque()  # jobs taken from the queue for a batch they did not fit (batching.py)
        self.threads: list[threading.Thread] = []

    def next_job(self, timeout: float):
        """A job put back by batching first, else the next in the queue (raises queue.Empty)."""
        try:
            return self.ready.popleft()
        except IndexError:
            return self.jobs.get(timeout=timeout)

    @property
    def idle(self) -> bool:
        return not self.running and not self.ready and self.jobs.empty()

    def abort(self, request: int, reason: str) -> None:
        """Skip the request if queued, wake the lane's thread if it waits for the request's means."""
        self.aborted.append(request)
        if request in self.running:
            self.exchange.inbox.abort(Abort(request, reason))

    def jobs_now(self) -> list:
        return list(self.ready) + list(self.jobs.queue) + list(self.running.values())


class Lanes:
    """The lanes of one device, made on first use (at most one per device of the export); `run(lane)` is
    the body of each lane's thread. Called from the I/O thread, except `run`."""

    def __init__(self, make_exchange: Callable[[], ZmqExchange], run: Callable[[Lane, threading.Event], None],
                 devices: int, slots: int = 1):
        self.make_exchange, self.run, self.devices, self.slots = make_exchange, run, devices, slots
        self.lanes: dict[int, Lane] = {}
        self.stop: threading.Event | None = None

    def start(self, stop: threading.Event) -> None:
        self.stop = stop
        for lane in self.lanes.values():
            self._start(lane)

    def _start(self, lane: Lane) -> None:
        if not lane.threads and self.stop is not None:
            lane.threads = [threading.Thread(target=self.run, args=(lane, self.stop), daemon=True,
                                             name=f"prism-lane-{lane.coordinator}-{k}") for k in range(lane.slots)]
            for t in lane.threads:
                t.start()

    def lane(self, coordinator: int) -> Lane:
        if not 0 <= coordinator < self.devices:
            raise ValueError(f"no device {coordinator} coordinates here")
        lane = self.lanes.get(coordinator)
        if lane is None:
            lane = self.lanes[coordinator] = Lane(coordinator, self.make_exchange(), self.slots)
            self._start(lane)
        return lane

    def of(self, request: int) -> Lane:
        return self.lane(coordinator_of(request))

    def join(self, timeout: float) -> None:
        for lane in self.lanes.values():
            for t in lane.threads:
                t.join(timeout)

    @property
    def idle(self) -> bool:
        return all(lane.idle for lane in self.lanes.values())

    def expire(self, now: float) -> None:
        """Drop inbox frames that waited longer than the exchange timeout, but those of requests running or
        queued here (a queued request's frames may wait for the requests before it)."""
        for lane in self.lanes.values():
            lane.exchange.inbox.expire(now, lane.exchange.timeout, {job.request for job in lane.jobs_now()})

    @property
    def rejected_frames(self) -> int:
        return sum(lane.exchange.traffic.rejected_frames for lane in self.lanes.values())

    @property
    def inbox_bytes(self) -> int:
        return sum(lane.exchange.inbox.nbytes for lane in self.lanes.values())
