"""Floating-point operation counts of an ONNX graph at concrete input shapes, from the graph alone (no timing).

The graph's dynamic input dims are fixed to the given values and onnxruntime's symbolic shape inference
propagates them to every tensor (it also follows shape arithmetic such as Shape -> Concat -> Reshape and
Range, which onnx's own data propagation misses in the GPT-2 graphs).

Cost model (one multiply-add = 2 FLOPs):
  * MatMul, MatMulInteger, QLinearMatMul, Gemm: 2 * K per output element, i.e. 2 * batch * M * K * N.
    Integer matmuls count the same as float ones; zero-point subtraction, Gemm's alpha/beta and bias
    addition are neglected (O(M*N) against O(M*K*N)).
  * every other op: FLOPS_PER_ELEMENT[op] (default 1) per element of its first output, except reductions
    (Reduce*), which touch each input element once: one FLOP per input element.
  * FREE ops (shape, indexing, layout, type casts) cost nothing, nor does any node whose inputs are all
    constant (initializers, Constant outputs and what is computed from them alone): onnxruntime folds
    those once at session creation, e.g. the DequantizeLinear/Transpose of a weight.
Nodes inside control-flow subgraphs (If, Loop, Scan) are not counted; PRISM's graphs have none.

Categories:
  * linear: a matmul with an operand that is constant (a weight, possibly through DequantizeLinear,
    Transpose, ...).
  * segment_means: a matmul reading the graph input AVERAGER directly ([B, S, n] @ [B, n, D]).
  * attention: any other matmul, i.e. between two activations (Q K^T and P V).
  * other: every non-matmul op.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import onnx
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

AVERAGER = "averager"
CATEGORIES = ("linear", "attention", "segment_means", "other")
# op -> positions of the two matrix operands
MATMULS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "Gemm": (0, 1), "QLinearMatMul": (0, 3)}
FREE = frozenset({
    "Shape", "Size", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice",
    "Gather", "GatherElements", "GatherND", "Expand", "Tile", "Pad", "Identity", "Cast", "CastLike",
    "Constant", "ConstantOfShape", "Range",
})
FLOPS_PER_ELEMENT = {
    "Softmax": 5,  # max, subtract, exp, sum, divide
    "LogSoftmax": 5,  # max, subtract, exp, sum, log-subtract
    "LayerNormalization": 8,  # mean, subtract, square, variance sum, rsqrt-multiply, scale, shift, + eps/rsqrt
    "Gelu": 8,  # 0.5 * x * (1 + erf(x / sqrt 2)): divide, erf (~4), add, two multiplies
    "DynamicQuantizeLinear": 4,  # min, max, divide by scale, round/saturate
    "QuantizeLinear": 2,  # divide by scale, add zero point
    "DequantizeLinear": 2,  # subtract zero point, multiply by scale
}


def graph_flops(model_or_path, input_shapes: dict[str, list[int]]) -> dict:
    """FLOPs of one run of the graph with these input shapes.

    Returns {"total": int, "by_category": {category: int} for CATEGORIES, "by_op": {op_type: int}}
    (by_op lists only ops that cost something). `input_shapes` must give every graph input that has a
    dynamic dim; fully static inputs may be left out and names the graph does not have are ignored.
    """
    model = _load(model_or_path)
    shapes = concrete_shapes(model, input_shapes)
    const = constant_tensors(model.graph)
    by_category = dict.fromkeys(CATEGORIES, 0)
    by_op: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        if all(i in const for i in node.input if i):
            continue
        flops = node_flops(node, shapes)
        if flops:
            by_category[node_category(node, const)] += flops
            by_op[node.op_type] += flops
    return {"total": sum(by_category.values()), "by_category": by_category, "by_op": dict(by_op)}


def concrete_shapes(model_or_path, input_shapes: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} for every tensor of the graph once its inputs have `input_shapes`."""
    model = _load(model_or_path)
    _fix_inputs(model.graph, input_shapes)
    del model.graph.value_info[:]  # the exporter's entries carry symbolic dims; infer afresh
    try:
        inferred = SymbolicShapeInference.infer_shapes(model)
    except Exception as e:  # the library raises a bare Exception when some shape stays unknown
        raise ValueError(f"shape inference failed for input shapes {input_shapes}: {e}") from e
    g = inferred.graph
    shapes = {t.name: tuple(t.dims) for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = tuple(d.dim_value for d in dims)
    return shapes


def constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Initializers, Constant outputs, and every tensor computed from those alone (nodes are in
    topological order, as the ONNX spec requires)."""
    const = {t.name for t in graph.initializer}
    for node in graph.node:
        if all(i in const for i in node.input if i):
            const.update(o for o in node.output if o)
    return const


def node_category(node: onnx.NodeProto, const: set[str]) -> str:
    """The category of a node's FLOPs (see the module docstring)."""
    if node.op_type not in MATMULS:
        return "other"
    operands = [node.input[i] for i in MATMULS[node.op_type]]
    if any(x in const for x in operands):
        return "linear"
    return "segment_means" if AVERAGER in operands else "attention"


def node_flops(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    """FLOPs of one node under the cost model of the module docstring."""
    if node.op_type in FREE:
        return 0
    out = _shape(node.output[0], shapes)
    if node.op_type in MATMULS:
        a = _shape(node.input[MATMULS[node.op_type][0]], shapes)
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        k = a[0] if node.op_type == "Gemm" and trans_a else a[-1]
        return 2 * math.prod(out) * k
    if node.op_type.startswith("Reduce"):
        return math.prod(_shape(node.input[0], shapes))
    return FLOPS_PER_ELEMENT.get(node.op_type, 1) * math.prod(out)


def _shape(name: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """A tensor's inferred shape, or ValueError when shape inference left it unknown."""
    if name not in shapes:
        raise ValueError(f"no concrete shape inferred for tensor '{name}'")
    return shapes[name]


def skeleton(path, keep: int = 4096) -> onnx.ModelProto:
    """A graph without its weights' values: initializers above `keep` elements keep their dims and dtype but
    no data. Shape inference and the FLOP count need nothing more, and a 1 GB graph becomes kilobytes."""
    model = onnx.load(os.fspath(path), load_external_data=False)  # external data: tables, never shape values
    for t in model.graph.initializer:
        if math.prod(t.dims) > keep or t.data_location == onnx.TensorProto.EXTERNAL:
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(f)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    # a fresh message: the loaded one keeps the weights' memory in its arena even with the fields cleared
    return onnx.ModelProto.FromString(model.SerializeToString())


def _load(model_or_path) -> onnx.ModelProto:
    """A private copy of the model (callers' protos are never modified)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        from ..exporters.tied import load_graph  # external data too, even hard-linked (onnx.load refuses it)

        return load_graph(model_or_path)
    model = onnx.ModelProto()
    model.CopyFrom(model_or_path)
    return model


def _fix_inputs(graph: onnx.GraphProto, input_shapes: dict[str, list[int]]) -> None:
    """Replace the dims of the graph inputs by the given values, checking rank and static dims."""
    weights = {t.name for t in graph.initializer}
    for v in graph.input:
        if v.name in weights:
            continue
        dims = v.type.tensor_type.shape.dim
        if v.name not in input_shapes:
            if all(d.HasField("dim_value") for d in dims):
                continue
            raise ValueError(f"no shape given for graph input '{v.name}' "
                             f"(dims {[d.dim_param or d.dim_value for d in dims]})")
        given = list(input_shapes[v.name])
        if len(given) != len(dims) or any(x < 0 for x in given):
            raise ValueError(f"input '{v.name}': shape {given} does not fit rank {len(dims)}")
        for d, x in zip(dims, given):
            if d.HasField("dim_value") and d.dim_value != x:
                raise ValueError(f"input '{v.name}': shape {given} contradicts the graph's static dim {d.dim_value}")
            d.dim_value = x
