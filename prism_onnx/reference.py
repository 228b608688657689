"""`simulate`: run PRISM as P devices would, in one process with PyTorch: the reference for everything else.

The devices run the same declared program as the runtime (`prism_onnx.program`), one step at a time
across devices, with a PyTorch backend (the family's step modules) and an in-memory exchange that keeps
the rows as tensors, so gradients flow through it (calibration) when the wire is float32.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import models
from .errors import InputError
from .inputs import merge_inputs, prepare
from .manifest import PrismSettings
from .models import PrismModel
from .plan import Plan, plan_for
from .program import Program, build_program, gather_outputs, run_lockstep
from .runtime.wire import check_wire_dtype, roundtrip

_converted: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prism_model(model, exchange: str | None = None) -> PrismModel:
    """The PrismModel for a transformers model (converted once per model object), exchanging `exchange`
    rows (hidden | kv; None: the family's default)."""
    if isinstance(model, PrismModel):
        return model.with_exchange(exchange)
    if model not in _converted:
        _converted[model] = models.convert(model)
    return _converted[model].with_exchange(exchange)


def _tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


class TorchBackend:
    """Runs a program step with the family's PyTorch step module (the graph the exporter traces).
    numpy=True returns numpy arrays (the decoder's numpy code runs on either backend)."""

    def __init__(self, pm: PrismModel, numpy: bool = False):
        self.modules, self.numpy = pm.step_modules(), numpy

    def run(self, graph: str, feeds: dict) -> list:
        out = list(self.modules[graph](*[_tensor(v) for v in feeds.values()]))
        return [o.detach().numpy() for o in out] if self.numpy else out


@dataclass
class DeviceTrace:
    """What each device sent in one simulated inference: rows per exchange point ([B, S, W] each)."""

    sent: list[list[torch.Tensor]] = field(default_factory=list)  # [point][device]


class TensorHub:
    """In-memory exchange for the lockstep reference: each device's sent rows, after the wire precision
    (float32 passes the tensor itself, so autograd flows; float16/int8 round-trip through the wire codec,
    with a straight-through gradient).

    received: {(point, rank): rows [B, R, W]} replaces what device `rank` gathers at `point` (validate
    replays the rows a bundle's devices really received); on_sent(point, rank, rows) sees every device's
    rows before the wire."""

    def __init__(self, devices: int, wire_dtype: str = "float32", trace: DeviceTrace | None = None,
                 received: dict | None = None, on_sent=None):
        self.wire_dtype, self.trace, self.received, self.on_sent = wire_dtype, trace, received or {}, on_sent
        self.rows: dict[tuple[int, int], torch.Tensor] = {}  # (point, src) -> [B, S, W]
        self.endpoints = [_TensorEndpoint(self, p) for p in range(devices)]


class _TensorEndpoint:
    def __init__(self, hub: TensorHub, rank: int):
        self.hub, self.rank = hub, rank

    def send(self, request, point, rows, plan):
        rows = _tensor(rows)
        if self.hub.on_sent is not None:
            self.hub.on_sent(point, self.rank, rows)
        if self.hub.wire_dtype != "float32":
            wired = torch.from_numpy(roundtrip(rows.detach().numpy(), self.hub.wire_dtype))
            rows = rows + (wired - rows).detach()
        self.hub.rows[(point, self.rank)] = rows
        if self.hub.trace is not None:
            while len(self.hub.trace.sent) <= point:
                self.hub.trace.sent.append([])
            self.hub.trace.sent[point].append(rows)

    def gather(self, request, point, plan):
        if (point, self.rank) in self.hub.received:
            return _tensor(self.hub.received[(point, self.rank)])
        parts = [self.hub.rows[(point, q)][:, plan.rows_to(q, self.rank)] for q in plan.sources(self.rank)]
        if not parts:
            width = self.hub.rows[(point, self.rank)].shape[-1]
            return torch.zeros(plan.batch, 0, width)
        return torch.cat(parts, dim=1)  # [B, R, W]


def run_devices(pm: PrismModel, token_inputs: dict[str, np.ndarray], plan: Plan, trace: DeviceTrace | None = None,
                wire_dtype: str = "float32", program: Program | None = None, received: dict | None = None,
                on_sent=None, hooks: dict | None = None) -> dict[str, torch.Tensor]:
    """The reference run of one request: {output name: tensor}, token outputs gathered along the sequence.
    `received`, `on_sent`: see TensorHub; `hooks`: {rank: on_step(step, feeds, results)} (program.DeviceRun)."""
    program = program or build_program(pm.spec)
    hub = TensorHub(plan.devices, wire_dtype, trace, received, on_sent)
    results = run_lockstep(program, TorchBackend(pm), plan, token_inputs, hub.endpoints, hooks=hooks)
    return gather_outputs(program, results, concat=torch.cat)


def simulate(model, inputs=None, *, devices: int, compression_ratio: int, count_bias: bool | None = None,
             keep_sinks: bool | None = None, split_weights=None, wire_dtype: str = "float32", window: int | None = None,
             far: str = "means", exchange: str | None = None, trace: DeviceTrace | None = None, **model_inputs):
    """Drop-in for `model(**inputs)` that runs PRISM over `devices` simulated devices.

    Returns the transformers output class of `model` with the same fields (`last_hidden_state`,
    `pooler_output`, `logits`). `inputs` are what the tokenizer or image processor returns (or keyword
    arguments `input_ids=`, `attention_mask=`, `token_type_ids=`, `pixel_values=`; any other keyword is a
    TypeError). Padding (`attention_mask`) works. The settings are those of PrismSettings: `wire_dtype`
    (float32, float16, int8) applies the wire precision to every exchanged row; `window` (W) and `far`
    (means, none) the halo window; `exchange` (hidden, kv) chooses what the devices exchange (default: the
    family's). `count_bias`, `keep_sinks` and `window` left as None take the model family's measured
    defaults (ModelSpec.defaults; window=0 and both switches on give the paper's PRISM).
    """
    pm = prism_model(model, exchange)
    settings = PrismSettings(devices=devices, compression_ratio=compression_ratio, count_bias=count_bias,
                             keep_sinks=keep_sinks, split_weights=split_weights,
                             wire_dtype=check_wire_dtype(wire_dtype), window=window, far=far)
    inputs = merge_inputs(inputs, model_inputs, "simulate")
    token_inputs, mask = prepare(pm.spec, inputs)
    plan = plan_for(pm.spec, mask, settings)
    with torch.no_grad():
        return pm.output_class(**run_devices(pm, token_inputs, plan, trace, settings.wire_dtype))


def generate(model, inputs=None, *, devices: int, compression_ratio: int, count_bias: bool | None = None,
             keep_sinks: bool | None = None, split_weights=None, wire_dtype: str = "float32",
             window: int | None = None,
             far: str = "means", config=None, **model_inputs):
    """The reference of distributed generation (like `model.generate`): PRISM prefill over `devices`
    simulated devices exchanging keys and values, then decoding on the tail device from its compressed
    prefix cache (window rows included). `config` is a GenerationConfig (default: 16 greedy tokens, stop at
    the model's EOS); `inputs` and settings as for simulate, left-padded when batched. Returns a
    generate.Generation."""
    from .generate import CacheCollector, GenerationConfig, check_prompt, decode_from_cache, stop_ids

    pm = prism_model(model, "kv")
    settings = PrismSettings(devices=devices, compression_ratio=compression_ratio, count_bias=count_bias,
                             keep_sinks=keep_sinks, split_weights=split_weights,
                             wire_dtype=check_wire_dtype(wire_dtype), window=window, far=far)
    inputs = merge_inputs(inputs, model_inputs, "generate")
    if config is None:
        config = GenerationConfig(stop_token_ids=stop_ids(model.config.to_dict()))
    token_inputs, mask = prepare(pm.spec, inputs)
    check_prompt(mask, config, pm.spec.max_positions)
    plan = plan_for(pm.spec, mask, settings)
    program = build_program(pm.spec)
    tail = plan.devices - 1
    collector = CacheCollector(program)
    backend = TorchBackend(pm, numpy=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        run_lockstep(program, backend, plan, token_inputs, TensorHub(plan.devices, wire_dtype).endpoints,
                     outputs=set(), hooks={tail: collector})
        return decode_from_cache(program, backend, collector, token_inputs["input_ids"], mask, config, tail, t0)


def cli_inputs(source, spec, *, kind: str, texts=(), images=(), input_ids=None) -> dict:
    """Model inputs for the dev-side CLI: the model folder's own transformers tokenizer for text, the
    bundle-compatible image preprocessing for images, or ids as given."""
    from .models import resolve_source
    from .runtime.preprocess import ImagePreprocessor, load_pixel_file

    if kind == "--input-ids":
        return dict(input_ids)
    if kind == "--text":
        if spec.input_kind != "text":
            raise InputError(f"{spec.model_type} takes images, not text")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(resolve_source(source) if isinstance(source, str) else
                                                source.name_or_path)
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"no tokenizer found for this model ({str(e).splitlines()[0]}); "
                             "pass --input-ids") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        enc = tok(list(texts), padding=True, truncation=True, max_length=spec.max_positions, return_tensors="np")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if spec.input_kind != "image":
        raise InputError(f"{spec.model_type} takes text, not images")
    if all(str(p).endswith(".npy") for p in images):
        return {"pixel_values": np.concatenate([load_pixel_file(p) for p in images])}
    folder = resolve_source(source) if isinstance(source, str) else getattr(source, "name_or_path", "")
    cfg = Path(folder) / "preprocessor_config.json" if folder else None
    pre = (ImagePreprocessor.from_file(cfg, spec.image_size) if cfg and cfg.is_file()
           else ImagePreprocessor({}, spec.image_size))
    return pre(list(images))


def compare(out, ref) -> dict:
    """max |diff| and cosine similarity of one output against the reference."""
    a, b = np.asarray(out, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return {"max_abs_diff": float(np.abs(a - b).max()) if a.size else 0.0,
            "cosine": float(a @ b / denom) if denom > 0 else 1.0}


def simulate_report(source, settings: PrismSettings, *, kind, texts=(), images=(), input_ids=None) -> dict:
    """What `prism simulate` prints: outputs vs the unpartitioned model, and per-device work and traffic
    against uncompressed position-wise partitioning (settings.baseline(), hidden states on the wire)."""
    from .runtime.wire import baseline_bytes_per_layer, plan_traffic

    model = models.load(source)
    pm = prism_model(model)
    spec = pm.spec
    inputs = cli_inputs(source, spec, kind=kind, texts=texts, images=images, input_ids=input_ids)
    token_inputs, mask = prepare(spec, inputs)
    settings = settings.resolved(spec)  # the report names the family's defaults it used
    plan = plan_for(spec, mask, settings)
    with torch.no_grad():
        outputs = run_devices(pm, token_inputs, plan, wire_dtype=settings.wire_dtype)
        ref = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    valid = mask.astype(bool)
    report_outputs = {}
    for name, value in outputs.items():
        v, r = value.numpy(), ref[name].numpy()
        if name in spec.token_outputs:  # padding positions are not compared
            v, r = v[valid], r[valid]
        c = compare(v, r)
        report_outputs[name] = {
            "shape": list(value.shape), "mean": float(value.mean()), "std": float(value.std()),
            "first": [round(float(x), 5) for x in value.flatten()[:4]],
            "max_abs_diff_vs_model": c["max_abs_diff"], "cosine_vs_model": c["cosine"],
        }
    sent, _ = plan_traffic(plan, spec.row_width, 1, settings.wire_dtype)
    per_device = [{"rank": p, "span": list(plan.span(p)), "tokens": plan.span(p)[1] - plan.span(p)[0],
                   "kv_rows": plan.projected_rows(p), "rows_sent": plan.sent_rows(p),
                   "bytes_sent_per_layer": sent[p][0]}
                  for p in range(plan.devices)]
    base_bytes = baseline_bytes_per_layer(spec, mask, settings)
    total = sum(d["bytes_sent_per_layer"] for d in per_device)
    return {
        "model": {k: getattr(spec, k) for k in ("model_type", "architecture", "num_layers", "hidden_size",
                                                 "num_heads", "exchange")},
        "settings": {**settings.__dict__, "split_weights": list(settings.split_weights or []) or None},
        "batch": plan.batch, "tokens": plan.n_tokens,
        "outputs": report_outputs,
        "per_device": per_device,
        "traffic": {"bytes_per_layer": total, "baseline_bytes_per_layer": base_bytes,
                    "ratio_vs_baseline": total / base_bytes if base_bytes else 0.0},
    }
