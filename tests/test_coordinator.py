"""The coordinator without sockets or models: a hand-written manifest, fake membership, plain functions."""

from pathlib import Path

import numpy as np
import pytest

from prism_onnx.errors import FrameError, InputError
from prism_onnx.runtime.admission import request_rules
from prism_onnx.runtime.bundle import DeviceBundle
from prism_onnx.runtime.coordinator import Coordinator
from prism_onnx.runtime.protocol import Kind, encode
from prism_onnx.runtime.schema import Abort, Result, Tokens, TrafficInfo, WireError, decode_record
from prism_onnx.runtime.jobs import Job

D, L = 8, 2


def manifest(devices=3):
    """A typed manifest of a small text encoder (no graph files: nothing here runs a graph)."""
    from prism_onnx.manifest import ExportSettings, GraphFile, Manifest, ModelSpec, Preprocessing, TensorInfo
    from prism_onnx.program import build_program

    spec = ModelSpec(model_type="bert", architecture="BertModel", hidden_size=D, num_heads=2, num_layers=L,
                     max_positions=16, causal=False, sinks=("first", "last"), input_kind="text",
                     embed_inputs=("input_ids",), token_outputs=("last_hidden_state",),
                     pooled_outputs=("pooler_output",), vocab_size=100)
    program = build_program(spec)
    graphs = {g: GraphFile(f"{g}.onnx", (), ()) for g in program.graphs()}
    graphs["embed"] = GraphFile("embed.onnx", (TensorInfo("input_ids", "int64", ("batch", "tokens")),), ())
    graphs["token_head"] = GraphFile("token_head.onnx", (),
                                     (TensorInfo("last_hidden_state", "float32", ("b", "t", D)),))
    settings = ExportSettings(devices=devices, compression_ratio=2, max_batch=4, max_seq_len=16)
    return Manifest(export_id="e" * 64, model=spec, settings=settings, program=program, graphs=graphs,
                    preprocessing=Preprocessing("text"), files={}, rank=0)


class FakeMembership:
    def __init__(self, devices=3):
        self.devices, self.down = devices, []

    def members(self, now):
        return [q for q in range(self.devices) if q not in self.down]

    def describe(self, q, now):
        return f"device {q} sent no heartbeat for 1.2 s"


@pytest.fixture
def coord():
    sent, replies, jobs, local = [], [], [], []
    c = Coordinator(DeviceBundle(Path("."), manifest()), 0, FakeMembership(), lambda q, parts: sent.append((q, parts))
                    or True, lambda client, record: replies.append((client, record)),
                    lambda job: jobs.append(job) or True, timeout=1.0,
                    abort_local=lambda request, why: local.append(request))
    c.sent, c.replies, c.jobs, c.local_aborts = sent, replies, jobs, local
    return c


def aborts(coord):
    """(device, request id) of every ABORT sent so far, the coordinator's own worker included."""
    out = []
    for q, parts in coord.sent:
        rec = decode_record(parts)
        assert isinstance(rec, Abort)
        out.append((q, rec.request))
    return sorted(out + [(coord.rank, r) for r in coord.local_aborts])


def decoded(coord, meta=None, arrays=None):
    """A REQUEST as the host decodes it: framing, arrays, the typed fields and their values."""
    parts = encode(Kind.REQUEST, meta if meta is not None else {"call": 7},
                   arrays if arrays is not None else {"input_ids": np.array([[1, 2, 3, 4, 5]])})
    return decode_record(parts, coord.limits, {Kind.REQUEST: request_rules(coord.limits)})


def request(coord, meta=None, arrays=None, client=b"c1", now=0.0):
    coord.on_request(client, decoded(coord, meta, arrays), now)


def result(request_id, rank, ok=True, n=2, error="", retry=False, span=(0, 0), code="invalid_input"):
    traffic = TrafficInfo((5, 5), (10, 10))
    outputs = {"last_hidden_state": np.full((1, n, D), float(rank), np.float32)} if ok else {}
    if ok and rank == 0:
        outputs["pooler_output"] = np.ones((1, D), np.float32)
    err = None if ok else WireError("PeerError" if retry else "InputError", "peer_failed" if retry else code, error,
                                    retry)
    return Result(request_id, rank, err, {"embed": 0.001}, traffic, span, arrays=outputs)


def error_of(reply) -> str:
    assert not reply.ok
    return reply.error.message


def test_request_runs_on_every_device_and_the_reply_gathers_outputs_in_rank_order(coord):
    request(coord)
    (job,) = coord.jobs
    assert isinstance(job, Job) and job.client.arrays["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert job.deadline == pytest.approx(coord.budget) and coord.budget == 1.0 * (L + 2)
    assert job.attempt.coordinator == 0 and job.attempt.ranks == (0, 1, 2) and job.attempt.request & 0xFFF == 0
    for rank in (2, 0, 1):
        coord.on_result(result(job.request, rank), now=0.5)
    ((client, reply),) = coord.replies
    assert client == b"c1" and reply.ok and reply.call == 7 and not coord.pending
    assert reply.arrays["last_hidden_state"][0, :, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert reply.stats["bytes_sent"] == [10, 10, 10] and reply.stats["latency_ms"] == 500.0


def test_a_device_error_fails_the_request_once_and_aborts_everyone(coord):
    request(coord)
    r = coord.jobs[0].request
    coord.on_result(result(r, 1), 0.1)
    coord.on_result(result(r, 2, ok=False, error="text 0 has 702 tokens", code="too_long"), 0.2)
    coord.on_result(result(r, 0), 0.3)  # late: ignored
    ((_, reply),) = coord.replies
    e = reply.error
    assert (e.type, e.code, e.message, e.ranks) == ("InputError", "too_long", "text 0 has 702 tokens", (2,))
    assert aborts(coord) == [(0, r), (1, r), (2, r)]  # every device of the attempt, this one's worker too


def test_deadline_expiry_names_the_missing_devices(coord):
    request(coord)
    coord.on_result(result(coord.jobs[0].request, 0), 0.1)
    coord.expire(1.0)
    assert not coord.replies
    coord.expire(coord.budget + 0.1)
    assert "timed out waiting for devices [1, 2]" in error_of(coord.replies[0][1])
    assert coord.replies[0][1].error.type == "Timeout" and coord.replies[0][1].error.ranks == (1, 2)


def test_planned_over_the_live_devices_and_refused_below_min_devices(coord):
    coord.membership.down = [1]
    request(coord)
    (job,) = coord.jobs
    assert job.ranks == (0, 2) and coord.pending[job.request].ranks == (0, 2)
    coord.min_devices = 3
    request(coord, client=b"late")
    assert len(coord.jobs) == 1
    assert error_of(coord.replies[0][1]) == ("only 2 of 3 devices are live ([0, 2]) and --min-devices is 3: lost "
                                             "device [1] (device 1 sent no heartbeat for 1.2 s)")
    assert coord.replies[0][1].error.type == "DevicesUnavailable" and coord.replies[0][1].error.retryable


@pytest.mark.parametrize("meta,arrays,error,match", [
    ({"texts": 5}, {}, FrameError, "field 'texts' must be a list"),
    ({"texts": ["a"] * 100_000}, {}, InputError, "100000 texts exceeds this export's --max-batch 4"),
    ({"texts": ["x" * 1_000_000]}, {}, InputError, "text 0 has 1,000,000 characters; the limit is 4,096"),
    ({"texts": ["a", 3]}, {}, FrameError, "field 'texts' must be a string"),
    ({"outputs": 5}, None, FrameError, "field 'outputs' must be a list"),
    ({"outputs": ["logits"]}, None, InputError, "unknown outputs"),
    ({"bogus": 1}, None, FrameError, "unknown field(s) ['bogus']"),
    ({}, {"input_ids": np.array([[1, 200]])}, InputError, "input_ids out of range"),
    ({}, {"input_ids": np.array([[1, 2]]), "attention_mask": np.array([[0, 0]])}, InputError,
     "at least one real token"),
    ({}, {"input_ids": np.array([[1, 2]]), "attention_mask": np.array([[1, 5]])}, InputError, "only 0 and 1"),
    ({"texts": ["a"]}, None, InputError, "exactly one of"),
    ({}, {}, InputError, "exactly one of"),
    ({"generate": {"max_new_tokens": 4}}, None, InputError, "this export cannot generate"),
])
def test_bad_requests_get_one_clear_typed_error_before_the_coordinator(coord, meta, arrays, error, match):
    """A REQUEST is checked while it is decoded (the host answers a refusal with its error; the coordinator
    never sees it): the error's class says whose fault it is, its message what to change."""
    with pytest.raises(error, match=match.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        decoded(coord, meta, arrays)


def test_busy_when_too_many_requests_are_pending_or_the_worker_queue_is_full(coord):
    coord.max_pending = 2
    for _ in range(3):
        request(coord)
    assert len(coord.jobs) == 2 and "busy" in error_of(coord.replies[0][1])
    assert coord.replies[0][1].error.type == "Busy" and coord.replies[0][1].error.code == "busy"
    coord.submit = lambda job: False
    coord.max_pending = 10
    request(coord)
    assert "worker queue is full" in error_of(coord.replies[1][1])


def test_outputs_that_do_not_fit_together_fail_the_request_not_the_runner(coord):
    request(coord)
    r = coord.jobs[0].request
    coord.on_result(result(r, 0), 0.1)
    coord.on_result(result(r, 1), 0.1)
    bad = result(r, 2)
    bad.arrays["last_hidden_state"] = np.zeros((3, 2, D), np.float32)  # another batch size
    coord.on_result(bad, 0.2)
    assert "do not fit together" in error_of(coord.replies[0][1]) and not coord.pending


# ---------------------------------------------------------------------------------------- elastic reruns
def test_a_lost_device_reruns_its_requests_over_the_survivors_with_new_ids(coord):
    """Device 2 is lost while two requests wait for it: each attempt is abandoned (ABORT to its devices, so
    they release its exchange state), and each request reruns over devices 0 and 1 with a new id; late
    results of the abandoned attempt are ignored; the reply says which devices computed it, after how many
    attempts and why."""
    request(coord, client=b"a")
    request(coord, client=b"b")
    old = [j.request for j in coord.jobs]
    coord.on_result(result(old[0], 1), 0.1)
    coord.membership.down = [2]
    coord.on_peer_lost(2, "device 2 closed the connection", now=0.2)
    assert not coord.replies and len(coord.jobs) == 4
    new = [j.request for j in coord.jobs[2:]]
    assert all(j.ranks == (0, 1) for j in coord.jobs[2:]) and not set(new) & set(old)
    assert sorted(coord.pending) == sorted(new) and aborts(coord) == sorted((q, r) for r in old for q in (0, 1, 2))
    coord.on_result(result(old[0], 0), 0.3)  # late, from the abandoned attempt: ignored
    coord.on_result(result(new[0], 1, span=(3, 5)), 0.4)
    coord.on_result(result(new[0], 0, span=(0, 3)), 0.5)
    ((client, reply),) = coord.replies
    assert client == b"a" and reply.ok and reply.attempts == 2
    assert reply.reruns == ("lost device 2 (device 2 closed the connection)",)
    assert reply.stats["ranks"] == [0, 1] and reply.stats["spans"] == [[0, 3], [3, 5]]
    assert reply.stats["split_weights"] is None and reply.stats["latency_ms"] == 500.0
    assert reply.arrays["last_hidden_state"][0, :, 0].tolist() == [0, 0, 1, 1]


def test_a_device_that_failed_for_another_devices_sake_is_rerun_when_membership_changes_or_after_the_hold(coord):
    """Device 1 reports that device 2 went silent (a RESULT with retry) before this coordinator noticed: the
    attempt is abandoned and held; it reruns as soon as device 2 leaves the members, or, if membership does
    not change (a transient failure), when the hold ends. A device's own error (no retry) fails at once."""
    request(coord)
    first = coord.jobs[0].request
    coord.on_result(result(first, 1, ok=False, error="no means from device(s) [2] within 1 s", retry=True), 0.1)
    assert len(coord.jobs) == 1 and not coord.replies and coord.pending[first].held_until == pytest.approx(1.3)
    coord.expire(0.2)
    assert len(coord.jobs) == 1  # still held: membership unchanged, the hold not over
    coord.membership.down = [2]
    coord.expire(0.3)
    assert len(coord.jobs) == 2 and coord.jobs[1].ranks == (0, 1)
    second = coord.jobs[1].request
    coord.membership.down = []
    coord.on_send_failed(second, 1, "device 0 cannot send to device 1: not connected", 0.4)
    coord.expire(0.5)
    assert len(coord.jobs) == 2  # every device of the attempt is still a member: wait ...
    coord.expire(0.4 + coord.hold_s)
    assert len(coord.jobs) == 3 and coord.jobs[2].ranks == (0, 1, 2)  # ... until the hold ends (device 2 is back)
    third = coord.jobs[2].request
    coord.on_result(result(third, 2, ok=False, error="Sequence too long", retry=False), 2.0)
    ((_, reply),) = coord.replies
    assert reply.call == 7 and error_of(reply) == "Sequence too long" and reply.error.type == "InputError"


def test_reruns_are_bounded_and_fail_fast_below_min_devices(coord):
    coord.min_devices = 2
    request(coord)
    coord.membership.down = [2]
    coord.on_peer_lost(2, "device 2 closed the connection", now=0.1)
    assert coord.jobs[-1].ranks == (0, 1)
    coord.membership.down = [1, 2]
    coord.on_peer_lost(1, "device 1 closed the connection", now=0.2)
    error = error_of(coord.replies[0][1])
    assert "only 1 of 3 devices are live ([0]) and --min-devices is 2: lost devices [1, 2]" in error
    assert "earlier attempts: lost device 2" in error and not coord.pending
    coord.min_devices, coord.max_attempts, coord.membership.down = 1, 2, []
    request(coord)
    for q in (1, 2):
        coord.on_peer_lost(q, f"device {q} closed the connection", now=0.3)
    assert "gave up after 2 attempts" in error_of(coord.replies[1][1])


def test_generation_carries_on_without_a_finished_device_and_reruns_when_the_tail_is_lost(coord):
    """The prefill of device 1 is in: losing it does not matter (the tail decodes from its own cache). Losing
    the tail while it decodes reruns the request from scratch over the survivors, whose tail is device 1;
    once tokens were streamed to the client, the request fails instead (the client has seen them)."""
    gen = {"max_new_tokens": 4, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "stop_token_ids": [],
           "repetition_penalty": 1.0}
    coord.limits = type(coord.limits)(**{**coord.limits.__dict__, "generates": True})
    for stream in (False, True):
        coord.membership.down = []
        request(coord, {"call": 1, "generate": gen, "stream": stream}, client=b"s" if stream else b"g")
        r = coord.jobs[-1].request
        coord.on_result(result(r, 0), 0.1)
        coord.on_result(result(r, 1), 0.1)
        coord.membership.down = [1]
        coord.on_peer_lost(1, "device 1 closed the connection", now=0.2)
        assert coord.jobs[-1].request == r  # no rerun
        if stream:
            coord.on_tokens(Tokens(r, 0, rank=2, arrays={"ids": np.array([7])}), 0.3)
            assert isinstance(coord.replies[-1][1], Tokens) and coord.replies[-1][1].step == 0
        coord.membership.down = [1, 2]
        coord.on_peer_lost(2, "device 2 closed the connection", now=0.4)
    assert coord.jobs[1].ranks == (0,) and coord.jobs[1].attempt.generate.max_new_tokens == 4  # the first, rerun
    assert "the tail device was lost after it streamed tokens" in error_of(coord.replies[-1][1])


@pytest.mark.parametrize("meta,match", [
    ({"generate": {"max_new_tokens": 1000}},
     "max_new_tokens 1000: this model has 16 positions, which hold the prompt and its new tokens (ask for at most 15)"),
    ({"split": [1.0, 1.0]}, "split 1,1 has 2 weights; this export has 3 devices (one weight each, 0 to leave one out)"),
])
def test_generation_and_split_requests_are_refused_naming_the_limit(coord, meta, match):
    """Issue 23: max_new_tokens beyond the positions is a too-long input saying how many fit (not a bound of
    a field); a split of the wrong length names the export's devices."""
    from dataclasses import replace

    limits = replace(coord.limits, generates=True)
    parts = encode(Kind.REQUEST, meta, {"input_ids": np.array([[1, 2, 3, 4, 5]])})
    with pytest.raises(InputError) as e:
        decode_record(parts, limits, {Kind.REQUEST: request_rules(limits)})
    assert str(e.value) == match
