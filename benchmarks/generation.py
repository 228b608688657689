"""Generation benchmarks: time to first token, decode speed, and perplexity under the compressed cache.

    ttft        a long prompt (N tokens) through runner processes, one per emulated host (ip netns, tbf
                links), pinned to one core each, one onnxruntime thread: PRISM at P devices against the
                same graphs on one device. Time to first token as the client sees it (median).
    decode      tokens per second of decoding, one thread on one core: the tail device of a P-device
                deployment (its compressed cache), the same graphs on one device, and the model exported by
                optimum-onnx with its key/value cache (the single-device decoder a user would pick).
    perplexity  teacher-forced continuations under the compressed prefix cache: each test window's first
                `prefix` tokens are prefilled over P devices, the rest is scored from the tail device's
                cache, against the full model on the whole window (the WikiText task models).

    python benchmarks/random_model.py --shape gpt2-medium --out out/bench/gpt2-medium
    python benchmarks/generation.py ttft --model out/bench/gpt2-medium --seq-len 1024 --devices 2 --cr 128
    python benchmarks/generation.py decode --model out/bench/gpt2-medium --seq-len 1024 --new-tokens 64
    python benchmarks/generation.py perplexity --task wikitext --devices 2,4 --cr 1,4,16,64,128
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from prism_onnx import models
from prism_onnx.exporters.bundle import export_graphs, write_bundles
from prism_onnx.generate import GenerationConfig, continuation_logits
from prism_onnx.manifest import ExportSettings
from prism_onnx.runtime.executor import Executor


def _graphs(model_dir: str, tmp: Path):
    """The graphs of a decoder exchanging keys and values: an existing export's (a folder holding
    manifest.json; it must be a kv export) or traced from a model folder."""
    from prism_onnx.exporters.bundle import Graphs

    if (Path(model_dir) / "manifest.json").is_file():
        g = Graphs.from_export(model_dir)
        if g.program.exchange != "kv":
            raise click.UsageError(f"{model_dir} exchanges {g.program.exchange} rows: generation needs kv")
        return g
    click.echo(f"tracing {model_dir} (key/value exchange)", err=True)
    g = export_graphs(models.load(model_dir), tmp / "graphs", exchange="kv")
    g.source = str(model_dir)
    return g


def _prompt(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(min(1000, vocab // 2), vocab, size=(1, n)).astype(np.int64)


def _emit(report: dict, json_path):
    click.echo(json.dumps(report, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))


@click.group()
def main():
    """Generation benchmarks (see the module docstring)."""


@main.command()
@click.option("--model", required=True, help="A decoder folder (benchmarks/random_model.py), or a kv export of one.")
@click.option("--seq-len", default=1024, show_default=True)
@click.option("--devices", default=2, show_default=True)
@click.option("--cr", default=128, show_default=True)
@click.option("--bandwidth", default="100mbit", show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def ttft(model, seq_len, devices, cr, bandwidth, repeats, json_path):
    from prism_onnx.runtime.cluster import LocalCluster
    from prism_onnx.testbed import Testbed

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir="out") as tmp:
        tmp = Path(tmp)
        g = _graphs(model, tmp)
        prompt = _prompt(g.spec.vocab_size, seq_len)
        report = {"model": model, "tokens": seq_len, "devices": devices, "compression_ratio": cr,
                  "bandwidth": bandwidth, "repeats": repeats, "ttft_ms": {}}
        for name, settings in (("prism", ExportSettings(devices=devices, compression_ratio=cr)),
                               ("single_device", ExportSettings(devices=1, compression_ratio=1))):
            b = write_bundles(g, tmp / name, settings, link=True)
            P = settings.devices
            with Testbed(P, rate=bandwidth) as net:
                pin = lambda k: [*net.prefix(k), "taskset", "-c", str(k % cores)]  # noqa: E731
                with LocalCluster(b, hosts=net.addresses, prefix=pin, timeout=120) as cluster:
                    cluster.client.timeout = 600
                    cfg = GenerationConfig(max_new_tokens=1)
                    cluster.client.generate(input_ids=prompt, config=cfg)  # warm-up
                    times = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        cluster.client.generate(input_ids=prompt, config=cfg)
                        times.append(1e3 * (time.perf_counter() - t0))
            report["ttft_ms"][name] = statistics.median(times)
            click.echo(f"{name}: time to first token {report['ttft_ms'][name]:.1f} ms (median of {repeats})", err=True)
        report["speedup"] = report["ttft_ms"]["single_device"] / report["ttft_ms"]["prism"]
    _emit(report, json_path)


def _ours_decode(bundle: Path, prompt: np.ndarray, new: int, repeats: int) -> float:
    ex = Executor(bundle, threads=1)
    cfg = GenerationConfig(max_new_tokens=new + 1, stop_token_ids=())
    ex.generate({"input_ids": prompt[:, :64]}, GenerationConfig(max_new_tokens=2, stop_token_ids=()))  # warm-up
    rates = [ex.generate({"input_ids": prompt}, cfg)[0].stats.decode_tokens_per_s for _ in range(repeats)]
    ex.close()
    return statistics.median(rates)


def _optimum_decode(model: str, prompt: np.ndarray, new: int, repeats: int, tmp: Path) -> float:
    """optimum-onnx's ORTModelForCausalLM (exported with its key/value cache), one thread: decoding rate
    from timing generate() with new + 1 tokens against 1 token (the prefill and first token) on the prompt."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    click.echo("exporting with optimum-onnx", err=True)
    m = ORTModelForCausalLM.from_pretrained(model, export=True, session_options=so)
    ids = torch.from_numpy(prompt)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n):
        t0 = time.perf_counter()
        out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == prompt.shape[1] + n
        return time.perf_counter() - t0

    run(2)  # warm-up
    rates = []
    for _ in range(repeats):
        one, many = run(1), run(new + 1)
        rates.append(new / (many - one))
    return statistics.median(rates)


@main.command()
@click.option("--model", required=True)
@click.option("--seq-len", default=1024, show_default=True)
@click.option("--new-tokens", default=64, show_default=True)
@click.option("--devices", default=2, show_default=True)
@click.option("--cr", default=128, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--core", default=1, show_default=True, help="The one core every decoder runs on.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def decode(model, seq_len, new_tokens, devices, cr, repeats, core, json_path):
    os.sched_setaffinity(0, {core})  # every decoder: one core, one onnxruntime thread
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir="out") as tmp:
        tmp = Path(tmp)
        g = _graphs(model, tmp)
        prompt = _prompt(g.spec.vocab_size, seq_len)
        rates = {}
        for name, settings in ((f"prism_tail_P{devices}_CR{cr}", ExportSettings(devices=devices, compression_ratio=cr)),
                               ("prism_one_device", ExportSettings(devices=1, compression_ratio=1))):
            b = write_bundles(g, tmp / name, settings, link=True)
            rates[name] = _ours_decode(b, prompt, new_tokens, repeats)
            click.echo(f"{name}: {rates[name]:.2f} tokens/s", err=True)
        rates["optimum_onnx"] = _optimum_decode(g.source, prompt, new_tokens, repeats, tmp)
        click.echo(f"optimum_onnx: {rates['optimum_onnx']:.2f} tokens/s", err=True)
    report = {"model": model, "prompt_tokens": seq_len, "new_tokens": new_tokens, "threads": 1, "core": core,
              "tokens_per_s": rates,
              "tail_vs_optimum": rates[f"prism_tail_P{devices}_CR{cr}"] / rates["optimum_onnx"],
              "one_device_vs_optimum": rates["prism_one_device"] / rates["optimum_onnx"]}
    _emit(report, json_path)


@main.command()
@click.option("--task", type=click.Choice(["wikitext", "wikitext-llama"]), default="wikitext", show_default=True)
@click.option("--devices", default="2,4", show_default=True)
@click.option("--cr", "crs", default="1,4,16,64,128", show_default=True)
@click.option("--window", default=256, show_default=True)
@click.option("--prefix", default=192, show_default=True, help="Tokens of each window prefilled over the devices.")
@click.option("--windows", default=32, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def perplexity(task, devices, crs, window, prefix, windows, json_path):
    import torch

    from prism_onnx.evaluate.evaluate import WikiTextLM
    from prism_onnx.runtime.preprocess import TextPreprocessor

    t = WikiTextLM(samples=windows, length=window, task=task)
    folder = Path(t.model_source())
    hf = models.load(str(folder))

    class Req:
        text = TextPreprocessor(folder / "tokenizer.json", window)

    data = np.concatenate([inputs["input_ids"] for inputs, _ in t.batches(Req)])  # [n, window]
    rest = data[:, prefix:]  # the continuations [n, window - prefix]
    with torch.no_grad():
        full = hf(input_ids=torch.from_numpy(data)).logits[:, prefix - 1:-1].double()  # predicts `rest`
    full_nll = float(torch.nn.functional.cross_entropy(full.flatten(0, 1), torch.from_numpy(rest).flatten()))
    report = {"task": task, "model": str(folder), "windows": len(data), "window": window, "prefix": prefix,
              "full_model": math.exp(full_nll), "rows": []}
    click.echo(f"{task}: full model perplexity of the continuations {report['full_model']:.3f}", err=True)
    with tempfile.TemporaryDirectory(dir="out") as tmp:
        tmp = Path(tmp)
        g = export_graphs(hf, tmp / "graphs", exchange="kv")
        g.source = str(folder)
        for P in map(int, devices.split(",")):
            for cr in map(int, crs.split(",")):
                b = write_bundles(g, tmp / f"P{P}-CR{cr}", ExportSettings(devices=P, compression_ratio=cr,
                                                                           max_seq_len=window), link=True)
                ex = Executor(b)
                nll, count = 0.0, 0
                for row in data:
                    inputs = {"input_ids": row[None, :prefix]}
                    token_inputs, plan = ex.requests.prepare(inputs)
                    collector, _ = ex.prefill(token_inputs, plan)
                    logits = continuation_logits(ex.program, ex.engines[-1], collector, row[None, prefix:],
                                                 plan.attention_mask, P - 1)[:, :-1].astype(np.float64)  # [1, T, V]
                    z = logits.max(-1, keepdims=True)
                    logz = np.log(np.exp(logits - z).sum(-1)) + z[..., 0]
                    nll += float((logz - np.take_along_axis(logits, row[None, prefix:, None], -1)[..., 0]).sum())
                    count += rest.shape[1]
                ex.close()
                ppl = math.exp(nll / count)
                report["rows"].append({"devices": P, "compression_ratio": cr, "perplexity": ppl,
                                       "delta": ppl - report["full_model"]})
                click.echo(f"P={P} CR={cr}: {ppl:.3f} ({ppl - report['full_model']:+.3f})", err=True)
    _emit(report, json_path)


if __name__ == "__main__":
    main()
