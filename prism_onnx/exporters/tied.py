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


class Tables:
    """The embedding tables of an `embed` graph once written to folder/embed.onnx.data: {initializer name:
    (offset, dtype, shape)}; `array(name)` maps one back from the file (no copy in memory)."""

    def __init__(self, folder: Path, location: str, entries: dict[str, tuple[int, np.dtype, tuple]]):
        self.folder, self.location, self.entries = folder, location, entries

    def array(self, name: str) -> np.ndarray:
        offset, dtype, shape = self.entries[name]
        return np.memmap(self.folder / self.location, dtype=dtype, mode="r", offset=offset, shape=shape)


def externalize_tables(folder: Path, embed: onnx.ModelProto) -> Tables:
    """Move embed's tables (initializers read by Gather or GatherBlockQuantized) into folder/embed.onnx.data at
    aligned offsets; `embed` is changed in place (save it to folder/embed.onnx). Every table moves, whatever
    its size, so that a tied head can point at it (`settle` undoes it when nothing needed it)."""
    location = "embed" + DATA_SUFFIX
    entries = {}
    with open(folder / location, "wb") as f:
        for t in _consumed(embed, TABLE_INPUTS):
            a = numpy_helper.to_array(t)
            f.write(b"\0" * (-f.tell() % ALIGN))
            entries[t.name] = (f.tell(), a.dtype, a.shape)
            f.write(np.ascontiguousarray(a).tobytes())
            _external(t, location, f.tell() - a.nbytes, a.nbytes)
    return Tables(folder, location, entries)


def point_head(head: onnx.ModelProto, tables: Tables) -> set[str]:
    """Point the head's weights that equal a table, byte for byte (any shape: int4's packed layouts) or as its
    transpose (float MatMul weights), at the table's bytes; `head` changed in place. -> the tables it reads."""
    used = set()
    for h in _consumed(head, WEIGHT_INPUTS):
        ha = numpy_helper.to_array(h)
        for name, (offset, dtype, shape) in tables.entries.items():
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if ha.dtype != dtype or ha.nbytes != size:
                continue
            table = tables.array(name)
            if np.array_equal(ha.reshape(-1), table.reshape(-1)):
                _external(h, tables.location, offset, size)
            elif ha.ndim == 2 and len(shape) == 2 and ha.shape == tuple(shape[::-1]) and np.array_equal(ha, table.T):
                _transpose_of(head, h, name, tables)
            else:
                continue
            used.add(name)
            break
    return used


def _transpose_of(head: onnx.ModelProto, weight: TensorProto, table: str, tables: Tables) -> None:
    offset, dtype, shape = tables.entries[table]
    shared = TensorProto(name=f"tied.{table}", data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                         dims=list(shape))
    _external(shared, tables.location, offset, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    head.graph.initializer.remove(weight)
    head.graph.initializer.append(shared)
    head.graph.node.insert(0, helper.make_node("Transpose", [shared.name], [weight.name], perm=[1, 0],
                                               name=f"tied.transpose.{weight.name}"))


def settle(embed: onnx.ModelProto, tables: Tables, used: set[str], keep: int = MIN_BYTES) -> bool:
    """After point_head: when no head reads a table and every table is smaller than `keep`, the tables go
    back into embed.onnx and the data file is removed. -> whether embed.onnx.data remains."""
    if used or any(int(np.prod(sh)) * np.dtype(dt).itemsize >= keep for _, dt, sh in tables.entries.values()):
        return True
    for t in embed.graph.initializer:
        if t.name in tables.entries:
            t.CopyFrom(numpy_helper.from_array(np.array(tables.array(t.name)), t.name))
    (tables.folder / tables.location).unlink()
    return False


def share_embedding(folder: Path, embed: onnx.ModelProto, head: onnx.ModelProto | None,
                    min_bytes: int = MIN_BYTES) -> str | None:
    """externalize_tables + point_head + settle, for protos held in memory. -> the data file's name or None."""
    tables = externalize_tables(folder, embed)
    used = point_head(head, tables) if head is not None else set()
    return tables.location if settle(embed, tables, used, min_bytes) else None


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
