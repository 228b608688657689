"""Every control message of the runtime as a typed, frozen record, checked once, when it is decoded.

    HELLO    runner -> runner        Hello      heartbeat: rank, export, clocks, who it sees, its health
    REFUSE   runner -> runner        Refuse     your HELLO is refused, and why
    START    coordinator -> device   Start      one attempt of a request: the Attempt, plus the device's own
                                                token inputs, the request's mask (and for the tail device of a
                                                generation the whole prompt) as arrays
    RESULT   device -> coordinator   Result     the device's outputs as arrays, or an ErrorInfo; its stats
    ABORT    coordinator -> devices  Abort      drop this attempt
    TOKENS   tail -> coordinator     Tokens     the tokens just generated (streaming); also coordinator ->
                                                client, with the client's `call` and the tokens' texts
    REQUEST  client -> coordinator   Request    texts, or input arrays; outputs, generation options
    REPLY    coordinator -> client   Reply      ok and outputs as arrays, or an ErrorInfo; stats
    STATUS   client -> coordinator   Status     the reply is a Reply whose `status` holds the cluster's state

protocol.py frames a message (header, a JSON part checked for size and depth before it is parsed, raw array
parts checked against their declared shapes and the receiver's ArrayRules before any array exists); this
module then turns the JSON part into the kind's record by one generic validator (`parse`): every field of
a record declares its JSON type and bounds (`spec`: numbers in a range, strings of a length, lists of a
size, nested records; bounds may be functions of the receiver's Limits), an unknown field is refused, and
a record's own `check(limits)` holds the rules that span fields. Every refusal is a FrameError (or the
InputError of a request's values) with one line naming the field.

msgspec would do this in C, but it has no wheels for armv7 boards (PyPI: x86_64 and aarch64 only), so the
validator is these ~100 lines of dataclasses and a loop.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np

from ..errors import ErrorInfo, FrameError, InputError
from .protocol import ArrayRules, Kind, decode, encode

MAX_INT = (1 << 63) - 1
MAX_BUDGET_S = 24 * 3600.0
MAX_ERROR = 2000  # characters of an error message that travel


# ----------------------------------------------------------------------------------- the validator
@dataclass(frozen=True)
class Rule:
    """How one field travels: `kind` int | float | str | bool | ints | floats | strs | obj | rec; number bounds
    `lo`, `hi` and list/object sizes `items` (numbers, or functions of the receiver's Limits, or None
    where unknown); `length` of strings; `rec` the record class of a nested record; `wire` its JSON name
    when that is not the field's name."""

    kind: str
    lo: Any = None
    hi: Any = None
    items: Any = None
    length: int = 256
    rec: type | None = None
    wire: str | None = None


def spec(kind: str, default: Any = MISSING, **rule) -> Any:
    """A record field that travels as `kind` (see Rule); without a default it is required."""
    meta = {"rule": Rule(kind, **rule)}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


def _bound(x, limits):
    if callable(x):
        return x(limits) if limits is not None else None
    return x


def _scalar(kind: str, name: str, v, r: Rule, limits):
    lo, hi = _bound(r.lo, limits), _bound(r.hi, limits)
    if kind == "int":
        if type(v) is not int or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise FrameError(f"field '{name}' must be an integer in [{lo}, {hi}], got {str(v)[:40]}")
        return v
    if kind == "float":
        if type(v) not in (int, float) or not math.isfinite(v) or (lo is not None and v < lo) or \
                (hi is not None and v > hi):
            raise FrameError(f"field '{name}' must be a number in [{lo}, {hi}], got {str(v)[:40]}")
        return float(v)
    if kind == "str":
        if not isinstance(v, str) or len(v) > r.length:
            raise FrameError(f"field '{name}' must be a string of at most {r.length} characters")
        return v
    if type(v) is not bool:
        raise FrameError(f"field '{name}' must be true or false")
    return v


def _value(r: Rule, name: str, v, limits):
    if r.kind in ("int", "float", "str", "bool"):
        return _scalar(r.kind, name, v, r, limits)
    items = _bound(r.items, limits)
    if r.kind == "obj":
        if not isinstance(v, dict) or (items is not None and len(v) > items):
            raise FrameError(f"field '{name}' must be an object of at most {items} entries")
        return v
    if r.kind == "rec":
        if not isinstance(v, dict):
            raise FrameError(f"field '{name}' must be an object")
        return parse(r.rec, v, limits, f"{name}.")
    if not isinstance(v, list) or (items is not None and len(v) > items):
        raise FrameError(f"field '{name}' must be a list of at most {items} items")
    return tuple(_scalar(r.kind[:-1], name, x, r, limits) for x in v)


def parse(cls, meta: dict, limits=None, prefix: str = "", arrays: dict | None = None):
    """The record of class `cls` from a JSON object (and the message's `arrays`): every field checked by its
    Rule, unknown fields refused, then the record's own `check(limits)`."""
    rules = {(f.metadata["rule"].wire or f.name): f for f in fields(cls) if "rule" in f.metadata}
    unknown = sorted(str(k)[:40] for k in meta if k not in rules)
    if unknown:
        raise FrameError(f"unknown field(s) {[prefix + u for u in unknown[:5]]}")
    values = {}
    for wire, f in rules.items():
        v = meta.get(wire)
        if v is None:
            if f.default is MISSING and f.default_factory is MISSING:
                raise FrameError(f"field '{prefix}{wire}' is missing")
            continue
        values[f.name] = _value(f.metadata["rule"], prefix + wire, v, limits)
    if arrays is not None:
        values["arrays"] = arrays
    record = cls(**values)
    record.check(limits)
    return record


def to_meta(record) -> dict:
    """A record's JSON object (None fields left out; tuples as lists; nested records as objects)."""
    out = {}
    for f in fields(record):
        if "rule" not in f.metadata:
            continue
        v = getattr(record, f.name)
        if v is None:
            continue
        out[f.metadata["rule"].wire or f.name] = to_meta(v) if f.metadata["rule"].kind == "rec" else \
            (list(v) if isinstance(v, tuple) else v)
    return out


class Record:
    """Base of the records: `check(limits)` (cross-field rules, none by default); `arrays` travel as raw
    parts (protocol.encode), checked by the kind's ArrayRules while decoding."""

    arrays: dict

    def check(self, limits) -> None:
        pass


def _devices(limits):
    return limits.devices - 1


# ------------------------------------------------------------------------------------------- errors
@dataclass(frozen=True)
class WireError(Record):
    """errors.ErrorInfo as it travels (RESULT and REPLY): the error's class, code, message, whether a rerun
    may succeed, and the devices it concerns."""

    type: str = spec("str", length=64)
    code: str = spec("str", length=64)
    message: str = spec("str", length=MAX_ERROR)
    retryable: bool = spec("bool", default=False)
    ranks: tuple[int, ...] = spec("ints", default=(), items=4096, lo=0, hi=4095)

    @classmethod
    def of(cls, info: ErrorInfo) -> "WireError":
        return cls(info.type, info.code, info.message[:MAX_ERROR], info.retryable, tuple(info.ranks))

    def info(self) -> ErrorInfo:
        return ErrorInfo(self.type, self.code, self.message, self.retryable, self.ranks)


# ----------------------------------------------------------------------------------- between runners
@dataclass(frozen=True)
class Hello(Record):
    rank: int = spec("int", lo=0, hi=1 << 16)
    nonce: str = spec("str", length=64)
    export_id: str = spec("str", length=128)
    t: float = spec("float", lo=-1e15, hi=1e15)
    settings: dict = spec("obj", default=None, items=32)
    serving: bool = spec("bool", default=False)
    ready: bool = spec("bool", default=False)
    formed: bool = spec("bool", default=False)
    echo: dict = spec("obj", default=None, items=256)  # rank -> that peer's clock in its last HELLO we heard
    sees: tuple[int, ...] = spec("ints", default=(), items=256, lo=0, hi=1 << 16)
    health: dict = spec("obj", default=None, items=8)
    peers: tuple[str, ...] = spec("strs", default=(), items=256)
    arrays: dict = field(default_factory=dict, repr=False)

    def check(self, limits) -> None:
        if not all(type(v) in (int, float) and abs(v) <= 1e15 for v in (self.echo or {}).values()):
            raise FrameError("field 'echo' must map ranks to times")
        if not all(type(v) is int for v in (self.health or {}).values()):
            raise FrameError("field 'health' must map names to counts")


@dataclass(frozen=True)
class Refuse(Record):
    sender: int = spec("int", lo=0, hi=_devices, wire="from")
    reason: str = spec("str", default="", length=MAX_ERROR)
    arrays: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Abort(Record):
    request: int = spec("int", lo=0, hi=MAX_INT)
    reason: str = spec("str", default="", length=MAX_ERROR)
    arrays: dict = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------------------- request ids
RANK_BITS = 12
MAX_DEVICES = 1 << RANK_BITS


def request_id(sequence: int, coordinator: int) -> int:
    """The id of one *attempt* at a request: the coordinator's rank in the low RANK_BITS bits, a sequence
    number above them (random: coordinator.new_request_id). A rerun (a device was lost) is a new attempt with
    a new id, so that late frames of the abandoned attempt can never be taken for the new one's."""
    return (int(sequence) << RANK_BITS) | int(coordinator)


def coordinator_of(request: int) -> int:
    return int(request) & (MAX_DEVICES - 1)


# ---------------------------------------------------------------------------------- generation options
@dataclass(frozen=True)
class GenerateOptions(Record):
    """generate.GenerationConfig as it travels; stop_token_ids None: the model's EOS (the tail device's)."""

    max_new_tokens: int = spec("int", default=16, lo=1, hi=MAX_INT)  # within the positions: check()
    temperature: float = spec("float", default=0.0, lo=0.0, hi=1e4)
    top_k: int = spec("int", default=0, lo=0, hi=lambda L: L.vocab_size)
    top_p: float = spec("float", default=1.0, lo=0.0, hi=1.0)
    seed: int | None = spec("int", default=None, lo=0, hi=MAX_INT)
    stop_token_ids: tuple[int, ...] | None = spec("ints", default=None, items=64, lo=0,
                                                  hi=lambda L: L.vocab_size - 1)
    repetition_penalty: float = spec("float", default=1.0, lo=1e-6, hi=1e4)

    def check(self, limits) -> None:
        if self.top_p <= 0:
            raise FrameError("field 'top_p' must be in (0, 1]")
        if limits is not None and limits.generates and self.max_new_tokens >= limits.max_positions:
            from ..errors import too_long

            raise too_long(f"max_new_tokens {self.max_new_tokens}: this model has {limits.max_positions} positions, "
                           f"which hold the prompt and its new tokens (ask for at most {limits.max_positions - 1})")

    @classmethod
    def of(cls, config, given_stops: bool = True) -> "GenerateOptions":
        return cls(config.max_new_tokens, config.temperature, config.top_k, config.top_p, config.seed,
                   tuple(config.stop_token_ids) if given_stops else None, config.repetition_penalty)

    def config(self, default_stops=()):
        from ..generate import GenerationConfig

        stops = self.stop_token_ids if self.stop_token_ids is not None else tuple(default_stops)
        return GenerationConfig(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.seed, stops,
                                self.repetition_penalty)


# ------------------------------------------------------------------------------------------- attempts
PROMPT = "prompt_ids"  # START of a generation's tail device: the whole prompt [B, N] (repetition penalty)
GENERATED = "generated_ids"  # RESULT of a generation's tail device: [B, T] ids, -1 after a row ends


@dataclass(frozen=True)
class Attempt(Record):
    """One run of a client request over one plan: what the coordinator tells every device of the plan (the
    JSON part of START), and what a device's worker runs. `ranks`: the plan's devices, position by position;
    `split_weights`: one per position (None: the export's weights of those devices); `budget_s`: seconds
    the attempt may take; `outputs`: the outputs asked for (None: all); `generate`: the tail device decodes
    after the prefill. START's arrays: `attention_mask` [B, N] of the whole request, the device's own token
    inputs [B, n, ...], and for the tail device of a generation `prompt_ids` [B, N]."""

    request: int = spec("int", lo=0, hi=MAX_INT)
    coordinator: int = spec("int", lo=0, hi=_devices)
    ranks: tuple[int, ...] = spec("ints", items=lambda L: L.devices, lo=0, hi=_devices)
    budget_s: float = spec("float", lo=1e-3, hi=MAX_BUDGET_S)
    split_weights: tuple[float, ...] | None = spec("floats", default=None, items=lambda L: L.devices, lo=1e-12,
                                                   hi=1e9)
    outputs: tuple[str, ...] | None = spec("strs", default=None, items=lambda L: len(L.outputs), length=64)
    generate: GenerateOptions | None = spec("rec", default=None, rec=GenerateOptions)
    stream: bool = spec("bool", default=False)
    arrays: dict = field(default_factory=dict, repr=False, compare=False)

    def check(self, limits) -> None:
        r = self.ranks
        if coordinator_of(self.request) != self.coordinator:
            raise FrameError(f"request {self.request} is not an id of device {self.coordinator}")
        if not r or any(a >= b for a, b in zip(r, r[1:])):
            raise FrameError("field 'ranks' must list increasing device ranks")
        if self.coordinator not in r:
            raise FrameError(f"the plan's devices {list(r)} leave out its coordinator {self.coordinator}")
        if self.split_weights is not None and len(self.split_weights) != len(r):
            raise FrameError("field 'split_weights' must hold one positive weight per rank")
        if limits is not None:
            if self.outputs is not None and not set(self.outputs) <= set(limits.outputs):
                raise FrameError(f"field 'outputs' must name outputs of this model {list(limits.outputs)}")
            if self.generate is not None and not limits.generates:
                raise FrameError("START of a generation for an export that cannot generate")
            if self.arrays:
                self._check_arrays(limits)

    def _check_arrays(self, limits) -> None:
        missing = [n for n in ("attention_mask", *limits.embed_inputs) if n not in self.arrays]
        if missing:
            raise FrameError(f"START carries no {missing}")
        mask = self.arrays["attention_mask"]
        if any(self.arrays[n].shape[0] != mask.shape[0] for n in limits.embed_inputs):
            raise FrameError("START inputs and attention_mask differ in batch size")
        if not np.isin(mask, (0, 1)).all():
            raise FrameError("START attention_mask must hold only 0 and 1")
        for name, (lo, hi) in limits.token_ranges.items():
            a = self.arrays.get(name)
            if a is not None and a.size and (a.min() < lo or a.max() >= hi):
                raise FrameError(f"START {name} outside [{lo}, {hi})")
        prompt = self.arrays.get(PROMPT)
        if prompt is not None and (self.generate is None or prompt.shape != mask.shape):
            raise FrameError("START carries prompt_ids without generation options, or not of the mask's shape")
        if prompt is not None and prompt.size and (prompt.min() < 0 or prompt.max() >= limits.vocab_size):
            raise FrameError(f"START prompt_ids outside [0, {limits.vocab_size})")

    @property
    def tail(self) -> int:
        return self.ranks[-1]


def start_rules(limits) -> ArrayRules:
    def allow(name, dtype, shape):
        if name == "attention_mask" or (name == PROMPT and limits.generates):
            ok = dtype == "int64" and len(shape) == 2 and 1 <= shape[0] <= limits.max_batch \
                and 1 <= shape[1] <= limits.max_seq_len
            return None if ok else f"{dtype} {list(shape)}: must be int64 [batch <= {limits.max_batch}, " \
                                   f"tokens <= {limits.max_seq_len}]"
        if name not in limits.token_inputs:
            return f"not a token input of this model ({', '.join(limits.embed_inputs)})"
        want, width = limits.token_inputs[name]
        rank = 2 if width is None else 3
        ok = dtype == want and len(shape) == rank and 1 <= shape[0] <= limits.max_batch \
            and 1 <= shape[1] <= limits.max_seq_len and (width is None or shape[2] == width)
        return None if ok else f"{dtype} {list(shape)}: must be {want} of rank {rank}" + \
            (f" with width {width}" if width else "")

    return ArrayRules(limits.max_message_bytes, max_arrays=2 + len(limits.embed_inputs), allow=allow)


# --------------------------------------------------------------------------------------------- RESULT
@dataclass(frozen=True)
class TrafficInfo(Record):
    """A device's bytes for one attempt (exchange.Traffic), per exchange point."""

    sent: tuple[int, ...] = spec("ints", items=lambda L: L.layers, lo=0, hi=MAX_INT)
    received: tuple[int, ...] = spec("ints", items=lambda L: L.layers, lo=0, hi=MAX_INT)
    rejected_frames: int = spec("int", default=0, lo=0, hi=MAX_INT)


@dataclass(frozen=True)
class GenerationInfo(Record):
    """The tail device's generation stats (generate.GenerationStats) and each row's finish reason."""

    prompt_tokens: int = spec("int", lo=0, hi=MAX_INT)
    generated_tokens: int = spec("int", lo=0, hi=MAX_INT)
    finish_reasons: tuple[str, ...] = spec("strs", items=lambda L: L.max_batch, length=8)
    time_to_first_token_ms: float | None = spec("float", default=None, lo=0.0, hi=1e15)
    decode_tokens_per_s: float | None = spec("float", default=None, lo=0.0, hi=1e15)
    cache_bytes: int = spec("int", default=0, lo=0, hi=MAX_INT)

    def check(self, limits) -> None:
        if not set(self.finish_reasons) <= {"stop", "length"}:
            raise FrameError("field 'generation.finish_reasons' must hold 'stop' or 'length'")


@dataclass(frozen=True)
class Result(Record):
    """A device's outcome of one attempt: its outputs (arrays), or `error`; `span` the tokens [start, end) it
    held; `timings` onnxruntime seconds per graph; `traffic` its bytes; `generation` (the tail device of a
    generation) with its `generated_ids`."""

    request: int = spec("int", lo=0, hi=MAX_INT)
    rank: int = spec("int", lo=0, hi=_devices)
    error: WireError | None = spec("rec", default=None, rec=WireError)
    timings: dict = spec("obj", default=None, items=lambda L: 2 * L.layers + 8)
    traffic: TrafficInfo | None = spec("rec", default=None, rec=TrafficInfo)
    span: tuple[int, ...] = spec("ints", default=(0, 0), items=2, lo=0, hi=lambda L: L.max_seq_len)
    generation: GenerationInfo | None = spec("rec", default=None, rec=GenerationInfo)
    arrays: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def check(self, limits) -> None:
        if not all(type(v) in (int, float) and 0 <= v < 1e6 for v in (self.timings or {}).values()):
            raise FrameError("field 'timings' must map graphs to seconds")
        if len(self.span) != 2 or self.span[0] > self.span[1]:
            raise FrameError("field 'span' must be [start, end]")


def result_rules(limits) -> ArrayRules:
    def allow(name, dtype, shape):
        if name == GENERATED and limits.generates:
            ok = dtype == "int64" and len(shape) == 2 and shape[0] <= limits.max_batch and \
                shape[1] <= limits.max_positions
            return None if ok else f"{dtype} {list(shape)}: generated ids must be int64 [batch, new tokens]"
        if name not in limits.outputs:
            return f"not an output of this model ({', '.join(limits.outputs)})"
        ok = dtype == "float32" and 2 <= len(shape) <= 3 and shape[0] <= limits.max_batch \
            and (len(shape) == 2 or shape[1] <= limits.max_seq_len)
        return None if ok else f"{dtype} {list(shape)}: not an output shape this export produces"

    return ArrayRules(limits.max_message_bytes, max_arrays=len(limits.outputs) + 1, allow=allow)


# --------------------------------------------------------------------------------------------- TOKENS
@dataclass(frozen=True)
class Tokens(Record):
    """The tail device's tokens of one decoding step, every row (-1: the row has ended), array `ids` [B].
    Relayed to a streaming client with its `call` and the tokens as `texts`."""

    request: int = spec("int", lo=0, hi=MAX_INT)
    step: int = spec("int", lo=0, hi=lambda L: L.max_positions)
    rank: int | None = spec("int", default=None, lo=0, hi=_devices)
    call: int | None = spec("int", default=None, lo=0, hi=MAX_INT)
    texts: tuple[str, ...] | None = spec("strs", default=None, items=lambda L: L.max_batch, length=1 << 16)
    arrays: dict = field(default_factory=dict, repr=False, compare=False)

    def check(self, limits) -> None:
        ids = self.arrays.get("ids")
        if ids is None:
            raise FrameError("TOKENS carry no ids")
        if limits is not None:
            if not limits.generates:
                raise FrameError("TOKENS for an export that cannot generate")
            if ids.size and (ids.min() < -1 or ids.max() >= limits.vocab_size):
                raise FrameError(f"TOKENS ids outside [-1, {limits.vocab_size})")


def tokens_rules(limits) -> ArrayRules:
    def allow(name, dtype, shape):
        ok = name == "ids" and dtype == "int64" and len(shape) == 1 and 1 <= shape[0] <= limits.max_batch
        return None if ok else f"{name} {dtype} {list(shape)}: TOKENS carry ids int64 [batch]"

    return ArrayRules(8 * limits.max_batch, max_arrays=1, allow=allow)


# ------------------------------------------------------------------------------------------ clients
@dataclass(frozen=True)
class Request(Record):
    """A client's request: `texts`, or input arrays (input_ids [B, N] and attention_mask, pixel_values, or
    image files image_0000...); `outputs` to return (None: all); `generate` to decode after the prefill
    (`stream`: send each step's tokens as they come); `split` the request's own plan (one weight per device of
    the export, 0: left out; `prism infer --split`, split.requested); `call` the client's id of this call,
    echoed back."""

    call: int | None = spec("int", default=None, lo=0, hi=MAX_INT)
    texts: tuple[str, ...] | None = spec("strs", default=None, length=1 << 30)  # admission.py: count, length
    outputs: tuple[str, ...] | None = spec("strs", default=None, items=lambda L: len(L.outputs), length=64)
    generate: GenerateOptions | None = spec("rec", default=None, rec=GenerateOptions)
    stream: bool = spec("bool", default=False)
    split: tuple[float, ...] | None = spec("floats", default=None, items=MAX_DEVICES, lo=0.0, hi=1e9)
    arrays: dict = field(default_factory=dict, repr=False, compare=False)

    def check(self, limits) -> None:
        if self.split is not None and not any(self.split):
            raise FrameError("field 'split' needs at least one positive weight")
        if limits is not None:
            if self.split is not None and len(self.split) != limits.devices:
                raise InputError(f"split {','.join(f'{w:g}' for w in self.split)} has {len(self.split)} weights; "
                                 f"this export has {limits.devices} devices (one weight each, 0 to leave one out)")
            from .admission import check_request

            check_request(self, limits)  # the values (InputError: the client's fault)


@dataclass(frozen=True)
class Status(Record):
    call: int | None = spec("int", default=None, lo=0, hi=MAX_INT)
    arrays: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Reply(Record):
    """The coordinator's answer to a REQUEST (outputs as arrays, or `error`) or to a STATUS (`status`)."""

    call: int | None = spec("int", default=None, lo=0, hi=MAX_INT)
    error: WireError | None = spec("rec", default=None, rec=WireError)
    stats: dict | None = spec("obj", default=None, items=64)
    attempts: int | None = spec("int", default=None, lo=0, hi=MAX_INT)
    reruns: tuple[str, ...] = spec("strs", default=(), items=4096, length=MAX_ERROR)
    generation: dict | None = spec("obj", default=None, items=64)
    batched: dict | None = spec("obj", default=None, items=8)
    status: dict | None = spec("obj", default=None, items=64)
    arrays: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def meta(self) -> dict:
        """The reply as the public client returns it: {"ok", "stats", "attempts", "reruns", ...}."""
        d = {k: v for k, v in to_meta(self).items() if k not in ("call", "error", "status")}
        return {"ok": self.ok, **d, **(self.status or {})}


# ---------------------------------------------------------------------------------------------- codec
RECORDS: dict[Kind, type] = {Kind.HELLO: Hello, Kind.REFUSE: Refuse, Kind.START: Attempt, Kind.RESULT: Result,
                             Kind.ABORT: Abort, Kind.TOKENS: Tokens, Kind.REQUEST: Request, Kind.STATUS: Status,
                             Kind.REPLY: Reply}
KIND_OF = {cls: kind for kind, cls in RECORDS.items()}
NO_ARRAYS = ArrayRules(0, 0)


def encode_record(record: Record) -> list[bytes]:
    """The wire parts of a record (protocol.encode: header, JSON, raw arrays)."""
    return encode(KIND_OF[type(record)], to_meta(record), record.arrays or None)


def decode_record(parts: list, limits=None, rules: dict | ArrayRules | None = None, kinds=None,
                  max_json: int | None = None) -> Record:
    """A message's record, checked: framing and arrays (protocol.decode with `rules`: one ArrayRules, or one
    per Kind; a kind without rules carries no array), then the fields (`parse`, bounds from `limits`).
    `kinds`: the kinds this receiver accepts (others are a FrameError)."""
    from .protocol import MAX_JSON, peek_kind

    kind = peek_kind(parts)
    if kinds is not None and kind is not None and kind not in kinds:
        raise FrameError(f"unexpected {kind.name}")
    if isinstance(rules, dict):
        rules = rules.get(kind, NO_ARRAYS)
    kind, meta, arrays = decode(parts, rules if rules is not None else NO_ARRAYS, max_json=max_json or MAX_JSON)
    if kinds is not None and kind not in kinds:
        raise FrameError(f"unexpected {kind.name}")
    cls = RECORDS.get(kind)
    if cls is None:
        raise FrameError(f"no record for {kind.name}")
    return parse(cls, meta, limits, arrays=arrays)


def peer_rules(limits) -> dict:
    """The array rules of each kind a runner accepts from its peers."""
    return {Kind.START: start_rules(limits), Kind.RESULT: result_rules(limits), Kind.TOKENS: tokens_rules(limits)}


__all__ = ["Abort", "Attempt", "GENERATED", "GenerateOptions", "GenerationInfo", "Hello", "PROMPT", "Record",
           "Refuse", "Reply", "Request", "Result", "Status", "Tokens", "TrafficInfo", "WireError", "coordinator_of",
           "decode_record", "encode_record", "parse", "peer_rules", "request_id", "spec", "to_meta"]
