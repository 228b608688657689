"""`prism validate`: run an export through the in-process executor and through PyTorch on the same inputs.

Tolerances (max |diff| over every output, real tokens only):
  * fp32 weights, float32 wire: <= 1e-4 against `simulate`, and at CR=1 also against the unpartitioned
    model. Both sides compute the same fp32 math in a different order (observed ~2e-6).
  * fp32 weights, float16 or int8 wire: <= 1e-3 against `simulate` run with the same wire precision
    (the rounding is reproduced exactly; a mean that lands within float error of a rounding boundary can
    round the other way, one step of the wire format, and that step is diluted by attention).
  * int8 weights (--quantize int8): weight quantization error is real, so the bound is on direction, per
    output row (token vector, logits row): mean cosine >= 0.98 and min cosine >= 0.9 against `simulate`
    (MiniLM, P=4, CR=8, 32 SST-2 sentences: mean 0.993, min 0.976 per-channel int8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import models
from .data import data_dir, digits_images, sst2
from .errors import ModelLoadError
from .reference import prism_model, run_devices
from .runtime.executor import Executor

EXACT_TOL = 1e-4
WIRE_TOL = 1e-3
QUANT_MEAN_COS, QUANT_MIN_COS = 0.98, 0.9


def tolerance(settings) -> dict:
    """The bound for an export's ExportSettings (see module docstring)."""
    if settings.quantize != "none":
        return {"kind": "cosine", "mean_cosine": QUANT_MEAN_COS, "min_cosine": QUANT_MIN_COS}
    return {"kind": "abs", "max_abs_diff": EXACT_TOL if settings.wire_dtype == "float32" else WIRE_TOL}


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (last axis)."""
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1), 1.0)


def sample_batches(executor: Executor, samples: int, batch_size: int = 8, seed: int = 0) -> list[dict]:
    """Inputs for validation: SST-2 dev sentences (text models with a tokenizer), scikit-learn digits
    (image models), or random token ids when no data fits."""
    req, spec, manifest = executor.requests, executor.spec, executor.manifest
    rng = np.random.default_rng(seed)
    chunks = [range(i, min(i + batch_size, samples)) for i in range(0, samples, batch_size)]
    if spec.input_kind == "image":
        try:
            imgs, _ = digits_images(spec.image_size, spec.num_channels, limit=samples)
            return [req.model_inputs(images=[imgs[i] for i in c]) for c in chunks]
        except ImportError:
            return [{"pixel_values": rng.standard_normal((len(c), spec.num_channels, spec.image_size,
                                                          spec.image_size)).astype(np.float32)} for c in chunks]
    if req.text is not None and data_dir() is not None:
        texts, _ = sst2("dev", limit=samples)
        return [req.model_inputs(texts=[texts[i] for i in c]) for c in chunks]
    max_len = min(manifest.settings.max_seq_len, 48)
    out = []
    for c in chunks:
        lengths = rng.integers(max(manifest.devices, max_len // 2), max_len + 1, size=len(c))
        ids = rng.integers(0, spec.vocab_size, size=(len(c), int(lengths.max())))
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def validate(export_dir: str | Path, *, samples: int = 8, model=None, batch_size: int = 8) -> dict:
    executor = Executor(export_dir)
    manifest = executor.manifest
    source = model if model is not None else manifest.source
    try:
        hf = models.load(source)
    except ModelLoadError as e:
        raise ModelLoadError(f"cannot load the PyTorch model to compare with ({e}); pass --model") from None
    pm = prism_model(hf)
    if pm.spec != manifest.model:
        raise ModelLoadError(f"--model {source} is not the model this bundle was exported from")
    settings = manifest.settings
    tol = tolerance(settings)
    per_output: dict[str, dict] = {}
    cosines: dict[str, list] = {}
    for inputs in sample_batches(executor, samples, batch_size):
        result = executor.run(inputs)
        token_inputs, plan = executor.requests.prepare(inputs)
        with torch.no_grad():
            sim = run_devices(pm, token_inputs, plan, wire_dtype=settings.wire_dtype)
        with torch.no_grad():
            ref = hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
        valid = plan.attention_mask.astype(bool)
        for name, value in result.outputs.items():
            a, b, c = value, sim[name].numpy(), ref[name].numpy()
            if name in manifest.model.token_outputs:
                a, b, c = a[valid], b[valid], c[valid]
            o = per_output.setdefault(name, {"max_abs_diff_vs_simulate": 0.0, "max_abs_diff_vs_model": 0.0})
            o["max_abs_diff_vs_simulate"] = max(o["max_abs_diff_vs_simulate"], float(np.abs(a - b).max()))
            o["max_abs_diff_vs_model"] = max(o["max_abs_diff_vs_model"], float(np.abs(a - c).max()))
            cos = cosines.setdefault(name, {"sim": [], "model": []})
            cos["sim"].append(row_cosines(a, b))
            cos["model"].append(row_cosines(a, c))
    failures = []
    exact = settings.compression_ratio == 1 and settings.quantize == "none" and settings.wire_dtype == "float32"
    for name, o in per_output.items():
        cs, cm = np.concatenate(cosines[name]["sim"]), np.concatenate(cosines[name]["model"])
        o.update(mean_cosine_vs_simulate=float(cs.mean()), min_cosine_vs_simulate=float(cs.min()),
                 mean_cosine_vs_model=float(cm.mean()), min_cosine_vs_model=float(cm.min()))
        if tol["kind"] == "abs" and o["max_abs_diff_vs_simulate"] > tol["max_abs_diff"]:
            failures.append(f"{name}: differs from simulate by {o['max_abs_diff_vs_simulate']:.3g} > "
                            f"{tol['max_abs_diff']:g}")
        if tol["kind"] == "cosine" and (cs.mean() < tol["mean_cosine"] or cs.min() < tol["min_cosine"]):
            failures.append(f"{name}: cosine vs simulate mean {cs.mean():.4f} min {cs.min():.4f}, needs >= "
                            f"{tol['mean_cosine']} and >= {tol['min_cosine']}")
        if exact and o["max_abs_diff_vs_model"] > EXACT_TOL:
            failures.append(f"{name}: at CR=1 differs from the unpartitioned model by "
                            f"{o['max_abs_diff_vs_model']:.3g} > {EXACT_TOL:g}")
    return {
        "export": str(export_dir), "export_id": manifest.export_id,
        "settings": {k: getattr(settings, k) for k in ("devices", "compression_ratio", "wire_dtype", "quantize",
                                                        "count_bias", "keep_sinks")},
        "samples": samples, "tolerance": tol,
        "max_abs_diff_vs_simulate": max(o["max_abs_diff_vs_simulate"] for o in per_output.values()),
        "max_abs_diff_vs_model": max(o["max_abs_diff_vs_model"] for o in per_output.values()),
        "outputs": per_output, "failures": failures, "passed": not failures,
    }
