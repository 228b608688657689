"""One device: its ONNX Runtime sessions (`Engine`) and its program for one request (`run_device`).

The same `run_device` runs in the in-process executor (P threads, in-memory exchange) and in `prism run`
on a board (one process, ZeroMQ exchange): the data path has one definition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from ..errors import InputError
from ..inputs import prepare
from ..plan import Plan, plan_from_manifest
from .bundle import DeviceBundle
from .exchange import Exchange, Traffic
from .preprocess import ImagePreprocessor, TextPreprocessor, load_pixel_file


def export_tag(export_id: str) -> int:
    """32-bit tag of an export id, carried in every frame."""
    return int(export_id[:8], 16)


class Engine:
    """The onnxruntime sessions of one device bundle. `threads` = intra-op threads (1 per board core)."""

    def __init__(self, bundle: DeviceBundle, threads: int = 1):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.spec = bundle.spec
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.sessions = {
            name: ort.InferenceSession(str(bundle.graph(name)), opts, providers=["CPUExecutionProvider"])
            for name in self.manifest["graphs"]
        }
        self.recorder: list | None = None  # set to a list to record every (graph, feeds) run (benchmarks)

    def run(self, name: str, feeds: dict[str, np.ndarray], timings: dict | None = None) -> list[np.ndarray]:
        if self.recorder is not None:
            self.recorder.append((name, feeds))
        t0 = time.perf_counter()
        out = self.sessions[name].run(None, feeds)
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    def exchange_kwargs(self, timeout: float = 30.0) -> dict:
        """Settings an Exchange endpoint for this bundle needs."""
        from ..plan import max_rows

        m = self.manifest
        return dict(wire_dtype=m["wire_dtype"], hidden=self.spec["hidden_size"], layers=self.spec["num_layers"],
                    export_tag=export_tag(m["export_id"]), max_rows=max_rows(m["max_seq_len"], m["compression_ratio"]),
                    max_batch=m["max_batch"], timeout=timeout)


@dataclass
class DeviceResult:
    rank: int
    outputs: dict[str, np.ndarray]  # token outputs for its own span; pooled outputs on rank 0
    timings: dict[str, float] = field(default_factory=dict)  # graph -> seconds
    traffic: Traffic | None = None

    @property
    def compute_s(self) -> float:
        return sum(self.timings.values())


def own_slice(spec: dict, token_inputs: dict[str, np.ndarray], plan: Plan, rank: int) -> dict[str, np.ndarray]:
    """The token-level inputs of device `rank`'s own span (all a device ever receives of a request)."""
    s, e = plan.span(rank)
    return {k: np.ascontiguousarray(token_inputs[k][:, s:e]) for k in spec["embed_inputs"]}


def run_device(engine: Engine, plan: Plan, rank: int, own_inputs: dict[str, np.ndarray], exchange: Exchange,
               request: int, outputs: set[str] | None = None) -> DeviceResult:
    """Device `rank`'s whole program for one request: embed, then per layer exchange + layer, then heads.
    `own_inputs` are the token-level inputs of its own span only (see own_slice); `outputs` limits the
    heads run and the outputs returned (default: all)."""
    spec = engine.spec
    s, e = plan.span(rank)
    timings: dict[str, float] = {}
    for k in spec["embed_inputs"]:
        if own_inputs[k].shape[:2] != (plan.batch, e - s):
            raise InputError(f"device {rank}: {k} has shape {own_inputs[k].shape}, its span needs "
                             f"{(plan.batch, e - s)}")
    feeds = {k: own_inputs[k] for k in spec["embed_inputs"]}
    feeds.update(position_ids=np.arange(s, e, dtype=np.int64), averager=plan.averager(rank))
    h, means = engine.run("embed", feeds, timings)  # [B, n, D], [B, S, D]
    local_bias, remote_bias = plan.local_bias(rank), plan.remote_bias(rank)
    L = spec["num_layers"]
    traffic = None
    try:
        for i in range(L):
            remote = exchange.all_gather(request, i, means, plan)  # exchange point attn_in.i: [B, R, D]
            feeds = {"hidden": h, "remote": remote, "local_bias": local_bias, "remote_bias": remote_bias}
            if i + 1 < L:
                feeds["averager"] = plan.averager(rank)
                h, means = engine.run(f"layer_{i}", feeds, timings)
            else:
                (h,) = engine.run(f"layer_{i}", feeds, timings)
    finally:
        traffic = exchange.finish(request)
    want = set(spec["token_outputs"]) | set(spec["pooled_outputs"]) if outputs is None else set(outputs)
    result = {}
    if engine.bundle.has_graph("token_head") and want & set(spec["token_outputs"]):
        result.update(zip(spec["token_outputs"], engine.run("token_head", {"hidden": h}, timings)))
    if rank == 0 and engine.bundle.has_graph("pooled_head") and want & set(spec["pooled_outputs"]):
        first = np.ascontiguousarray(h[:, 0, :])
        result.update(zip(spec["pooled_outputs"], engine.run("pooled_head", {"first": first}, timings)))
    return DeviceResult(rank, {k: v for k, v in result.items() if k in want}, timings, traffic)


def check_outputs(spec: dict, outputs) -> set[str] | None:
    """Validate a request's choice of outputs (None = all)."""
    if outputs is None:
        return None
    known = set(spec["token_outputs"]) | set(spec["pooled_outputs"])
    unknown = set(outputs) - known
    if unknown or not outputs:
        raise InputError(f"unknown outputs {sorted(unknown)}; this model returns {sorted(known)}")
    return set(outputs)


def gather_outputs(spec: dict, results: list[DeviceResult]) -> dict[str, np.ndarray]:
    """Token outputs concatenated along the sequence in rank order; pooled outputs from rank 0."""
    results = sorted(results, key=lambda r: r.rank)
    out = {name: np.concatenate([r.outputs[name] for r in results], axis=1) for name in spec["token_outputs"]
           if name in results[0].outputs}
    out.update({name: results[0].outputs[name] for name in spec["pooled_outputs"] if name in results[0].outputs})
    return out


class Requests:
    """Turns request inputs (texts, images, pixel arrays, ids) into token-level arrays + the plan, using
    only what the bundle carries (tokenizer.json / preprocessor_config.json)."""

    def __init__(self, bundle: DeviceBundle):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.spec = bundle.spec
        pre = self.manifest["preprocessing"]
        self.text = None
        self.image = None
        if pre["kind"] == "text" and pre.get("tokenizer"):
            self.text = TextPreprocessor(bundle.root / pre["tokenizer"], self.manifest["max_seq_len"], pre["pad_id"])
        if pre["kind"] == "image":
            self.image = ImagePreprocessor.from_file(bundle.root / pre["config"], self.spec["image_size"])

    def model_inputs(self, *, texts=None, images=None, input_ids=None, attention_mask=None, pixel_values=None):
        """The transformers-style inputs for one request."""
        if texts:
            if self.text is None:
                raise InputError("this bundle has no tokenizer (" + ("an image model" if self.image else
                                 "none was exported") + "); send input ids" + ("" if self.image else " instead"))
            return self.text(list(texts))
        if images:
            if self.spec["input_kind"] != "image":
                raise InputError(f"{self.spec['model_type']} takes text, not images")
            arrays = [load_pixel_file(p) for p in images if str(p).endswith(".npy")]
            if arrays:
                if len(arrays) != len(images):
                    raise InputError("give either image files or .npy pixel arrays, not both")
                return {"pixel_values": np.concatenate(arrays)}
            return self.image(list(images))
        if pixel_values is not None:
            return {"pixel_values": np.asarray(pixel_values, np.float32)}
        if input_ids is not None:
            out = {"input_ids": np.asarray(input_ids, np.int64)}
            if attention_mask is not None:
                out["attention_mask"] = np.asarray(attention_mask, np.int64)
            return out
        raise InputError("a request needs texts, images, pixel_values or input_ids")

    def prepare(self, inputs: dict) -> tuple[dict[str, np.ndarray], Plan]:
        token_inputs, mask = prepare(self.spec, inputs)
        B, N = mask.shape
        if N > self.manifest["max_seq_len"]:
            raise InputError(f"sequence of {N} tokens is longer than this export's --max-seq-len "
                             f"{self.manifest['max_seq_len']}")
        if B > self.manifest["max_batch"]:
            raise InputError(f"batch of {B} is larger than this export's limit {self.manifest['max_batch']}")
        return token_inputs, plan_from_manifest(self.manifest, mask)
