"""The paper's kind of table on a BERT-base shape: bytes on the wire and per-device FLOPs of PRISM against
uncompressed position-wise partitioning (CR=1, Voltage), for P in {2, 4, 8} at N=512.

Bytes are the runtime's counters (in-process executor, the same wire encoding as the network); FLOPs
come from the graph shapes of the calls each device made (prism_onnx.evaluate.flops). Random weights:
neither number depends on them.

    python benchmarks/paper_table.py --export out/bench/bert-p2-cr128 --json out/bench/paper_table.json
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from dataclasses import replace

from prism_onnx.evaluate.bench import bench_inputs, cut, device_work
from prism_onnx.exporters.bundle import Graphs, write_bundles
from prism_onnx.runtime.bundle import MANIFEST, read_manifest
from prism_onnx.runtime.executor import Executor


def measure(bundle: Path, inputs: dict, outputs, count_means: bool) -> dict:
    ex = Executor(bundle)
    res = ex.run(inputs, outputs)
    work = device_work(ex, inputs, outputs, repeats=0, count_means=count_means)
    ex.close()
    return {"bytes": sum(res.stats.bytes_sent), "flops": [w["flops"] for w in work],
            "linear": [w["by_category"]["linear"] for w in work], "linear_alone": [w["linear_alone"] for w in work]}


@click.command()
@click.option("--export", "export_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Any export of the model (its graphs are reused for every setting).")
@click.option("--seq-len", default=512, show_default=True)
@click.option("--devices", default="2,4,8", show_default=True)
@click.option("--cr", default=128, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(export_dir, seq_len, devices, cr, json_path):
    graphs = Graphs.from_export(export_dir)
    m = read_manifest(Path(export_dir) / MANIFEST)
    inputs = bench_inputs(m, seq_len)
    outputs = list(m.model.pooled_outputs) or None
    rows = []
    with tempfile.TemporaryDirectory(dir=Path(export_dir).parent) as tmp:
        for P in map(int, devices.split(",")):
            mk = lambda name, **kw: write_bundles(graphs, Path(tmp) / f"{name}-{P}", replace(  # noqa: E731
                m.settings, devices=P, split_weights=None, **kw), link=True)
            base = measure(mk("base", compression_ratio=1, keep_sinks=False, wire_dtype="float32"), inputs, outputs,
                           count_means=False)
            for sinks in (False, True):
                for wire in ("float32", "int8"):
                    p = measure(mk(f"p-{sinks}-{wire}", compression_ratio=cr, keep_sinks=sinks, wire_dtype=wire),
                                inputs, outputs, count_means=True)
                    row = {"devices": P, "cr": cr, "sinks": sinks, "wire": wire, "tokens": seq_len,
                           "bytes_prism": p["bytes"], "bytes_baseline": base["bytes"],
                           "bytes_pct_of_baseline": 100 * p["bytes"] / base["bytes"],
                           "gflops_busiest_prism": max(p["flops"]) / 1e9, "gflops_busiest_baseline": max(base["flops"]) / 1e9,
                           "flops_cut_pct": 100 * cut(max(p["flops"]), max(base["flops"])),
                           "linear_cut_pct": 100 * cut(max(p["linear"]), max(base["linear"])),
                           "linear_bound_pct": 100 * cut(max(p["linear_alone"]), max(base["linear"]))}
                    rows.append(row)
                    click.echo(f"P={P} CR={cr} sinks={'on' if sinks else 'off'} wire={wire}: bytes "
                               f"{row['bytes_pct_of_baseline']:.3f}% of baseline ({p['bytes']:,} vs {base['bytes']:,}); "
                               f"FLOPs cut {row['flops_cut_pct']:.1f}% (linear {row['linear_cut_pct']:.1f}%, "
                               f"bound {row['linear_bound_pct']:.1f}%)")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
