"""Trace the steps of the device program (prism_onnx.program) into ONNX graphs with dynamic axes.

One graph per step, identical on every device (the split is a run-time input, not baked in). A graph's
inputs and outputs are named as its step declares them; example tensors and dynamic axes come from the
references' vocabulary (program.py), so the program stays the one statement of what feeds what.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from ..manifest import DEFAULT_OPSET
from ..models import PrismModel, family
from ..program import Program, Step, split_ref

# trace sizes: distinct and >= 2 so that torch.export keeps every axis symbolic
_B, _N, _R, _S = 2, 7, 3, 5


@dataclass(frozen=True)
class GraphSpec:
    name: str  # file stem: embed, layer_0, ..., token_head, pooled_head
    module: torch.nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic: dict  # input name -> {axis: Dim}


class _Axes:
    batch, tokens, remote, segments = Dim("batch"), Dim("tokens"), Dim("remote_rows"), Dim("segments")


def example(ref: str, pm: PrismModel, token_inputs: dict) -> tuple[torch.Tensor, dict]:
    """(example tensor, dynamic axes) for a step input reference."""
    spec, a = pm.spec, _Axes
    kind, name = split_ref(ref)
    if kind == "input":
        return token_inputs[name], {0: a.batch, 1: a.tokens}
    if kind == "plan":
        return {
            "position_ids": (torch.arange(3, 3 + _N).repeat(_B, 1), {0: a.batch, 1: a.tokens}),
            "averager": (torch.rand(_B, _S, _N), {0: a.batch, 1: a.segments, 2: a.tokens}),
            "local_bias": (torch.zeros(_B, _N), {0: a.batch, 1: a.tokens}),
            "remote_bias": (torch.zeros(_B, _R), {0: a.batch, 1: a.remote}),
        }[name]
    if kind == "value":
        if name == "hidden":
            return torch.randn(_B, _N, spec.hidden_size), {0: a.batch, 1: a.tokens}
        return torch.randn(_B, spec.kv_heads, _N, spec.head_dim), {0: a.batch, 2: a.tokens}  # k, v
    if kind == "recv":
        return torch.randn(_B, _R, spec.row_width), {0: a.batch, 1: a.remote}
    if kind == "first":
        return torch.randn(_B, spec.hidden_size), {0: a.batch}
    raise ValueError(f"no example for reference {ref!r}")


def graph_specs(pm: PrismModel, program: Program) -> list[GraphSpec]:
    """Every graph a device bundle holds, with the trace inputs and dynamic axes of each."""
    modules = pm.step_modules()
    token_inputs = family(pm.spec.model_type).example_inputs(pm.spec, _B, _N)
    specs = []
    for step in program.steps:
        examples = [example(ref, pm, token_inputs) for ref in step.inputs.values()]
        specs.append(GraphSpec(step.graph, modules[step.graph], tuple(t for t, _ in examples), list(step.inputs),
                               list(step.outputs), {n: axes for n, (_, axes) in zip(step.inputs, examples)}))
    return specs


def trace_graph(g: GraphSpec, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """torch.onnx (dynamo) export of one step; checked with onnx's full checker (types and shapes) and
    refused if it uses anything but standard ONNX operators."""
    dynamic_shapes = tuple(g.dynamic.get(name, {}) for name in g.input_names)
    params = inspect.signature(g.module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):  # forward(*args): one tuple argument
        dynamic_shapes = (dynamic_shapes,)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            g.module, g.args, dynamo=True, input_names=g.input_names, output_names=g.output_names,
            dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, verbose=False,
        )
    model = program.model_proto
    model.doc_string = f"prism-onnx {g.name}"
    got = [v.name for v in model.graph.input]
    if got != g.input_names or [v.name for v in model.graph.output] != g.output_names:
        raise RuntimeError(f"{g.name}: traced graph has inputs {got}, the program declares {g.input_names}")
    foreign = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign or model.functions:
        raise RuntimeError(f"{g.name}: graph uses non-standard domains {foreign} or local functions")
    onnx.checker.check_model(model, full_check=True)
    return model


def export_graph(g: GraphSpec, path: Path, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """trace_graph, saved to `path`."""
    model = trace_graph(g, opset)
    onnx.save_model(model, str(path))
    return model


__all__ = ["GraphSpec", "Step", "export_graph", "graph_specs", "trace_graph"]
