"""Control messages between runners and clients: a small header, a JSON part, then raw array parts.

    part 0   CONTROL_HEADER: magic b"PRSC", version, kind
    part 1   JSON object (utf-8, <= MAX_JSON bytes); "arrays": [{"name", "dtype", "shape"}] describes parts 2..
    part 2.. raw little-endian array buffers, one per entry of "arrays" (never pickle)

Means frames (wire.py, magic b"PRSM") are the other message type; `kind_of` tells them apart.
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum

import numpy as np

from ..errors import FrameError
from .wire import MAGIC as MEANS_MAGIC

CONTROL_MAGIC = b"PRSC"
VERSION = 1
CONTROL_HEADER = struct.Struct("<4sBBxx")
MAX_JSON = 1 << 20
ARRAY_DTYPES = {"int64", "int32", "float32", "float16", "int8", "uint8", "bool"}


class Kind(IntEnum):
    HELLO = 1  # runner -> runner: rank, export id, instance nonce (also the heartbeat)
    REFUSE = 2  # runner -> runner: your HELLO is refused (another export, rank taken)
    START = 3  # coordinator -> device: run request r (its token inputs + the request's attention mask)
    RESULT = 4  # device -> coordinator: outputs of request r (or its error) + stats
    REQUEST = 5  # client -> coordinator: inputs + options
    REPLY = 6  # coordinator -> client: outputs + stats, or an error
    STATUS = 7  # client -> coordinator: is the cluster ready?
    ABORT = 8  # coordinator -> devices: request r failed, drop it (frees devices waiting on a dead peer)


def kind_of(parts: list) -> str:
    """'means' | 'control' | 'garbage', from the first bytes of the first part."""
    head = bytes(parts[0][:4]) if parts and len(parts[0]) >= 4 else b""
    return {MEANS_MAGIC: "means", CONTROL_MAGIC: "control"}.get(head, "garbage")


def encode(kind: Kind, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> list[bytes]:
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    for k, v in arrays.items():
        if v.dtype.name not in ARRAY_DTYPES:
            raise FrameError(f"array {k}: dtype {v.dtype} cannot travel")
    meta = {**meta, "arrays": [{"name": k, "dtype": v.dtype.name, "shape": list(v.shape)} for k, v in arrays.items()]}
    parts = [CONTROL_HEADER.pack(CONTROL_MAGIC, VERSION, int(kind)), json.dumps(meta).encode()]
    parts += [v.astype(v.dtype.newbyteorder("<"), copy=False).tobytes() for v in arrays.values()]
    return parts


def decode(parts: list, max_array_bytes: int) -> tuple[Kind, dict, dict[str, np.ndarray]]:
    """Parse and check a control message; sizes are checked against the declared shapes and the limit
    before any array is built."""
    if len(parts) < 2 or len(parts[0]) != CONTROL_HEADER.size:
        raise FrameError("control message needs a header and a JSON part")
    magic, version, kind = CONTROL_HEADER.unpack(bytes(parts[0]))
    if magic != CONTROL_MAGIC or version != VERSION:
        raise FrameError(f"not a PRISM v{VERSION} control message")
    try:
        kind = Kind(kind)
    except ValueError:
        raise FrameError(f"unknown control message kind {kind}") from None
    if len(parts[1]) > MAX_JSON:
        raise FrameError(f"control JSON of {len(parts[1])} bytes exceeds {MAX_JSON}")
    try:
        meta = json.loads(bytes(parts[1]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrameError(f"control JSON unreadable: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arrays", []), list):
        raise FrameError("control JSON must be an object with an 'arrays' list")
    specs = meta.pop("arrays", [])
    if len(specs) != len(parts) - 2:
        raise FrameError(f"control message declares {len(specs)} arrays but carries {len(parts) - 2}")
    arrays = {}
    for spec, buf in zip(specs, parts[2:]):
        try:
            name, dtype, shape = str(spec["name"]), str(spec["dtype"]), [int(d) for d in spec["shape"]]
        except (KeyError, TypeError, ValueError):
            raise FrameError(f"bad array description {spec!r}") from None
        if dtype not in ARRAY_DTYPES or any(d < 0 for d in shape) or len(shape) > 6:
            raise FrameError(f"array {name}: dtype {dtype} shape {shape} not allowed")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes > max_array_bytes:
            raise FrameError(f"array {name} declares {nbytes} bytes, beyond the limit {max_array_bytes}")
        if nbytes != len(buf):
            raise FrameError(f"array {name}: {dtype} {shape} needs {nbytes} bytes, got {len(buf)}")
        arrays[name] = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return kind, meta, arrays
