"""Weight quantization of exported graphs, with onnxruntime.quantization.

int8   dynamic int8 weights (quantize_dynamic), per channel: standard ONNX (MatMulInteger, DynamicQuantizeLinear,
       DequantizeLinear).
int4   blocks of `block_size` weights along the input axis, each with its own scale and zero point, run by
       onnxruntime's contrib ops (domain com.microsoft, recorded per graph in the manifest; fast ARM and x86
       kernels):
         * every MatMul with a constant weight in the embed and layer graphs: 4 bits (MatMulNBits), quantized
           by onnxruntime's HQQ quantizer (half-quadratic: data-free, a zero point per block fitted to the
           weights). HQQ's zero points are floats, which MatMulNBits only runs on a slow path (~3 tokens/s
           against ~25 on SmolLM2), so each is stored as the nearest integer zero point plus a float
           correction per block: W = s (q - z) = s (q - round(z)) - s (z - round(z)), and the last term is
           x's sums over each block times a [K/block_size, N] matrix (`integer_zero_points`; exact).
         * embedding tables read by a Gather and the head graphs' weights: 8 bits in blocks (RTN, symmetric;
           GatherBlockQuantized and MatMulNBits over one uint8 layout, so a head tied to the embedding holds
           byte-identical weights and tied.py stores them once). The embedding and the language-model head
           are where 4 bits cost most (they touch every token's logits) and 8 bits cost nothing measurable.
       `accuracy_level` 4: MatMulNBits multiplies with int8 activations (its fastest kernels).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
from onnx import helper, numpy_helper

INT4_OPS = {"MatMulNBits", "GatherBlockQuantized"}
MS_DOMAIN = "com.microsoft"
ACCURACY_LEVEL = 4
HEADS = ("token_head", "pooled_head")


def quantize_int8(src, dst, per_channel: bool = True) -> None:
    """Dynamic int8 weight quantization with onnxruntime.quantization (MatMul/Gemm/Gather weights); `src` a
    path or a ModelProto, `dst` a path.

    Per-channel scales: on MiniLM, per-tensor scales gave a mean token cosine of 0.957 against fp32,
    per-channel 0.993 (measured by benchmarks/quantization.py).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # "consider pre-processing"
    quantize_dynamic(src if isinstance(src, onnx.ModelProto) else str(src), str(dst), weight_type=QuantType.QInt8,
                     per_channel=per_channel)
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)


def _attr(node, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def quantize_tables(proto: onnx.ModelProto, block_size: int, bits: int = 8) -> int:
    """Every Gather of a constant 2-D float table [V, D] -> GatherBlockQuantized of the table quantized as
    MatMulNBits quantizes a weight [K=D, N=V] (symmetric; uint8 [V, D*bits/8], scales [V, D/block_size]).
    -> tables done."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    quant = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                                                    bits=bits))
    inits = {t.name: t for t in proto.graph.initializer}
    done = 0
    for i, node in enumerate(list(proto.graph.node)):
        t = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if t is None or len(t.dims) != 2 or _attr(node, "axis", 0) != 0 or t.data_type != onnx.TensorProto.FLOAT:
            continue
        table = numpy_helper.to_array(t)
        packed, scales, _ = quant.qbits_block_quant(np.ascontiguousarray(table.T))
        V, D = table.shape
        data = packed.reshape(V, -1)[:, :(D * bits + 7) // 8]  # a pure reshape when block_size divides D
        extra = [numpy_helper.from_array(np.ascontiguousarray(data), f"{t.name}_Q{bits}"),
                 numpy_helper.from_array(scales, f"{t.name}_scales")]
        proto.graph.initializer.extend(extra)
        gbq = helper.make_node("GatherBlockQuantized", [extra[0].name, node.input[1], extra[1].name],
                               list(node.output), name=f"{node.name}_Q{bits}", domain=MS_DOMAIN, gather_axis=0,
                               quantize_axis=1, block_size=block_size, bits=bits)
        proto.graph.node.remove(node)
        proto.graph.node.insert(i, gbq)
        if not any(t.name in n.input for n in proto.graph.node):
            proto.graph.initializer.remove(inits.pop(t.name))
        done += 1
    _ms_opset(proto)
    return done


def _ms_opset(proto: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _matmuls(proto: onnx.ModelProto, config) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # per node
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HQQ: torch.from_numpy of a read-only array it never writes
        q = MatMulNBitsQuantizer(proto, algo_config=config)
        q.process()
    return q.model.model


def integer_zero_points(proto: onnx.ModelProto, accuracy_level: int = ACCURACY_LEVEL) -> int:
    """MatMulNBits nodes with float zero points (HQQ) -> uint4 zero points round(z) plus the exact correction
    -s (z - round(z)) per block, added as MatMul(block sums of x, C [K/block_size, N]) (module docstring).
    A weight whose K is not a multiple of the block size keeps its float zero points. -> nodes converted."""
    inits = {t.name: t for t in proto.graph.initializer}
    nodes, done = [], 0
    for n in proto.graph.node:
        nodes.append(n)
        if n.op_type != "MatMulNBits":
            continue
        n.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
        zp = inits.get(n.input[3]) if len(n.input) > 3 else None
        K, N, bs = _attr(n, "K"), _attr(n, "N"), _attr(n, "block_size")
        if zp is None or zp.data_type != onnx.TensorProto.FLOAT or K % bs:
            continue
        s = numpy_helper.to_array(inits[n.input[2]]).reshape(N, -1)
        z = numpy_helper.to_array(zp).reshape(N, -1)
        zi = np.clip(np.round(z), 0, 15).astype(np.uint8)
        kb = zi.shape[1]
        even = np.concatenate([zi, np.zeros((N, kb % 2), np.uint8)], axis=1)
        out, x = n.output[0], n.input[0]
        proto.graph.initializer.extend([
            numpy_helper.from_array(even[:, 0::2] | (even[:, 1::2] << 4), f"{out}_zp4"),
            numpy_helper.from_array(np.ascontiguousarray((-s * (z - zi)).T.astype(np.float32)), f"{out}_zpfix"),
            numpy_helper.from_array(np.array([0, 0, kb, bs], np.int64), f"{out}_blocks_shape"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{out}_last_axis")])
        n.input[3] = f"{out}_zp4"
        n.output[0] = f"{out}_q"
        nodes += [helper.make_node("Reshape", [x, f"{out}_blocks_shape"], [f"{out}_blocks"]),  # [B, n, K/bs, bs]
                  helper.make_node("ReduceSum", [f"{out}_blocks", f"{out}_last_axis"], [f"{out}_block_sums"],
                                   keepdims=0),
                  helper.make_node("MatMul", [f"{out}_block_sums", f"{out}_zpfix"], [f"{out}_fix"]),
                  helper.make_node("Add", [f"{out}_q", f"{out}_fix"], [out])]
        done += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    used = {i for node in proto.graph.node for i in node.input}
    for t in [t for t in proto.graph.initializer if t.name not in used]:
        proto.graph.initializer.remove(t)
    return done


def quantize_int4(proto: onnx.ModelProto, block_size: int = 32, head: bool = False) -> onnx.ModelProto:
    """int4 weights (module docstring): `head` graphs get 8-bit blocks, the others HQQ 4-bit blocks; the
    embedding tables of any graph 8-bit blocks."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig)

    quantize_tables(proto, block_size, bits=8)
    if head:
        out = _matmuls(proto, DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8,
                                                           accuracy_level=ACCURACY_LEVEL,
                                                           op_types_to_quantize=("MatMul",)))
    else:
        out = _matmuls(proto, HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=("MatMul",)))
        integer_zero_points(out)
    _ms_opset(out)
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


def dequantized(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in float32 with the quantized weights' own values (MatMulNBits -> MatMul,
    GatherBlockQuantized -> Gather over dequantized weights): the int4 reference, float arithmetic on exactly
    the weights an int4 bundle holds."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = []
    for n in out.graph.node:
        if n.op_type == "MatMulNBits":
            w = _dequantize(inits, n, _attr(n, "N"), _attr(n, "K")).T  # [K, N]
            name = f"{n.output[0]}_deq"
            out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), name))
            nodes.append(helper.make_node("MatMul", [n.input[0], name], list(n.output)))
        elif n.op_type == "GatherBlockQuantized":
            data = inits[n.input[0]]
            table = _dequantize(inits, n, data.shape[0], data.shape[1] * 8 // _attr(n, "bits", 4))
            name = f"{n.output[0]}_deq"
            out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table), name))
            nodes.append(helper.make_node("Gather", [name, n.input[1]], list(n.output), axis=0))
        else:
            nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _dequantize(inits: dict, node, rows: int, cols: int) -> np.ndarray:
    """[rows, cols] float32 of a MatMulNBits weight (rows = N) or a GatherBlockQuantized table (uint8 data)."""
    bits, bs = _attr(node, "bits", 4), _attr(node, "block_size")
    data = inits[node.input[1] if node.op_type == "MatMulNBits" else node.input[0]].reshape(rows, -1)
    scales = inits[node.input[2]].reshape(rows, -1)
    kb = scales.shape[1]
    q = data.astype(np.float32) if bits == 8 else np.stack([data & 0xF, data >> 4], -1).reshape(rows, -1)
    q = q[:, :kb * bs].astype(np.float32).reshape(rows, kb, bs)
    zname = node.input[3] if len(node.input) > 3 else ""
    if zname:
        z = inits[zname]
        z = (z.reshape(rows, -1) if z.dtype != np.uint8 or bits == 8 else
             np.stack([z & 0xF, z >> 4], -1).reshape(rows, -1)[:, :kb]).astype(np.float32)
    else:
        z = np.full((rows, kb), 2.0 ** (bits - 1), np.float32)
    return ((q - z[..., None]) * scales[..., None]).reshape(rows, -1)[:, :cols]
