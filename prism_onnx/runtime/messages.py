"""The control messages between runners (START, RESULT, ABORT, REFUSE): how they are built and how a
receiver checks them against its bundle before acting. HELLO is membership.py's.

Every `check_*` raises FrameError (or InputError for the values of inputs) with one line naming the
field; the array rules run while the message is decoded, before any array exists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import FrameError
from ..plan import Plan
from ..errors import InputError
from .admission import check_generate, check_ids
from .bundle import Limits
from .protocol import ArrayRules, Kind, encode, get_bool, get_dict, get_float, get_int, get_list, get_str

MAX_BUDGET_S = 24 * 3600.0
MAX_ERROR = 2000

# ----------------------------------------------------------------------------------------- request ids
RANK_BITS = 12
MAX_DEVICES = 1 << RANK_BITS
EPOCH_US = 1_735_689_600_000_000  # 2025-01-01 in microseconds since 1970


def first_sequence() -> int:
    """Where a coordinator's request sequence starts: microseconds since 2025, so that a restarted
    coordinator's ids are larger than those of its earlier life (devices drop late frames of finished
    requests by comparing ids)."""
    return max(0, time.time_ns() // 1000 - EPOCH_US)


def request_id(sequence: int, coordinator: int) -> int:
    """The id of one *attempt* at a request: the coordinator's rank in the low RANK_BITS bits, its sequence
    number above them. A rerun (a device was lost) is a new attempt with a new id, so that late frames of
    the abandoned attempt can never be taken for the new one's. Devices run the attempts of one coordinator
    in order, one at a time (a lane per coordinator, worker.py)."""
    return (int(sequence) << RANK_BITS) | int(coordinator)


def coordinator_of(request: int) -> int:
    return int(request) & (MAX_DEVICES - 1)



# ----------------------------------------------------------------------------------------------- START
def start_message(request: int, coordinator: int, plan: Plan, own: dict[str, np.ndarray], budget_s: float,
                  outputs: set[str] | None, generate: dict | None = None, stream: bool = False,
                  prompt_ids: np.ndarray | None = None) -> list[bytes]:
    """START device p of a request: its own token inputs, the request's mask, the plan's membership
    (`ranks`: the devices that compute it, position by position; `split_weights`: one per position, or None
    for the export's weights of those devices); for generation the options, and for the tail device the
    whole prompt's ids (`prompt_ids`, for its repetition penalty)."""
    meta = {"request": request, "coordinator": coordinator, "budget_s": budget_s,
            "outputs": sorted(outputs) if outputs is not None else None, "ranks": list(plan.ranks),
            "split_weights": list(plan.weights) if plan.weights else None}
    if generate is not None:
        meta.update(generate=generate, stream=stream)
    arrays = {"attention_mask": np.asarray(plan.attention_mask, np.int64), **own}
    if prompt_ids is not None:
        arrays[PROMPT] = np.asarray(prompt_ids, np.int64)
    return encode(Kind.START, meta, arrays)


PROMPT = "prompt_ids"


def start_rules(limits: Limits) -> ArrayRules:
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


@dataclass
class Start:
    request: int
    coordinator: int
    budget_s: float
    outputs: set[str] | None
    attention_mask: np.ndarray
    own_inputs: dict[str, np.ndarray]
    ranks: tuple[int, ...] = ()  # the plan's devices, position by position
    split_weights: tuple[float, ...] | None = None
    generate: dict | None = None  # generation options (admission.check_generate), the tail device decodes
    stream: bool = False
    prompt_ids: np.ndarray | None = None


def check_plan_members(meta: dict, devices: int) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
    """START's `ranks` (increasing device ranks; default all) and `split_weights` (one positive number per
    rank, or None)."""
    ranks = get_list(meta, "ranks", int, devices, default=None)
    ranks = tuple(range(devices)) if ranks is None else tuple(ranks)
    if not ranks or any(not 0 <= r < devices for r in ranks) or any(a >= b for a, b in zip(ranks, ranks[1:])):
        raise FrameError(f"field 'ranks' must list increasing device ranks of 0..{devices - 1}")
    weights = get_list(meta, "split_weights", float, devices, default=None)
    if weights is not None and (len(weights) != len(ranks) or not all(0 < w < 1e9 for w in weights)):
        raise FrameError("field 'split_weights' must hold one positive weight per rank")
    return ranks, None if weights is None else tuple(float(w) for w in weights)


def check_start(meta: dict, arrays: dict, limits: Limits) -> Start:
    request = get_int(meta, "request")
    coordinator = get_int(meta, "coordinator", 0, limits.devices - 1)
    if coordinator_of(request) != coordinator:
        raise FrameError(f"request {request} is not an id of device {coordinator}")
    ranks, weights = check_plan_members(meta, limits.devices)
    if coordinator not in ranks:
        raise FrameError(f"the plan's devices {list(ranks)} leave out its coordinator {coordinator}")
    budget = get_float(meta, "budget_s", 1e-3, MAX_BUDGET_S)
    outputs = get_list(meta, "outputs", str, len(limits.outputs), default=None)
    if outputs is not None and not set(outputs) <= set(limits.outputs):
        raise FrameError(f"field 'outputs' must name outputs of this model {list(limits.outputs)}")
    generate = None
    if meta.get("generate") is not None:
        try:
            generate = check_generate(meta["generate"], limits)
        except InputError as e:
            raise FrameError(f"field 'generate': {e}") from None
    missing = [n for n in ("attention_mask", *limits.embed_inputs) if n not in arrays]
    if missing:
        raise FrameError(f"START carries no {missing}")
    mask = arrays["attention_mask"]
    own = {n: arrays[n] for n in limits.embed_inputs}
    if any(a.shape[0] != mask.shape[0] for a in own.values()):
        raise FrameError("START inputs and attention_mask differ in batch size")
    if "input_ids" in own:
        check_ids(own["input_ids"], None, limits)
    if not np.isin(mask, (0, 1)).all():
        raise FrameError("START attention_mask must hold only 0 and 1")
    prompt = arrays.get(PROMPT)
    if prompt is not None:
        if generate is None or prompt.shape != mask.shape:
            raise FrameError("START carries prompt_ids without generation options, or not of the mask's shape")
        check_ids(prompt, None, limits)
    return Start(request, coordinator, budget, set(outputs) if outputs is not None else None, np.array(mask),
                 {k: np.array(v) for k, v in own.items()}, ranks, weights, generate,
                 get_bool(meta, "stream", default=False), None if prompt is None else np.array(prompt))


# ---------------------------------------------------------------------------------------------- RESULT
def result_rules(limits: Limits) -> ArrayRules:
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


GENERATED = "generated_ids"  # the tail device's RESULT of a generation request: [B, T] ids, -1 after a row ends
GENERATION_STATS = {"prompt_tokens": int, "generated_tokens": int, "time_to_first_token_ms": float,
                    "decode_tokens_per_s": float, "cache_bytes": int}


@dataclass
class Result:
    request: int
    rank: int
    ok: bool
    error: str
    timings: dict
    traffic: dict
    outputs: dict
    span: tuple[int, int] = (0, 0)  # the tokens [start, end) the device held (the split used)
    generation: dict | None = None  # the tail device's: GENERATION_STATS and finish_reasons
    retry: bool = False  # failed because of another device (lost, silent, aborted): a rerun may succeed


def check_result(meta: dict, arrays: dict, limits: Limits) -> Result:
    request, rank = get_int(meta, "request"), get_int(meta, "rank", 0, limits.devices - 1)
    ok, error = get_bool(meta, "ok"), get_str(meta, "error", 100_000, default="")[:MAX_ERROR]
    timings = get_dict(meta, "timings", 2 * limits.layers + 8, default={})
    if not all(type(v) in (int, float) and 0 <= v < 1e6 for v in timings.values()):
        raise FrameError("field 'timings' must map graphs to seconds")
    t = get_dict(meta, "traffic", 8, default={})
    per_layer = get_dict(t, "per_layer", 2)
    traffic = {"bytes_sent": get_int(t, "bytes_sent"), "bytes_received": get_int(t, "bytes_received"),
               "per_layer": {k: get_list(per_layer, k, int, limits.layers) for k in ("sent", "received")},
               "rejected_frames": get_int(t, "rejected_frames", default=0)}
    span = get_list(meta, "span", int, 2, default=[0, 0])
    if len(span) != 2 or not 0 <= span[0] <= span[1] <= limits.max_seq_len:
        raise FrameError(f"field 'span' must be [start, end] within {limits.max_seq_len} tokens")
    generation = None
    if meta.get("generation") is not None:
        g = get_dict(meta, "generation", 8)
        generation = {}
        for key, kind in GENERATION_STATS.items():
            v = g.get(key)
            if v is not None and (type(v) not in (int, float) or not 0 <= v < 1e15 or (kind is int and type(v) is not int)):
                raise FrameError(f"field 'generation.{key}' must be a non-negative {kind.__name__}")
            generation[key] = v
        generation["finish_reasons"] = get_list(g, "finish_reasons", str, limits.max_batch, max_len=8)
        if not set(generation["finish_reasons"]) <= {"stop", "length"}:
            raise FrameError("field 'generation.finish_reasons' must hold 'stop' or 'length'")
    return Result(request, rank, ok, error or ("" if ok else "device failed"), timings, traffic,
                  {k: np.array(v) for k, v in arrays.items()}, (span[0], span[1]), generation,
                  get_bool(meta, "retry", default=False))


# ---------------------------------------------------------------------------------------------- TOKENS
def batch_message(request: int, members) -> list[bytes]:
    """The coordinator's own worker ran several requests as one (batching.py): request `request` carries
    the rows [start, end) of each member and its own token count (request id, start, end, n_tokens)."""
    return encode(Kind.BATCH, {"request": request, "members": [list(map(int, m)) for m in members]})


def check_batch(meta: dict, limits: Limits) -> tuple[int, list[tuple[int, int, int, int]]]:
    request = get_int(meta, "request")
    members = meta.get("members")
    if not isinstance(members, list) or not 2 <= len(members) <= limits.max_batch:
        raise FrameError(f"BATCH needs 2..{limits.max_batch} members")
    out = []
    for m in members:
        if not isinstance(m, list) or len(m) != 4 or not all(type(x) is int for x in m) or \
                not 0 <= m[1] < m[2] <= limits.max_batch or not 1 <= m[3] <= limits.max_seq_len:
            raise FrameError(f"BATCH member {m!r}: expected [request, start row, end row, tokens]")
        out.append((m[0], m[1], m[2], m[3]))
    return request, out


def tokens_message(request: int, rank: int, step: int, ids: np.ndarray) -> list[bytes]:
    """The tail device streams each generated token of every row (-1: the row has ended)."""
    return encode(Kind.TOKENS, {"request": request, "rank": rank, "step": step},
                  {"ids": np.asarray(ids, np.int64)})


def tokens_rules(limits: Limits) -> ArrayRules:
    def allow(name, dtype, shape):
        ok = name == "ids" and dtype == "int64" and len(shape) == 1 and 1 <= shape[0] <= limits.max_batch
        return None if ok else f"{name} {dtype} {list(shape)}: TOKENS carry ids int64 [batch]"

    return ArrayRules(8 * limits.max_batch, max_arrays=1, allow=allow)


@dataclass
class Tokens:
    request: int
    rank: int
    step: int
    ids: np.ndarray  # [B]


def check_tokens(meta: dict, arrays: dict, limits: Limits) -> Tokens:
    if not limits.generates:
        raise FrameError("TOKENS for an export that cannot generate")
    ids = arrays.get("ids")
    if ids is None:
        raise FrameError("TOKENS carry no ids")
    if ids.size and (ids.min() < -1 or ids.max() >= limits.vocab_size):
        raise FrameError(f"TOKENS ids outside [-1, {limits.vocab_size})")
    return Tokens(get_int(meta, "request"), get_int(meta, "rank", 0, limits.devices - 1),
                  get_int(meta, "step", 0, limits.max_positions), np.array(ids))


# ----------------------------------------------------------------------------------------- ABORT, REFUSE
def check_abort(meta: dict) -> tuple[int, str]:
    return get_int(meta, "request"), get_str(meta, "reason", 100_000, default="")[:MAX_ERROR]


def check_refuse(meta: dict, devices: int) -> tuple[int, str]:
    return get_int(meta, "from", 0, devices - 1), get_str(meta, "reason", 100_000, default="")[:MAX_ERROR]
