"""`simulate`: run PRISM as P devices would, in one process with PyTorch: the reference for everything else."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import models
from .errors import InputError
from .inputs import prepare
from .models import PrismModel
from .plan import Plan, make_plan
from .runtime.wire import check_wire_dtype, roundtrip

_converted: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prism_model(model) -> PrismModel:
    """The PrismModel for a transformers model (converted once per model object)."""
    if isinstance(model, PrismModel):
        return model
    if model not in _converted:
        _converted[model] = models.convert(model)
    return _converted[model]


@dataclass
class DeviceTrace:
    """What each device did in one simulated inference: means sent per layer ([B, S, D] each)."""

    sent: list[list[torch.Tensor]]  # [layer][device]


@torch.no_grad()
def run_devices(pm: PrismModel, token_inputs: dict[str, np.ndarray], plan: Plan, trace: DeviceTrace | None = None,
                wire_dtype: str = "float32"):
    """The per-device loop. Returns {output name: tensor} with token outputs gathered along the sequence.

    Sent means go through the wire encoding of `wire_dtype` (float32 is lossless), as on the network.
    """
    spec = pm.spec
    P = plan.devices
    t = torch.from_numpy

    def send(p, means):
        if wire_dtype != "float32":
            means = t(roundtrip(means.numpy(), wire_dtype))
        if trace is not None:
            trace.sent[-1].append(means)
        return means

    embed = pm.embed_step()
    h, sent = [], []  # per device: hidden [B, n_p, D]; means it sends [B, S_p, D]
    if trace is not None:
        trace.sent.append([])
    for p in range(P):
        s, e = plan.span(p)
        args = [t(np.ascontiguousarray(token_inputs[k][:, s:e])) for k in spec.embed_inputs]
        hp, mp = embed(*args, torch.arange(s, e), t(plan.averager(p)))
        h.append(hp)
        sent.append(send(p, mp))

    for i in range(spec.num_layers):
        step = pm.layer_step(i)
        last = step.next_block is None
        new_h, new_sent = [], []
        if trace is not None and not last:
            trace.sent.append([])
        for p in range(P):
            remote = torch.cat([h[p][:, :0]] + [sent[q] for q in plan.sources(p)], dim=1)  # [B, R_p, D]
            args = [h[p], remote, t(plan.local_bias(p)), t(plan.remote_bias(p))]
            out = step(*args) if last else step(*args, t(plan.averager(p)))
            new_h.append(out[0])
            if not last:
                new_sent.append(send(p, out[1]))
        h, sent = new_h, new_sent

    outputs = {}
    if pm.token_head is not None:
        per_device = [pm.token_head(hp) for hp in h]
        for j, name in enumerate(spec.token_outputs):
            outputs[name] = torch.cat([o[j] for o in per_device], dim=1)
    if pm.pooled_head is not None:
        for name, value in zip(spec.pooled_outputs, pm.pooled_head(h[0][:, 0, :])):
            outputs[name] = value
    return outputs


def simulate(model, inputs=None, *, devices: int, compression_ratio: int, count_bias: bool = True,
             keep_sinks: bool = True, split_weights=None, wire_dtype: str = "float32",
             trace: DeviceTrace | None = None, **kwargs):
    """Drop-in for `model(**inputs)` that runs PRISM over `devices` simulated devices.

    Returns the transformers output class of `model` with the same fields (`last_hidden_state`,
    `pooler_output`, `logits`). `inputs` are what the tokenizer or image processor returns (or keyword
    arguments like `input_ids=`, `attention_mask=`, `pixel_values=`). Padding (`attention_mask`) works.
    `wire_dtype` (float32, float16, int8) applies the wire precision to every exchanged mean.
    """
    pm = prism_model(model)
    inputs = {**(dict(inputs) if inputs is not None else {}), **kwargs}
    token_inputs, mask = prepare(pm.spec.to_dict(), inputs)
    plan = make_plan(pm.spec, mask, devices=devices, compression_ratio=compression_ratio, count_bias=count_bias,
                     keep_sinks=keep_sinks, split_weights=split_weights)
    return pm.output_class(**run_devices(pm, token_inputs, plan, trace, check_wire_dtype(wire_dtype)))


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
            raise InputError(f"no tokenizer found for this model ({str(e).splitlines()[0]}); pass --input-ids") from None
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


def simulate_report(source, *, kind, texts=(), images=(), input_ids=None, devices, compression_ratio,
                    count_bias=True, keep_sinks=True, split_weights=None, wire_dtype="float32") -> dict:
    """What `prism simulate` prints: outputs vs the unpartitioned model, and per-device work and traffic."""
    from .runtime.wire import plan_traffic

    check_wire_dtype(wire_dtype)
    model = models.load(source)
    pm = prism_model(model)
    spec = pm.spec
    inputs = cli_inputs(source, spec, kind=kind, texts=texts, images=images, input_ids=input_ids)
    token_inputs, mask = prepare(spec.to_dict(), inputs)
    plan = make_plan(spec, mask, devices=devices, compression_ratio=compression_ratio, count_bias=count_bias,
                     keep_sinks=keep_sinks, split_weights=split_weights)
    outputs = run_devices(pm, token_inputs, plan, wire_dtype=wire_dtype)
    with torch.no_grad():
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
    D = spec.hidden_size
    sent, _ = plan_traffic(plan, D, 1, wire_dtype)
    per_device = [{"rank": p, "span": list(plan.span(p)), "tokens": plan.span(p)[1] - plan.span(p)[0],
                   "kv_rows": plan.kv_rows(p), "rows_sent": plan.sent_rows(p), "bytes_sent_per_layer": sent[p][0]}
                  for p in range(plan.devices)]
    baseline = make_plan(spec, mask, devices=devices, compression_ratio=1, keep_sinks=False,
                         split_weights=split_weights)
    base_bytes = sum(row[0] for row in plan_traffic(baseline, D, 1, "float32")[0])
    total = sum(d["bytes_sent_per_layer"] for d in per_device)
    return {
        "model": {k: getattr(spec, k) for k in ("model_type", "architecture", "num_layers", "hidden_size",
                                                 "num_heads")},
        "settings": {"devices": devices, "compression_ratio": compression_ratio, "count_bias": count_bias,
                     "keep_sinks": keep_sinks, "split_weights": split_weights, "wire_dtype": wire_dtype},
        "batch": plan.batch, "tokens": plan.n_tokens,
        "outputs": report_outputs,
        "per_device": per_device,
        "traffic": {"bytes_per_layer": total, "baseline_bytes_per_layer": base_bytes,
                    "ratio_vs_baseline": total / base_bytes if base_bytes else 0.0},
    }
