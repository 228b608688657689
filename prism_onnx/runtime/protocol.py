"""Control messages between runners and clients: a small header, a JSON part, then raw array parts.

    part 0   CONTROL_HEADER: magic b"PRSC", version, kind
    part 1   JSON object (utf-8, <= MAX_JSON bytes); "arrays": [{"name", "dtype", "shape"}] describes parts 2..
    part 2.. raw little-endian array buffers, one per entry of "arrays" (never pickle)

Means frames (wire.py, magic b"PRSM") are the other message type; `kind_of` tells them apart.

`decode` checks everything before it builds anything: the JSON's size and nesting depth (before it is
parsed), the number of arrays, each array's dtype, rank and shape (Python integers, so no product can
overflow) against `ArrayRules` (the receiver's limits and, optionally, what the manifest allows for each
name), and the buffer sizes. The JSON's fields are then checked as the kind's typed record (schema.py).
Every failure is a FrameError with one line that names the problem.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from ..errors import FrameError
from .wire import MAGIC as MEANS_MAGIC

CONTROL_MAGIC = b"PRSC"
VERSION = 2  # 2: typed records (schema.py), errors as ErrorInfo; runners of version 1 and 2 refuse each other
CONTROL_HEADER = struct.Struct("<4sBBxx")
MAX_JSON = 1 << 20
MAX_DEPTH = 8  # nesting of the JSON part: legitimate messages need 4
MAX_ARRAYS = 8
MAX_RANK = 6
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
    TOKENS = 9  # tail device -> coordinator -> client: the tokens just generated for request r (streaming)


def kind_of(parts: list) -> str:
    """'means' | 'control' | 'garbage', from the first bytes of the first part."""
    head = bytes(parts[0][:4]) if parts and len(parts[0]) >= 4 else b""
    return {MEANS_MAGIC: "means", CONTROL_MAGIC: "control"}.get(head, "garbage")


def peek_kind(parts: list) -> Kind | None:
    """The kind a control message claims (to choose its array rules before decoding), or None."""
    if not parts or len(parts[0]) != CONTROL_HEADER.size:
        return None
    magic, version, kind = CONTROL_HEADER.unpack(bytes(parts[0]))
    try:
        return Kind(kind) if magic == CONTROL_MAGIC and version == VERSION else None
    except ValueError:
        return None


def peek_call(parts: list) -> int | None:
    """The client's call id of a message that failed to decode, when its JSON part is readable."""
    try:
        call = parse_json(bytes(parts[1])).get("call") if len(parts) > 1 else None
    except FrameError:
        return None
    return call if type(call) is int else None


def encode(kind: Kind, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> list[bytes]:
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    for k, v in arrays.items():
        if v.dtype.name not in ARRAY_DTYPES:
            raise FrameError(f"array {k}: dtype {v.dtype} cannot travel")
    meta = {**meta, "arrays": [{"name": k, "dtype": v.dtype.name, "shape": list(v.shape)} for k, v in arrays.items()]}
    parts = [CONTROL_HEADER.pack(CONTROL_MAGIC, VERSION, int(kind)), json.dumps(meta).encode()]
    parts += [v.astype(v.dtype.newbyteorder("<"), copy=False).tobytes() for v in arrays.values()]
    return parts


@dataclass(frozen=True)
class ArrayRules:
    """What a receiver accepts as array parts: total bytes per array, how many arrays, and `allow(name,
    dtype, shape)` -> None or the reason to refuse (e.g. the manifest's dtypes and ranks; FrameError), or it
    raises an error of its own (a client's input beyond the export's limits: InputError too_long)."""

    max_bytes: int
    max_arrays: int = MAX_ARRAYS
    allow: Callable[[str, str, tuple], str | None] | None = None


# a JSON string; possessive quantifiers: no backtracking state per character (the plain alternation held
# ~100 bytes per character of a long string on the regex stack: 1 MB of text cost 116 MB)
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"')


def json_depth(data: bytes) -> int:
    """Nesting depth of a JSON text, counted without parsing it (strings removed first)."""
    b = np.frombuffer(_STRING.sub(b"0", data), np.uint8)
    if not len(b):
        return 0
    steps = (b == ord("[")).astype(np.int32) + (b == ord("{")) - (b == ord("]")) - (b == ord("}"))
    return int(np.cumsum(steps).max())


def _no_constants(name):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(data: bytes, max_bytes: int = MAX_JSON, max_depth: int = MAX_DEPTH) -> dict:
    if len(data) > max_bytes:
        raise FrameError(f"control JSON of {len(data)} bytes exceeds {max_bytes}")
    if json_depth(data) > max_depth:
        raise FrameError(f"control JSON nested deeper than {max_depth} levels")
    try:
        meta = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FrameError(f"control JSON unreadable: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise FrameError("control JSON must be an object")
    return meta


def _array_spec(spec) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(spec, dict):
        raise FrameError(f"array description must be an object, got {type(spec).__name__}")
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise FrameError("array name must be a string of 1 to 64 characters")
    if not isinstance(dtype, str) or dtype not in ARRAY_DTYPES:
        raise FrameError(f"array {name}: dtype {str(dtype)[:20]!r} not allowed ({', '.join(sorted(ARRAY_DTYPES))})")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise FrameError(f"array {name}: shape must be a list of at most {MAX_RANK} sizes")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise FrameError(f"array {name}: shape {str(shape)[:80]} must hold non-negative integers")
    return name, dtype, tuple(shape)


def decode(parts: list, rules: ArrayRules | int, *,
           max_json: int = MAX_JSON) -> tuple[Kind, dict, dict[str, np.ndarray]]:
    """Parse and check a control message; sizes are checked against the declared shapes and the rules
    before any array is built (arrays are read-only views of the received buffers)."""
    if isinstance(rules, int):
        rules = ArrayRules(rules)
    if len(parts) < 2 or len(parts[0]) != CONTROL_HEADER.size:
        raise FrameError("control message needs a header and a JSON part")
    magic, version, kind = CONTROL_HEADER.unpack(bytes(parts[0]))
    if magic != CONTROL_MAGIC or version != VERSION:
        if magic == CONTROL_MAGIC:
            raise FrameError(f"a control message of protocol version {version}; this runner speaks version {VERSION} "
                             f"(runners and clients of different prism-onnx versions cannot talk: install the same "
                             f"version everywhere)")
        raise FrameError(f"not a PRISM v{VERSION} control message")
    try:
        kind = Kind(kind)
    except ValueError:
        raise FrameError(f"unknown control message kind {kind}") from None
    if len(parts) - 2 > rules.max_arrays:
        raise FrameError(f"control message carries {len(parts) - 2} arrays, at most {rules.max_arrays} allowed")
    meta = parse_json(bytes(parts[1]), max_json)
    specs = meta.pop("arrays", [])
    if not isinstance(specs, list):
        raise FrameError("control JSON 'arrays' must be a list")
    if len(specs) != len(parts) - 2:
        raise FrameError(f"control message declares {len(specs)} arrays but carries {len(parts) - 2}")
    checked = []
    for spec, buf in zip(specs, parts[2:]):
        name, dtype, shape = _array_spec(spec)
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow
        if nbytes > rules.max_bytes:
            raise FrameError(f"array {name} declares {nbytes} bytes, beyond the limit {rules.max_bytes}")
        if nbytes != len(buf):
            raise FrameError(f"array {name}: {dtype} {list(shape)} needs {nbytes} bytes, got {len(buf)}")
        why = rules.allow(name, dtype, shape) if rules.allow else None
        if why:
            raise FrameError(f"array {name}: {why}")
        if any(name == c[0] for c in checked):
            raise FrameError(f"array {name} appears twice")
        checked.append((name, dtype, shape))
    arrays = {name: np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
              for (name, dtype, shape), buf in zip(checked, parts[2:])}
    return kind, meta, arrays
