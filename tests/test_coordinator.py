"""The coordinator without sockets or models: a hand-written manifest, fake membership, plain functions."""

from pathlib import Path

import numpy as np
import pytest

from prism_onnx.runtime.bundle import DeviceBundle
from prism_onnx.runtime.coordinator import Coordinator
from prism_onnx.runtime.messages import Result
from prism_onnx.runtime.protocol import Kind, decode
from prism_onnx.runtime.worker import PrepareJob

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
    graphs["token_head"] = GraphFile("token_head.onnx", (), (TensorInfo("last_hidden_state", "float32", ("b", "t", D)),))
    settings = ExportSettings(devices=devices, compression_ratio=2, max_batch=4, max_seq_len=16)
    return Manifest(export_id="e" * 64, model=spec, settings=settings, program=program, graphs=graphs,
                    preprocessing=Preprocessing("text"), files={}, rank=0)


class FakeMembership:
    def __init__(self):
        self.down = []

    def missing(self, now):
        return list(self.down)

    def describe(self, q, now):
        return f"device {q} sent no heartbeat for 1.2 s"


@pytest.fixture
def coord():
    sent, replies, jobs = [], [], []
    c = Coordinator(DeviceBundle(Path("."), manifest()), 0, FakeMembership(), lambda q, parts: sent.append((q, parts))
                    or True, lambda client, meta, arrays=None: replies.append((client, meta, arrays)),
                    lambda job: jobs.append(job) or True, timeout=1.0)
    c.sent, c.replies, c.jobs = sent, replies, jobs
    return c


def request(coord, meta=None, arrays=None, client=b"c1", now=0.0):
    coord.on_request(client, meta if meta is not None else {"call": 7},
                     arrays if arrays is not None else {"input_ids": np.array([[1, 2, 3, 4, 5]])}, now)


def result(request_id, rank, ok=True, n=2, error=""):
    traffic = {"bytes_sent": 10, "bytes_received": 20, "per_layer": {"sent": [5, 5], "received": [10, 10]}}
    outputs = {"last_hidden_state": np.full((1, n, D), float(rank), np.float32)} if ok else {}
    if ok and rank == 0:
        outputs["pooler_output"] = np.ones((1, D), np.float32)
    return Result(request_id, rank, ok, error, {"embed": 0.001}, traffic, outputs)


def test_request_runs_on_every_device_and_the_reply_gathers_outputs_in_rank_order(coord):
    request(coord)
    (job,) = coord.jobs
    assert isinstance(job, PrepareJob) and job.kwargs["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert job.deadline == pytest.approx(coord.budget) and coord.budget == 1.0 * (L + 2)
    for rank in (2, 0, 1):
        coord.on_result(result(job.request, rank), now=0.5)
    ((client, meta, arrays),) = coord.replies
    assert client == b"c1" and meta["ok"] and meta["call"] == 7 and not coord.pending
    assert arrays["last_hidden_state"][0, :, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert meta["stats"]["bytes_sent"] == [10, 10, 10] and meta["stats"]["latency_ms"] == 500.0


def test_a_device_error_fails_the_request_once_and_aborts_everyone(coord):
    request(coord)
    r = coord.jobs[0].request
    coord.on_result(result(r, 1), 0.1)
    coord.on_result(result(r, 2, ok=False, error="device 2: no means"), 0.2)
    coord.on_result(result(r, 0), 0.3)  # late: ignored
    assert [m["error"] for _, m, _ in coord.replies] == ["device 2: no means"]
    aborts = [(q, decode(parts, 0)) for q, parts in coord.sent]
    assert sorted(q for q, _ in aborts) == [1, 2] and all(k == Kind.ABORT and m["request"] == r for _, (k, m, _) in aborts)


def test_a_lost_peer_fails_every_pending_request_at_once(coord):
    request(coord, client=b"a")
    request(coord, client=b"b")
    coord.on_peer_lost(2, "device 2 sent no heartbeat for 1.0 s")
    assert sorted(c for c, _, _ in coord.replies) == [b"a", b"b"]
    assert all("device 2 sent no heartbeat" in m["error"] for _, m, _ in coord.replies) and not coord.pending


def test_deadline_expiry_names_the_missing_devices(coord):
    request(coord)
    coord.on_result(result(coord.jobs[0].request, 0), 0.1)
    coord.expire(1.0)
    assert not coord.replies
    coord.expire(coord.budget + 0.1)
    assert "timed out waiting for devices [1, 2]" in coord.replies[0][1]["error"]


def test_refused_when_a_device_is_missing(coord):
    coord.membership.down = [2]
    request(coord)
    assert not coord.jobs and "devices [2] are not connected: device 2 sent no heartbeat" in coord.replies[0][1]["error"]


@pytest.mark.parametrize("meta,arrays,match", [
    ({"texts": 5}, {}, "'texts' must be a non-empty list"),
    ({"texts": ["a"] * 100_000}, {}, "100000 texts exceeds this export's --max-batch 4"),
    ({"texts": ["x" * 1_000_000]}, {}, "text 0 has 1,000,000 characters; the limit is 4,096"),
    ({"texts": ["a", 3]}, {}, "text 1 is a int"),
    ({"outputs": 5}, None, "'outputs' must be a non-empty list"),
    ({"outputs": ["logits"]}, None, "unknown outputs"),
    ({"bogus": 1}, None, "unknown request field"),
    ({}, {"input_ids": np.array([[1, 200]])}, "input_ids out of range"),
    ({}, {"input_ids": np.array([[1, 2]]), "attention_mask": np.array([[0, 0]])}, "at least one real token"),
    ({}, {"input_ids": np.array([[1, 2]]), "attention_mask": np.array([[1, 5]])}, "only 0 and 1"),
    ({"texts": ["a"]}, None, "exactly one of"),
    ({}, {}, "exactly one of"),
])
def test_bad_requests_get_one_clear_error_and_nothing_runs(coord, meta, arrays, match):
    request(coord, meta, arrays)
    assert not coord.jobs and not coord.pending
    (_, reply, _), = coord.replies
    assert not reply["ok"] and match in reply["error"]


def test_busy_when_too_many_requests_are_pending_or_the_worker_queue_is_full(coord):
    coord.max_pending = 2
    for _ in range(3):
        request(coord)
    assert len(coord.jobs) == 2 and "busy" in coord.replies[0][1]["error"]
    coord.submit = lambda job: False
    coord.max_pending = 10
    request(coord)
    assert "worker queue is full" in coord.replies[1][1]["error"]


def test_outputs_that_do_not_fit_together_fail_the_request_not_the_runner(coord):
    request(coord)
    r = coord.jobs[0].request
    coord.on_result(result(r, 0), 0.1)
    coord.on_result(result(r, 1), 0.1)
    bad = result(r, 2)
    bad.outputs["last_hidden_state"] = np.zeros((3, 2, D), np.float32)  # another batch size
    coord.on_result(bad, 0.2)
    assert "do not fit together" in coord.replies[0][1]["error"] and not coord.pending
