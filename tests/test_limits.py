"""Parse limits and bounded memory, without sockets: the crashers found on main, the parsers under 10,000
fuzzed messages, the means inbox's bounds, rate-limited rejection logs."""

import logging
from pathlib import Path

import numpy as np
import pytest

import fuzz_messages
from prism_onnx.errors import FrameError, PrismError
from prism_onnx.plan import make_plan
from prism_onnx.runtime.admission import request_rules
from prism_onnx.runtime.bundle import DeviceBundle
from prism_onnx.runtime.counters import RateLimitedLog
from prism_onnx.runtime.exchange import Abort, Inbox, LocalHub
from prism_onnx.runtime.membership import Membership
from prism_onnx.runtime.protocol import Kind, decode, encode, json_depth, kind_of
from prism_onnx.runtime.schema import Hello, decode_record, peer_rules, request_id
from prism_onnx.runtime.wire import MeansFrame, MeansHeader, decode_means, encode_means
from test_coordinator import manifest

LIMITS = DeviceBundle(Path("."), manifest(devices=2)).limits


@pytest.mark.parametrize("parts,match", [
    (fuzz_messages.raw(Kind.REQUEST, b"[" * 100_000 + b"]" * 100_000), "nested deeper than 8"),
    (fuzz_messages.raw(Kind.REQUEST, fuzz_messages.arrays_json(
        [{"name": "input_ids", "dtype": "int64", "shape": [2 ** 70]}]), b""), "beyond the limit"),
    (fuzz_messages.raw(Kind.REQUEST, b'{"arrays":[{"name":"input_ids","dtype":"int64","shape":[1e300]}]}', b""),
     "non-negative integers"),
    (fuzz_messages.raw(Kind.REQUEST, fuzz_messages.arrays_json(
        [{"name": "input_ids", "dtype": "int64", "shape": [2 ** 62, 4]}]), b""), "beyond the limit"),
    (fuzz_messages.raw(Kind.REQUEST, fuzz_messages.arrays_json(
        [{"name": "input_ids", "dtype": ["int64"], "shape": [1]}]), b"\0" * 8), "dtype"),
    (fuzz_messages.raw(Kind.REQUEST, b'{"a": NaN}'), "NaN is not a number"),
    (fuzz_messages.raw(Kind.REQUEST, b"7" * 10_000), "unreadable"),
    (encode(Kind.REQUEST, {}, {"input_ids": np.zeros((0, 5), np.int64)}), "at least one row"),
    (encode(Kind.REQUEST, {}, {"pixel_values": np.zeros((1, 3), np.float32)}), "not an input of this text model"),
    (encode(Kind.REQUEST, {}, {f"x{i}": np.zeros(1, np.int64) for i in range(9)}), "at most 6 allowed"),
])
def test_crashers_from_main_are_one_line_frame_errors(parts, match):
    with pytest.raises(FrameError, match=match):
        decode(parts, request_rules(LIMITS))


@pytest.mark.parametrize("ids,match", [
    (np.zeros((1, 17), np.int64), "input_ids: a sequence of 17 tokens is longer than this export's --max-seq-len 16"),
    (np.zeros((5, 3), np.int64), "input_ids: a batch of 5 rows is larger than this export's --max-batch 4"),
])
def test_ids_beyond_the_exports_limits_are_too_long_inputs_not_bad_frames(ids, match):
    """A well-formed request whose ids exceed --max-seq-len or --max-batch: the client's input is too long for
    this deployment (InputError, code too_long: HTTP 413), as a text of as many tokens is."""
    from prism_onnx.errors import InputError

    with pytest.raises(InputError, match=match) as e:
        decode(encode(Kind.REQUEST, {}, {"input_ids": ids}), request_rules(LIMITS))
    assert e.value.code == "too_long"


def test_json_depth_ignores_brackets_inside_strings():
    assert json_depth(b'{"a": "[[[[\\"[[", "b": [[1]]}') == 3
    assert json_depth(b'"' + b"x" * 1_000_000 + b'"') == 0


def test_parsers_survive_10000_fuzzed_messages():
    """Every parser and check a runner applies, fed 5,000 hostile messages per port: the only exception
    allowed is a PrismError (one clear line); anything else would be a crash of the message loop."""
    t = fuzz_messages.Target(LIMITS.hidden, LIMITS.layers, LIMITS.wire_dtype, 0xEEEEEEEE, 0, 1, 2, LIMITS.vocab_size,
                             "e" * 64)
    m = Membership(1, {0: "x"}, "e" * 64, {}, "n")
    rules = {**peer_rules(LIMITS), Kind.REQUEST: request_rules(LIMITS)}
    crashes, n = [], 0
    for port in ("peer", "client"):
        for parts in fuzz_messages.messages(5000, port, t, seed=7):
            n += 1
            try:
                if kind_of(parts) == "means":
                    decode_means(parts, wire_dtype=LIMITS.wire_dtype, hidden=LIMITS.hidden, max_rows=LIMITS.max_rows,
                                 max_batch=LIMITS.max_batch)
                    continue
                rec = decode_record(parts, LIMITS, rules)
                if isinstance(rec, Hello):
                    m.on_hello(rec, 1.0, b"s", 0)
            except PrismError:
                pass
            except Exception as e:  # noqa: BLE001 - the point of the test
                crashes.append(f"{type(e).__name__}: {e}")
    assert n == 10_000 and crashes == []


def header(src: int, request: int, point: int = 0) -> MeansHeader:
    return MeansHeader(request, point, src, 0, 7, 1, 1, 4)


def test_inbox_is_bounded_per_source_and_in_total_and_expires_old_frames():
    box = Inbox(per_source=100, total=150)
    assert box.put(header(1, 7), ["a"], 60, now=0.0) is None
    assert "from device 1" in box.put(header(1, 7), ["b"], 60, now=0.0)
    assert box.put(header(2, 8), ["c"], 60, now=1.0) is None
    assert "inbox full" in box.put(header(3, 8), ["d"], 60, now=1.0)
    box.abort(Abort(7, "stop"))
    assert isinstance(box.take(7, 0, 0.01), Abort)  # an abort jumps its request's queue
    h, parts, nbytes = box.take(7, 0, 0.01)  # a reader gets only its own request's frames, of its point
    assert parts == ["a"] and box.nbytes == 60
    assert box.put(header(1, 9, point=1), ["e"], 30, now=1.0) is None
    assert box.take(9, 0, 0.01) is None  # request 9's frame is for exchange point 1
    assert box.expire(now=5.0, max_age=3.5, keep={9}) == 1 and box.nbytes == 30  # request 9 is queued here
    assert box.take(8, 0, 0.01) is None and box.take(9, 1, 0.01)[1] == ["e"] and box.nbytes == 0
    box.finish(9)
    assert box.put(header(1, 9), ["late"], 30, now=6.0) is None and box.nbytes == 0  # finished: dropped


def test_early_frames_wait_in_the_bounded_inbox_and_expire():
    """Frames of requests that never start here: held up to the inbox's bound per source (the rest refused
    and counted), dropped when older than the exchange timeout."""
    from types import SimpleNamespace

    plan = make_plan(SimpleNamespace(causal=False, sinks=()), np.ones((1, 10), np.int64), devices=3,
                     compression_ratio=2)
    hub = LocalHub(3, wire_dtype="float32", width=4, points=["attn_in.0", "attn_in.1"], export_tag=7, max_rows=8,
                   max_batch=2, timeout=0.5)
    dev = hub.endpoints[2]
    frame = lambda req, src: encode_means(MeansFrame(req, 0, src, 2, 7, plan.segments[src].counts,  # noqa: E731
                                                     np.zeros((1, plan.segments[src].rows, 4), np.float32)), "float32")
    size = sum(len(p) for p in frame(10, 0))
    dev.inbox = Inbox(per_source=3 * size, total=100 * size)  # room for three early frames per source
    for req in range(10, 20):  # ten early frames of requests that never start here
        hub.endpoints[0]._send(2, frame(req, 0))
    assert dev.inbox.nbytes == 3 * size and dev.traffic.rejected_frames == 7
    with pytest.raises(PrismError, match="no means"):
        dev.gather(1, 0, plan)
    assert dev.inbox.expire(now=1e9, max_age=dev.timeout) == 3 and dev.inbox.nbytes == 0


def test_rejection_logs_are_rate_limited_and_say_how_many_were_not_logged(caplog):
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("t"), burst=3, window=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        logged = [log.warning("bad %d", i) for i in range(100)]
        now[0] = 11.0
        log.warning("bad again")
    assert logged.count(True) == 3
    assert [r.getMessage() for r in caplog.records][-2:] == ["... 97 more rejections not logged in the last 10 s",
                                                             "bad again"]


@pytest.mark.parametrize("meta,arrays,match", [
    ({}, {}, "field 'request' is missing"),
    ({"request": request_id(1, 5), "coordinator": 5, "budget_s": 1.0}, {}, "coordinator"),
    ({"request": request_id(1, 0), "coordinator": 0, "budget_s": 1e9}, {}, "budget_s"),
    ({"request": request_id(1, 0), "coordinator": 0, "budget_s": 1.0}, {"attention_mask": np.ones((1, 2), np.int64)},
     "START carries no"),
    ({"request": request_id(1, 0), "coordinator": 0, "budget_s": 1.0, "outputs": ["nope"]}, {}, "outputs"),
    ({"request": request_id(1, 0), "coordinator": 0, "budget_s": 1.0},
     {"attention_mask": np.ones((1, 2), np.int64), "input_ids": np.ones((1, 0), np.int64)}, "must be int64"),
    ({"request": request_id(1, 0), "coordinator": 0, "budget_s": 1.0},
     {"attention_mask": np.ones((1, 2), np.int64), "input_ids": np.full((1, 2), 10 ** 6, np.int64)},
     r"input_ids outside \[0, 100\)"),
    ({"request": request_id(1, 0), "coordinator": 0, "budget_s": 1.0},
     {"attention_mask": np.full((1, 2), 3, np.int64), "input_ids": np.ones((1, 2), np.int64)}, "only 0 and 1"),
    ({"request": request_id(1, 0), "coordinator": 0, "budget_s": 1.0},
     {"attention_mask": np.ones((2, 2), np.int64), "input_ids": np.ones((1, 2), np.int64)}, "batch size"),
])
def test_bad_starts_are_refused_before_any_job_exists(meta, arrays, match):
    with pytest.raises(PrismError, match=match):
        decode_record(encode(Kind.START, {"ranks": [0, 1], **meta} if meta else meta, arrays), LIMITS,
                      peer_rules(LIMITS))


def test_a_message_of_another_protocol_version_is_refused_naming_both_versions():
    from prism_onnx.runtime.protocol import CONTROL_HEADER, CONTROL_MAGIC, VERSION

    parts = [CONTROL_HEADER.pack(CONTROL_MAGIC, VERSION - 1, int(Kind.HELLO)), b"{}"]
    with pytest.raises(FrameError, match=f"protocol version {VERSION - 1}; this runner speaks version {VERSION}"):
        decode_record(parts, LIMITS)
