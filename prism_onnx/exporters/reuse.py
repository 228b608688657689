"""Export speed: the layer graphs of a model are one graph with different weights, so one layer is traced and
the others are made from it by putting their own weights into its initializers (tracing a SmolLM2 layer
takes ~6 s; substituting one ~0.3 s).

Why this is safe:
  * Layers are grouped by structure (`structure`): the same module types and non-tensor attributes (heads,
    eps, scale...), parameter names, shapes and dtypes, and equal buffers (rotary frequencies). The last
    layer of the device program sends nothing (fewer outputs) and so forms a group of its own, traced.
  * A group's template is traced from a copy of its first layer whose parameters were replaced by distinct
    random values: the exporter's optimizer then cannot merge or fold parameters that happen to be equal (the
    RMSNorm weights of ones of a fresh model are merged into one initializer otherwise), and every
    initializer of the traced graph matches at most one parameter, by value: the same values (any shape) or,
    for 2-D weights, their transpose (the exporter folds nn.Linear's transpose into the initializer).
    Initializers that match no parameter are constants of the structure (shapes, axes, rotary tables).
  * Every graph made from a template is run under onnxruntime on the trace inputs and compared with its
    PyTorch step module (max |diff| <= CHECK_RTOL x the output's max |value|); a layer that does not match
    is traced instead, so a wrong substitution can only cost time.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .graphs import GraphSpec, trace_graph

CHECK_RTOL = 1e-4  # float32 kernels in another order: ~1e-6 of the output's magnitude for one layer


def structure(module: torch.nn.Module) -> tuple:
    """What decides a step module's traced graph besides its parameter values (see the module docstring)."""
    mods = tuple((name, type(m).__qualname__, tuple(sorted(
        (k, v) for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, (bool, int, float, str)))))
        for name, m in module.named_modules())
    params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters())
    buffers = tuple((n, tuple(b.shape), str(b.dtype)) for n, b in module.named_buffers())
    return mods, params, buffers


def same_buffers(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for (_, x), (_, y) in zip(a.named_buffers(), b.named_buffers()))


def _digest(a: np.ndarray) -> tuple:
    return a.dtype.str, a.size, hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@dataclass
class Source:
    """Where one initializer of a template comes from: parameter `param`, transposed or not, in `shape`."""

    param: str
    transposed: bool
    shape: tuple


class LayerTemplate:
    """A traced layer graph whose weight initializers are emptied and mapped to parameter names."""

    def __init__(self, proto: onnx.ModelProto, sources: dict[str, Source], module: torch.nn.Module):
        self.proto, self.sources, self.module = proto, sources, module

    @classmethod
    def trace(cls, g: GraphSpec, opset: int, seed: int = 0) -> "LayerTemplate | None":
        """The template of layer graph `g` (traced from a copy with random parameters); None when an
        initializer matches several parameters (then the layers are traced one by one)."""
        module = copy.deepcopy(g.module)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
        proto = trace_graph(replace(g, module=module), opset)
        index: dict[tuple, list[tuple[str, bool]]] = {}
        for name, p in module.named_parameters():
            a = p.detach().numpy()
            index.setdefault(_digest(a), []).append((name, False))
            if a.ndim == 2 and min(a.shape) > 1:
                index.setdefault(_digest(a.T), []).append((name, True))
        sources = {}
        for init in proto.graph.initializer:
            arr = numpy_helper.to_array(init)
            hits = index.get(_digest(arr), [])
            if len(hits) > 1:
                return None
            if hits:
                sources[init.name] = Source(hits[0][0], hits[0][1], tuple(arr.shape))
                init.ClearField("raw_data")  # filled per layer
        return cls(proto, sources, g.module)

    def fits(self, module: torch.nn.Module) -> bool:
        return structure(module) == structure(self.module) and same_buffers(module, self.module)

    def instantiate(self, g: GraphSpec) -> onnx.ModelProto:
        """The graph of layer step `g`: the template with g's parameters."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        params = dict(g.module.named_parameters())
        for init in proto.graph.initializer:
            src = self.sources.get(init.name)
            if src is not None:
                a = params[src.param].detach().numpy()
                a = np.ascontiguousarray(a.T if src.transposed else a).reshape(src.shape)
                init.CopyFrom(numpy_helper.from_array(a, init.name))
        proto.doc_string = f"prism-onnx {g.name}"
        return proto


def agrees(proto: onnx.ModelProto, g: GraphSpec, rtol: float = CHECK_RTOL) -> bool:
    """Whether graph `proto` computes what step module g.module does on g's trace inputs (onnxruntime vs
    PyTorch eager): max |diff| <= rtol x max |value| for every output."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {n: a.numpy() for n, a in zip(g.input_names, g.args)})
    with torch.no_grad():
        want = g.module(*g.args)
    want = want if isinstance(want, tuple) else (want,)
    for a, b in zip(got, want):
        b = b.numpy()
        if a.shape != b.shape or not np.isfinite(a).all():
            return False
        if float(np.abs(a - b).max(initial=0.0)) > rtol * max(float(np.abs(b).max(initial=0.0)), 1e-30):
            return False
    return True


class LayerGraphs:
    """Graphs of the layer steps of one export: each traced once per structure, then substituted.

    `graph(g)` returns g's graph; `counts` tallies the traces (templates included) and the substitutions."""

    def __init__(self, specs: list[GraphSpec], opset: int):
        self.opset = opset
        layers = [g for g in specs if g.name.startswith("layer_")]
        keys = [structure(g.module) for g in layers]
        self.group_size = {k: keys.count(k) for k in keys}
        self.templates: dict[tuple, LayerTemplate | None] = {}
        self.counts = {"traced": 0, "substituted": 0}

    def graph(self, g: GraphSpec) -> onnx.ModelProto:
        key = structure(g.module) if g.name.startswith("layer_") else None
        if key is None or self.group_size.get(key, 0) < 2:
            return self._trace(g)
        if key not in self.templates:
            self.counts["traced"] += 1  # the template: one trace for the whole group
            self.templates[key] = LayerTemplate.trace(g, self.opset)
        t = self.templates[key]
        if t is not None and t.fits(g.module):
            proto = t.instantiate(g)
            if agrees(proto, g):
                self.counts["substituted"] += 1
                return proto
            self.templates[key] = None  # the template does not hold for this model: trace the rest
        return self._trace(g)

    def _trace(self, g: GraphSpec) -> onnx.ModelProto:
        self.counts["traced"] += 1
        return trace_graph(g, self.opset)
