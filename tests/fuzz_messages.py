"""Hostile messages for a runner's ports: random bytes, known crashers, and mutations of valid messages.

`messages(n, port, ctx, seed)` yields n multipart messages (lists of bytes) for port "peer" or "client".
`ctx` describes the target export (hidden size, layers, wire dtype, export tag, ranks, vocabulary) so that
structure-aware messages get past the first checks and reach the deeper ones.
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass

import numpy as np

from prism_onnx.runtime.protocol import CONTROL_HEADER, CONTROL_MAGIC, VERSION, Kind, encode
from prism_onnx.runtime.schema import (Abort, Attempt, Hello, Request, Result, Status, WireError, encode_record,
                                       request_id)
from prism_onnx.runtime.wire import DTYPE_CODES, MAGIC, MEANS_HEADER, MeansFrame, encode_means


@dataclass
class Target:
    hidden: int
    layers: int
    wire_dtype: str
    tag: int
    src: int  # the rank whose key the fuzzer holds (peer port)
    dst: int  # the rank of the runner attacked
    devices: int
    vocab: int
    export_id: str


def header(kind: int, version: int = VERSION, magic: bytes = CONTROL_MAGIC) -> bytes:
    return CONTROL_HEADER.pack(magic, version, kind)


def raw(kind: Kind, meta_json: bytes, *buffers: bytes) -> list[bytes]:
    return [header(int(kind)), meta_json, *buffers]


def arrays_json(specs, **meta) -> bytes:
    return json.dumps({**meta, "arrays": specs}).encode()


def crashers(t: Target, port: str) -> list[list[bytes]]:
    """One message per crasher class found against main (plus relatives)."""
    k = Kind.REQUEST if port == "client" else Kind.START
    deep = b"[" * 100_000 + b"]" * 100_000
    out = [
        raw(k, deep),
        raw(k, b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        raw(k, arrays_json([{"name": "input_ids", "dtype": "int64", "shape": [2 ** 70]}]), b""),
        raw(k, b'{"arrays":[{"name":"input_ids","dtype":"int64","shape":[1e300]}]}', b""),
        raw(k, arrays_json([{"name": "input_ids", "dtype": "int64", "shape": [2 ** 62, 4]}]), b""),
        raw(k, arrays_json([{"name": "input_ids", "dtype": "int64", "shape": [-1, 4]}]), b""),
        raw(k, arrays_json([{"name": "input_ids", "dtype": "object", "shape": [1]}]), b"\0" * 8),
        raw(k, arrays_json([{"name": "input_ids", "dtype": "int64", "shape": [True, 2]}]), b"\0" * 16),
        raw(k, arrays_json([{"name": "x", "dtype": "int64", "shape": [1]}] * 3), b"\0" * 8),
        raw(k, arrays_json([1, 2]), b"", b""),
        raw(k, b'{"arrays": 5}'),
        raw(k, b'{"a": NaN, "b": Infinity}'),
        raw(k, b"1" * 100_000),
        raw(k, b'{"x": "\xff\xfe"}'),
        raw(k, b"[]"),
        raw(Kind.HELLO, b'{"rank": 1e308, "nonce": [], "t": "x"}'),
        [header(99), b"{}"],
        [header(int(k), version=7), b"{}"],
        [header(int(k)), b"{}", b"extra part without a description"],
    ]
    if port == "client":
        out += [encode(Kind.REQUEST, {"texts": 5}), encode(Kind.REQUEST, {"outputs": 5, "texts": ["a"]}),
                encode(Kind.REQUEST, {}, {"input_ids": np.zeros((0, 5), np.int64)}),
                encode(Kind.REQUEST, {}, {"input_ids": np.zeros((5, 0), np.int64)}),
                encode(Kind.REQUEST, {}, {"input_ids": np.full((1, 4), 2 ** 40, np.int64)}),
                encode(Kind.REQUEST, {}, {"input_ids": np.full((1, 4), -3, np.int64)}),
                encode(Kind.REQUEST, {"texts": [None, 3]}), encode(Kind.REQUEST, {"texts": [""] * 100_000}),
                encode(Kind.REQUEST, {"texts": [{"a": 1}]}), encode(Kind.REQUEST, {"call": -5, "texts": ["a"]}),
                encode(Kind.REQUEST, {}, {"attention_mask": np.ones((1, 3), np.int64)}),
                encode(Kind.REQUEST, {}, {"pixel_values": np.zeros((1, 3, 16, 16), np.float32)}),
                encode(Kind.REQUEST, {}, {"image_0000": np.frombuffer(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, np.uint8)}),
                encode(Kind.STATUS, {"call": "x"}), encode(Kind.ABORT, {"request": 1}),
                encode(Kind.REPLY, {"ok": True})]
    else:
        f = MeansFrame(1, 0, t.src, t.dst, t.tag, np.ones((1, 2), np.int32), np.zeros((1, 2, t.hidden), np.float32))
        out += [
            [MEANS_HEADER.pack(MAGIC, 1, DTYPE_CODES[t.wire_dtype], 7, 0, t.src, t.dst, t.tag, 2 ** 32 - 1,
                               2 ** 32 - 1, t.hidden)],
            [MEANS_HEADER.pack(MAGIC, 1, DTYPE_CODES[t.wire_dtype], 7, 2 ** 31 - 1, t.src, t.dst, t.tag, 1, 1,
                               t.hidden), b"\0" * 4, b"\0" * 4 * t.hidden],
            encode_means(MeansFrame(**{**f.__dict__, "src": 999}), t.wire_dtype),
            encode_means(MeansFrame(**{**f.__dict__, "dst": 999}), t.wire_dtype),
            encode_means(MeansFrame(**{**f.__dict__, "counts": -np.ones((1, 2), np.int32)}), t.wire_dtype),
            encode_means(f, t.wire_dtype)[:-1],
            encode(Kind.START, {"request": 1, "coordinator": t.src, "budget_s": 1e300}),
            encode(Kind.START, {"request": 2 ** 70, "coordinator": t.src, "budget_s": 5.0},
                   {"attention_mask": np.ones((1, 4), np.int64)}),
            encode(Kind.START, {"request": 1, "coordinator": t.src, "budget_s": 5.0, "outputs": 5},
                   {"attention_mask": np.ones((1, 4), np.int64), "input_ids": np.ones((1, 2), np.int64)}),
            encode(Kind.RESULT, {"request": 1, "rank": t.src, "ok": True, "traffic": 5}),
            encode(Kind.ABORT, {"request": "all"}), encode(Kind.ABORT, {"request": 3, "reason": "x" * 200_000}),
            encode(Kind.REQUEST, {"texts": ["a"]}), encode(Kind.REFUSE, {"reason": "go away", "from": t.src}),
        ]
    return out


def valid(t: Target, port: str, rng: random.Random) -> list[bytes]:
    """A well-formed message of this port (the base of the mutations), as the runtime's typed records make them."""
    if port == "client":
        n = rng.randint(1, 12)
        choice = rng.randrange(4)
        if choice == 0:
            return encode_record(Status(call=rng.randrange(1 << 30)))
        if choice == 1:
            return encode_record(Request(texts=("".join(rng.choice("ab cd") for _ in range(n)),)))
        ids = np.array([[rng.randrange(t.vocab) for _ in range(n)]], np.int64)
        return encode_record(Request(outputs=("last_hidden_state",), arrays={"input_ids": ids,
                                                                            "attention_mask": np.ones_like(ids)}))
    choice = rng.randrange(5)
    req = request_id(rng.randrange(1, 1 << 40), t.src)
    if choice == 0:
        return encode_record(Hello(t.src, f"fuzz{rng.randrange(1000)}", t.export_id, 1.0, settings={}, ready=True,
                                   echo={}, sees=()))
    if choice == 1:
        n = rng.randint(2, 8)
        ranks = tuple(sorted({t.src, t.dst}))
        return encode_record(Attempt(req, t.src, ranks, 2.0, arrays={
            "attention_mask": np.ones((1, n), np.int64), "input_ids": np.ones((1, n // 2), np.int64),
            "token_type_ids": np.zeros((1, n // 2), np.int64)}))
    if choice == 2:
        return encode_record(Abort(req, "fuzz"))
    if choice == 3:
        return encode_record(Result(req, t.src, error=WireError("PeerError", "peer_failed", "fuzz", True)))
    rows = rng.randint(1, 4)
    return encode_means(MeansFrame(req, rng.randrange(t.layers), t.src, t.dst, t.tag, np.ones((1, rows), np.int32),
                                   np.zeros((1, rows, t.hidden), np.float32)), t.wire_dtype)


def _any_value(rng: random.Random):
    return rng.choice([None, True, -1, 0, 2 ** 63, 2 ** 80, 1e308, -0.5, "", "x" * rng.randint(0, 300), [], [1, "a"],
                       {}, {"a": [1]}, [[[]]], ["last_hidden_state"]])


def mutate(parts: list[bytes], rng: random.Random) -> list[bytes]:
    parts = [bytearray(p) for p in parts]
    how = rng.randrange(8)
    if how == 0 and parts[0]:  # flip bytes of the header
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(parts[0]))
            parts[0][i] = rng.randrange(256)
    elif how == 1 and len(parts) > 1:  # a JSON field gets a value of any type
        try:
            meta = json.loads(bytes(parts[1]))
            key = rng.choice(list(meta) or ["x"]) if rng.random() < 0.8 else rng.choice(["texts", "outputs", "call"])
            meta[key] = _any_value(rng)
            parts[1] = bytearray(json.dumps(meta).encode())
        except (ValueError, UnicodeDecodeError):
            parts[1] = bytearray(rng.randbytes(rng.randint(0, 64)))
    elif how == 2 and len(parts) > 1:  # an array description lies about dtype or shape
        try:
            meta = json.loads(bytes(parts[1]))
            if meta.get("arrays"):
                spec = rng.choice(meta["arrays"])
                spec[rng.choice(["dtype", "shape", "name"])] = rng.choice(
                    ["float64", "int8", [2 ** 33], [3, -1], [1] * 9, [0], "image_9", "attention_mask", 5, None])
            parts[1] = bytearray(json.dumps(meta).encode())
        except (ValueError, UnicodeDecodeError):
            pass
    elif how == 3:  # truncate or extend one part
        i = rng.randrange(len(parts))
        parts[i] = parts[i][: rng.randrange(len(parts[i]) + 1)] if rng.random() < 0.5 else parts[i] + rng.randbytes(8)
    elif how == 4:  # drop or add a part
        if len(parts) > 1 and rng.random() < 0.5:
            del parts[rng.randrange(len(parts))]
        else:
            parts.insert(rng.randrange(len(parts) + 1), bytearray(rng.randbytes(rng.randint(0, 100))))
    elif how == 5 and parts[0][:4] == MAGIC:  # a means header with other numbers
        fields = list(MEANS_HEADER.unpack(bytes(parts[0])))
        i = rng.randrange(3, len(fields))
        fields[i] = rng.choice([0, 1, 2, 2 ** 16 - 1, 2 ** 31 - 1]) if i in (4,) else rng.choice(
            [0, 1, 3, 2 ** 16 - 1]) if i in (5, 6) else rng.choice([0, 1, 5, 2 ** 31])
        try:
            parts[0] = bytearray(MEANS_HEADER.pack(*fields))
        except struct.error:
            pass
    elif how == 6:  # splice random bytes into the JSON or a buffer
        i = rng.randrange(len(parts))
        j = rng.randrange(len(parts[i]) + 1)
        parts[i][j:j] = rng.randbytes(rng.randint(1, 16))
    # how == 7: unchanged (a valid message)
    return [bytes(p) for p in parts]


def random_message(rng: random.Random) -> list[bytes]:
    return [rng.randbytes(rng.choice([0, 1, 4, 12, 40, rng.randint(0, 4000)])) for _ in range(rng.randint(1, 5))]


def messages(n: int, port: str, t: Target, seed: int = 0):
    """n messages: every crasher, then a mix of random (20%), mutated (70%) and valid (10%) messages."""
    rng = random.Random(seed)
    fixed = crashers(t, port)
    for m in fixed[:n]:
        yield m
    for _ in range(max(0, n - len(fixed))):
        r = rng.random()
        if r < 0.2:
            yield random_message(rng)
        elif r < 0.9:
            yield mutate(valid(t, port, rng), rng)
        else:
            yield valid(t, port, rng)
