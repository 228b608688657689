"""The coordinator (the runner started with --serve): client requests in, replies out.

    REQUEST  checked (admission.py) -> a pending entry + a PrepareJob for the local worker, which
             prepares the inputs and STARTs every other device (worker.py)
    RESULT   one per device; the last one completes the reply (outputs gathered by `gather_outputs`; for
             generation the tail device's generated ids, their texts, time to first token and speed)
    TOKENS   the tail device's new tokens while it generates: relayed to a client that asked to stream
    failure  a device's error, a lost peer (membership), an unsendable message or the deadline: the
             client gets one error naming the device, every device gets ABORT

No sockets here: it talks through the callables it is given (`send`, `reply`, `submit`), so tests drive
it with plain functions and numbers for `now`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import PrismError
from .admission import check_request
from .bundle import DeviceBundle
from ..program import DeviceResult, RequestStats, gather_outputs
from .exchange import Traffic
from .messages import GENERATED, Result
from .protocol import Kind, encode
from .worker import PrepareJob

MAX_PENDING = 32


@dataclass
class Pending:
    client: bytes
    call: int | None
    t0: float
    deadline: float
    results: dict[int, Result] = field(default_factory=dict)
    stream: bool = False
    first_token: float | None = None  # when the first streamed token arrived


@dataclass
class Coordinator:
    bundle: DeviceBundle
    rank: int
    membership: object  # membership.Membership (ready, missing, describe)
    send: Callable[[int, list], bool]  # (peer rank, parts) -> sent?
    reply: Callable[..., None]  # (client, meta, arrays[, kind]): a REPLY, or TOKENS while streaming
    submit: Callable[[PrepareJob], bool]  # to the local worker
    timeout: float = 10.0
    max_pending: int = MAX_PENDING
    pending: dict[int, Pending] = field(default_factory=dict)

    def __post_init__(self):
        self.limits = self.bundle.limits
        self.budget = self.timeout * (self.limits.layers + 2)
        self.ids = itertools.count(time.time_ns() // 1000)  # increasing across coordinator restarts

    def _answer(self, client: bytes, call: int | None, meta: dict, arrays: dict | None = None):
        self.reply(client, {**meta, "call": call} if call is not None else meta, arrays)

    def on_request(self, client: bytes, meta: dict, arrays: dict, now: float) -> None:
        call = meta.get("call") if type(meta.get("call")) is int else None
        missing = self.membership.missing(now)
        if missing:
            why = "; ".join(self.membership.describe(q, now) for q in missing)
            return self._answer(client, call, {"ok": False, "error": f"devices {missing} are not connected: {why}"})
        if len(self.pending) >= self.max_pending:
            return self._answer(client, call, {"ok": False, "error": f"busy: {len(self.pending)} requests running"})
        try:
            req = check_request(meta, arrays, self.limits)
        except PrismError as e:
            return self._answer(client, call, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        request = next(self.ids)
        budget = self.budget
        if req.generate is not None:  # the tail decodes after the prefill: a generous second per token
            budget += self.timeout + req.generate["max_new_tokens"]
        job = PrepareJob(request, req.kwargs, req.outputs, now + budget, budget, req.generate, req.stream)
        if not self.submit(job):
            return self._answer(client, call, {"ok": False, "error": "busy: the worker queue is full"})
        self.pending[request] = Pending(client, call, now, now + budget, stream=req.stream)

    def on_tokens(self, tok, now: float) -> None:
        """The tail device's new tokens: relay them to a client that streams (ids -1: the row ended)."""
        p = self.pending.get(tok.request)
        if p is None or tok.rank != self.limits.devices - 1:
            return  # finished, failed, or not from the tail device
        if p.first_token is None:
            p.first_token = now
        if p.stream:
            meta = {"request": tok.request, "step": tok.step}
            texts = self._texts(tok.ids[:, None])
            if texts is not None:
                meta["texts"] = texts
            self.reply(p.client, {**meta, "call": p.call} if p.call is not None else meta, {"ids": tok.ids},
                       Kind.TOKENS)

    def on_result(self, res: Result, now: float) -> None:
        p = self.pending.get(res.request)
        if p is None or res.rank in p.results:
            return  # answered already (an error came first), expired, or a duplicate
        if not res.ok:
            return self.fail(res.request, res.error)
        p.results[res.rank] = res
        if len(p.results) == self.limits.devices:
            try:
                meta, outputs = self._assemble(p, now)
            except (ValueError, KeyError) as e:  # a device sent outputs that do not fit the others'
                return self.fail(res.request, f"request {res.request}: the devices' outputs do not fit together "
                                              f"({type(e).__name__}: {str(e)[:200]})")
            del self.pending[res.request]
            self._answer(p.client, p.call, meta, outputs)

    def fail(self, request: int, error: str) -> None:
        """The request failed: answer the client, tell every device to drop it."""
        p = self.pending.pop(request, None)
        msg = encode(Kind.ABORT, {"request": request, "reason": error})
        for q in range(self.limits.devices):
            if q != self.rank:
                self.send(q, msg)
        if p is not None:
            self._answer(p.client, p.call, {"ok": False, "error": error})

    def on_peer_lost(self, q: int, why: str) -> None:
        """A device is gone: the requests still waiting for its result fail (one whose result it has
        delivered, e.g. a generation the tail device is decoding, carries on)."""
        for request, p in list(self.pending.items()):
            if q not in p.results:
                self.fail(request, f"request {request} failed: {why}")

    def expire(self, now: float) -> None:
        for request, p in list(self.pending.items()):
            if now > p.deadline:
                missing = [q for q in range(self.limits.devices) if q not in p.results]
                self.fail(request, f"request {request} timed out waiting for devices {missing}")

    def _assemble(self, p: Pending, now: float) -> tuple[dict, dict]:
        """The devices' results -> the client's outputs (program.gather_outputs) and stats (RequestStats);
        for generation the tail's generated ids, their texts and the generation stats."""
        results = [DeviceResult(r.rank, r.outputs, r.timings, Traffic.from_dict(r.traffic, self.limits.layers))
                   for r in p.results.values()]
        stats = RequestStats.of(results, latency_ms=1e3 * (now - p.t0))
        stats.spans = [list(p.results[r].span) for r in stats.ranks]
        meta = {"ok": True, "stats": stats.to_dict()}
        tail = p.results[self.limits.devices - 1]
        if tail.generation is not None:
            ids = tail.outputs[GENERATED]
            meta["generation"] = {**tail.generation, "texts": self._texts(ids)}
            if p.first_token is not None:
                meta["generation"]["time_to_first_token_ms_at_coordinator"] = round(1e3 * (p.first_token - p.t0), 3)
            return meta, {GENERATED: ids}
        return meta, gather_outputs(self.bundle.manifest.program, results)

    def _texts(self, ids) -> list[str] | None:
        """Generated ids [B, T] (-1 after a row ended) as text, with the bundle's tokenizer (None: none)."""
        if not hasattr(self, "_tokenizer"):
            pre = self.bundle.manifest.preprocessing
            self._tokenizer = None
            if pre.tokenizer:
                from .preprocess import TextPreprocessor

                self._tokenizer = TextPreprocessor(self.bundle.root / pre.tokenizer, self.limits.max_seq_len, pre.pad_id)
        if self._tokenizer is None:
            return None
        return [self._tokenizer.decode([t for t in row if t >= 0]) for row in ids.tolist()]
