"""Weight quantization of exported graphs, with onnxruntime.quantization.

int8   dynamic int8 weights (quantize_dynamic), per channel: standard ONNX (MatMulInteger, DynamicQuantizeLinear,
       DequantizeLinear).
int4   4-bit weights in blocks of `block_size` values along the input axis, one float scale per block
       (symmetric: value = scale * (q - 8), q in 0..15): every MatMul with a constant weight becomes
       MatMulNBits (MatMulNBitsQuantizer), every embedding table [V, D] read by a Gather becomes
       GatherBlockQuantized over the same uint8 layout (quantized by the same library routine, along D, per
       row), so a head tied to the embedding holds byte-identical weights and tied.py stores them once.
       Both ops are onnxruntime contrib ops (domain com.microsoft, recorded per graph in the manifest) with
       fast ARM and x86 kernels. `accuracy_level` 4 lets MatMulNBits compute with int8 activations (its
       fastest kernels); 0 dequantizes to float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

INT4_OPS = {"MatMulNBits", "GatherBlockQuantized"}
MS_DOMAIN = "com.microsoft"


def quantize_int8(src: Path | onnx.ModelProto, dst: Path, per_channel: bool = True) -> None:
    """Dynamic int8 weight quantization with onnxruntime.quantization (MatMul/Gemm/Gather weights).

    Per-channel scales: on MiniLM, per-tensor scales gave a mean token cosine of 0.957 against fp32,
    per-channel 0.993 (measured by benchmarks/quantization.py).
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # "consider pre-processing"
    quantize_dynamic(src if isinstance(src, onnx.ModelProto) else str(src), str(dst), weight_type=QuantType.QInt8,
                     per_channel=per_channel)
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)


def _quantizer(block_size: int, symmetric: bool, accuracy_level: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    return DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                        accuracy_level=accuracy_level or None, op_types_to_quantize=("MatMul",))


def quantize_tables(proto: onnx.ModelProto, block_size: int, symmetric: bool) -> int:
    """Every Gather of a constant 2-D float table [V, D] -> GatherBlockQuantized of the table quantized as
    MatMulNBits quantizes a weight [K=D, N=V] (uint8 [V, D/2], scales [V, D/block_size]). -> tables done."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    quant = DefaultWeightOnlyQuantizer(_quantizer(block_size, symmetric, 0))
    inits = {t.name: t for t in proto.graph.initializer}
    done = 0
    for i, node in enumerate(list(proto.graph.node)):
        t = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if t is None or len(t.dims) != 2 or axis != 0 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        table = numpy_helper.to_array(t)
        packed, scales, zero_points = quant.qbits_block_quant(np.ascontiguousarray(table.T))
        V, D = table.shape
        data = packed.reshape(V, -1)[:, :(D + 1) // 2]  # a pure reshape when block_size divides D
        extra = [numpy_helper.from_array(np.ascontiguousarray(data), f"{t.name}_Q4"),
                 numpy_helper.from_array(scales, f"{t.name}_scales")]
        if not symmetric:
            extra.append(numpy_helper.from_array(zero_points, f"{t.name}_zero_points"))
        proto.graph.initializer.extend(extra)
        gbq = helper.make_node("GatherBlockQuantized", [extra[0].name, node.input[1], extra[1].name] +
                               [e.name for e in extra[2:]], list(node.output), name=f"{node.name}_Q4",
                               domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=block_size, bits=4)
        proto.graph.node.remove(node)
        proto.graph.node.insert(i, gbq)
        if not any(t.name in n.input for n in proto.graph.node):
            proto.graph.initializer.remove(inits.pop(t.name))
        done += 1
    if done and not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done


def quantize_int4(proto: onnx.ModelProto, block_size: int = 32, symmetric: bool = True,
                  accuracy_level: int = 4) -> onnx.ModelProto:
    """int4 weights (module docstring): embedding tables, then every MatMul with a constant weight."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # per node
    quantize_tables(proto, block_size, symmetric)
    q = MatMulNBitsQuantizer(proto, algo_config=_quantizer(block_size, symmetric, accuracy_level))
    q.process()
    out = q.model.model
    check_domains(out, INT4_OPS)
    onnx.checker.check_model(out)  # structure; onnx has no schema for the contrib ops, onnxruntime checks them
    return out


def check_domains(proto: onnx.ModelProto, allowed_ops: set[str]) -> tuple[str, ...]:
    """The non-standard domains a quantized graph uses (only com.microsoft's `allowed_ops` may appear)."""
    foreign = {(n.domain, n.op_type) for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    stray = sorted(f"{d}.{op}" for d, op in foreign if d != MS_DOMAIN or op not in allowed_ops)
    if stray or proto.functions:
        raise RuntimeError(f"quantized graph uses unexpected operators {stray} or local functions")
    return tuple(sorted({d for d, _ in foreign}))
