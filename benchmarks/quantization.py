"""int8 weight quantization: per-tensor vs per-channel scales, against the fp32 bundle's reference.

Exports the model once, quantizes the graphs both ways with onnxruntime.quantization, and reports the
bundle size and the cosine of every output row against `simulate` on SST-2 dev sentences.

    python benchmarks/quantization.py --model sentence-transformers/all-MiniLM-L6-v2 --samples 32
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import click

from prism_onnx import models
from prism_onnx.exporters.bundle import ExportSettings, export_graphs, quantize_int8, write_bundles
from prism_onnx.validate import validate


@click.command()
@click.option("--model", default="sentence-transformers/all-MiniLM-L6-v2", show_default=True)
@click.option("--devices", default=4, show_default=True)
@click.option("--cr", default=8, show_default=True)
@click.option("--samples", default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(model, devices, cr, samples, as_json):
    hf = models.load(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = export_graphs(hf, tmp / "fp32")
        fp32.source = model
        for name, per_channel in (("fp32", None), ("int8 per-tensor", False), ("int8 per-channel", True)):
            g = fp32
            if per_channel is not None:
                folder = tmp / name.replace(" ", "_")
                shutil.copytree(fp32.folder, folder)
                for f in fp32.files.values():
                    quantize_int8(fp32.folder / f, folder / f, per_channel=per_channel)
                g = type(fp32)(**{**fp32.__dict__, "folder": folder, "quantize": "int8"})
            out = write_bundles(g, tmp / f"bundle-{len(rows)}", ExportSettings(devices=devices, compression_ratio=cr))
            rep = validate(out, samples=samples)
            size = sum(f.stat().st_size for f in (out / "device-0").iterdir())
            rows.append({"variant": name, "device_bundle_mb": round(size / 1e6, 1), **{
                f"{o}_cosine_vs_simulate": {"mean": round(v["mean_cosine_vs_simulate"], 5),
                                            "min": round(v["min_cosine_vs_simulate"], 5)}
                for o, v in rep["outputs"].items()}})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(f"{model}, P={devices}, CR={cr}, {samples} SST-2 dev sentences")
        for r in rows:
            cos = "; ".join(f"{k.split('_cosine')[0]} cosine mean {v['mean']:.4f} min {v['min']:.4f}"
                            for k, v in r.items() if k.endswith("_simulate"))
            click.echo(f"  {r['variant']:<17} {r['device_bundle_mb']:6.1f} MB per device; {cos}")


if __name__ == "__main__":
    main()
