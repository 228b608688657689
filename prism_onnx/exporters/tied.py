"""The embedding table stored once per device, in ONNX external data (`embed.onnx.data`), read by the `embed`
graph and, when the model ties its language-model head to the embedding (SmolLM2, Llama-3.2-1B, GPT-2), by
the `token_head` graph too:

    float32   embed: Gather(E [V, D]);  token_head: MatMul(h, Transpose(E))  (E read from the same bytes)
    int4      embed: GatherBlockQuantized(Eq, ids, scales); token_head: MatMulNBits(h, Eq, scales): one layout,
              one copy (GatherBlockQuantized reads uint8 data in MatMulNBits' layout, quantize.py)

Both graphs stay ordinary ONNX files; every file, the data file included, is in the bundle's sha256 table.
onnxruntime memory-maps external data stored at aligned offsets, so an embed session keeps resident only
the table rows it reads (measured, SmolLM2: +11 MB for the embed session instead of +113 MB); the head's
session packs its own copy of the weight for its matrix kernel whichever way it is stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGN = 1 << 16  # offsets in the data file: onnxruntime maps aligned external data instead of copying it
MIN_BYTES = 1 << 20  # an embedding table smaller than this stays inside embed.onnx unless the head shares it
DATA_SUFFIX = ".onnx.data"
TABLE_INPUTS = {"Gather": (0,), "GatherBlockQuantized": (0, 2, 3)}
WEIGHT_INPUTS = {"MatMul": (1,), "Gemm": (1,), "MatMulNBits": (1, 2, 3), "MatMulInteger": (1,)}


def _consumed(proto: onnx.ModelProto, inputs: dict[str, tuple[int, ...]]) -> list[TensorProto]:
    names = {n.input[i] for n in proto.graph.node if n.op_type in inputs for i in inputs[n.op_type]
             if i < len(n.input)}
    return [t for t in proto.graph.initializer if t.name in names]


def _external(t: TensorProto, location: str, offset: int, length: int) -> None:
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(name)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def _tie(head: onnx.ModelProto, tables: dict[str, np.ndarray]) -> dict[str, list[tuple[str, bool]]]:
    """{table name: [(head initializer, transposed)]}: the head's weights that equal an embedding table,
    byte for byte (any shape: int4's packed layouts) or as its transpose (float MatMul weights)."""
    ties: dict[str, list[tuple[str, bool]]] = {}
    for h in _consumed(head, WEIGHT_INPUTS):
        ha = numpy_helper.to_array(h)
        for name, ea in tables.items():
            if ha.dtype != ea.dtype or ha.nbytes != ea.nbytes:
                continue
            if ha.tobytes() == ea.tobytes():
                ties.setdefault(name, []).append((h.name, False))
                break
            if ha.ndim == 2 and ea.ndim == 2 and ha.shape == ea.shape[::-1] and np.array_equal(ha, ea.T):
                ties.setdefault(name, []).append((h.name, True))
                break
    return ties


def share_embedding(folder: Path, embed: onnx.ModelProto, head: onnx.ModelProto | None,
                    min_bytes: int = MIN_BYTES) -> str | None:
    """Move embed's tables (those the head shares, and any of min_bytes or more) into folder/embed.onnx.data
    and point the head's equal weights at the same bytes; both protos are changed in place (save them to
    folder/embed.onnx and folder/token_head.onnx). -> the data file's name, or None when nothing moved."""
    tables = {t.name: numpy_helper.to_array(t) for t in _consumed(embed, TABLE_INPUTS)}
    ties = _tie(head, tables) if head is not None else {}
    moved = [n for n, a in tables.items() if n in ties or a.nbytes >= min_bytes]
    if not moved:
        return None
    location = "embed" + DATA_SUFFIX
    offsets = {}
    with open(folder / location, "wb") as f:
        for name in moved:
            f.write(b"\0" * (-f.tell() % ALIGN))
            offsets[name] = (f.tell(), tables[name].nbytes)
            f.write(np.ascontiguousarray(tables[name]).tobytes())
    for t in embed.graph.initializer:
        if t.name in offsets:
            _external(t, location, *offsets[t.name])
    if head is not None:
        _point_head(head, ties, tables, offsets, location)
    return location


def _point_head(head: onnx.ModelProto, ties: dict, tables: dict, offsets: dict, location: str) -> None:
    inits = {t.name: t for t in head.graph.initializer}
    for table, uses in ties.items():
        for name, transposed in uses:
            if not transposed:
                _external(inits[name], location, *offsets[table])
                continue
            head.graph.initializer.remove(inits[name])
            shared = TensorProto(name=f"tied.{table}", data_type=helper.np_dtype_to_tensor_dtype(tables[table].dtype),
                                 dims=tables[table].shape)
            _external(shared, location, *offsets[table])
            head.graph.initializer.append(shared)
            head.graph.node.insert(0, helper.make_node("Transpose", [shared.name], [name], perm=[1, 0],
                                                       name=f"tied.transpose.{name}"))


def load_graph(path: Path) -> onnx.ModelProto:
    """A graph file with its external data (files beside it) read in. onnx.load would refuse a data file that
    has several hard links (its guard against hard-link attacks), as the device folders of an export and the
    graph cache have; the location must name a file in the graph's own folder."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if not location or Path(location).name != location:
            raise ValueError(f"{path.name}: external data of {t.name} at {location!r}, not a file beside it")
        with open(path.parent / location, "rb") as f:
            f.seek(int(info.get("offset", 0)))
            t.raw_data = f.read(int(info["length"])) if "length" in info else f.read()
        t.data_location = TensorProto.DEFAULT
        del t.external_data[:]
    return proto


def inline(path: Path) -> onnx.ModelProto:
    """A graph with its external data read in and its tied transposes folded back into initializers: what
    the quantizers take (they quantize constant initializers, not the output of a Transpose)."""
    proto = load_graph(path)
    inits = {t.name: t for t in proto.graph.initializer}
    for node in list(proto.graph.node):
        if node.op_type == "Transpose" and node.name.startswith("tied.transpose.") and node.input[0] in inits:
            src = inits.pop(node.input[0])
            proto.graph.initializer.remove(src)
            proto.graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(numpy_helper.to_array(src).T), node.output[0]))
            proto.graph.node.remove(node)
    return proto
