"""Lanes: a device runs the requests of each coordinator in a lane of their own.

Any runner may coordinate (serve clients), so a device can hold requests of several coordinators at once.
Within one coordinator's lane, requests start in the order that coordinator started them, at most `slots`
at once (`prism run --max-inflight`: pipelining, so that a device waiting for another's means for one
request computes the next). Every device receives a coordinator's STARTs on one connection, in one order,
and admits them in that order, so the oldest unfinished request is running on every device of its plan
and always progresses: no two devices ever wait for each other's *other* request forever. Lanes of
different coordinators run side by side (threads of their own), so two coordinators never deadlock each
other, whatever order their STARTs reach the devices in.

Each lane has its own exchange endpoint (ZmqExchange: its own Inbox, kept by request and exchange point)
and its own outbox socket (shared by the lane's threads: ZeroMQ sockets are not thread-safe, so the outbox
serializes its sends). A means frame, an ABORT or a RESULT reaches the right lane by its request id, which
names the coordinator (messages.request_id).

Vocabulary:
    lane        the queue, threads (`slots`) and exchange endpoint of one coordinator's requests on this device
    job         one request attempt this device computes (worker.Job; on the coordinator, a client request's
                Job before it is tokenized, and batching.Prepared after)
    members     a job's `ranks`: the devices of its plan
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable

from .exchange import Abort, Exchange
from .schema import coordinator_of
from .wire import MEANS_HEADER

MAX_QUEUED = 64


class ZmqExchange(Exchange):
    """Means leave through the lane's outbox (the I/O thread forwards them); frames arrive through the
    runner's dispatch, which hands them to `accept` (exchange.py: checked once, then the inbox)."""

    def __init__(self, rank: int, outbox, **kw):
        super().__init__(rank, **kw)
        self.outbox = outbox

    def _send(self, dst, parts):
        self.outbox.send(dst, MEANS_HEADER.unpack(bytes(parts[0]))[3], parts)


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
