"""`Graphs`: a folder of exported graphs (+ preprocessing files), shared by all devices of one or more exports;
and the `GraphFile` entry of one graph file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..manifest import DEFAULT_OPSET, GraphFile, ModelSpec, Preprocessing, TensorInfo
from ..program import Program
from ..runtime.bundle import MANIFEST, read_manifest


@dataclass
class Graphs:
    """A folder of exported graphs (+ preprocessing files), shared by all devices of one or more exports.

    `made` says how the graphs came to be: {"traced": n, "substituted": n} (reuse.py) or {"cached": n};
    `digests` the sha256 of files whose content is known (write_bundles hashes the others)."""

    folder: Path
    spec: ModelSpec
    program: Program
    files: dict[str, GraphFile] = field(default_factory=dict)  # graph name -> file and its inputs/outputs
    preprocessing: Preprocessing = field(default_factory=lambda: Preprocessing("text"))
    quantize: str = "none"
    opset: int = DEFAULT_OPSET
    source: str = ""
    config_summary: dict = field(default_factory=dict)
    calibration: dict | None = None  # what `prism calibrate` did to the model these graphs come from
    block_size: int = 32  # int4: values per quantization block
    made: dict = field(default_factory=dict)
    digests: dict = field(default_factory=dict)  # file -> sha256, where known (the graph cache computed them)

    def path(self, name: str) -> Path:
        """The file of graph `name`."""
        return self.folder / self.files[name].file

    def graph_payload(self) -> list[str]:
        """Every graph file and external-data file, once each."""
        return list(dict.fromkeys(f for g in self.files.values() for f in g.files()))

    @classmethod
    def from_export(cls, export_dir: str | Path) -> "Graphs":
        """The graphs of an existing export (device-0's copy), to lay out bundles with other settings:
        the graphs do not depend on P, CR, the split or the wire precision."""
        root = Path(export_dir)
        m = read_manifest(root / MANIFEST)
        return cls(root / "device-0", m.model, m.program, dict(m.graphs), m.preprocessing, m.settings.quantize,
                   m.settings.opset, m.source, m.config_summary, m.calibration, m.settings.block_size)


def _tensor_info(v) -> TensorInfo:
    t = v.type.tensor_type
    return TensorInfo(v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                      tuple(d.dim_param or d.dim_value for d in t.shape.dim))


def graph_file(path: Path, model: onnx.ModelProto) -> GraphFile:
    """The manifest entry of graph `model` saved at `path`: inputs, outputs, external-data files, domains."""
    data = sorted({e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                   for e in t.external_data if e.key == "location"})
    domains = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    return GraphFile(path.name, tuple(_tensor_info(v) for v in model.graph.input),
                     tuple(_tensor_info(v) for v in model.graph.output), tuple(data), tuple(domains))
