"""The paper's kind of table: bytes on the wire and per-device FLOPs of PRISM against uncompressed
position-wise partitioning (Voltage), for P in {2, 4, 8}, from any export (BERT-base, Llama-3.2-1B shapes).

Shapes only, no arithmetic: every device runs the export's own device program (prism_onnx.program) with a
backend that returns zero tensors of the shapes onnxruntime's shape inference gives each graph output, and
sends them through the runtime's real exchange (in memory, the network's wire encoding). So the bytes are
the exchange's own counters and the FLOPs are counted from the shapes of the calls each device made
(prism_onnx.evaluate.flops), at a memory cost of one graph proto at a time: a 1.2B-parameter model at P=8
fits on a 24 GB machine, where running it would need P copies of the weights.

Voltage: every device all-gathers the hidden states of all N tokens (float32) and projects keys and values
for all of them. For a family that exchanges hidden states this is the export's own program at CR=1 without
sinks (its identity averager is not counted). For a key/value family (Llama) the bytes are the hidden
states' (Plan at CR=1, D values per row: runtime.wire.baseline_bytes_per_layer) and the FLOPs are the CR=1
program's plus the projection of the received rows into keys and values, whose cost per row is read from
the embed graph (it projects layer 0's keys and values of the device's own tokens).

    python benchmarks/paper_table.py --export out/bench/bert-base-p2-cr128 --seq-len 512 --devices 2,4,8 --cr 128
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import click
import numpy as np

from prism_onnx.evaluate.bench import bench_inputs, cut
from prism_onnx.evaluate.flops import concrete_shapes, graph_flops, skeleton
from prism_onnx.exporters.bundle import Graphs, write_bundles
from prism_onnx.program import RequestStats, run_lockstep
from prism_onnx.runtime.bundle import MANIFEST, Export, read_manifest
from prism_onnx.runtime.device import Engine, Requests
from prism_onnx.runtime.exchange import LocalHub
from prism_onnx.runtime.wire import baseline_bytes_per_layer


@lru_cache(maxsize=None)
def _skeleton(digest: str, path: str):
    return skeleton(path)  # one per distinct file (bundles of every setting hard-link the same graphs)


@lru_cache(maxsize=None)
def _shapes(digest: str, path: str, shapes: tuple) -> dict:
    return concrete_shapes(_skeleton(digest, path), {k: list(v) for k, v in shapes})


@lru_cache(maxsize=None)
def _flops(digest: str, path: str, shapes: tuple) -> dict:
    return graph_flops(_skeleton(digest, path), {k: list(v) for k, v in shapes})["by_category"]


class ShapeBackend:
    """A device program backend that computes nothing: zero outputs of the inferred shapes; records the
    calls (graph, input shapes) for the FLOP count."""

    def __init__(self, bundle):
        self.bundle, self.calls = bundle, []
        self.outputs = {n: [t.name for t in g.outputs] for n, g in bundle.manifest.graphs.items()}
        self.dtypes = {n: [t.dtype for t in g.outputs] for n, g in bundle.manifest.graphs.items()}

    def key(self, graph: str) -> tuple[str, str]:
        m = self.bundle.manifest
        return m.files[m.graphs[graph].file], str(self.bundle.graph(graph))

    def run(self, graph: str, feeds: dict) -> list:
        shapes = tuple((k, tuple(np.shape(v))) for k, v in feeds.items())
        self.calls.append((graph, shapes))
        inferred = _shapes(*self.key(graph), shapes)
        return [np.zeros(inferred[n], dtype) for n, dtype in zip(self.outputs[graph], self.dtypes[graph])]

    def flops(self) -> dict:
        out: dict[str, int] = {}
        for graph, shapes in self.calls:
            for c, v in _flops(*self.key(graph), shapes).items():
                out[c] = out.get(c, 0) + v
        return out


def measure(bundle_dir: Path, inputs: dict, outputs) -> dict:
    """One request through every device of an export, shapes only: bytes (exchange counters) and FLOPs.
    The devices run in lockstep in this thread (program.run_lockstep: every point's rows are sent before
    any is gathered), so only one graph proto is in memory at a time."""
    export = Export.load(bundle_dir, verify=False)
    program = export.manifest.program
    token_inputs, plan = Requests(export.devices[0]).prepare(inputs)
    engine = Engine.__new__(Engine)  # only for exchange_kwargs: no sessions are created
    engine.manifest, engine.spec, engine.program = export.manifest, export.manifest.model, program
    hub = LocalHub(plan.devices, **Engine.exchange_kwargs(engine, timeout=600))
    backends = [ShapeBackend(b) for b in export.devices]
    want = set(outputs) if outputs else None
    results = run_lockstep(program, backends, plan, token_inputs, hub.endpoints, 1, want)
    for r in results:
        r.traffic = hub.endpoints[r.rank].finish(1)
    stats = RequestStats.of(results, plan)
    return {"bytes": sum(stats.bytes_sent), "by_category": [b.flops() for b in backends], "plan": plan,
            "backends": backends}


def kv_projection_flops_per_row(m: dict) -> list[float]:
    """Per device: the FLOPs of one token's keys and values for one layer (norm, projections, rotary), read
    from its embed call, which computes exactly that for the device's own tokens (the lookup is free)."""
    out = []
    for p, backend in enumerate(m["backends"]):
        graph, shapes = next(c for c in backend.calls if c[0] == "embed")
        cats = _flops(*backend.key(graph), shapes)
        s, e = m["plan"].span(p)
        out.append((sum(cats.values()) - cats["segment_means"]) / (e - s))
    return out


@click.command()
@click.option("--export", "export_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Any export of the model (its graphs are reused for every setting).")
@click.option("--seq-len", default=512, show_default=True)
@click.option("--devices", default="2,4,8", show_default=True)
@click.option("--cr", default=128, show_default=True)
@click.option("--wires", default="float32,int8", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(export_dir, seq_len, devices, cr, wires, json_path):
    graphs = Graphs.from_export(export_dir)
    m = read_manifest(Path(export_dir) / MANIFEST)
    spec = m.model
    inputs = bench_inputs(m, seq_len)
    outputs = list(spec.pooled_outputs) or None
    L = spec.num_layers
    rows = []
    with tempfile.TemporaryDirectory(dir=Path(export_dir).parent) as tmp:
        for P in map(int, devices.split(",")):
            mk = lambda name, s: write_bundles(graphs, Path(tmp) / f"{name}-{P}", s, link=True)  # noqa: E731
            settings = replace(m.settings, devices=P, split_weights=None, compression_ratio=cr)
            base = measure(mk("base", settings.baseline()), inputs, outputs)
            mask = base["plan"].attention_mask
            voltage_bytes = L * baseline_bytes_per_layer(spec, mask, settings)
            base_flops = [sum(v for k, v in c.items() if k != "segment_means") for c in base["by_category"]]
            base_linear = [c["linear"] for c in base["by_category"]]
            if spec.exchange == "kv":  # Voltage also projects the received hidden states to keys and values
                per_row = kv_projection_flops_per_row(base)
                extra = [L * r * base["plan"].remote_counts(p).shape[1] for p, r in enumerate(per_row)]
                base_flops = [f + x for f, x in zip(base_flops, extra)]
                base_linear = [f + x for f, x in zip(base_linear, extra)]
            for sinks in (False, True):
                for wire in wires.split(","):
                    p = measure(mk(f"p-{sinks}-{wire}", replace(settings, keep_sinks=sinks, wire_dtype=wire)),
                                inputs, outputs)
                    flops = [sum(c.values()) for c in p["by_category"]]
                    linear = [c["linear"] for c in p["by_category"]]
                    row = {"devices": P, "cr": cr, "sinks": sinks, "wire": wire, "tokens": seq_len,
                           "exchange": spec.exchange, "row_width": spec.row_width,
                           "bytes_prism": p["bytes"], "bytes_voltage": voltage_bytes,
                           "bytes_pct_of_voltage": 100 * p["bytes"] / voltage_bytes,
                           "gflops_busiest_prism": max(flops) / 1e9, "gflops_busiest_voltage": max(base_flops) / 1e9,
                           "flops_cut_pct": 100 * cut(max(flops), max(base_flops)),
                           "linear_cut_pct": 100 * cut(max(linear), max(base_linear))}
                    rows.append(row)
                    click.echo(f"P={P} CR={cr} sinks={'on' if sinks else 'off'} wire={wire}: bytes "
                               f"{row['bytes_pct_of_voltage']:.3f}% of Voltage ({p['bytes']:,} vs {voltage_bytes:,}); "
                               f"busiest device {row['gflops_busiest_prism']:.1f} vs "
                               f"{row['gflops_busiest_voltage']:.1f} GFLOPs: cut {row['flops_cut_pct']:.1f}% "
                               f"(linear {row['linear_cut_pct']:.1f}%)")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
