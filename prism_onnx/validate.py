"""`prism validate`: run an export through the in-process executor (onnxruntime) and through PyTorch on the
same inputs, and say how far the bundles are from both references.

What decides the exit code (the bound), per export setting:
  * fp32 weights, any wire precision: a relative bound. Every device's rows before the wire (per exchange
    point and device), and every output given the rows the devices really received, agree with the PyTorch
    reference within  max |diff| <= atol + rtol * max |reference|  (over the real tokens of all inputs;
    defaults rtol 1e-4, atol 1e-6; `--rtol`, `--atol` override them). Why relative: onnxruntime and PyTorch
    run the same float32 math with other kernels and summation orders, which differ by a few units of float32
    rounding (2^-24 = 6e-8) of the magnitudes summed, at every operation; the residual stream carries every
    layer's share to the output, so the difference grows with depth and with the output's magnitude, and a
    fixed absolute bound cannot serve a 2-layer test model and a 30-layer model with logits up to ~28 alike.
    Observed: ~1e-6 of max |value| for 2-layer models; SmolLM2-135M at CR=1 (30 layers, 49,152 logits up to
    ~40), P=4: 2.6e-6 to 6.3e-6 here (SST-2 sentences, 375-495-token WikiText paragraphs), and 2.2e-5 in the
    run that reported the absolute bound failing (6.1e-4 of logits up to ~28): rtol 1e-4 leaves a margin of
    4.5x over the worst, while a changed weight moves outputs by 1e-2 or more of their magnitude
    (tests/test_validate_bounds.py). The atol term
    only matters for outputs near zero. The reference is run with the bundle's received rows (`received=`):
    float16 and int8 rows are then the same on both sides. Comparing against a reference that rounds its own
    rows instead is not a bound: a row within 1e-7 of a rounding boundary rounds the other way, one wire
    step (2^-11 relative in float16, max|row|/127 in int8), and the layers after it amplify that step (0.002
    was seen on MiniLM with int8 rows). That comparison is still reported, as max_abs_diff_vs_simulate.
  * quantized weights (--quantize int8, int4): weight quantization error is real, so the bound is on
    direction, per output row (token vector, logits row): mean and worst cosine against the fp32 reference.
    int8: mean >= 0.98, worst >= 0.9 (MiniLM, P=4, CR=8, 32 SST-2 sentences: mean 0.993, worst 0.976 per-
    channel int8). int4: mean >= 0.95, worst >= 0.8 (4 bits per weight cost more: MiniLM P=2, 32 SST-2
    sentences, token vectors: mean 0.980, worst 0.935; SmolLM2 logits on WikiText paragraphs: 0.9996, 0.984;
    a wrong scale, zero point or table gives cosines near 0). `--rtol`/`--atol` replace them with the
    relative bound.
  * at CR=1 with fp32 weights and a float32 wire, PRISM is exact: the outputs must also agree with the
    unpartitioned model within the relative bound.
Reported and never failed on, unless asked (`--min-cosine-vs-model`): agreement with the unpartitioned model
at CR > 1 (max |diff| and its share of max |value|, mean and worst cosine per output row, and for logits the
share of tokens whose top-1 prediction agrees; `cosine_vs_model` is the mean cosine of the main output): that
is what compression costs, not a defect, and the report shows it in full.

A calibrated export (`prism calibrate`) is checked the same way against its own source, the calibrated model
folder; "the unpartitioned model" of the agreement report is then the model it was calibrated from (what
calibration tries to match), and the CR=1 exactness bound holds against the calibrated model's own forward
(`max_abs_diff_vs_own_model`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import models
from .data import data_dir, digits_images, sst2
from .errors import InputError, ModelLoadError
from .program import split_ref
from .reference import prism_model, run_devices
from .runtime.executor import Executor

RTOL, ATOL = 1e-4, 1e-6
QUANT_COSINE = {"int8": (0.98, 0.9), "int4": (0.95, 0.8)}  # (mean, worst) per output row, see the docstring


@dataclass(frozen=True)
class Bound:
    """The pass/fail bound (module docstring): "relative" (max |diff| <= atol + rtol * max |reference|) or
    "cosine" (per output row: mean >= mean_cosine, worst >= min_cosine)."""

    kind: str
    rtol: float | None = None
    atol: float | None = None
    mean_cosine: float | None = None
    min_cosine: float | None = None

    def allows(self, diff: float, scale: float) -> bool:
        """diff (max |diff|) within the relative bound for values up to `scale` (max |reference|)."""
        return diff <= self.atol + self.rtol * scale

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def tolerance(settings, rtol: float | None = None, atol: float | None = None) -> Bound:
    """The bound for an export's ExportSettings (see module docstring); rtol/atol: the user's relative bound."""
    if settings.quantize != "none" and rtol is None and atol is None:
        mean, worst = QUANT_COSINE[settings.quantize]
        return Bound("cosine", mean_cosine=mean, min_cosine=worst)
    return Bound("relative", rtol=RTOL if rtol is None else rtol, atol=ATOL if atol is None else atol)


class WireRecorder:
    """An on_step hook: what one device sent at each exchange point (before the wire) and received (after)."""

    def __init__(self, program, rank: int):
        self.program, self.rank = program, rank
        self.sent: dict[int, np.ndarray] = {}
        self.received: dict[int, np.ndarray] = {}

    def __call__(self, step, feeds, results):
        for name, ref in step.inputs.items():
            if ref.startswith("recv:"):
                self.received[self.program.point_index(split_ref(ref)[1])] = np.array(feeds[name])
        for (name, ref), value in zip(step.outputs.items(), results):
            if ref.startswith("send:"):
                self.sent[self.program.point_index(split_ref(ref)[1])] = np.array(value)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (last axis)."""
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1), 1.0)


def sample_batches(executor: Executor, samples: int, batch_size: int = 8, seed: int = 0,
                   data: str | Path | None = None) -> list[dict]:
    """Inputs for validation: `data` (a text file, one input per line, or a folder of images), else SST-2
    dev sentences (text models with a tokenizer), scikit-learn digits (image models), or random token ids."""
    req, spec, manifest = executor.requests, executor.spec, executor.manifest
    rng = np.random.default_rng(seed)
    chunks = [range(i, min(i + batch_size, samples)) for i in range(0, samples, batch_size)]
    if data is not None:
        return data_batches(executor, Path(data), samples, batch_size)
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
    return random_ids(manifest, [len(c) for c in chunks], rng)


def random_ids(manifest, batches: list[int], rng: np.random.Generator) -> list[dict]:
    """Random token ids for a model without a tokenizer, one batch per entry of `batches` (its row count):
    no special id (pad, bos, eos of the config) among the real tokens, and padding with the pad id, as a
    tokenizer would give. A model may treat these ids apart from the mask: RoBERTa counts its position ids
    from `input_ids != pad_token_id`, so a pad id inside a row would move every later token's position."""
    cfg = manifest.config_summary
    special = [i for k in ("pad_token_id", "bos_token_id", "eos_token_id") if cfg.get(k) is not None
               for i in np.atleast_1d(cfg[k])]  # an id or a list of ids (eos of some configs)
    ordinary = np.setdiff1d(np.arange(manifest.model.vocab_size), special)
    pad = int(cfg.get("pad_token_id") or 0)
    max_len = min(manifest.settings.max_seq_len, 48)
    out = []
    for rows in batches:
        lengths = rng.integers(max(manifest.devices, max_len // 2), max_len + 1, size=rows)
        ids = rng.choice(ordinary, size=(rows, int(lengths.max())))
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        out.append({"input_ids": np.where(mask == 1, ids, pad), "attention_mask": mask})
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def data_batches(executor: Executor, data: Path, samples: int, batch_size: int) -> list[dict]:
    """The first `samples` inputs of a text file (one per line; blank lines skipped) or an image folder,
    through the bundle's own preprocessing, one input per batch row (each split over its own tokens)."""
    req = executor.requests
    if data.is_dir():
        items = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:samples]
        if not items:
            raise InputError(f"{data}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return [req.model_inputs(images=[str(p)]) for p in items]
    if not data.is_file():
        raise InputError(f"{data}: no such file or folder")
    texts = [t for t in data.read_text(encoding="utf-8", errors="replace").splitlines() if t.strip()][:samples]
    if not texts:
        raise InputError(f"{data}: no text lines")
    return [req.model_inputs(texts=[t]) for t in texts]


class OutputStats:
    """One output's agreement with the references, accumulated over the inputs' real tokens."""

    KEYS = ("reference", "simulate", "model", "own_model")

    def __init__(self):
        self.diff = dict.fromkeys(self.KEYS, 0.0)  # max |bundle - reference|
        self.scale = dict.fromkeys(self.KEYS, 0.0)  # max |reference|
        self.cos = {"reference": [], "model": []}
        self.top1 = [0, 0]  # tokens whose argmax agrees with the model's, tokens

    def add(self, bundle: np.ndarray, refs: dict[str, np.ndarray], logits: bool) -> None:
        for key, ref in refs.items():
            self.diff[key] = max(self.diff[key], float(np.abs(bundle - ref).max(initial=0.0)))
            self.scale[key] = max(self.scale[key], float(np.abs(ref).max(initial=0.0)))
        self.cos["reference"].append(row_cosines(bundle, refs["reference"]))
        self.cos["model"].append(row_cosines(bundle, refs["model"]))
        if logits:
            self.top1[0] += int((bundle.argmax(-1) == refs["model"].argmax(-1)).sum())
            self.top1[1] += int(np.prod(bundle.shape[:-1]))

    def report(self, own: bool) -> dict:
        cr, cm = np.concatenate(self.cos["reference"]), np.concatenate(self.cos["model"])
        out = {}
        for key in self.KEYS if own else self.KEYS[:3]:
            out[f"max_abs_diff_vs_{key}"] = self.diff[key]
            out[f"rel_diff_vs_{key}"] = self.diff[key] / self.scale[key] if self.scale[key] > 0 else 0.0
        out.update(max_abs_value=self.scale["reference"], mean_cosine_vs_reference=float(cr.mean()),
                   min_cosine_vs_reference=float(cr.min()), mean_cosine_vs_model=float(cm.mean()),
                   min_cosine_vs_model=float(cm.min()))
        if self.top1[1]:
            out["top1_agreement_vs_model"] = self.top1[0] / self.top1[1]
        return out


def _checks(bound: Bound, stats: dict[str, OutputStats], wire: dict, exact: bool, min_model_cosine) -> list[str]:
    """The failures of a validation: what broke its bound, one line each."""
    failures = []
    if bound.kind == "relative":
        worst = max(wire.items(), key=lambda kv: kv[1][0] - bound.rtol * kv[1][1], default=None)
        if worst is not None and not bound.allows(*worst[1]):
            (point, rank), (diff, scale) = worst
            failures.append(f"rows device {rank} sent at exchange point {point} differ from the reference by "
                            f"{diff:.3g} > {bound.atol:g} + {bound.rtol:g} x {scale:.3g}")
    for name, o in stats.items():
        d, sc = o.diff, o.scale
        if bound.kind == "relative" and not bound.allows(d["reference"], sc["reference"]):
            failures.append(f"{name}: differs from the PyTorch reference by {d['reference']:.3g} > {bound.atol:g} + "
                            f"{bound.rtol:g} x max |value| {sc['reference']:.3g}")
        cr = np.concatenate(o.cos["reference"])
        if bound.kind == "cosine" and (cr.mean() < bound.mean_cosine or cr.min() < bound.min_cosine):
            failures.append(f"{name}: cosine vs the PyTorch reference mean {cr.mean():.4f} min {cr.min():.4f}, "
                            f"needs >= {bound.mean_cosine} and >= {bound.min_cosine}")
        if exact and not bound.allows(d["own_model"], sc["own_model"]):
            failures.append(f"{name}: at CR=1 differs from the unpartitioned model by {d['own_model']:.3g} > "
                            f"{bound.atol:g} + {bound.rtol:g} x max |value| {sc['own_model']:.3g}")
        cm = np.concatenate(o.cos["model"]).mean()
        if min_model_cosine is not None and cm < min_model_cosine:
            failures.append(f"{name}: mean cosine vs the unpartitioned model {cm:.4f} < --min-cosine-vs-model "
                            f"{min_model_cosine}")
    return failures


def validate(export_dir: str | Path, *, samples: int = 8, model=None, batch_size: int = 8,
             data: str | Path | None = None, progress: bool = False, rtol: float | None = None,
             atol: float | None = None, min_model_cosine: float | None = None) -> dict:
    """Bundles vs the PyTorch reference and vs the unpartitioned model (see the module docstring).
    rtol/atol: the relative bound's terms (default RTOL, ATOL; given for a quantized export, they replace
    its cosine bound); min_model_cosine: also fail when an output's mean cosine against the unpartitioned
    model is below it."""
    from tqdm.auto import tqdm

    executor = Executor(export_dir)
    manifest = executor.manifest
    source = model if model is not None else manifest.source
    hf = _load(source)
    # "vs model": the unpartitioned model the export approximates. For a calibrated export that is the model
    # it was calibrated from (the calibrated weights are the reference's, not the goal).
    base = manifest.calibration["base_source"] if manifest.calibration and model is None else None
    base_hf = _load(base) if base else hf
    pm = prism_model(hf, manifest.model.exchange)
    if pm.spec != manifest.model:
        raise ModelLoadError(f"--model {source} is not the model this bundle was exported from")
    settings = manifest.settings
    bound = tolerance(settings, rtol, atol)
    stats: dict[str, OutputStats] = {}
    wire: dict[tuple[int, int], tuple[float, float]] = {}  # (point, rank) -> (max |diff|, max |reference row|)
    batches = sample_batches(executor, samples, batch_size, data=data)
    exact = settings.compression_ratio == 1 and settings.quantize == "none" and settings.wire_dtype == "float32"
    for inputs in tqdm(batches, desc="validating", unit="batch", disable=not progress):
        _compare(executor, pm, hf, base_hf, inputs, exact, stats, wire)
    failures = _checks(bound, stats, wire, exact, min_model_cosine)
    own = base_hf is not hf and exact  # the calibrated model's own forward was computed
    per_output = {name: o.report(own) for name, o in stats.items()}
    main_output = (manifest.model.pooled_outputs + manifest.model.token_outputs)[0] if \
        "last_hidden_state" not in per_output else "last_hidden_state"
    n_inputs = sum(len(next(iter(b.values()))) for b in batches)
    sent = max(wire.values(), key=lambda ds: ds[0] / ds[1] if ds[1] else 0.0, default=(0.0, 0.0))
    return {
        "export": str(export_dir), "export_id": manifest.export_id, "model": base or str(source),
        "calibration": _calibration_summary(manifest.calibration),
        "settings": {k: getattr(settings, k) for k in ("devices", "compression_ratio", "wire_dtype", "quantize",
                                                        "count_bias", "keep_sinks", "exchange")},
        "samples": n_inputs, "data": str(data) if data else None, "tolerance": bound.to_dict(),
        "max_abs_diff_sent_rows": max((d for d, _ in wire.values()), default=0.0),
        "rel_diff_sent_rows": sent[0] / sent[1] if sent[1] else 0.0,
        **{f"{k}_vs_{ref}": max(o[f"{k}_vs_{ref}"] for o in per_output.values())
           for ref in ("reference", "simulate", "model") for k in ("max_abs_diff", "rel_diff")},
        "main_output": main_output, "cosine_vs_model": per_output[main_output]["mean_cosine_vs_model"],
        "worst_cosine_vs_model": per_output[main_output]["min_cosine_vs_model"],
        "top1_agreement_vs_model": per_output[main_output].get("top1_agreement_vs_model"),
        "outputs": per_output, "failures": failures, "passed": not failures,
    }


def _compare(executor, pm, hf, base_hf, inputs: dict, exact: bool, stats: dict, wire: dict) -> None:
    """One batch through the bundles and the references; accumulates into `stats` and `wire`."""
    manifest, settings, program = executor.manifest, executor.manifest.settings, executor.manifest.program
    recorders = {p: WireRecorder(program, p) for p in range(manifest.devices)}
    result = executor.run(inputs, on_step=recorders)
    token_inputs, plan = executor.requests.prepare(inputs)
    received = {(i, p): r for p, rec in recorders.items() for i, r in rec.received.items()}
    with torch.no_grad():
        replay_trace = _SentTrace()
        replay = run_devices(pm, token_inputs, plan, wire_dtype=settings.wire_dtype, received=received,
                             on_sent=replay_trace)
        sim = run_devices(pm, token_inputs, plan, wire_dtype=settings.wire_dtype)
        ref = base_hf(**model_feeds(base_hf, manifest, inputs))
        own = hf(**model_feeds(hf, manifest, inputs)) if base_hf is not hf and exact else ref
    for (i, p), rows_ref in replay_trace.rows.items():
        sent = recorders[p].sent[i]
        if sent.size:
            d, sc = wire.get((i, p), (0.0, 0.0))
            wire[(i, p)] = (max(d, float(np.abs(sent - rows_ref).max())), max(sc, float(np.abs(rows_ref).max())))
    valid = plan.attention_mask.astype(bool)
    for name, value in result.outputs.items():
        refs = {"reference": replay[name].numpy(), "simulate": sim[name].numpy(), "model": ref[name].numpy(),
                "own_model": own[name].numpy()}
        a = value
        if name in manifest.model.token_outputs:
            a, refs = a[valid], {k: v[valid] for k, v in refs.items()}
        stats.setdefault(name, OutputStats()).add(a, refs, logits=name == "logits")


def _load(source):
    try:
        return models.load(source)
    except ModelLoadError as e:
        raise ModelLoadError(f"cannot load the PyTorch model to compare with ({e}); pass --model") from None


def _calibration_summary(record: dict | None) -> dict | None:
    if not record:
        return None
    keys = ("base_source", "data", "data_sha256", "steps", "trained_parameters", "loss_before", "loss_after")
    return {k: record.get(k) for k in keys}


class _SentTrace:
    """Collects the rows each device of the reference sent: {(point, rank): rows}."""

    def __init__(self):
        self.rows: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, point: int, rank: int, rows) -> None:
        self.rows[(point, rank)] = rows.detach().numpy()


def model_feeds(model, manifest, inputs: dict) -> dict:
    """The unpartitioned model's inputs: a decoder gets position ids counted from each row's first real token,
    as the plan gives them (Plan.position_ids)."""
    feeds = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    if manifest.model.causal and "attention_mask" in feeds:
        feeds["position_ids"] = (feeds["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return feeds


def summary_lines(r: dict) -> list[str]:
    """The human summary of a validate report (what `prism validate` prints without --json)."""
    s = r["settings"]
    lines = [f"{r['export']}: P={s['devices']} CR={s['compression_ratio']} wire={s['wire_dtype']} "
             f"quantize={s['quantize']} exchange={s['exchange']}, {r['samples']} inputs",
             f"  rows sent at the exchange points vs the reference: max |diff| {r['max_abs_diff_sent_rows']:.3g} "
             f"({r['rel_diff_sent_rows']:.2g} of max |value|)"]
    costs = ([f"CR={s['compression_ratio']}"] if s["compression_ratio"] > 1 else []) \
        + ([f"{s['quantize']} weights"] if s["quantize"] != "none" else []) \
        + ([f"a {s['wire_dtype']} wire"] if s["wire_dtype"] != "float32" else [])
    what = "not checked: what " + " and ".join(costs) + " cost" if costs else "checked: CR=1 is exact"
    for name, o in r["outputs"].items():
        lines.append(f"  {name}: vs the PyTorch reference (same received rows) max |diff| "
                     f"{o['max_abs_diff_vs_reference']:.3g} ({o['rel_diff_vs_reference']:.2g} of max |value| "
                     f"{o['max_abs_value']:.3g}), cosine mean {o['mean_cosine_vs_reference']:.5f} min "
                     f"{o['min_cosine_vs_reference']:.5f}; vs simulate (own rounding) max |diff| "
                     f"{o['max_abs_diff_vs_simulate']:.3g}")
        top1 = f", top-1 agreement {100 * o['top1_agreement_vs_model']:.1f}%" if "top1_agreement_vs_model" in o else ""
        lines.append(f"  {name}: vs the unpartitioned model ({what}): max |diff| {o['max_abs_diff_vs_model']:.3g} "
                     f"({o['rel_diff_vs_model']:.2g} of max |value|), cosine mean {o['mean_cosine_vs_model']:.5f} "
                     f"worst {o['min_cosine_vs_model']:.5f}{top1}")
    lines.append(f"  bound: {', '.join(f'{k} {v}' for k, v in r['tolerance'].items())}")
    lines += [f"  FAIL {f}" for f in r["failures"]]
    lines.append("passed" if r["passed"] else "FAILED")
    return lines
