"""What travels between devices: segment-mean frames, in one wire precision (float32, float16, int8 + row scale).

A means frame is a ZeroMQ multipart message:
    header   fixed-size struct (MEANS_HEADER): magic, version, dtype, request id, exchange point, ranks, shape
    counts   int32 [B, S]       tokens behind each mean row (0 = empty row)
    scales   float32 [B, S]     only for int8: x = q * scale, one scale per row
    data     [B, S, D]          the means, in the wire dtype
Arrays travel as raw little-endian buffers, never pickled. `frame_nbytes` is the analytic size the
transport's byte counters must agree with.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import FrameError, PrismError

# manifest.WIRE_DTYPES
WIRE_ENCODINGS = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1")}
DTYPE_CODES = {name: i for i, name in enumerate(WIRE_ENCODINGS)}
MAGIC = b"PRSM"
VERSION = 1

# magic, version, dtype code, request id, layer, src rank, dst rank, export tag, B, S, D
MEANS_HEADER = struct.Struct("<4sBBxxQiHHIIII")




def check_wire_dtype(name: str) -> str:
    if name not in WIRE_ENCODINGS:
        raise PrismError(f"unknown wire dtype '{name}'; choose one of {', '.join(WIRE_ENCODINGS)}")
    return name


def frame_nbytes(batch: int, rows: int, hidden: int, wire_dtype: str) -> int:
    """Bytes of one means frame on the wire (all parts)."""
    n = batch * rows
    scales = 4 * n if wire_dtype == "int8" else 0
    return MEANS_HEADER.size + 4 * n + scales + n * hidden * WIRE_ENCODINGS[wire_dtype].itemsize


def encode_values(x: np.ndarray, wire_dtype: str) -> tuple[np.ndarray | None, np.ndarray]:
    """float32 [B, S, D] -> (scales [B, S] float32 or None, data in the wire dtype)."""
    x = np.asarray(x, dtype=np.float32)
    if wire_dtype == "float32":
        return None, np.ascontiguousarray(x, dtype="<f4")
    if wire_dtype == "float16":
        return None, np.ascontiguousarray(x, dtype="<f2")
    amax = np.abs(x).max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)  # [B, S]
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype("<f4")
    q = np.clip(np.rint(x / scales[..., None]), -127, 127).astype(np.int8)
    return scales, np.ascontiguousarray(q)


def decode_values(scales: np.ndarray | None, data: np.ndarray) -> np.ndarray:
    """Inverse of encode_values, back to float32."""
    if data.dtype == np.int8:
        return data.astype(np.float32) * scales[..., None]
    return data.astype(np.float32)


def roundtrip(x: np.ndarray, wire_dtype: str) -> np.ndarray:
    """What the receiver sees of x after the wire (for the in-process executor)."""
    return decode_values(*encode_values(x, wire_dtype))


@dataclass(frozen=True)
class MeansFrame:
    request: int
    layer: int
    src: int
    dst: int
    export_tag: int
    counts: np.ndarray  # [B, S] int32
    means: np.ndarray  # [B, S, D] float32 (decoded)


def encode_means(frame: MeansFrame, wire_dtype: str) -> list[bytes | memoryview]:
    B, S, D = frame.means.shape
    scales, data = encode_values(frame.means, wire_dtype)
    header = MEANS_HEADER.pack(MAGIC, VERSION, DTYPE_CODES[wire_dtype], frame.request, frame.layer, frame.src,
                               frame.dst, frame.export_tag, B, S, D)
    parts = [header, np.ascontiguousarray(frame.counts, dtype="<i4").tobytes()]
    if scales is not None:
        parts.append(scales.tobytes())
    parts.append(data.tobytes())
    return parts


@dataclass(frozen=True)
class MeansHeader:
    request: int
    layer: int
    src: int
    dst: int
    export_tag: int
    batch: int
    rows: int
    width: int = 0


def check_means(parts: list, *, wire_dtype: str, hidden: int, max_rows: int, max_batch: int) -> MeansHeader:
    """Check a means frame's header and part sizes against the bundle's limits without touching the
    payload: the receiving I/O thread runs this before it queues a frame, the worker `decode_means`."""
    if not parts or len(parts[0]) != MEANS_HEADER.size:
        raise FrameError(f"means frame header must be {MEANS_HEADER.size} bytes, got "
                         f"{len(parts[0]) if parts else 0}")
    magic, version, code, req, layer, src, dst, tag, B, S, D = MEANS_HEADER.unpack(bytes(parts[0]))
    if magic != MAGIC or version != VERSION:
        raise FrameError(f"not a PRISM v{VERSION} frame (magic {magic!r}, version {version})")
    if code != DTYPE_CODES[wire_dtype]:
        names = {v: k for k, v in DTYPE_CODES.items()}
        raise FrameError(f"frame dtype {names.get(code, code)} but this bundle's wire dtype is {wire_dtype}")
    if D != hidden:
        raise FrameError(f"frame hidden size {D}, bundle hidden size {hidden}")
    if B > max_batch or S > max_rows:
        raise FrameError(f"frame declares [{B}, {S}, {D}], beyond the limits [{max_batch}, {max_rows}, {hidden}]")
    n = B * S
    expected = [4 * n] + ([4 * n] if wire_dtype == "int8" else []) + [n * D * WIRE_ENCODINGS[wire_dtype].itemsize]
    sizes = [len(p) for p in parts[1:]]
    if sizes != expected:
        raise FrameError(f"frame parts have {sizes[:4]} bytes, header [{B}, {S}, {D}] {wire_dtype} needs {expected}")
    return MeansHeader(req, layer, src, dst, tag, B, S, D)


def decode_means(parts: list[bytes], *, wire_dtype: str, hidden: int, max_rows: int, max_batch: int) -> MeansFrame:
    """Parse a means frame, checking every size against the header *before* touching the payload.

    `max_rows` and `max_batch` are the bundle's limits: a frame declaring more is refused without
    allocating anything for it.
    """
    return decode_payload(check_means(parts, wire_dtype=wire_dtype, hidden=hidden, max_rows=max_rows,
                                      max_batch=max_batch), parts, wire_dtype)


def decode_payload(h: MeansHeader, parts: list, wire_dtype: str) -> MeansFrame:
    """The payload of a frame whose header and part sizes `check_means` accepted: counts, values (float32)."""
    B, S, hidden = h.batch, h.rows, h.width
    counts = np.frombuffer(parts[1], dtype="<i4").reshape(B, S)
    scales = np.frombuffer(parts[2], dtype="<f4").reshape(B, S) if wire_dtype == "int8" else None
    data = np.frombuffer(parts[-1], dtype=WIRE_ENCODINGS[wire_dtype]).reshape(B, S, hidden)
    if np.any(counts < 0):
        raise FrameError("frame counts must be >= 0")
    means = decode_values(scales, data)
    if not np.all(np.isfinite(means)):
        raise FrameError("frame holds non-finite values")
    return MeansFrame(h.request, h.layer, h.src, h.dst, h.export_tag, counts, means)


def baseline_bytes_per_layer(spec, attention_mask, settings) -> int:
    """Bytes all devices send per layer under uncompressed position-wise partitioning (Voltage) for this
    request: the plan of `settings.baseline()` with hidden states (D values per row) in float32 on the wire,
    whatever the model's own exchange kind. Analytic: the reference that reductions are measured against."""
    from ..plan import plan_for

    sent, _ = plan_traffic(plan_for(spec, attention_mask, settings.baseline()), spec.hidden_size, 1, "float32")
    return sum(row[0] for row in sent)


def plan_traffic(plan, hidden: int, layers: int, wire_dtype: str) -> tuple[list[list[int]], list[list[int]]]:
    """Analytic bytes per device and exchange point: (sent[p][layer], received[p][layer]) for rows of
    `hidden` values (the exchange's row width).

    Device q sends one frame to each receiver p at every exchange point, of the rows the plan routes to p
    (Plan.rows_to: all its means, or with a halo window p's window rows and the means outside it); the
    runtime's byte counters must equal these numbers. Lists are per plan position (plan.ranks, in order).
    """
    B = plan.batch
    frame = {(q, p): frame_nbytes(B, len(plan.rows_to(q, p)), hidden, wire_dtype)
             for p in plan.ranks for q in plan.sources(p)}
    sent = [[sum(frame[(q, p)] for p in plan.receivers(q))] * layers for q in plan.ranks]
    received = [[sum(frame[(q, p)] for q in plan.sources(p))] * layers for p in plan.ranks]
    return sent, received
