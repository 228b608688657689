"""Trace the PRISM step modules (prism.py) into ONNX graphs with dynamic batch, token and row axes.

One graph per step, identical on every device (the split is a run-time input, not baked in):
    embed        token inputs [B, n], position_ids [n], averager [B, S, n]   -> hidden [B, n, D], means [B, S, D]
    layer_i      hidden, remote [B, R, D], local_bias [B, n], remote_bias [B, R], averager
                                                                               -> hidden_out, means (not last layer)
    token_head   hidden [B, n, D]                                            -> per-token outputs
    pooled_head  first [B, D] (token 0 on device 0)                          -> pooled outputs
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from ..models import PrismModel, family

DEFAULT_OPSET = 20
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


def graph_specs(pm: PrismModel) -> list[GraphSpec]:
    """Every graph a device bundle holds, with the trace inputs and dynamic axes of each."""
    spec = pm.spec
    D = spec.hidden_size
    batch, tokens, remote, seg = Dim("batch"), Dim("tokens"), Dim("remote_rows"), Dim("segments")
    token_inputs = family(spec.model_type).example_inputs(spec, _B, _N)
    token_axes = {name: {0: batch, 1: tokens} for name in spec.embed_inputs}
    averager = torch.rand(_B, _S, _N)
    specs = [GraphSpec(
        "embed", pm.embed_step(),
        (*[token_inputs[k] for k in spec.embed_inputs], torch.arange(3, 3 + _N), averager),
        [*spec.embed_inputs, "position_ids", "averager"], ["hidden", "means"],
        {**token_axes, "position_ids": {0: tokens}, "averager": {0: batch, 1: seg, 2: tokens}},
    )]
    for i in range(spec.num_layers):
        step = pm.layer_step(i)
        last = step.next_block is None
        args = (torch.randn(_B, _N, D), torch.randn(_B, _R, D), torch.zeros(_B, _N), torch.zeros(_B, _R))
        names = ["hidden", "remote", "local_bias", "remote_bias"]
        dyn = {"hidden": {0: batch, 1: tokens}, "remote": {0: batch, 1: remote}, "local_bias": {0: batch, 1: tokens},
               "remote_bias": {0: batch, 1: remote}}
        if not last:
            args, names = (*args, averager), [*names, "averager"]
            dyn["averager"] = {0: batch, 1: seg, 2: tokens}
        specs.append(GraphSpec(f"layer_{i}", step, args, names, ["hidden_out"] + ([] if last else ["means"]), dyn))
    if pm.token_head is not None:
        specs.append(GraphSpec("token_head", pm.token_head, (torch.randn(_B, _N, D),), ["hidden"],
                               list(spec.token_outputs), {"hidden": {0: batch, 1: tokens}}))
    if pm.pooled_head is not None:
        specs.append(GraphSpec("pooled_head", pm.pooled_head, (torch.randn(_B, D),), ["first"],
                               list(spec.pooled_outputs), {"first": {0: batch}}))
    return specs


def export_graph(g: GraphSpec, path: Path, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """torch.onnx (dynamo) export of one step; checked with onnx's full checker (types and shapes)."""
    dynamic_shapes = tuple(g.dynamic.get(name, {}) for name in g.input_names)
    if g.name == "embed":  # EmbedStep.forward(*args): torch.export sees one tuple argument
        dynamic_shapes = (dynamic_shapes,)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            g.module, g.args, dynamo=True, input_names=g.input_names, output_names=g.output_names,
            dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, verbose=False,
        )
    model = program.model_proto
    model.doc_string = f"prism-onnx {g.name}"
    foreign = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign or model.functions:
        raise RuntimeError(f"{g.name}: graph uses non-standard domains {foreign} or local functions")
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return model
