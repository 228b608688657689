"""Issue 21: what an export costs a board and its owner, for float32, int8 and int4 weights.

    python benchmarks/bundles.py export --model /work/cache/smollm2-135m --devices 4 --quantize none,int4,int8
    python benchmarks/bundles.py export --model out/bench/llama-3.2-1b --devices 4 --quantize none --max-seq-len 1024
    python benchmarks/bundles.py quality --model /work/cache/smollm2-135m --windows 16
    python benchmarks/bundles.py runtime --model /work/cache/smollm2-135m
    python benchmarks/bundles.py encoder          # MiniLM: SST-2 probe accuracy, long-text cosine

export   wall time of `prism export` in a fresh process with an empty graph cache (cold), then of a second
         export with another CR (the cache warm); bytes of one device bundle, of the whole export and of
         both exports on disk (hard links once, as `du`), against the model's safetensors.
quality  WikiText-2 (valid) perplexity through P=1, CR=1 bundles: the first --windows windows of --window
         tokens of the whole text, every token after the first of a window scored.
runtime  one device's onnxruntime sessions in a fresh process (what a runner holds, without its sockets):
         resident memory (VmRSS) once loaded and its peak (VmHWM) after 3 prompts of 512 tokens and 3
         generations of 64 greedy tokens after 128, the 512-token prefill time and decode tokens/s (medians
         of 3) on --threads threads, with onnxruntime's memory arena off (the runtime's default) or on.
encoder  MiniLM at P=2, CR=1: the logistic SST-2 probe's accuracy on the 872 dev sentences and the embedding
         cosine against the float32 PyTorch model on 32 WikiText-2 paragraphs of 256-512 tokens.
Each prints one JSON object per measurement (--json FILE appends them there too) and `uptime`'s load, since
this machine is shared.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

QUANT = ("none", "int8", "int4")
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "valid.txt"


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def emit(row: dict, path: str | None) -> None:
    row = {**row, "load_1min": load()}
    click.echo(json.dumps(row))
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def prism_export(model: str, out: Path, cache: Path, *args: str) -> tuple[dict, float]:
    env = {**os.environ, "PRISM_GRAPH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "prism_onnx.cli", "export", model, "--out", str(out), "--overwrite",
                        "--json", *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if p.returncode:
        raise click.ClickException(f"export failed: {p.stdout[-400:]} {p.stderr[-400:]}")
    return json.loads(p.stdout), seconds


def safetensors_bytes(model: str) -> int:
    return sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))


@click.group()
def main():
    pass


@main.command()
@click.option("--model", required=True)
@click.option("--devices", default=4, show_default=True)
@click.option("--quantize", default="none,int4,int8", show_default=True)
@click.option("--max-seq-len", default=None, type=int)
@click.option("--out", default="out/bench/bundles", show_default=True)
@click.option("--json", "json_path", default=None)
def export(model, devices, quantize, max_seq_len, out, json_path):
    """Cold and warm export time, bundle and export bytes."""
    more = ["--max-seq-len", str(max_seq_len)] if max_seq_len else []
    weights = safetensors_bytes(model)
    for q in quantize.split(","):
        with tempfile.TemporaryDirectory(prefix="prism-bench-cache-") as cache:
            dest = Path(out) / f"{Path(model).name}-p{devices}-{q}"
            args = ("-P", str(devices), "--quantize", q, *more)
            cold, cold_s = prism_export(model, dest, Path(cache), "--cr", "1", *args)
            warm, warm_s = prism_export(model, Path(f"{dest}-cr16"), Path(cache), "--cr", "16", *args)
        emit({"bench": "export", "model": model, "devices": devices, "quantize": q, "cold_seconds": round(cold_s, 1),
              "graphs": cold["graphs"], "warm_seconds_other_cr": round(warm_s, 1), "warm_graphs": warm["graphs"],
              "device_bytes": cold["device_bytes"], "export_bytes": cold["total_bytes"],
              "both_exports_bytes": disk_bytes(dest, Path(f"{dest}-cr16")), "safetensors_bytes": weights,
              "device_vs_safetensors": round(cold["device_bytes"] / weights, 3) if weights else None,
              "export_vs_device": round(cold["total_bytes"] / cold["device_bytes"], 3)}, json_path)


def disk_bytes(*folders: Path) -> int:
    """Bytes of the files under `folders`, hard links once (as `du` counts them)."""
    seen = {}
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                seen[(f.stat().st_dev, f.stat().st_ino)] = f.stat().st_size
    return sum(seen.values())


def perplexity(bundle: Path, windows: int, window: int) -> float:
    from tokenizers import Tokenizer

    from prism_onnx.runtime.executor import Executor

    ex = Executor(bundle)
    ids = Tokenizer.from_file(str(bundle / "device-0" / "tokenizer.json")).encode(WIKITEXT.read_text()).ids
    nll, n = 0.0, 0
    for w in range(windows):
        x = np.array(ids[w * window:(w + 1) * window], dtype=np.int64)[None]
        logits = ex.run({"input_ids": x, "attention_mask": np.ones_like(x)}).outputs["logits"][0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(window - 1), x[0, 1:]].sum())
        n += window - 1
    ex.close()
    return float(np.exp(nll / n))


@main.command()
@click.option("--model", required=True)
@click.option("--windows", default=16, show_default=True)
@click.option("--window", default=512, show_default=True)
@click.option("--quantize", default="none,int8,int4", show_default=True)
@click.option("--out", default="out/bench/bundles", show_default=True)
@click.option("--json", "json_path", default=None)
def quality(model, windows, window, quantize, out, json_path):
    """WikiText-2 valid perplexity of P=1, CR=1 bundles."""
    base = None
    for q in quantize.split(","):
        dest = Path(out) / f"{Path(model).name}-p1-{q}"
        prism_export(model, dest, Path(os.environ.get("PRISM_GRAPH_CACHE", Path.home() / ".cache/prism-onnx/graphs")),
                     "-P", "1", "--cr", "1", "--quantize", q, "--max-seq-len", str(window))
        ppl = perplexity(dest, windows, window)
        base = ppl if q == "none" else base
        emit({"bench": "perplexity", "model": model, "quantize": q, "windows": windows, "window": window,
              "tokens_scored": windows * (window - 1), "perplexity": round(ppl, 3),
              "vs_float32": round(ppl / base, 4) if base else None}, json_path)


RUNNER = """
import json, statistics, sys, time, numpy as np
def status():
    return {k: int(v.split()[0]) // 1024 for k, v in (l.split(":", 1) for l in open("/proc/self/status"))
            if k in ("VmRSS", "VmHWM")}
from prism_onnx.generate import GenerationConfig
from prism_onnx.runtime.executor import Executor
ex = Executor(sys.argv[1], threads=int(sys.argv[2]), memory_arena=sys.argv[3] == "on")
loaded = status()["VmRSS"]
rng = np.random.default_rng(0)
prefill, speeds = [], []
for _ in range(3):
    ids = rng.integers(100, 20000, (1, 512))
    t0 = time.perf_counter()
    ex.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    prefill.append(1e3 * (time.perf_counter() - t0))
for _ in range(3):
    ids = rng.integers(100, 20000, (1, 128))
    gen, _ = ex.generate({"input_ids": ids, "attention_mask": np.ones_like(ids)},
                         GenerationConfig(max_new_tokens=65, stop_token_ids=()))
    speeds.append(gen.stats.decode_tokens_per_s)
print(json.dumps({"rss_loaded_mb": loaded, "rss_peak_mb": status()["VmHWM"], "decode_tokens_per_s": speeds,
                  "prefill_512_ms": prefill}))
"""


@main.command()
@click.option("--model", required=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--quantize", default="none,int8,int4", show_default=True)
@click.option("--arena", default="off", show_default=True, help="onnxruntime's CPU memory arena: off, on or both.")
@click.option("--rounds", default=1, show_default=True, help="Runs of every setting, interleaved.")
@click.option("--out", default="out/bench/bundles", show_default=True)
@click.option("--json", "json_path", default=None)
def runtime(model, threads, quantize, arena, rounds, out, json_path):
    """RSS of one device's sessions, 512-token prefill time and decode tokens/s (P=1 bundles of `quality`),
    each setting in a fresh process: loaded, then 3 prefills of 512 tokens, then 3 generations of 64
    tokens after 128; the peak (VmHWM) is after all of it."""
    arenas = ("off", "on") if arena == "both" else (arena,)
    for _ in range(rounds):
        for q in quantize.split(","):
            dest = Path(out) / f"{Path(model).name}-p1-{q}"
            if not dest.is_dir():
                prism_export(model, dest, Path(os.environ.get("PRISM_GRAPH_CACHE",
                                                              Path.home() / ".cache/prism-onnx/graphs")),
                             "-P", "1", "--cr", "1", "--quantize", q, "--max-seq-len", "512")
            for a in arenas:
                p = subprocess.run([sys.executable, "-c", RUNNER, str(dest), str(threads), a], capture_output=True,
                                   text=True)
                if p.returncode:
                    raise click.ClickException(p.stderr[-600:])
                r = json.loads(p.stdout.strip().splitlines()[-1])
                emit({"bench": "runtime", "model": model, "quantize": q, "threads": threads, "memory_arena": a,
                      "device_bytes": sum(f.stat().st_size for f in (dest / "device-0").iterdir() if f.is_file()),
                      "rss_loaded_mb": r["rss_loaded_mb"], "rss_peak_mb": r["rss_peak_mb"],
                      "decode_tokens_per_s": round(statistics.median(r["decode_tokens_per_s"]), 1),
                      "prefill_512_ms": round(statistics.median(r["prefill_512_ms"]), 1)}, json_path)


@main.command()
@click.option("--quantize", default="none,int8,int4", show_default=True)
@click.option("--out", default="out/bench/bundles", show_default=True)
@click.option("--json", "json_path", default=None)
def encoder(quantize, out, json_path):
    """MiniLM, P=2, CR=1: SST-2 probe accuracy and long-text embedding cosine."""
    from prism_onnx import models
    from prism_onnx.evaluate.evaluate import LongText, SST2Probe
    from prism_onnx.evaluate.probe import MINILM
    from prism_onnx.runtime.executor import Executor

    model = models.load(MINILM)
    for q in quantize.split(","):
        dest = Path(out) / f"minilm-p2-{q}"
        prism_export(MINILM, dest, Path(os.environ.get("PRISM_GRAPH_CACHE", Path.home() / ".cache/prism-onnx/graphs")),
                     "-P", "2", "--cr", "1", "--quantize", q)
        ex = Executor(dest)
        row = {"bench": "encoder", "model": "all-MiniLM-L6-v2", "quantize": q,
               "device_bytes": sum(f.stat().st_size for f in (dest / "device-0").iterdir() if f.is_file())}
        sst2, longtext = SST2Probe(), LongText()
        data = sst2.batches(ex.requests)
        row["sst2_accuracy"] = round(sst2.score([ex.run(inputs).outputs for inputs, _ in data], data), 4)
        data = longtext.batches(ex.requests)
        longtext.reference = longtext.full_outputs(model, data)
        row["longtext_cosine_vs_float32_model"] = round(
            longtext.score([ex.run(inputs).outputs for inputs, _ in data], data), 5)
        ex.close()
        emit(row, json_path)


if __name__ == "__main__":
    main()
