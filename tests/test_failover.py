"""Elastic failover over real runner processes (loopback, CurveZMQ): lose a device or the coordinator in the
middle of a stream of requests and lose no request (issue 9).

The stream is the real batch client, `prism infer --texts-file - --server r0,r1,r2 --save DIR`, fed one line
at a time through its stdin, so the test decides when each request is sent. A kill happens *provably* in the
middle of a request: the test freezes runner 2 (SIGSTOP), sends a request, waits until the coordinator's
STATUS shows that request waiting for runner 2, and only then kills the victim (SIGKILL: a crash, the
kernel closes its connections). Nothing here asserts a duration: the stream waits for events (a STATUS, a
log line, a reply), and the 30 s rejoin guard only stops a hang. The runners' heartbeat timeout is 5 s so
that the freeze itself is never taken for a loss; a kill is noticed when its connections close (as on a LAN
when a board's process dies; a powered-off board is noticed after the heartbeat timeout, 1 s by default).
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import hf_forward, sst2_sentences, tiny_model
from prism_onnx.runtime.cluster import LocalCluster
from prism_onnx.runtime.executor import Executor
from test_runtime import poll_until

STREAM = 300


class Stream:
    """`prism infer --texts-file -` against every serving runner of `cluster`, one line at a time."""

    def __init__(self, cluster, bundle, texts, save):
        cmd = [sys.executable, "-m", "prism_onnx.cli", "infer", "--server", cluster.servers, "--keys",
               str(bundle / "client"), "--texts-file", "-", "--save", str(save), "--timeout", "60"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.texts, self.sent, self.records, self.lines = texts, 0, [], queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()

    def send(self) -> None:
        self.proc.stdin.write(self.texts[self.sent % len(self.texts)] + "\n")
        self.proc.stdin.flush()
        self.sent += 1

    def receive(self) -> dict:
        rec = json.loads(self.lines.get(timeout=60))
        rec["t"] = time.monotonic()
        self.records.append(rec)
        assert rec["ok"], rec
        return rec

    def one(self) -> dict:
        self.send()
        return self.receive()

    def close(self) -> tuple[int, str]:
        self.proc.stdin.close()
        err = self.proc.stderr.read()
        return self.proc.wait(60), err


def freeze_and_kill(cluster, stream, victim: int, frozen: int = 2) -> tuple[dict, float]:
    """Freeze runner `frozen`, send one request, wait until coordinator 0 shows it waiting for `frozen`, then
    SIGKILL runner `victim` (and let `frozen` go on if it is not the victim). -> (that request's record, the
    time of the kill)."""
    os.killpg(cluster.procs[frozen].pid, signal.SIGSTOP)
    stream.send()
    poll_until(lambda: any(frozen in r["waiting_for"] for r in cluster.client.status()["requests"]),
               f"a request waits for runner {frozen}")
    t_kill = time.monotonic()
    cluster.kill(victim)
    if victim != frozen:
        os.killpg(cluster.procs[frozen].pid, signal.SIGCONT)
    return stream.receive(), t_kill


def restart_and_rejoin(cluster, stream, k: int) -> tuple[float, dict]:
    """Restart runner k while the stream goes on; -> (seconds from the moment it is up (its log says so) to
    the first reply whose plan holds it, that reply)."""
    before = cluster.times_up(k)
    cluster.start_device(k)
    while cluster.times_up(k) == before:
        assert cluster.procs[k].poll() is None, cluster.log_tail(k)
        rec = stream.one()
        assert k not in rec["devices"]
    t_up = time.monotonic()
    rec = stream.one()
    while k not in rec["devices"]:
        assert cluster.procs[k].poll() is None and time.monotonic() - t_up < 300, cluster.log_tail(k)  # hang guard
        rec = stream.one()
    return rec["t"] - t_up, rec


def run_stream_with_kills(bundle, tmp_path, texts) -> dict:
    save = tmp_path / "outputs"
    out = {}
    with LocalCluster(bundle, serve_all=True, extra_args=["--heartbeat-timeout", "5"]) as cluster:
        servers = cluster.servers.split(",")
        stream = Stream(cluster, bundle, texts, save)
        for _ in range(40):
            assert stream.one()["devices"] == [0, 1, 2]
        # 1. the rank-2 runner dies in the middle of a request: it is rerun over devices 0 and 1
        rec, t_kill = freeze_and_kill(cluster, stream, victim=2)
        # why the first attempt was abandoned names device 2: "lost device 2" when the coordinator's membership
        # notices first, "cannot send to device 2" when its means to the dead runner fail first (a race)
        assert rec["devices"] == [0, 1] and rec["attempts"] == 2 and "device 2" in rec["reruns"][0], rec
        out["kill_2_to_reply_s"] = rec["t"] - t_kill
        for _ in range(20):
            assert stream.one()["devices"] == [0, 1]
        out["rejoin_2_s"], _ = restart_and_rejoin(cluster, stream, 2)
        for _ in range(20):
            assert stream.one()["devices"] == [0, 1, 2]
        # 2. the coordinator (rank 0) dies in the middle of a request: the client resends it to rank 1
        rec, t_kill = freeze_and_kill(cluster, stream, victim=0)
        assert rec["server"] == servers[1] and len(rec["failovers"]) == 1 and servers[0] in rec["failovers"][0], rec
        assert rec["devices"] == [1, 2], rec
        out["kill_0_to_reply_s"] = rec["t"] - t_kill
        for _ in range(20):
            assert stream.one()["devices"] == [1, 2]
        out["rejoin_0_s"], _ = restart_and_rejoin(cluster, stream, 0)
        while stream.sent < STREAM:
            assert stream.one()["devices"] == [0, 1, 2]
        code, err = stream.close()
    assert code == 0 and f"{stream.sent} requests, 0 failed" in err, err
    out["records"] = stream.records
    latencies = sorted(r["latency_ms"] for r in stream.records)
    out["normal_ms"], out["max_ms"] = latencies[len(latencies) // 2], latencies[-1]
    # Recovery times are printed, not asserted (the machine is shared; benchmarks/failover.py measures them)
    print({k: v for k, v in out.items() if k != "records"})
    assert [r["index"] for r in stream.records] == list(range(stream.sent))
    return out


@pytest.fixture(scope="module")
def texts():
    return sst2_sentences(400)


def saved(tmp_path, index):
    return dict(np.load(tmp_path / "outputs" / f"{index:06d}.npz"))


def test_cr1_stream_loses_no_request_when_a_device_then_the_coordinator_dies(make_bundle, tmp_path, texts):
    """P=3, CR=1: >= 300 requests; rank 2 killed mid-request, then the coordinator (rank 0); 0 failed, every
    output equals the unpartitioned transformers model (CR=1 is exact under any membership)."""
    import torch

    bundle = make_bundle("BertModel", devices=3, compression_ratio=1)
    out = run_stream_with_kills(bundle, tmp_path, texts)
    model, requests = tiny_model("BertModel"), Executor(bundle).requests
    worst, threads = 0.0, torch.get_num_threads()
    torch.set_num_threads(1)  # 300 tiny forwards: one thread is 40x faster than a pool on a busy machine
    try:
        for r in out["records"]:
            expected = hf_forward(model, requests.model_inputs(texts=[texts[r["index"] % len(texts)]]))
            got = saved(tmp_path, r["index"])
            for name in ("last_hidden_state", "pooler_output"):
                worst = max(worst, float(np.abs(got[name] - getattr(expected, name).numpy()).max()))
    finally:
        torch.set_num_threads(threads)
    assert worst <= 1e-4, worst


def test_cr4_stream_outputs_are_those_of_the_plan_each_reply_reports(make_bundle, tmp_path, texts):
    """The same at CR=4: 0 failed, and each output equals the in-process executor run over the devices and
    split that its reply reports."""
    bundle = make_bundle("BertModel", devices=3, compression_ratio=4)
    out = run_stream_with_kills(bundle, tmp_path, texts)
    ex = Executor(bundle)
    plans = set()
    for r in out["records"]:
        inputs = ex.requests.model_inputs(texts=[texts[r["index"] % len(texts)]])
        res = ex.run(inputs, ranks=r["devices"], split_weights=r["split_weights"])
        assert res.stats.spans == r["spans"]
        got = saved(tmp_path, r["index"])
        for name, value in res.outputs.items():
            assert np.array_equal(got[name], value), (r["index"], name)
        plans.add(tuple(r["devices"]))
    assert plans == {(0, 1, 2), (0, 1), (1, 2)}


def test_min_devices_fails_requests_naming_the_lost_rank(make_bundle):
    """--min-devices 3 at P=3: once rank 2 is lost, requests fail with an error that names it (never a
    timeout, never an answer from fewer devices)."""
    from prism_onnx.errors import PrismError

    bundle = make_bundle("BertModel", devices=3, compression_ratio=1)
    with LocalCluster(bundle, serve_all=True, extra_args=["--min-devices", "3"]) as cluster:
        ids = np.array([[7, 8, 9, 10, 11, 12]])
        cluster.client.infer(input_ids=ids)
        assert cluster.client.last_reply["stats"]["ranks"] == [0, 1, 2]
        cluster.kill(2)

        def refused():
            try:
                cluster.client.infer(input_ids=ids)
            except PrismError as e:
                return str(e)
            assert cluster.client.last_reply["stats"]["ranks"] == [0, 1, 2]  # answered before the loss was seen

        error = poll_until(refused, "a request refused below --min-devices")
        assert "--min-devices is 3" in error and "lost device [2]" in error, error


def test_launch_kill_with_an_ids_file_loses_nothing(make_bundle, tmp_path):
    """`prism launch --ids-file F --kill 2@0 --save DIR`: one JSON line per line of F, in order, all ok, one
    NNNNNN.npz per request, each equal to the unpartitioned model (CR=1: exact under any membership)."""
    bundle = make_bundle("BertModel", devices=3, compression_ratio=1)
    rng = np.random.default_rng(3)
    rows = [rng.integers(5, 300, size=int(rng.integers(4, 20))).tolist() for _ in range(25)]
    (tmp_path / "ids.txt").write_text("".join(",".join(map(str, r)) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "-m", "prism_onnx.cli", "launch", str(bundle), "--ids-file",
                          str(tmp_path / "ids.txt"), "--save", str(tmp_path / "saved"), "--kill", "2@0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "25 requests, 0 failed" in out.stderr, out.stderr[-2000:]
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["index"] for r in records] == list(range(25)) and all(r["ok"] for r in records)
    assert all(r["devices"] in ([0, 1, 2], [0, 1]) for r in records), [r["devices"] for r in records]
    model = tiny_model("BertModel")
    for i, ids in enumerate(rows):
        expected = hf_forward(model, {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)})
        got = dict(np.load(tmp_path / "saved" / f"{i:06d}.npz"))
        assert np.abs(got["last_hidden_state"] - expected.last_hidden_state.numpy()).max() <= 1e-4
