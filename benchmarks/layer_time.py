"""Per-layer time: the exported ONNX layer graph on onnxruntime vs the same PyTorch module in eager mode.

Same shapes for both (one device's share of an N-token request), one thread each, runs interleaved so
that machine noise hits both alike; reports medians and their ratio.

    python benchmarks/layer_time.py --model sentence-transformers/all-MiniLM-L6-v2 --devices 4 --cr 8 --seq-len 256
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
import torch

from prism_onnx import models
from prism_onnx.exporters.bundle import export_graphs
from prism_onnx.manifest import PrismSettings
from prism_onnx.plan import plan_for
from prism_onnx.reference import prism_model


@click.command()
@click.option("--model", default="sentence-transformers/all-MiniLM-L6-v2", show_default=True)
@click.option("--devices", default=4, show_default=True)
@click.option("--cr", default=8, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--rank", default=1, show_default=True, help="Which device's shapes to time.")
@click.option("--repeats", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(model, devices, cr, seq_len, rank, repeats, as_json):
    torch.set_num_threads(1)
    hf = models.load(model)
    pm = prism_model(hf)
    spec = pm.spec
    plan = plan_for(spec, np.ones((1, seq_len), np.int64), PrismSettings(devices, cr))
    s, e = plan.span(rank)
    n, R = e - s, plan.remote_counts(rank).shape[1]
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((1, spec.kv_heads, n, spec.head_dim)).astype(np.float32)
    values = {"value:hidden": rng.standard_normal((1, n, spec.hidden_size)).astype(np.float32), "value:k": kv,
              "value:v": kv, "recv:": rng.standard_normal((1, R, spec.row_width)).astype(np.float32),
              "plan:local_bias": plan.local_bias(rank), "plan:remote_bias": plan.remote_bias(rank),
              "plan:averager": plan.averager(rank), "plan:position_ids": plan.position_ids(rank)}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_graphs(hf, Path(tmp))
        step_decl = next(st for st in graphs.program.steps if st.graph == "layer_0")
        feeds = {k: values[ref if not ref.startswith("recv:") else "recv:"] for k, ref in step_decl.inputs.items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        sess = ort.InferenceSession(str(graphs.path("layer_0")), opts, providers=["CPUExecutionProvider"])
        step = pm.step_modules()["layer_0"]
        targs = [torch.from_numpy(v) for v in feeds.values()]
        t_ort, t_torch = [], []
        with torch.no_grad():
            for _ in range(5):  # warm-up
                sess.run(None, feeds)
                step(*targs)
            for _ in range(repeats):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                t_ort.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                step(*targs)
                t_torch.append(time.perf_counter() - t0)
            diff = float(np.abs(sess.run(None, feeds)[0] - step(*targs)[0].numpy()).max())
    r = {"model": model, "devices": devices, "cr": cr, "seq_len": seq_len, "rank": rank,
         "shapes": {k: list(v.shape) for k, v in feeds.items()}, "repeats": repeats, "threads": 1,
         "onnxruntime_ms": 1e3 * statistics.median(t_ort), "pytorch_eager_ms": 1e3 * statistics.median(t_torch),
         "max_abs_diff": diff}
    r["ratio_ort_over_torch"] = r["onnxruntime_ms"] / r["pytorch_eager_ms"]
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
        click.echo(f"{model} layer_0 on device {rank} of {devices} (N={seq_len}, CR={cr}): shapes {r['shapes']}")
        click.echo(f"  onnxruntime {r['onnxruntime_ms']:.3f} ms, PyTorch eager {r['pytorch_eager_ms']:.3f} ms "
                   f"(median of {repeats}, 1 thread): ratio {r['ratio_ort_over_torch']:.2f}; max |diff| {diff:.2g}")


if __name__ == "__main__":
    main()
