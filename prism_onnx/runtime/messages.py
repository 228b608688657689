"""The control messages between runners (START, RESULT, ABORT, REFUSE): how they are built and how a
receiver checks them against its bundle before acting. HELLO is membership.py's.

Every `check_*` raises FrameError (or InputError for the values of inputs) with one line naming the
field; the array rules run while the message is decoded, before any array exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FrameError
from ..plan import Plan
from .admission import check_ids
from .bundle import Limits
from .protocol import ArrayRules, Kind, encode, get_bool, get_dict, get_float, get_int, get_list, get_str

MAX_BUDGET_S = 24 * 3600.0
MAX_ERROR = 2000


# ----------------------------------------------------------------------------------------------- START
def start_message(request: int, coordinator: int, plan: Plan, own: dict[str, np.ndarray], budget_s: float,
                  outputs: set[str] | None) -> list[bytes]:
    return encode(Kind.START, {"request": request, "coordinator": coordinator, "budget_s": budget_s,
                               "outputs": sorted(outputs) if outputs else None},
                  {"attention_mask": np.asarray(plan.attention_mask, np.int64), **own})


def start_rules(limits: Limits) -> ArrayRules:
    def allow(name, dtype, shape):
        if name == "attention_mask":
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

    return ArrayRules(limits.max_message_bytes, max_arrays=1 + len(limits.embed_inputs), allow=allow)


@dataclass
class Start:
    request: int
    coordinator: int
    budget_s: float
    outputs: set[str] | None
    attention_mask: np.ndarray
    own_inputs: dict[str, np.ndarray]


def check_start(meta: dict, arrays: dict, limits: Limits) -> Start:
    request = get_int(meta, "request")
    coordinator = get_int(meta, "coordinator", 0, limits.devices - 1)
    budget = get_float(meta, "budget_s", 1e-3, MAX_BUDGET_S)
    outputs = get_list(meta, "outputs", str, len(limits.outputs), default=None)
    if outputs is not None and (not outputs or not set(outputs) <= set(limits.outputs)):
        raise FrameError(f"field 'outputs' must name outputs of this model {list(limits.outputs)}")
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
    return Start(request, coordinator, budget, set(outputs) if outputs else None, np.array(mask),
                 {k: np.array(v) for k, v in own.items()})


# ---------------------------------------------------------------------------------------------- RESULT
def result_rules(limits: Limits) -> ArrayRules:
    def allow(name, dtype, shape):
        if name not in limits.outputs:
            return f"not an output of this model ({', '.join(limits.outputs)})"
        ok = dtype == "float32" and 2 <= len(shape) <= 3 and shape[0] <= limits.max_batch \
            and (len(shape) == 2 or shape[1] <= limits.max_seq_len)
        return None if ok else f"{dtype} {list(shape)}: not an output shape this export produces"

    return ArrayRules(limits.max_message_bytes, max_arrays=len(limits.outputs), allow=allow)


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
    return Result(request, rank, ok, error or ("" if ok else "device failed"), timings, traffic,
                  {k: np.array(v) for k, v in arrays.items()}, (span[0], span[1]))


# ----------------------------------------------------------------------------------------- ABORT, REFUSE
def check_abort(meta: dict) -> tuple[int, str]:
    return get_int(meta, "request"), get_str(meta, "reason", 100_000, default="")[:MAX_ERROR]


def check_refuse(meta: dict, devices: int) -> tuple[int, str]:
    return get_int(meta, "from", 0, devices - 1), get_str(meta, "reason", 100_000, default="")[:MAX_ERROR]
