"""The device program: which graphs a device runs, in which order, what feeds each graph input and where
each output goes, declared as data (written into every manifest) and run by one interpreter.

The runtime (onnxruntime backend, ZeroMQ or in-memory exchange) and the reference (PyTorch backend,
in-memory exchange) both run `DeviceRun.step` over the same `Program`: the order of graphs, the feeds and
the exchange points have one definition. Torch-free: boards import this.

References in `Step.inputs` (graph input -> where its value comes from):
    input:NAME     a token-level request input, the device's own span: ids [B, n] or patches [B, n, C*ps*ps]
    plan:NAME      from the request's partition plan, for this device:
                       position_ids [B, n] (in-row positions: Plan.position_ids), averager [B, S, n],
                       local_bias [B, n], remote_bias [B, R]
    value:NAME     a tensor an earlier step of this device produced: hidden [B, n, D]; k, v [B, Hkv, n, dh]
    recv:POINT     the rows this device gathers at exchange point POINT: [B, R, W], sources in device order
    first:NAME     value NAME at token 0: [B, D]. A step reading it runs only on the device owning token 0 (rank 0)
References in `Step.outputs` (graph output -> where it goes):
    value:NAME     kept for later steps of this device
    send:POINT     segment-mean rows [B, S, W] this device sends at exchange point POINT
    output:NAME    a model output (token outputs are concatenated over devices; pooled ones come from rank 0)

Exchange points are named after what travels: `attn_in.i` (Segment Means of layer i's attention input,
W = D) or `kv.i` (Segment Means of layer i's rotated keys and values, W = 2 * kv_heads * head_dim).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

PLAN_VALUES = ("position_ids", "averager", "local_bias", "remote_bias")
KINDS_IN = ("input", "plan", "value", "recv", "first")
KINDS_OUT = ("value", "send", "output")


def split_ref(ref: str) -> tuple[str, str]:
    kind, _, name = ref.partition(":")
    return kind, name


@dataclass(frozen=True)
class ExchangePoint:
    """A named all-gather of segment means: `producer` sends, `consumer` (on every receiver) reads."""

    name: str  # attn_in.i | kv.i
    layer: int  # the layer whose attention reads the rows
    producer: str  # step (graph) that sends
    consumer: str  # step (graph) that receives
    width: int  # values per row

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "producer": self.producer, "consumer": self.consumer,
                "width": self.width}


@dataclass(frozen=True)
class Step:
    """Run graph `graph` with `inputs` (graph input -> reference) and route its `outputs` (graph output ->
    reference). Both are ordered as the graph's own inputs and outputs."""

    graph: str
    inputs: dict[str, str]
    outputs: dict[str, str]

    @property
    def first_token_only(self) -> bool:
        return any(split_ref(r)[0] == "first" for r in self.inputs.values())

    def model_outputs(self) -> list[str]:
        return [split_ref(r)[1] for r in self.outputs.values() if split_ref(r)[0] == "output"]

    def to_dict(self) -> dict:
        return {"graph": self.graph, "inputs": dict(self.inputs), "outputs": dict(self.outputs)}


@dataclass(frozen=True)
class Program:
    """Steps in execution order and the exchange points between them."""

    exchange: str  # hidden | kv
    steps: tuple[Step, ...]
    points: tuple[ExchangePoint, ...]
    token_outputs: tuple[str, ...]
    pooled_outputs: tuple[str, ...]

    def __post_init__(self):
        self.check()

    def graphs(self) -> list[str]:
        return [s.graph for s in self.steps]

    def point_index(self, name: str) -> int:
        for i, p in enumerate(self.points):
            if p.name == name:
                return i
        raise KeyError(f"no exchange point named {name!r}")

    def check(self) -> None:
        """Every reference is well-formed; values are produced before use; every exchange point is sent by
        its producer and received by its consumer, exactly once."""
        names = [p.name for p in self.points]
        if len(set(names)) != len(names):
            raise ValueError(f"exchange point names repeat: {names}")
        produced: set[str] = set()
        sent, received = {}, {}
        for step in self.steps:
            for ref in step.inputs.values():
                kind, name = split_ref(ref)
                if kind not in KINDS_IN:
                    raise ValueError(f"step {step.graph}: unknown input reference {ref!r}")
                if kind in ("value", "first") and name not in produced:
                    raise ValueError(f"step {step.graph} reads value {name!r} before any step produces it")
                if kind == "plan" and name not in PLAN_VALUES:
                    raise ValueError(f"step {step.graph}: unknown plan value {name!r}")
                if kind == "recv":
                    received.setdefault(name, []).append(step.graph)
            for ref in step.outputs.values():
                kind, name = split_ref(ref)
                if kind not in KINDS_OUT:
                    raise ValueError(f"step {step.graph}: unknown output reference {ref!r}")
                if kind == "value":
                    produced.add(name)
                if kind == "send":
                    sent.setdefault(name, []).append(step.graph)
        for p in self.points:
            if sent.get(p.name) != [p.producer] or received.get(p.name) != [p.consumer]:
                raise ValueError(f"exchange point {p.name}: sent by {sent.get(p.name)}, received by "
                                 f"{received.get(p.name)}; declared {p.producer} -> {p.consumer}")
        stray = (set(sent) | set(received)) - set(names)
        if stray:
            raise ValueError(f"steps use undeclared exchange points {sorted(stray)}")

    def to_dict(self) -> dict:
        return {"exchange": self.exchange, "steps": [s.to_dict() for s in self.steps],
                "exchange_points": [p.to_dict() for p in self.points],
                "token_outputs": list(self.token_outputs), "pooled_outputs": list(self.pooled_outputs)}

    @classmethod
    def from_dict(cls, d: dict) -> "Program":
        return cls(
            exchange=str(d["exchange"]),
            steps=tuple(Step(str(s["graph"]), {str(k): str(v) for k, v in s["inputs"].items()},
                             {str(k): str(v) for k, v in s["outputs"].items()}) for s in d["steps"]),
            points=tuple(ExchangePoint(str(p["name"]), int(p["layer"]), str(p["producer"]), str(p["consumer"]),
                                       int(p["width"])) for p in d["exchange_points"]),
            token_outputs=tuple(d["token_outputs"]), pooled_outputs=tuple(d["pooled_outputs"]),
        )


def build_program(spec) -> Program:
    """The program of a model (a ModelSpec): embed, one step per layer, then the heads.

    hidden exchange:  embed -> (hidden, means of layer 0's attention input)
                      layer_i (hidden, remote means, biases[, averager]) -> (hidden[, means for layer i+1])
    kv exchange:      embed -> (hidden, k, v of layer 0, means of [k | v])
                      layer_i (hidden, k, v, remote [k | v] rows, biases, position_ids[, averager])
                              -> (hidden[, k, v of layer i+1, their means])
    Own keys and values are carried from step to step, so no device projects them twice.
    """
    L, kv = spec.num_layers, spec.exchange == "kv"
    carried = ("hidden", "k", "v") if kv else ("hidden",)
    prefix = "kv" if kv else "attn_in"
    points = tuple(ExchangePoint(f"{prefix}.{i}", i, "embed" if i == 0 else f"layer_{i - 1}", f"layer_{i}",
                                 spec.row_width) for i in range(L))
    steps = [Step("embed",
                  {**{n: f"input:{n}" for n in spec.embed_inputs}, "position_ids": "plan:position_ids",
                   "averager": "plan:averager"},
                  {"hidden": "value:hidden", **({"k": "value:k", "v": "value:v"} if kv else {}),
                   "means": f"send:{points[0].name}"})]
    for i in range(L):
        last = i + 1 == L
        inputs = {c: f"value:{c}" for c in carried}
        inputs.update(remote=f"recv:{points[i].name}", local_bias="plan:local_bias", remote_bias="plan:remote_bias")
        if kv:
            inputs["position_ids"] = "plan:position_ids"
        outputs = {"hidden_out": "value:hidden"}
        if not last:
            inputs["averager"] = "plan:averager"
            outputs.update({f"{c}_out": f"value:{c}" for c in carried[1:]})
            outputs["means"] = f"send:{points[i + 1].name}"
        steps.append(Step(f"layer_{i}", inputs, outputs))
    if spec.token_outputs:
        steps.append(Step("token_head", {"hidden": "value:hidden"}, {n: f"output:{n}" for n in spec.token_outputs}))
    if spec.pooled_outputs:
        steps.append(Step("pooled_head", {"first": "first:hidden"}, {n: f"output:{n}" for n in spec.pooled_outputs}))
    return Program(spec.exchange, tuple(steps), points, tuple(spec.token_outputs), tuple(spec.pooled_outputs))


# ------------------------------------------------------------------------------------------- interpreter
class Backend(Protocol):
    """Runs one graph: feeds in the step's input order -> outputs in the step's output order."""

    def run(self, graph: str, feeds: dict[str, Any]) -> list: ...


class ExchangeEndpoint(Protocol):
    """One device's endpoint of the exchange points (runtime.exchange.Exchange, reference.TensorHub)."""

    rank: int

    def send(self, request: int, point: int, rows, plan) -> None: ...

    def gather(self, request: int, point: int, plan) -> Any: ...


@dataclass
class DeviceResult:
    """What one device returns for one request."""

    rank: int
    outputs: dict[str, Any]  # token outputs of its own span; pooled outputs on rank 0
    timings: dict[str, float] = field(default_factory=dict)  # graph -> seconds
    traffic: Any = None  # runtime.exchange.Traffic, when the exchange counts bytes

    @property
    def compute_s(self) -> float:
        return sum(self.timings.values())


class DeviceRun:
    """One device's state while it runs one request's program: the values it holds, its outputs."""

    def __init__(self, program: Program, backend: Backend, plan, rank: int, inputs: dict, exchange: ExchangeEndpoint,
                 request: int = 0, outputs: set[str] | None = None, on_step: Callable | None = None):
        """`plan`: anything with position_ids, averager, local_bias, remote_bias and span per rank (a Plan, or
        generate.DecodePlan); `on_step(step, feeds, results)` is called after every step this device runs."""
        self.program, self.backend, self.plan, self.rank = program, backend, plan, rank
        self.inputs, self.exchange, self.request, self.on_step = inputs, exchange, request, on_step
        self.want = set(program.token_outputs) | set(program.pooled_outputs) if outputs is None else set(outputs)
        self.values: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self._plan_values: dict[str, np.ndarray] = {}

    def _plan_value(self, name: str) -> np.ndarray:
        if name not in self._plan_values:
            p, plan = self.rank, self.plan
            self._plan_values[name] = {
                "position_ids": lambda: plan.position_ids(p), "averager": lambda: plan.averager(p),
                "local_bias": lambda: plan.local_bias(p), "remote_bias": lambda: plan.remote_bias(p),
            }[name]()
        return self._plan_values[name]

    def _resolve(self, ref: str):
        kind, name = split_ref(ref)
        if kind == "input":
            return self.inputs[name]
        if kind == "plan":
            return self._plan_value(name)
        if kind == "value":
            return self.values[name]
        if kind == "first":
            return self.values[name][:, 0]
        return self.exchange.gather(self.request, self.program.point_index(name), self.plan)  # recv

    def runs(self, step: Step) -> bool:
        """Whether this device runs `step` for this request."""
        if step.first_token_only and self.plan.span(self.rank)[0] != 0:
            return False
        wanted = step.model_outputs()
        return not wanted or len(wanted) < len(step.outputs) or bool(self.want & set(wanted))

    def step(self, step: Step) -> None:
        if not self.runs(step):
            return
        feeds = {name: self._resolve(ref) for name, ref in step.inputs.items()}
        t0 = time.perf_counter()
        results = self.backend.run(step.graph, feeds)
        self.timings[step.graph] = self.timings.get(step.graph, 0.0) + time.perf_counter() - t0
        for (name, ref), value in zip(step.outputs.items(), results):
            kind, key = split_ref(ref)
            if kind == "value":
                self.values[key] = value
            elif kind == "send":
                self.exchange.send(self.request, self.program.point_index(key), value, self.plan)
            elif key in self.want:
                self.outputs[key] = value
        if self.on_step is not None:
            self.on_step(step, feeds, results)

    def result(self, traffic=None) -> DeviceResult:
        return DeviceResult(self.rank, self.outputs, self.timings, traffic)


def run_device(program: Program, backend: Backend, plan, rank: int, inputs: dict, exchange, request: int,
               outputs: set[str] | None = None, on_step: Callable | None = None) -> DeviceResult:
    """Device `rank`'s whole program for one request. `inputs` are the token-level inputs of its own span
    (see own_slice); `outputs` limits the heads run and the outputs returned (default: all). The exchange's
    per-request state is released whatever happens (`exchange.finish`)."""
    run = DeviceRun(program, backend, plan, rank, inputs, exchange, request, outputs, on_step)
    traffic = None
    try:
        for step in program.steps:
            run.step(step)
    finally:
        finish = getattr(exchange, "finish", None)
        traffic = finish(request) if finish else None
    return run.result(traffic)


def run_lockstep(program: Program, backend, plan, inputs: dict, exchanges: list, request: int = 0,
                 outputs: set[str] | None = None, hooks: dict | None = None) -> list[DeviceResult]:
    """All devices in one thread, one step at a time across devices (the reference's loop): every exchange
    point's rows are sent by all devices before any device gathers them. `backend`: one for all devices, or
    a list with one per plan position, as `exchanges`; `hooks`: {rank: on_step}."""
    hooks = hooks or {}
    backends = backend if isinstance(backend, list) else [backend] * plan.devices
    runs = [DeviceRun(program, backends[i], plan, r, own_slice(inputs, plan, r), exchanges[i], request, outputs,
                      hooks.get(r)) for i, r in enumerate(plan.ranks)]
    for step in program.steps:
        for run in runs:
            run.step(step)
    return [r.result() for r in runs]


def own_slice(token_inputs: dict, plan, rank: int) -> dict:
    """The token-level inputs of device `rank`'s own span (all a device ever receives of a request)."""
    s, e = plan.span(rank)
    out = {}
    for k, v in token_inputs.items():
        part = v[:, s:e]
        out[k] = np.ascontiguousarray(part) if isinstance(part, np.ndarray) else part
    return out


def gather_outputs(program: Program, results: list[DeviceResult], concat: Callable = np.concatenate) -> dict:
    """Token outputs concatenated along the sequence in rank order; pooled outputs from the device that
    holds them (rank 0)."""
    results = sorted(results, key=lambda r: r.rank)
    out = {name: concat([r.outputs[name] for r in results], axis=1) for name in program.token_outputs
           if name in results[0].outputs}
    for r in results:
        out.update({name: r.outputs[name] for name in program.pooled_outputs if name in r.outputs})
    return out


@dataclass
class RequestStats:
    """What one request cost, per device in rank order: bytes on the wire (the exchange's own counters,
    in total and per exchange point), onnxruntime compute, the span of tokens each device held; and the
    request's end-to-end latency where a client measured it. `ranks`, `spans` and `split_weights` are the
    plan in force: the devices that computed the request (all P, or the live ones after a loss)."""

    ranks: list[int]
    bytes_sent: list[int]
    bytes_received: list[int]
    per_layer: list[dict]  # per device: {"sent": [bytes per point], "received": [...]}
    compute_ms: list[float]
    spans: list[list[int]] = field(default_factory=list)
    latency_ms: float | None = None
    split_weights: list[float] | None = None  # the plan's weight per device (None: as even as possible)

    @classmethod
    def of(cls, results: list[DeviceResult], plan=None, latency_ms: float | None = None) -> "RequestStats":
        results = sorted(results, key=lambda r: r.rank)
        sent = [list(r.traffic.sent) if r.traffic is not None else [] for r in results]
        received = [list(r.traffic.received) if r.traffic is not None else [] for r in results]
        return cls(ranks=[r.rank for r in results], bytes_sent=[sum(s) for s in sent],
                   bytes_received=[sum(x) for x in received],
                   per_layer=[{"sent": s, "received": x} for s, x in zip(sent, received)],
                   compute_ms=[round(1e3 * r.compute_s, 3) for r in results],
                   spans=[list(plan.span(r.rank)) for r in results] if plan is not None else [],
                   latency_ms=None if latency_ms is None else round(latency_ms, 3),
                   split_weights=list(plan.weights) if plan is not None and plan.weights else None)

    def to_dict(self) -> dict:
        return {"ranks": self.ranks, "spans": self.spans, "split_weights": self.split_weights,
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "per_layer": self.per_layer, "compute_ms": self.compute_ms,
                "latency_ms": self.latency_ms}
