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
from dataclasses import dataclass, field

import numpy as np

from ..errors import PeerError, PrismError
from ..generate import CacheCollector, GenerationConfig, check_prompt, decode, stop_ids
from ..program import own_slice, run_device
from .batching import Prepared, batchable, gather
from .device import Engine, Requests, check_outputs
from .lanes import Inbox, Lane, Lanes, ZmqExchange
from .messages import GENERATED, batch_message, coordinator_of, start_message, tokens_message
from .protocol import Kind, encode

__all__ = ["Inbox", "Job", "PrepareJob", "Worker", "ZmqExchange"]
log = logging.getLogger("prism.run")


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
    ranks: tuple[int, ...] | None = None  # the plan's devices (None: all of the export's)
    split_weights: tuple[float, ...] | None = None  # one per plan position (None: the export's)


@dataclass
class PrepareJob:
    """The coordinator's own part of a client request attempt: prepare the inputs, START the others, run.
    `ranks`: the devices of the attempt's plan (the live ones, chosen by the coordinator; None: all)."""

    request: int
    kwargs: dict
    outputs: set[str] | None
    deadline: float
    budget_s: float
    generate: dict | None = None
    stream: bool = False
    ranks: tuple[int, ...] | None = None
    split_weights: tuple[float, ...] | None = None
    coordinator: int = -1  # set by the worker: its own rank


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

    def submit(self, job: Job | PrepareJob) -> bool:
        """Queue a job in its coordinator's lane (a PrepareJob: this device's own lane)."""
        if isinstance(job, PrepareJob):
            job.coordinator = self.rank
        try:
            self.lanes.lane(job.coordinator).jobs.put_nowait(job)
            return True
        except queue.Full:
            return False

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
                ranks = job.ranks if job.ranks is not None else range(self.bundle.devices)
                if q in ranks or lane.coordinator == q:
                    lane.abort(job.request, reason)
                    hit.append(job.request)
        return hit

    def _loop(self, lane: Lane, stop: threading.Event) -> None:
        """One of a lane's threads: the lane's jobs in their order, one at a time on this thread; each one's
        RESULT goes to its coordinator."""
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
                meta, arrays = self._run(job, lane)
                lane.exchange.outbox.send(job.coordinator, job.request, encode(Kind.RESULT, meta, arrays))
            except Exception:  # a bug in reporting: count it, keep the lane alive
                self.on_internal_error()
                log.exception("device %d: could not report request %d", self.rank, job.request)
            finally:
                lane.running.pop(job.request, None)

    def _run(self, job, lane: Lane) -> tuple[dict, dict]:
        meta, arrays = {"request": job.request, "rank": self.rank, "ok": False}, {}
        exchange = lane.exchange
        try:
            if time.monotonic() > job.deadline:
                raise PeerError(f"request {job.request} expired before device {self.rank} could start it")
            if job.request in lane.aborted:
                raise PeerError(f"request {job.request} was aborted before device {self.rank} started it")
            if isinstance(job, PrepareJob):
                job = self._start(self._tokenize(job), lane)
            elif isinstance(job, Prepared):
                job = self._start(job, lane)
            plan = self.bundle.manifest.plan(job.attention_mask, job.split_weights, job.ranks)
            if job.generate is not None:
                return self._generate(job, plan, meta, lane)
            res = run_device(self.bundle.manifest.program, self.engine, plan, self.rank, job.own_inputs, exchange,
                             job.request, job.outputs)
            meta.update(ok=True, timings=res.timings, traffic=res.traffic.to_dict(), span=list(plan.span(self.rank)))
            arrays = res.outputs
        except PrismError as e:
            # PeerError: another device failed this one (lost, silent, an ABORT): a rerun may succeed
            meta.update(ok=False, error=str(e), traffic=exchange.finish(job.request).to_dict(),
                        retry=isinstance(e, PeerError))
            log.error("device %d: request %d failed: %s", self.rank, job.request, e)
        except Exception as e:  # a bug: report it, keep serving
            self.on_internal_error()
            meta.update(ok=False, error=f"device {self.rank} internal error: {type(e).__name__}: {e}",
                        traffic=exchange.finish(job.request).to_dict())
            log.exception("device %d: request %d crashed", self.rank, job.request)
        return meta, arrays

    def _tokenize(self, job: PrepareJob) -> Prepared:
        """Coordinator: a request's inputs -> token arrays and the plan over the attempt's devices (texts are
        padded on the left for generation)."""
        generating = job.generate is not None
        token_inputs, plan = self.requests.prepare(self.requests.model_inputs(**job.kwargs, left_pad=generating),
                                                   job.split_weights, job.ranks)
        if generating:
            check_prompt(plan.attention_mask, GenerationConfig.from_dict(job.generate), self.bundle.spec.max_positions)
        return Prepared(job, token_inputs, plan)

    def _plan_of(self, job: PrepareJob | Prepared):
        """The plan of a batch led by `job`: its devices and split, over the batch's mask."""
        j = job.job if isinstance(job, Prepared) else job
        return lambda mask: self.bundle.manifest.plan(mask, j.split_weights, j.ranks)

    def _start(self, prep: Prepared, lane: Lane) -> Job:
        """Coordinator: START every other device of the plan with its own slice (a batch: first tell the
        coordinator whose rows are whose). Only the tail device (the plan's last) of a generation runs a head."""
        job, plan, token_inputs = prep.job, prep.plan, prep.inputs
        generating = job.generate is not None
        want = set() if generating else check_outputs(self.bundle.spec, sorted(job.outputs) if job.outputs else None)
        if len(prep.members) > 1:
            lane.exchange.outbox.send(self.rank, job.request, batch_message(job.request, prep.members))
        mine = None
        prompt = token_inputs["input_ids"] if generating else None
        for p in plan.ranks:
            own = own_slice(token_inputs, plan, p)
            if p == self.rank:
                mine = own
            else:
                lane.exchange.outbox.send(p, job.request, start_message(
                    job.request, self.rank, plan, own, job.budget_s, want, job.generate, job.stream,
                    prompt if p == plan.tail else None))
        return Job(job.request, self.rank, plan.attention_mask, mine, job.deadline, want, job.generate, job.stream,
                   prompt, plan.ranks, job.split_weights)

    def _generate(self, job: Job, plan, meta: dict, lane: Lane) -> tuple[dict, dict]:
        """A generation request: the prefill like any request; the tail device (the plan's last) then
        decodes from its compressed prefix cache, streaming TOKENS to the coordinator when asked, and returns
        the generated ids. The exchange is not used after the prefill: no means move while decoding."""
        program, tail = self.bundle.manifest.program, plan.tail
        collector = CacheCollector(program) if self.rank == tail else None
        t0 = time.perf_counter()
        res = run_device(program, self.engine, plan, self.rank, job.own_inputs, lane.exchange, job.request, set(),
                         collector)
        meta.update(ok=True, timings=res.timings, traffic=res.traffic.to_dict(), span=list(plan.span(self.rank)))
        if collector is None:
            return meta, {}
        options = dict(job.generate)
        options["stop_token_ids"] = stop_ids(self.bundle.manifest.config_summary, options.get("stop_token_ids"))
        config = GenerationConfig.from_dict(options)

        def stream(step: int, ids: np.ndarray) -> None:
            if job.stream:
                lane.exchange.outbox.send(job.coordinator, job.request, tokens_message(job.request, self.rank, step, ids))
            if job.request in lane.aborted:
                raise PeerError(f"request {job.request} was aborted while device {self.rank} generated")

        prompt = job.prompt_ids if job.prompt_ids is not None else job.own_inputs["input_ids"]
        gen = decode(program, self.engine, collector, prompt, plan.attention_mask, config, self.rank, t0,
                     self.max_cache_bytes, stream)
        ids = np.full((len(gen.ids), max(map(len, gen.ids))), -1, np.int64)
        for b, row in enumerate(gen.ids):
            ids[b, :len(row)] = row
        meta["generation"] = {**gen.stats.to_dict(), "finish_reasons": gen.finish_reasons}
        return meta, {GENERATED: ids}
