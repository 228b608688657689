"""The coordinator (any runner started with --serve): client requests in, replies out, and the reruns
that make a lost device cost no request.

    REQUEST  checked (admission.py) -> planned over the live devices (membership.members) -> an attempt:
             a PrepareJob for the local worker, which prepares the inputs and STARTs every other device
             of the plan (worker.py)
    RESULT   one per device of the attempt's plan; the last one completes the reply (outputs gathered by
             `gather_outputs`; for generation the tail device's generated ids, their texts, time to first
             token and speed)
    TOKENS   the tail device's new tokens while it generates: relayed to a client that asked to stream
    rerun    a device of the plan is lost before it delivered its RESULT (membership), or a device failed
             the attempt because of another device (a RESULT with `retry`, an unsendable START): the
             attempt is abandoned (ABORT to its devices, so they release its exchange state) and the request
             runs again as a new attempt, with a new request id, over the devices live now (a prefill is
             idempotent). A device whose RESULT is in is not needed any more: a generation whose prefill
             it finished carries on. The tail of a generation lost while decoding reruns it from scratch,
             unless tokens were already streamed to the client (then the request fails: the client has seen
             them).
    BATCH    the local worker ran several requests as one attempt (batching.py): the others ride on the
             first one's attempt, and each is answered with its own rows; a rerun or a failure of the attempt
             is a rerun or a failure of each of them
    split    each attempt's split weights come from `split` (split.py: even, static, or adaptive from the
             compute time every RESULT reports); the reply reports the weights and spans used
    failure  a device's own error (bad input, a cache limit), the deadline, too many attempts, or fewer live
             devices than `min_devices`: the client gets one error naming the devices, every device of the
             attempt gets ABORT

Vocabulary: a *request* is what a client sent (one reply); an *attempt* is one run of it over one plan,
identified by its request id (messages.request_id); `ranks` are the attempt's plan devices.

No sockets here: it talks through the callables it is given (`send`, `reply`, `submit`, `abort_local`),
so tests drive it with plain functions and numbers for `now`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import PrismError
from ..program import DeviceResult, RequestStats, gather_outputs
from .admission import RequestInputs, check_request
from .bundle import DeviceBundle
from .exchange import Traffic
from .messages import GENERATED, Result, first_sequence, request_id
from .protocol import Kind, encode
from .split import SplitPolicy
from .worker import PrepareJob

MAX_PENDING = 32
HOLD_S = 1.2  # an attempt a device failed for another device's sake: rerun when membership changes, or after this


@dataclass
class Pending:
    """One client request, at its current attempt."""

    client: bytes
    call: int | None
    t0: float
    req: RequestInputs  # the checked request, kept to rerun it
    ranks: tuple[int, ...] = ()  # the current attempt's plan devices
    weights: tuple[float, ...] | None = None  # the current attempt's split weights, one per plan position
    deadline: float = 0.0
    results: dict[int, Result] = field(default_factory=dict)
    attempts: int = 0
    reruns: list[str] = field(default_factory=list)  # why each earlier attempt was abandoned
    held_until: float | None = None  # abandoned, waiting to rerun (see Coordinator.hold)
    first_token: float | None = None  # when the first streamed token arrived
    rows: tuple[int, int, int] | None = None  # batched: this request's rows of the attempt's outputs, its tokens
    riders: list["Pending"] = field(default_factory=list)  # batched: the other requests of this attempt

    @property
    def tail(self) -> int:
        return self.ranks[-1]


@dataclass
class Coordinator:
    bundle: DeviceBundle
    rank: int
    membership: object  # membership.Membership (members, describe)
    send: Callable[[int, list], bool]  # (peer rank, parts) -> sent?
    reply: Callable[..., None]  # (client, meta, arrays[, kind]): a REPLY, or TOKENS while streaming
    submit: Callable[[PrepareJob], bool]  # to the local worker
    timeout: float = 10.0
    max_pending: int = MAX_PENDING
    min_devices: int = 1
    abort_local: Callable[[int, str], None] = lambda request, why: None  # the local worker's part of an attempt
    max_attempts: int | None = None  # default: one more than the export's devices
    hold_s: float = HOLD_S
    split: SplitPolicy | None = None  # default: the export's static split if it has one, else adaptive
    pending: dict[int, Pending] = field(default_factory=dict)  # by the current attempt's request id

    def __post_init__(self):
        self.limits = self.bundle.limits
        self.budget = self.timeout * (self.limits.layers + 2)
        self.max_attempts = self.max_attempts or self.limits.devices + 1
        self.sequence = itertools.count(first_sequence())  # increasing across coordinator restarts
        if self.split is None:
            static = self.bundle.manifest.settings.split_weights
            self.split = SplitPolicy("static", static) if static else SplitPolicy("auto")

    def _answer(self, client: bytes, call: int | None, meta: dict, arrays: dict | None = None):
        self.reply(client, {**meta, "call": call} if call is not None else meta, arrays)

    # ------------------------------------------------------------------------------------------ planning
    def members(self, now: float) -> tuple[list[int] | None, str | None]:
        """(the devices to plan over, None), or (None, why not): fewer live than `min_devices`."""
        ranks = sorted(self.membership.members(now))
        if len(ranks) >= self.min_devices:
            return ranks, None
        lost = [q for q in range(self.limits.devices) if q not in ranks]
        why = "; ".join(self.membership.describe(q, now) for q in lost)
        return None, (f"only {len(ranks)} of {self.limits.devices} devices are live ({ranks}) and --min-devices is "
                      f"{self.min_devices}: lost device{'s' if len(lost) > 1 else ''} {lost} ({why})")

    def on_request(self, client: bytes, meta: dict, arrays: dict, now: float) -> None:
        call = meta.get("call") if type(meta.get("call")) is int else None
        ranks, why = self.members(now)
        if why:
            return self._answer(client, call, {"ok": False, "error": why})
        if len(self.pending) >= self.max_pending:
            return self._answer(client, call, {"ok": False, "error": f"busy: {len(self.pending)} requests running"})
        try:
            req = check_request(meta, arrays, self.limits)
        except PrismError as e:
            return self._answer(client, call, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        p = Pending(client, call, now, req)
        if not self._attempt(p, ranks, now):
            self._answer(client, call, {"ok": False, "error": "busy: the worker queue is full"})

    def _attempt(self, p: Pending, ranks: list[int], now: float) -> bool:
        """Start an attempt of p over `ranks` with a new request id. False: the local worker is full."""
        request = request_id(next(self.sequence), self.rank)
        budget = self.budget
        if p.req.generate is not None:  # the tail decodes after the prefill: a generous second per token
            budget += self.timeout + p.req.generate["max_new_tokens"]
        weights = self.split.weights(ranks)
        job = PrepareJob(request, p.req.kwargs, p.req.outputs, now + budget, budget, p.req.generate, p.req.stream,
                         tuple(ranks), weights)
        if not self.submit(job):
            return False
        p.ranks, p.weights, p.deadline, p.results, p.held_until = tuple(ranks), weights, now + budget, {}, None
        p.attempts += 1
        self.pending[request] = p
        return True

    # ------------------------------------------------------------------------------------- from devices
    def on_tokens(self, tok, now: float) -> None:
        """The tail device's new tokens: relay them to a client that streams (ids -1: the row ended)."""
        p = self.pending.get(tok.request)
        if p is None or p.held_until is not None or tok.rank != p.tail:
            return  # finished, failed, abandoned, or not from the tail device
        if p.first_token is None:
            p.first_token = now
        if p.req.stream:
            meta = {"request": tok.request, "step": tok.step}
            texts = self._texts(tok.ids[:, None])
            if texts is not None:
                meta["texts"] = texts
            self.reply(p.client, {**meta, "call": p.call} if p.call is not None else meta, {"ids": tok.ids},
                       Kind.TOKENS)

    def on_batch(self, request: int, members: list[tuple[int, int, int, int]], now: float) -> None:
        """The local worker batched `members` (request id, first row, end row, tokens) into the attempt
        `request`."""
        p = self.pending.get(request)
        if p is None or p.held_until is not None:  # that attempt failed or was abandoned already (its ABORT
            for member, *_ in members:  # reaches the worker): the others must not wait for it
                if member != request and member in self.pending:
                    self.pending[member].reruns.append(f"batched into request {request}, which was abandoned")
                    self._rerun(member, now)
            return
        for member, start, end, tokens in members:
            q = p if member == request else self.pending.pop(member, None)
            if q is None:
                continue  # answered already (e.g. expired): its rows are dropped
            q.rows = (start, end, tokens)
            if q is not p:
                p.riders.append(q)

    def on_result(self, res: Result, now: float) -> None:
        p = self.pending.get(res.request)
        if p is None or p.held_until is not None or res.rank in p.results or res.rank not in p.ranks:
            return  # answered already (an error came first), abandoned, expired, not in the plan, or a duplicate
        if not res.ok:
            if res.retry:  # another device failed it (lost, silent): a rerun may succeed
                return self.hold(res.request, f"device {res.rank}: {res.error}", now)
            return self.fail(res.request, res.error)
        p.results[res.rank] = res
        if len(p.results) == len(p.ranks):
            try:
                meta, outputs = self._assemble(p, now)
            except (ValueError, KeyError) as e:  # a device sent outputs that do not fit the others'
                return self.fail(res.request, f"request {res.request}: the devices' outputs do not fit together "
                                              f"({type(e).__name__}: {str(e)[:200]})")
            del self.pending[res.request]
            rows = next((len(v) for v in outputs.values()), 1)  # the batch the devices computed
            for r in p.results.values():  # the adaptive split learns each device's speed, in tokens x rows
                self.split.observe(r.rank, (r.span[1] - r.span[0]) * rows, sum(r.timings.values()))
            for q in [p, *p.riders]:
                if q.rows is None:
                    self._answer(q.client, q.call, meta, outputs)
                else:
                    self._answer(q.client, q.call, {**meta, "batched": {"requests": 1 + len(p.riders),
                                                                         "rows": list(q.rows[:2])}},
                                 self._rows(outputs, *q.rows))

    def on_send_failed(self, request: int, q: int, why: str, now: float) -> None:
        """A message of an attempt (its START) could not be sent to device q."""
        p = self.pending.get(request)
        if p is not None and q in p.ranks and p.held_until is None:
            self.hold(request, why, now)

    def on_peer_lost(self, q: int, why: str, now: float) -> None:
        """Device q is gone: rerun every attempt whose plan still needs it (q in its plan, its RESULT not in).
        An attempt whose RESULT from q is in carries on (e.g. a generation the tail device is decoding)."""
        for request, p in list(self.pending.items()):
            if p.held_until is not None:
                self._rerun(request, now)  # membership changed: rerun now, not at the end of the hold
            elif q in p.ranks and q not in p.results:
                self._abandon(request, f"lost device {q} ({why})")
                self._rerun(request, now)

    # --------------------------------------------------------------------------------- reruns, failures
    def hold(self, request: int, why: str, now: float) -> None:
        """A device failed the attempt because of another device: abandon it, and rerun it as soon as
        membership changes (that device is found lost) or after `hold_s` (a transient failure)."""
        self._abandon(request, why)
        self.pending[request].held_until = now + self.hold_s

    def _abandon(self, request: int, why: str) -> None:
        p = self.pending[request]
        p.reruns.append(why)
        self._abort(request, p.ranks, why)

    def _rerun(self, request: int, now: float) -> None:
        p = self.pending.pop(request)
        riders, p.riders = p.riders, []
        for q in [p, *riders]:  # each request of a batch reruns on its own (the worker may batch them again)
            q.rows = None
            if q is not p and p.reruns:
                q.reruns.append(p.reruns[-1])
            self._rerun_one(q, now)

    def _rerun_one(self, p: Pending, now: float) -> None:
        error = None
        if p.req.stream and p.first_token is not None:
            error = "the tail device was lost after it streamed tokens; send the request again"
        elif p.attempts >= self.max_attempts:
            error = f"gave up after {p.attempts} attempts"
        ranks, why = self.members(now)
        error = error or why
        if error is None and not self._attempt(p, ranks, now):
            error = "busy: the worker queue is full"
        if error is not None:
            self._answer(p.client, p.call, {"ok": False, "error": f"request failed: {error} (earlier attempts: "
                                                                     f"{'; '.join(p.reruns)})"})

    def _abort(self, request: int, ranks, why: str) -> None:
        msg = encode(Kind.ABORT, {"request": request, "reason": why})
        for q in ranks:
            if q != self.rank:
                self.send(q, msg)
        self.abort_local(request, why)

    def fail(self, request: int, error: str) -> None:
        """The request failed: answer the client (every request of a batch), tell every device of the
        attempt to drop it."""
        p = self.pending.pop(request, None)
        self._abort(request, p.ranks if p is not None else range(self.limits.devices), error)
        if p is not None:
            for q in [p, *p.riders]:
                self._answer(q.client, q.call, {"ok": False, "error": error})

    def expire(self, now: float) -> None:
        """Reruns whose hold ended (or a device of whose plan left the members), and attempts past their
        deadline."""
        live = None
        for request, p in list(self.pending.items()):
            if p.held_until is not None:
                live = live if live is not None else sorted(self.membership.members(now))
                if now >= p.held_until or not set(p.ranks) <= set(live):
                    self._rerun(request, now)
            elif now > p.deadline:
                missing = [q for q in p.ranks if q not in p.results]
                self.fail(request, f"request {request} timed out waiting for devices {missing}")

    def describe_pending(self, now: float) -> list[dict]:
        """For STATUS: each pending request's attempt id, plan devices, attempt number and age."""
        return [{"request": r, "ranks": list(p.ranks), "attempt": p.attempts, "held": p.held_until is not None,
                 "batched_with": len(p.riders),
                 "waiting_for": [q for q in p.ranks if q not in p.results], "age_ms": round(1e3 * (now - p.t0), 1)}
                for r, p in self.pending.items()]

    # ------------------------------------------------------------------------------------------- replies
    def _assemble(self, p: Pending, now: float) -> tuple[dict, dict]:
        """The devices' results -> the client's outputs (program.gather_outputs) and stats (RequestStats: the
        plan in force, its devices, spans and split weights); for generation the tail's generated ids, their
        texts and the generation stats."""
        results = [DeviceResult(r.rank, r.outputs, r.timings, Traffic.from_dict(r.traffic, self.limits.layers))
                   for r in p.results.values()]
        stats = RequestStats.of(results, latency_ms=1e3 * (now - p.t0))
        stats.spans = [list(p.results[r].span) for r in stats.ranks]
        stats.split_weights = list(p.weights) if p.weights else None
        meta = {"ok": True, "stats": stats.to_dict(), "attempts": p.attempts, "reruns": p.reruns}
        tail = p.results[p.tail]
        if tail.generation is not None:
            ids = tail.outputs[GENERATED]
            meta["generation"] = {**tail.generation, "texts": self._texts(ids)}
            if p.first_token is not None:
                meta["generation"]["time_to_first_token_ms_at_coordinator"] = round(1e3 * (p.first_token - p.t0), 3)
            return meta, {GENERATED: ids}
        return meta, gather_outputs(self.bundle.manifest.program, results)

    def _rows(self, outputs: dict, start: int, end: int, tokens: int) -> dict:
        """A batched request's own outputs: its rows, and of token outputs [B, N, ...] its own first `tokens`
        positions (a request padded on the right to the batch's length: `prism run --batch-pad`)."""
        per_token = set(self.bundle.manifest.program.token_outputs)
        return {k: v[start:end, :tokens] if k in per_token else v[start:end] for k, v in outputs.items()}

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
