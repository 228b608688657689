"""The worker thread of a runner: runs requests one at a time with `run_device`, in the order they started.

It owns no socket of the network: everything it sends (means, STARTs, RESULTs) goes through the
`outbox` (an inproc socket the I/O thread drains, so each peer has one connection for everything), and
everything it receives comes through the `Inbox`, which the I/O thread fills with checked means frames
(bounded in bytes per source and in total) and aborts.

On the coordinator, the worker also prepares requests (tokenizing, decoding images: the slow part,
kept off the I/O thread so heartbeats never wait for it) and sends the STARTs before running its own part.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import PeerError, PrismError
from ..generate import CacheCollector, GenerationConfig, check_prompt, decode, stop_ids
from ..program import own_slice, run_device
from .device import Engine, Requests, check_outputs
from .exchange import Abort, Exchange
from .messages import GENERATED, start_message, tokens_message
from .protocol import Kind, encode
from .wire import MEANS_HEADER

log = logging.getLogger("prism.run")
MAX_QUEUED = 64


@dataclass
class Job:
    request: int
    coordinator: int
    attention_mask: np.ndarray
    own_inputs: dict[str, np.ndarray]
    deadline: float
    outputs: set[str] | None = None
    generate: dict | None = None  # generation options: the tail device decodes after the prefill
    stream: bool = False
    prompt_ids: np.ndarray | None = None  # [B, N] the whole prompt, for the tail's repetition penalty


@dataclass
class PrepareJob:
    """The coordinator's own part of a client request: prepare the inputs, START the others, run."""

    request: int
    kwargs: dict
    outputs: set[str] | None
    deadline: float
    budget_s: float
    generate: dict | None = None
    stream: bool = False


class Inbox:
    """Means frames for the worker, bounded in bytes per source and in total; aborts jump the queue."""

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
        """Drop frames older than max_age (the I/O thread calls this while the worker is idle)."""
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
    """Means leave through the outbox (the I/O thread forwards them) and arrive through the Inbox."""

    def __init__(self, rank: int, outbox, inbox: Inbox, **kw):
        super().__init__(rank, **kw)
        self.outbox, self.inbox = outbox, inbox

    def _send(self, dst, parts):
        self.outbox.send(dst, MEANS_HEADER.unpack(bytes(parts[0]))[3], parts)

    def _recv(self, timeout):
        return self.inbox.get(min(timeout, 0.5))


@dataclass
class Worker:
    engine: Engine
    rank: int
    exchange: ZmqExchange
    requests: Requests | None  # the coordinator prepares requests
    on_internal_error: callable = lambda: None
    max_cache_bytes: int | None = None  # the key/value cache a generation request may hold on this device
    jobs: queue.Queue = field(default_factory=lambda: queue.Queue(MAX_QUEUED))
    aborted: deque = field(default_factory=lambda: deque(maxlen=1024))
    current: int | None = None

    @property
    def bundle(self):
        return self.engine.bundle

    @property
    def idle(self) -> bool:
        return self.current is None and self.jobs.empty()

    def submit(self, job: Job | PrepareJob) -> bool:
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            return False

    def abort(self, request: int, reason: str) -> None:
        """I/O thread: skip the request if queued, wake the worker if it waits for the request's means."""
        self.aborted.append(request)
        if self.current == request:
            self.exchange.inbox.abort(Abort(request, reason))

    def abort_all(self, reason: str) -> None:
        for job in list(self.jobs.queue):
            self.aborted.append(job.request)
        current = self.current
        if current is not None:
            self.abort(current, reason)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            self.current = job.request
            try:
                meta, arrays, coordinator = self._run(job)
                self.exchange.outbox.send(coordinator, job.request, encode(Kind.RESULT, meta, arrays))
            except Exception:  # a bug in reporting: count it, keep the worker alive
                self.on_internal_error()
                log.exception("device %d: could not report request %d", self.rank, job.request)
            finally:
                self.current = None

    def _run(self, job) -> tuple[dict, dict, int]:
        meta, arrays = {"request": job.request, "rank": self.rank, "ok": False}, {}
        coordinator = self.rank if isinstance(job, PrepareJob) else job.coordinator
        try:
            if time.monotonic() > job.deadline:
                raise PeerError(f"request {job.request} expired before device {self.rank} could start it")
            if job.request in self.aborted:
                raise PeerError(f"request {job.request} was aborted before device {self.rank} started it")
            if isinstance(job, PrepareJob):
                job = self._prepare(job)
            plan = self.bundle.manifest.plan(job.attention_mask)
            if job.generate is not None:
                return (*self._generate(job, plan, meta), coordinator)
            res = run_device(self.bundle.manifest.program, self.engine, plan, self.rank, job.own_inputs, self.exchange,
                             job.request, job.outputs)
            meta.update(ok=True, timings=res.timings, traffic=res.traffic.to_dict(), span=list(plan.span(self.rank)))
            arrays = res.outputs
        except PrismError as e:
            meta.update(ok=False, error=str(e), traffic=self.exchange.finish(job.request).to_dict())
            log.error("device %d: request %d failed: %s", self.rank, job.request, e)
        except Exception as e:  # a bug: report it, keep serving
            self.on_internal_error()
            meta.update(ok=False, error=f"device {self.rank} internal error: {type(e).__name__}: {e}",
                        traffic=self.exchange.finish(job.request).to_dict())
            log.exception("device %d: request %d crashed", self.rank, job.request)
        return meta, arrays, coordinator

    def _prepare(self, job: PrepareJob) -> Job:
        """Coordinator: inputs -> token arrays and plan; START every other device with its own slice. For
        generation the texts are padded on the left, and only the tail device runs a head (its own)."""
        generating = job.generate is not None
        token_inputs, plan = self.requests.prepare(self.requests.model_inputs(**job.kwargs, left_pad=generating))
        if generating:
            check_prompt(plan.attention_mask, GenerationConfig.from_dict(job.generate), self.bundle.spec.max_positions)
        want = set() if generating else check_outputs(self.bundle.spec, sorted(job.outputs) if job.outputs else None)
        mine, tail = None, plan.devices - 1
        prompt = token_inputs["input_ids"] if generating else None
        for p in range(plan.devices):
            own = own_slice(token_inputs, plan, p)
            if p == self.rank:
                mine = own
            else:
                self.exchange.outbox.send(p, job.request, start_message(
                    job.request, self.rank, plan, own, job.budget_s, want, job.generate, job.stream,
                    prompt if p == tail else None))
        return Job(job.request, self.rank, plan.attention_mask, mine, job.deadline, want, job.generate, job.stream,
                   prompt)

    def _generate(self, job: Job, plan, meta: dict) -> tuple[dict, dict]:
        """A generation request: the prefill like any request; the tail device (the last partition) then
        decodes from its compressed prefix cache, streaming TOKENS to the coordinator when asked, and returns
        the generated ids. The exchange is not used after the prefill: no means move while decoding."""
        program, tail = self.bundle.manifest.program, plan.devices - 1
        collector = CacheCollector(program) if self.rank == tail else None
        t0 = time.perf_counter()
        res = run_device(program, self.engine, plan, self.rank, job.own_inputs, self.exchange, job.request, set(),
                         collector)
        meta.update(ok=True, timings=res.timings, traffic=res.traffic.to_dict(), span=list(plan.span(self.rank)))
        if collector is None:
            return meta, {}
        options = dict(job.generate)
        options["stop_token_ids"] = stop_ids(self.bundle.manifest.config_summary, options.get("stop_token_ids"))
        config = GenerationConfig.from_dict(options)

        def stream(step: int, ids: np.ndarray) -> None:
            if job.stream:
                self.exchange.outbox.send(job.coordinator, job.request, tokens_message(job.request, self.rank, step, ids))
            if job.request in self.aborted:
                raise PeerError(f"request {job.request} was aborted while device {self.rank} generated")

        prompt = job.prompt_ids if job.prompt_ids is not None else job.own_inputs["input_ids"]
        gen = decode(program, self.engine, collector, prompt, plan.attention_mask, config, self.rank, t0,
                     self.max_cache_bytes, stream)
        ids = np.full((len(gen.ids), max(map(len, gen.ids))), -1, np.int64)
        for b, row in enumerate(gen.ids):
            ids[b, :len(row)] = row
        meta["generation"] = {**gen.stats.to_dict(), "finish_reasons": gen.finish_reasons}
        return meta, {GENERATED: ids}
