"""FLOP counter (prism_onnx.evaluate.flops) against hand counts of a tiny exported BERT layer.

For hidden D, intermediate I, own tokens n, remote rows R, segments S and batch B, one layer computes
    linear        = 2B (n D^2 [Q] + 2 (n+R) D^2 [K, V] + n D^2 [O] + 2 n D I [FFN])
    attention     = 2B (2 n (n+R) D)          [Q K^T and P V over all heads]
    segment_means = 2B S n D                  [averager @ hidden_out; 0 in the last layer]
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from prism_onnx.evaluate.flops import CATEGORIES, concrete_shapes, graph_flops

D, I, LAYERS = 32, 64, 2
SHAPE_SETS = [dict(B=1, n=7, R=3, S=2), dict(B=2, n=16, R=5, S=4)]


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """{"fp32": {graph name: path}, "int8": {layer name: path}} of a tiny random BertModel, exported once."""
    import torch
    from transformers import BertConfig, BertModel

    from prism_onnx import models
    from prism_onnx.exporters.bundle import export_graphs, quantize_int8

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("flops")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=I,
                         max_position_embeddings=64, vocab_size=100)).save_pretrained(root / "bert")
    graphs = export_graphs(models.load(root / "bert"), root / "graphs")
    int8 = {}
    for name in ("layer_0", f"layer_{LAYERS - 1}"):
        int8[name] = root / f"{name}.int8.onnx"
        quantize_int8(graphs.path(name), int8[name])
    return {"fp32": {name: graphs.path(name) for name in graphs.files}, "int8": int8}


def layer_inputs(B, n, R, S, last=False) -> dict[str, list[int]]:
    shapes = {"hidden": [B, n, D], "remote": [B, R, D], "local_bias": [B, n], "remote_bias": [B, R]}
    return shapes if last else {**shapes, "averager": [B, S, n]}


def expected(B, n, R, S, last=False) -> dict[str, int]:
    return {
        "linear": 2 * B * (n * D * D + 2 * (n + R) * D * D + n * D * D + 2 * n * D * I),
        "attention": 2 * B * (2 * n * (n + R) * D),
        "segment_means": 0 if last else 2 * B * S * n * D,
    }


@pytest.mark.parametrize("dims", SHAPE_SETS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
@pytest.mark.parametrize("last", [False, True], ids=["layer_0", "last_layer"])
def test_layer_matches_hand_count(layers, dims, last):
    path = layers["fp32"][f"layer_{LAYERS - 1}" if last else "layer_0"]
    got = graph_flops(path, layer_inputs(**dims, last=last))
    assert {k: got["by_category"][k] for k in ("linear", "attention", "segment_means")} == expected(**dims, last=last)
    assert set(got["by_category"]) == set(CATEGORIES)
    assert got["by_category"]["other"] > 0
    assert got["total"] == sum(got["by_category"].values()) == sum(got["by_op"].values())
    assert got["by_op"]["MatMul"] == sum(expected(**dims, last=last).values())


@pytest.mark.parametrize("last", [False, True], ids=["layer_0", "last_layer"])
def test_int8_graph_has_the_same_matmul_flops(layers, last):
    name = f"layer_{LAYERS - 1}" if last else "layer_0"
    dims = SHAPE_SETS[1]
    fp32 = graph_flops(layers["fp32"][name], layer_inputs(**dims, last=last))
    int8 = graph_flops(layers["int8"][name], layer_inputs(**dims, last=last))
    assert int8["by_op"]["MatMulInteger"] == int8["by_category"]["linear"] == expected(**dims, last=last)["linear"]
    for k in ("linear", "attention", "segment_means"):
        assert int8["by_category"][k] == fp32["by_category"][k]
    assert int8["by_category"]["other"] > fp32["by_category"]["other"]  # activation quantization


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_inferred_shapes_equal_onnxruntime(layers, precision):
    """Every matmul and every costed elementwise output has the shape onnxruntime really produces."""
    path = layers[precision]["layer_0"]
    shapes_in = layer_inputs(**SHAPE_SETS[0])
    inferred = concrete_shapes(path, shapes_in)
    model = onnx.load(str(path))
    probe = [n.output[0] for n in model.graph.node
             if n.op_type in ("MatMul", "MatMulInteger", "Softmax", "LayerNormalization", "Gelu", "Add")]
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=x) for x in probe if x not in outputs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes_in.items()}
    actual = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    assert len(probe) > 10
    for name in probe:
        assert inferred[name] == actual[name].shape, name


def test_missing_input_shape_names_the_input(layers):
    shapes = layer_inputs(**SHAPE_SETS[0])
    del shapes["remote_bias"]
    with pytest.raises(ValueError, match="remote_bias"):
        graph_flops(layers["fp32"]["layer_0"], shapes)


def test_wrong_rank_names_the_input(layers):
    with pytest.raises(ValueError, match="'hidden'"):
        graph_flops(layers["fp32"]["layer_0"], {**layer_inputs(**SHAPE_SETS[0]), "hidden": [1, 7]})


def test_cost_model_on_a_hand_built_graph():
    """Gemm with transA, a constant-only node (free), Softmax at 5 and reductions per input element."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [6, 4], np.ones(24, np.float32))
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"]),  # [4, 6]
        helper.make_node("Mul", ["wt", "wt"], ["w2"]),  # constant-only: folded, free
        helper.make_node("Gemm", ["x", "w2"], ["y"], transA=1),  # x [4, m]: x^T [m, 4] @ [4, 6]
        helper.make_node("Softmax", ["y"], ["p"]),
        helper.make_node("ReduceSum", ["p"], ["s"], keepdims=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, "m"])],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    got = graph_flops(model, {"x": [4, 3]})
    assert got["by_op"] == {"Gemm": 2 * 3 * 4 * 6, "Softmax": 5 * 3 * 6, "ReduceSum": 3 * 6}
    assert got["by_category"] == {"linear": 144, "attention": 0, "segment_means": 0, "other": 90 + 18}
    assert list(model.graph.input[0].type.tensor_type.shape.dim)[1].dim_param == "m"  # caller's proto untouched
