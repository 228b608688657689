"""The worker of a runner: runs request attempts with `run_device`, in lanes (lanes.py): one per
coordinator, up to `inflight` jobs at once within a lane (started in order), lanes side by side.

It owns no socket of the network: everything it sends (means, STARTs, RESULTs) goes through a lane's
`outbox` (an inproc socket the I/O thread drains, so each peer has one connection for everything), and
everything it receives comes through the lane's `Inbox`, which the I/O thread fills with checked means
frames (bounded in bytes per source and in total) and aborts.

On the coordinator, the worker also prepares requests (tokenizing, decoding images: the slow part,
kept off the I/O thread so heartbeats never wait for it) and sends the STARTs before running its own part.
A job's plan is computed from the request's mask over the devices the coordinator chose (`ranks`, the
live ones): every device of the plan computes the same plan from the same START fields.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import ErrorInfo, InputError, PeerError, PrismError
from ..generate import CacheCollector, check_prompt, decode_from_cache, stop_ids
from ..program import own_slice, run_device
from .admission import model_kwargs
from .batching import Prepared, batchable, gather
from .counters import BUGS
from .device import Engine, Requests, wanted_outputs
from .lanes import Lane, Lanes, ZmqExchange
from .jobs import Batched, Job
from .schema import (GENERATED, PROMPT, GenerationInfo, Result, Tokens, TrafficInfo, WireError, coordinator_of,
                     encode_record)

__all__ = ["Worker", "ZmqExchange"]
log = logging.getLogger("prism.run")


@dataclass
class Worker:
    engine: Engine
    rank: int
    make_exchange: Callable[[], ZmqExchange]  # a new lane's exchange endpoint (its inbox and outbox)
    requests: Requests | None  # the coordinator prepares requests
    on_internal_error: Callable = lambda: None
    max_cache_bytes: int | None = None  # the key/value cache a generation request may hold on this device
    inflight: int = 1  # requests of one lane running at once (pipelining)
    batch_wait: float = 0.0  # seconds the coordinator's lane may wait for requests to batch (0: no batching)
    batch_pad: bool = False  # batch requests of different lengths, padded (batching.py: changes CR > 1 results)
    lanes: Lanes = field(init=False)

    def __post_init__(self):
        self.lanes = Lanes(self.make_exchange, self._loop, self.bundle.devices, self.inflight)

    @property
    def bundle(self):
        return self.engine.bundle

    @property
    def idle(self) -> bool:
        return self.lanes.idle

    def start(self, stop: threading.Event) -> None:
        self.lanes.start(stop)

    def submit(self, job: Job) -> bool:
        """Queue a job in its coordinator's lane."""
        try:
            self.lanes.lane(job.coordinator).jobs.put_nowait(job)
            return True
        except queue.Full:
            return False

    def deliver_means(self, header, parts: list, nbytes: int, now: float) -> None:
        """I/O thread: a means frame whose header passed its checks, to its request's lane (Exchange.admit;
        FrameError when refused)."""
        self.lanes.of(header.request).exchange.admit(header, parts, nbytes, now)

    def abort(self, request: int, reason: str) -> None:
        """I/O thread: skip the request if queued, wake its lane if it waits for the request's means."""
        lane = self.lanes.lanes.get(coordinator_of(request))
        if lane is not None:
            lane.abort(request, reason)

    def abort_involving(self, q: int, reason: str) -> list[int]:
        """Device q is lost: abort every job whose plan holds q, or that q coordinates. -> their ids."""
        hit = []
        for lane in list(self.lanes.lanes.values()):
            for job in lane.jobs_now():
                if q in job.ranks or lane.coordinator == q:
                    lane.abort(job.request, reason)
                    hit.append(job.request)
        return hit

    def _loop(self, lane: Lane, stop: threading.Event) -> None:
        """One of a lane's threads: the lane's jobs in their order, one at a time on this thread; each one's
        RESULT goes to its coordinator (in process, when that is this device)."""
        while not stop.is_set():
            try:
                job = lane.next_job(timeout=0.2)
            except queue.Empty:
                continue
            if self.batch_wait > 0 and batchable(job):  # the coordinator's own lane: client requests
                job = gather(job, lane, self._tokenize, self._plan_of(job), self.bundle.limits.max_batch,
                             self.batch_wait, self.batch_pad)
            lane.running[job.request] = job
            try:
                self._to_coordinator(lane, job.coordinator, job.request, self._run(job, lane))
            except Exception as e:  # a bug in reporting: count it, keep the lane alive
                self.on_internal_error()
                BUGS.error(e, f"device {self.rank}: could not report request {job.request}")
            finally:
                lane.running.pop(job.request, None)

    def _to_coordinator(self, lane: Lane, coordinator: int, request: int, record) -> None:
        """A Result, Tokens or Batched for the attempt's coordinator: a typed object when that is this
        device, else its message."""
        if coordinator == self.rank:
            lane.exchange.outbox.local(record)
        else:
            lane.exchange.outbox.send(coordinator, request, encode_record(record))

    def _run(self, job, lane: Lane) -> Result:
        exchange, request = lane.exchange, job.request
        try:
            if time.monotonic() > job.deadline:
                raise PeerError(f"request {request} expired before device {self.rank} could start it")
            if request in lane.aborted:
                raise PeerError(f"request {request} was aborted before device {self.rank} started it")
            if isinstance(job, Prepared):
                job = self._start(job, lane)
            elif job.client is not None:
                job = self._start(self._tokenize(job), lane)
            a = job.attempt
            plan = self.bundle.manifest.plan(a.arrays["attention_mask"], a.split_weights, a.ranks)
            own = {n: a.arrays[n] for n in self.bundle.spec.embed_inputs}
            s, e = plan.span(self.rank)
            if any(v.shape[1] != e - s for v in own.values()):
                raise InputError(f"request {request}: device {self.rank}'s inputs hold "
                                 f"{next(iter(own.values())).shape[1]} tokens, its span of the plan {e - s}")
            if a.generate is not None:
                return self._generate(job, plan, own, lane)
            res = run_device(self.bundle.manifest.program, self.engine, plan, self.rank, own, exchange, request,
                             set(a.outputs) if a.outputs is not None else None)
            return Result(request, self.rank, timings=res.timings, traffic=_traffic(res.traffic),
                          span=plan.span(self.rank), arrays=res.outputs)
        except Exception as e:  # PrismError: the request's fault or another device's; else a bug (reported)
            if not isinstance(e, PrismError):  # one ERROR line per cause a minute, the traceback at DEBUG
                self.on_internal_error()
                BUGS.error(e, f"device {self.rank}: request {request} crashed")
            else:
                log.log(logging.WARNING if isinstance(e, PeerError) else logging.INFO,
                        "device %d: request %d failed: %s", self.rank, request, e)
            return Result(request, self.rank, error=WireError.of(ErrorInfo.of(e, ranks=(self.rank,))),
                          traffic=_traffic(exchange.finish(request)))

    def _tokenize(self, job: Job) -> Prepared:
        """Coordinator: a request's inputs -> token arrays and the plan over the attempt's devices (texts are
        padded on the left for generation)."""
        a = job.attempt
        generating = a.generate is not None
        inputs = self.requests.model_inputs(**model_kwargs(job.client), left_pad=generating)
        token_inputs, plan = self.requests.prepare(inputs, a.split_weights, a.ranks)
        if generating:
            check_prompt(plan.attention_mask, a.generate.config(), self.bundle.spec.max_positions)
        return Prepared.of(job, token_inputs, plan)

    def _plan_of(self, job: Job | Prepared):
        """The plan of a batch led by `job`: its devices and split, over the batch's mask."""
        a = job.attempt
        return lambda mask: self.bundle.manifest.plan(mask, a.split_weights, a.ranks)

    def _start(self, prep: Prepared, lane: Lane) -> Job:
        """Coordinator: START every other device of the plan with its own slice (a batch: first tell the
        coordinator whose rows are whose). Only the tail device (the plan's last) of a generation runs a head."""
        attempt, plan, token_inputs = prep.attempt, prep.plan, prep.inputs
        generating = attempt.generate is not None
        want = set() if generating else wanted_outputs(self.bundle.spec, attempt.outputs)
        attempt = replace(attempt, outputs=tuple(sorted(want)) if want is not None else None)
        if len(prep.members) > 1:
            lane.exchange.outbox.local(Batched(attempt.request, tuple(prep.members)))
        mine = None
        for p in plan.ranks:
            arrays = {"attention_mask": np.asarray(plan.attention_mask, np.int64), **own_slice(token_inputs, plan, p)}
            if generating and p == plan.tail:
                arrays[PROMPT] = np.asarray(token_inputs["input_ids"], np.int64)
            if p == self.rank:
                mine = replace(attempt, arrays=arrays)
            else:
                lane.exchange.outbox.send(p, attempt.request, encode_record(replace(attempt, arrays=arrays)))
        return Job(mine, prep.deadline)

    def _generate(self, job: Job, plan, own: dict, lane: Lane) -> Result:
        """A generation request: the prefill like any request; the tail device (the plan's last) then
        decodes from its compressed prefix cache, streaming TOKENS to the coordinator when asked, and returns
        the generated ids. The exchange is not used after the prefill: no means move while decoding."""
        program, tail, a = self.bundle.manifest.program, plan.tail, job.attempt
        collector = CacheCollector(program) if self.rank == tail else None
        run_plan, exchange = collector.wrap(plan, self.rank, lane.exchange) if collector else (plan, lane.exchange)
        t0 = time.perf_counter()
        res = run_device(program, self.engine, run_plan, self.rank, own, exchange, a.request, set(), collector)
        done = Result(a.request, self.rank, timings=res.timings, traffic=_traffic(res.traffic),
                      span=plan.span(self.rank))
        if collector is None:
            return done
        config = a.generate.config(stop_ids(self.bundle.manifest.config_summary))

        def stream(step: int, ids: np.ndarray) -> None:
            if a.stream:
                self._to_coordinator(lane, a.coordinator, a.request,
                                     Tokens(a.request, step, rank=self.rank, arrays={"ids": np.asarray(ids, np.int64)}))
            if a.request in lane.aborted:
                raise PeerError(f"request {a.request} was aborted while device {self.rank} generated")

        prompt = a.arrays.get(PROMPT, own["input_ids"])
        gen = decode_from_cache(program, self.engine, collector, prompt, plan.attention_mask, config, self.rank, t0,
                     self.max_cache_bytes, stream)
        ids = np.full((len(gen.ids), max(map(len, gen.ids))), -1, np.int64)
        for b, row in enumerate(gen.ids):
            ids[b, :len(row)] = row
        st = gen.stats
        info = GenerationInfo(st.prompt_tokens, st.generated, tuple(gen.finish_reasons), st.time_to_first_token_ms,
                              st.decode_tokens_per_s, st.cache_bytes)
        return replace(done, generation=info, arrays={GENERATED: ids})


def _traffic(t) -> TrafficInfo:
    return TrafficInfo(tuple(t.sent), tuple(t.received), t.rejected_frames)
