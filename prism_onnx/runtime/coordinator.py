"""The coordinator (any runner started with --serve): client requests in, replies out, and the reruns
that make a lost device cost no request.

    REQUEST  checked while decoded (schema.Request, admission.py) -> planned over the live devices
             (membership.members) -> an Attempt: a Job for the local worker, which prepares the inputs and
             STARTs every other device of the plan (worker.py)
    RESULT   one per device of the attempt's plan; the last one completes the reply (replies.py)
    TOKENS   the tail device's new tokens while it generates: relayed to a client that asked to stream
    rerun    a device of the plan is lost before it delivered its RESULT (membership), or a device failed
             the attempt because of another device (a RESULT whose error is retryable, an unsendable START):
             the attempt is abandoned (ABORT to its devices, so they release its exchange state) and the
             request runs again as a new attempt, with a new request id, over the devices live now (a prefill
             is idempotent). A device whose RESULT is in is not needed any more: a generation whose prefill it
             finished carries on. The tail of a generation lost while decoding reruns it from scratch, unless
             tokens were already streamed to the client (then the request fails: the client has seen them).
    batch    the local worker ran several requests as one attempt (batching.py): the others ride on the first
             one's attempt, and each is answered with its own rows; a rerun or a failure of the attempt is a
             rerun or a failure of each of them
    split    each attempt's split weights come from `split` (split.py: even by default, static, or adaptive
             from the compute time every RESULT reports), or from the request itself (`Request.split`: a
             reply's plan reproduced); the reply reports the weights and spans used
    failure  a device's own error (bad input, a cache limit), the deadline, too many attempts, or fewer live
             devices than `min_devices`: the client gets one typed error (errors.ErrorInfo: its class, code,
             message, the devices concerned), every device of the attempt gets ABORT

Vocabulary: a *request* is what a client sent (one reply); an *attempt* is one run of it over one plan,
identified by its request id (schema.request_id); `ranks` are the attempt's plan devices.

No sockets here: it talks through the callables it is given (`send`, `reply`, `submit`, `abort_local`),
so tests drive it with plain functions and numbers for `now`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import Busy, DevicesUnavailable, ErrorInfo, FrameError, PeerError, PrismError, Timeout
from .bundle import DeviceBundle
from .replies import Replies, error_reply
from .schema import Abort, Attempt, Reply, Request, Result, Tokens, encode_record, request_id
from .split import SplitPolicy, default_policy, requested
from .jobs import Job

MAX_PENDING = 32
HOLD_S = 1.2  # an attempt a device failed for another device's sake: rerun when membership changes, or after this
SEQUENCE_BITS = 50  # request_id: a random number of this many bits above the coordinator's rank


def new_request_id(rank: int, pending) -> int:
    """A new attempt's id (schema.request_id) with a random sequence: unpredictable (ids tell nobody how many
    requests others sent, nor which id comes next), and none of the `pending` ids (devices forget finished
    ids after 4,096 more, exchange.RecentIds; random ids of 50 bits meet within that window once in ~10^11)."""
    while True:
        request = request_id(secrets.randbits(SEQUENCE_BITS), rank)
        if request not in pending:
            return request


@dataclass
class Pending:
    """One client request, at its current attempt."""

    client: object  # who asked (clients.ClientRef), handed back with the replies
    req: Request  # the checked request, kept to rerun it
    t0: float
    attempt: Attempt | None = None  # the current attempt
    deadline: float = 0.0
    results: dict[int, Result] = field(default_factory=dict)
    attempts: int = 0
    reruns: list[str] = field(default_factory=list)  # why each earlier attempt was abandoned
    held_until: float | None = None  # abandoned, waiting to rerun (see Coordinator.hold)
    first_token: float | None = None  # when the first streamed token arrived
    rows: tuple[int, int, int] | None = None  # batched: this request's rows of the attempt's outputs, its tokens
    riders: list["Pending"] = field(default_factory=list)  # batched: the other requests of this attempt
    streams: list | None = None  # streaming: each row's text so far (detokenize.TextStream, replies.py)

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.attempt.ranks if self.attempt is not None else ()


@dataclass
class Coordinator:
    bundle: DeviceBundle
    rank: int
    membership: object  # membership.Membership (members, describe)
    send: Callable[[int, list], bool]  # (peer rank, parts) -> sent?
    reply: Callable[[object, Reply | Tokens], None]  # to a client: its Reply, or Tokens while it streams
    submit: Callable[[Job], bool]  # to the local worker
    timeout: float = 10.0
    max_pending: int = MAX_PENDING
    min_devices: int = 1
    abort_local: Callable[[int, str], None] = lambda request, why: None  # the local worker's part of an attempt
    max_attempts: int | None = None  # default: one more than the export's devices
    hold_s: float = HOLD_S
    split: SplitPolicy | None = None  # default: the export's static split if it has one, else even
    pending: dict[int, Pending] = field(default_factory=dict)  # by the current attempt's request id

    def __post_init__(self):
        self.limits = self.bundle.limits
        self.budget = self.timeout * (self.limits.layers + 2)
        self.max_attempts = self.max_attempts or self.limits.devices + 1
        self.assembler = Replies(self.bundle)
        if self.split is None:
            self.split = default_policy(self.bundle.manifest.settings.split_weights)

    # ------------------------------------------------------------------------------------------ planning
    def members(self, now: float, req: Request | None = None) -> tuple[list[int] | None, PrismError | None]:
        """The devices to plan over (those a request's own split names, when it has one), or the error."""
        split = req.split if req is not None else None
        return plan_members(self.membership, self.limits.devices, self.min_devices, now, split, self.rank)

    def on_request(self, client, req: Request, now: float) -> None:
        """A checked REQUEST (a request that failed its checks is answered by the host with its error)."""
        ranks, why = self.members(now, req)
        if why is None and len(self.pending) >= self.max_pending:
            why = Busy(f"busy: {len(self.pending)} requests running")
        p = Pending(client, req, now)
        if why is None and not self._attempt(p, ranks, now):
            why = Busy("busy: the worker queue is full")
        if why is not None:
            self.reply(client, error_reply(req.call, ErrorInfo.of(why)))

    def _attempt(self, p: Pending, ranks: list[int], now: float) -> bool:
        """Start an attempt of p over `ranks` with a new request id. False: the local worker is full."""
        budget = self.budget
        if p.req.generate is not None:  # the tail decodes after the prefill: a generous second per token
            budget += self.timeout + p.req.generate.max_new_tokens
        weights = self.split.weights(ranks) if p.req.split is None else requested(p.req.split, ranks, self.rank)[1]
        attempt = Attempt(new_request_id(self.rank, self.pending), self.rank, tuple(ranks), budget,
                          weights, p.req.outputs, p.req.generate, p.req.stream)
        if not self.submit(Job(attempt, now + budget, p.req)):
            return False
        p.attempt, p.deadline, p.results, p.held_until = attempt, now + budget, {}, None
        p.attempts += 1
        self.pending[attempt.request] = p
        return True

    # ------------------------------------------------------------------------------------- from devices
    def on_tokens(self, tok: Tokens, now: float) -> None:
        """The tail device's new tokens: relay them to a client that streams (ids -1: the row ended)."""
        p = self.pending.get(tok.request)
        if p is None or p.held_until is not None or tok.rank != p.attempt.tail:
            return  # finished, failed, abandoned, or not from the tail device
        if p.first_token is None:
            p.first_token = now
        if p.req.stream:
            ids = tok.arrays["ids"]
            self.reply(p.client, Tokens(tok.request, tok.step, call=p.req.call, texts=self.assembler.new_text(p, ids),
                                        arrays={"ids": ids}))

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
            info = res.error.info()
            if info.retryable:  # another device failed it (lost, silent): a rerun may succeed
                return self.hold(res.request, f"device {res.rank}: {info.message}", now)
            return self.fail(res.request, replace(info, ranks=info.ranks or (res.rank,)))
        p.results[res.rank] = res
        if len(p.results) < len(p.ranks):
            return
        try:
            fields, outputs = self.assembler.assemble(p, now)
        except (ValueError, KeyError) as e:  # a device sent outputs that do not fit the others'
            return self.fail(res.request, ErrorInfo.of(FrameError(
                f"request {res.request}: the devices' outputs do not fit together ({type(e).__name__}: "
                f"{str(e)[:200]})")))
        del self.pending[res.request]
        rows = next((len(v) for v in outputs.values()), 1)  # the batch the devices computed
        for r in p.results.values():  # the adaptive split learns each device's speed, in tokens x rows
            self.split.observe(r.rank, (r.span[1] - r.span[0]) * rows, sum((r.timings or {}).values()))
        for client, reply in self.assembler.answers(p, fields, outputs):
            self.reply(client, reply)

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
                self.hold(request, f"lost device {q} ({why})", None)
                self._rerun(request, now)

    # --------------------------------------------------------------------------------- reruns, failures
    def hold(self, request: int, why: str, now: float | None) -> None:
        """A device failed the attempt because of another device: abandon it (ABORT its devices), and rerun it
        as soon as membership changes (that device is found lost) or after `hold_s` (a transient failure);
        now=None: only abandon it (the caller reruns it at once)."""
        p = self.pending[request]
        p.reruns.append(why)
        self._abort(request, p.ranks, why)
        if now is not None:
            p.held_until = now + self.hold_s

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
            error = PeerError("the tail device was lost after it streamed tokens; send the request again")
        elif p.attempts >= self.max_attempts:
            error = DevicesUnavailable(f"gave up after {p.attempts} attempts")
        ranks, why = self.members(now, p.req)
        error = error or why
        if error is None and not self._attempt(p, ranks, now):
            error = Busy("busy: the worker queue is full")
        if error is not None:
            info = ErrorInfo.of(error)
            self.reply(p.client, error_reply(p.req.call, replace(
                info, message=f"request failed: {info.message} (earlier attempts: {'; '.join(p.reruns)})")))

    def _abort(self, request: int, ranks, why: str) -> None:
        msg = encode_record(Abort(request, why[:2000]))
        for q in ranks:
            if q != self.rank:
                self.send(q, msg)
        self.abort_local(request, why)

    def fail(self, request: int, error: ErrorInfo) -> None:
        """The request failed: answer the client (every request of a batch), tell every device of the
        attempt to drop it."""
        p = self.pending.pop(request, None)
        self._abort(request, p.ranks if p is not None else range(self.limits.devices), error.message)
        if p is not None:
            for q in [p, *p.riders]:
                self.reply(q.client, error_reply(q.req.call, error))

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
                self.fail(request, ErrorInfo.of(Timeout(f"request {request} timed out waiting for devices {missing}",
                                                        ranks=missing)))

    def describe_pending(self, now: float) -> list[dict]:
        return describe_pending(self.pending, now)


def plan_members(membership, devices: int, min_devices: int, now: float, split=None, coordinator: int = 0):
    """(the devices to plan over, None), or (None, DevicesUnavailable): fewer live than `min_devices`; with a
    request's own `split`, the devices it names (split.requested: all live, the coordinator among them)."""
    ranks = sorted(membership.members(now))
    if len(ranks) >= min_devices:
        try:
            return (ranks if split is None else requested(split, ranks, coordinator)[0]), None
        except PrismError as e:
            return None, e
    lost = [q for q in range(devices) if q not in ranks]
    why = "; ".join(membership.describe(q, now) for q in lost)
    return None, DevicesUnavailable(
        f"only {len(ranks)} of {devices} devices are live ({ranks}) and --min-devices is {min_devices}: lost "
        f"device{'s' if len(lost) > 1 else ''} {lost} ({why})", ranks=lost)


def describe_pending(pending: dict, now: float) -> list[dict]:
    """For STATUS: each pending request's attempt id, plan devices, attempt number and age, and the client
    that sent it (`client`: its name, clients.ClientRef); a request batched into another's attempt is listed
    with `rides_on` that attempt."""
    out = []
    for r, p in pending.items():
        waiting = [q for q in p.ranks if q not in p.results]
        out.append({"request": r, "client": getattr(p.client, "client", None), "ranks": list(p.ranks),
                    "attempt": p.attempts, "held": p.held_until is not None, "batched_with": len(p.riders),
                    "waiting_for": waiting, "age_ms": round(1e3 * (now - p.t0), 1)})
        out += [{"rides_on": r, "client": getattr(q.client, "client", None), "ranks": list(p.ranks),
                 "waiting_for": waiting, "age_ms": round(1e3 * (now - q.t0), 1)} for q in p.riders]
    return out
