"""The device runtime over ZeroMQ: `prism launch` / `prism run` / `prism infer`, byte counters, failures.

Correctness bound: a launched cluster runs the same ONNX graphs with the same thread count on the same
inputs as the in-process executor, and both pass the means through the same wire encoding, so outputs
must be bit-identical for every wire precision (float32, float16, int8).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq
from click.testing import CliRunner

from conftest import EXPORT_ARCHS, as_served, inputs_for_arch
from prism_onnx.cli import main
from prism_onnx.errors import FrameError
from prism_onnx.runtime.cluster import LocalCluster, free_ports
from prism_onnx.runtime.executor import Executor
from prism_onnx.runtime.keys import RunnerKeys
from prism_onnx.runtime.wire import MAGIC, MEANS_HEADER, MeansFrame, decode_means, encode_means, plan_traffic


def request_kwargs(inputs):
    return {"pixel_values": inputs["pixel_values"]} if "pixel_values" in inputs else \
        {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), (k, float(np.abs(a[k] - b[k]).max()))


def dealer(address: str, keys: tuple[bytes, bytes] | None = None, server_key: bytes | None = None):
    """A raw ZeroMQ DEALER to address; with keys (public, secret) it speaks CurveZMQ to server_key."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if keys:
        s.curve_publickey, s.curve_secretkey = keys
        s.curve_serverkey = server_key
    s.connect(address if address.startswith("tcp://") else f"tcp://{address}")
    return s


def client_dealer(cluster):
    k = cluster.client_keys
    return dealer(cluster.serve_address, (k.public, k.secret), k.server)


def device_dealer(bundle, cluster, as_rank: int, to_rank: int):
    """A socket holding device `as_rank`'s key, connected to device `to_rank`'s peer port."""
    k = RunnerKeys.load(bundle / f"device-{as_rank}" / "keys", as_rank, len(cluster.ports))
    return dealer(f"127.0.0.1:{cluster.ports[to_rank]}", (k.public, k.secret), k.peers[to_rank])


def poll_until(fn, what: str, timeout: float = 60.0, every: float = 0.1):
    """Wait until fn() returns something true (generous deadline for a loaded machine); return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def assert_traffic_is_analytic(executor: Executor, inputs: dict, stats: dict):
    """The bytes a reply reports equal those its plan (devices, split) implies."""
    _, plan = executor.requests.prepare(inputs, stats["split_weights"], stats["ranks"])
    m = executor.manifest
    sent, received = plan_traffic(plan, m.model.row_width, m.model.num_layers, m.settings.wire_dtype)
    assert stats["bytes_sent"] == [sum(s) for s in sent]
    assert stats["bytes_received"] == [sum(r) for r in received]
    assert [d["sent"] for d in stats["per_layer"]] == sent
    assert [d["received"] for d in stats["per_layer"]] == received


@pytest.mark.parametrize("arch,devices", [(a, 3) for a in EXPORT_ARCHS] + [("BertModel", 2), ("GPT2LMHeadModel", 2)])
def test_launch_equals_executor_and_counts_bytes(arch, devices, make_bundle):
    bundle = make_bundle(arch, devices=devices, compression_ratio=3)
    inputs = inputs_for_arch(arch)
    ex = Executor(bundle)
    expected = ex.run(inputs)
    with LocalCluster(bundle) as cluster:
        outputs, stats = cluster.client.infer(**request_kwargs(inputs))
        # a second request with another length (text) or another batch (images) on the same cluster
        other = inputs_for_arch(arch, seed=1, lengths=(21,)) if not arch.startswith("ViT") else \
            {"pixel_values": inputs["pixel_values"][:1]}
        outputs2, stats2 = cluster.client.infer(**request_kwargs(other))
    assert_same(outputs, as_served(ex, inputs, stats))
    assert_same(outputs2, as_served(ex, other, stats2))
    assert_traffic_is_analytic(ex, inputs, stats)
    assert_traffic_is_analytic(ex, other, stats2)
    assert stats["bytes_sent"] == expected.stats.bytes_sent


@pytest.mark.parametrize("wire", ["float16", "int8"])
def test_lossy_wire_over_zeromq_equals_executor(wire, make_bundle):
    bundle = make_bundle("GPT2LMHeadModel", devices=3, compression_ratio=2, wire_dtype=wire)
    inputs = inputs_for_arch("GPT2LMHeadModel")
    ex = Executor(bundle)
    with LocalCluster(bundle) as cluster:
        outputs, stats = cluster.client.infer(**request_kwargs(inputs))
    assert_same(outputs, ex.run(inputs).outputs)
    assert_traffic_is_analytic(ex, inputs, stats)


def test_cli_launch_and_infer_save_npz(make_bundle, tmp_path):
    bundle = make_bundle("BertModel", devices=2, compression_ratio=2)
    out = tmp_path / "out.npz"
    r = CliRunner().invoke(main, ["launch", str(bundle), "--text", "a fine film", "--text", "dull",
                                  "--save", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["devices"] == 2 and len(rep["stats"]["bytes_sent"]) == 2
    saved = dict(np.load(out))
    assert set(saved) == {"last_hidden_state", "pooler_output"}
    expected = Executor(bundle).requests.model_inputs(texts=["a fine film", "dull"])
    assert saved["last_hidden_state"].shape[:2] == expected["input_ids"].shape

    with LocalCluster(bundle) as cluster:
        keys = str(bundle / "client")
        r = CliRunner().invoke(main, ["infer", "--server", cluster.serve_address, "--input-ids", "101,2000,102",
                                      "--json"])
        assert r.exit_code == 2 and "give --keys" in r.output
        r = CliRunner().invoke(main, ["infer", "--server", cluster.serve_address, "--keys", keys, "--input-ids",
                                      "101,2000,102", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["outputs"]["last_hidden_state"]["shape"] == [1, 3, 32]
        # a bad request gets a clear error and the cluster keeps serving
        r = CliRunner().invoke(main, ["infer", "--server", cluster.serve_address, "--keys", keys, "--input-ids",
                                      ",".join(["5"] * 65)])
        assert r.exit_code == 1 and "longer than" in r.output
        assert cluster.operator_status()["ready"]


def test_many_requests_in_a_row_queued_and_bounded_memory(make_bundle):
    bundle = make_bundle("BertModel", devices=3, compression_ratio=2)
    ex = Executor(bundle)
    cases = [inputs_for_arch("BertModel", seed=s, lengths=lengths)
             for s, lengths in enumerate([(13, 9), (30,), (5, 7, 3), (64,)])]

    def rss_kb(pid):
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1])

    with LocalCluster(bundle) as cluster:
        for i in range(20):
            outputs, stats = cluster.client.infer(**request_kwargs(cases[i % 4]))
            assert_same(outputs, as_served(ex, cases[i % 4], stats))
        before = [rss_kb(p.pid) for p in cluster.procs]
        for i in range(200):
            outputs, stats = cluster.client.infer(**request_kwargs(cases[i % 4]))
            assert_same(outputs, as_served(ex, cases[i % 4], stats))
        after = [rss_kb(p.pid) for p in cluster.procs]
        # several requests queued at once: their layers must not mix
        socks = []
        from prism_onnx.runtime.connection import REPLY_RULES
        from prism_onnx.runtime.schema import Request, decode_record, encode_record
        for i in range(8):
            s = client_dealer(cluster)
            s.send_multipart(encode_record(Request(arrays=request_kwargs(cases[i % 4]))))
            socks.append(s)
        for i, s in enumerate(socks):
            assert s.poll(30000)
            reply = decode_record(s.recv_multipart(), None, REPLY_RULES)
            assert reply.ok, reply.error
            want = as_served(ex, cases[i % 4], reply.stats)  # equal lengths may have run as one batch:
            for k, v in want.items():  # the same graphs on more rows, summed in another order (1e-5)
                assert np.abs(np.array(reply.arrays[k]) - v).max() <= 1e-5, k
            s.close(linger=0)
    growth = [a - b for a, b in zip(after, before)]
    print("RSS growth over 200 requests (kB):", growth)
    assert max(growth) < 20_000


def test_runners_stop_cleanly_on_sigint_and_sigterm_and_launch_leaves_none_behind(make_bundle):
    bundle = make_bundle("BertModel", devices=2, compression_ratio=2)
    inputs = inputs_for_arch("BertModel")

    def runners():  # pids of this bundle's `prism run` processes still alive
        out = subprocess.run(["pgrep", "-f", f"prism_onnx.cli run {bundle}/"], capture_output=True, text=True)
        return out.stdout.split()

    with LocalCluster(bundle) as cluster:
        cluster.client.infer(**request_kwargs(inputs))
        assert len(runners()) == 2
        cluster.stop_device(1, signal.SIGINT)  # Ctrl-C on a board
    # rank 0 got SIGTERM from LocalCluster.close; both finished their loop and exited 0
    assert [p.returncode for p in cluster.procs] == [0, 0]
    assert all("stopped" in log.read_text() for log in cluster.logs)
    assert runners() == []

    # `prism launch` whose request fails: exit 1 with the error, and every runner it started is gone
    r = CliRunner().invoke(main, ["launch", str(bundle), "--input-ids", ",".join(["5"] * 65)])
    assert r.exit_code == 1 and "longer than" in r.output
    assert runners() == []


# -------------------------------------------------------------------------------------------- failures
def run_cmd(bundle_dir, rank, peers, *extra):
    return [sys.executable, "-m", "prism_onnx.cli", "run", str(bundle_dir), "--rank", str(rank), "--peers", peers,
            *map(str, extra)]


def test_missing_peer_is_reported_after_the_stated_timeout(make_bundle):
    bundle = make_bundle("BertModel", devices=2, compression_ratio=2)
    ports = free_ports(2)
    peers = f"127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    p = subprocess.run(run_cmd(bundle / "device-0", 0, peers, "--peer-timeout", 2), capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 1
    assert f"peer(s) 1 (tcp://127.0.0.1:{ports[1]}) did not come up within 2 s" in p.stderr


def test_peer_dying_mid_request_is_planned_around_and_rejoins(make_bundle):
    """A frozen peer (SIGSTOP: connected, silent) mid-request: its heartbeats stop, the request is rerun over
    the other two and equals the executor over that plan; resumed, it is back in the plan. Killed: the same;
    restarted, it rejoins. Waits are for replies (poll_until is only a hang guard)."""
    bundle = make_bundle("BertModel", devices=3, compression_ratio=2)
    inputs = inputs_for_arch("BertModel")
    executor = Executor(bundle)

    with LocalCluster(bundle, timeout=2.0) as cluster:
        def reply_over(ranks):
            outputs, stats = cluster.client.infer(**request_kwargs(inputs))
            return (outputs, stats) if stats["ranks"] == ranks else None

        def served(reply):  # the outputs equal the executor's over the plan the reply reports
            outputs, stats = reply
            assert_same(outputs, as_served(executor, inputs, stats))

        served(cluster.client.infer(**request_kwargs(inputs)))
        os.killpg(cluster.procs[2].pid, signal.SIGSTOP)
        outputs, stats = cluster.client.infer(**request_kwargs(inputs))
        reply = cluster.client.last_reply
        assert reply["stats"]["ranks"] == [0, 1] and reply["attempts"] >= 2, reply
        assert all("device 2" in why for why in reply["reruns"]), reply
        served((outputs, stats))
        os.killpg(cluster.procs[2].pid, signal.SIGCONT)
        served(poll_until(lambda: reply_over([0, 1, 2]), "the resumed runner back in the plan"))
        cluster.stop_device(2, signal.SIGKILL)
        served(poll_until(lambda: reply_over([0, 1]), "requests planned without the killed runner"))
        cluster.start_device(2)
        served(poll_until(lambda: reply_over([0, 1, 2]), "the restarted runner back in the plan"))


def test_bad_frames_are_rejected_and_the_runner_keeps_serving(make_bundle):
    """Bad frames from a connection holding device 0's key reach device 1's checks and are each rejected; the
    test waits until device 1 reports every one of them (carried to the coordinator by its heartbeats) before
    it reads the counters, with a generous deadline instead of a sleep."""
    bundle = make_bundle("BertModel", devices=2, compression_ratio=2)
    inputs = inputs_for_arch("BertModel")
    ex = Executor(bundle)
    tag = int(json.loads((bundle / "manifest.json").read_text())["export_id"][:8], 16)
    with LocalCluster(bundle) as cluster:
        s = device_dealer(bundle, cluster, as_rank=0, to_rank=1)
        good = MeansFrame(request=1, layer=0, src=0, dst=1, export_tag=tag, counts=np.ones((1, 2), np.int32),
                          means=np.zeros((1, 2, 32), np.float32))
        bad = [
            [b"\x00garbage bytes that mean nothing"],
            encode_means(good, "float16"),  # wrong dtype for this bundle
            encode_means(MeansFrame(**{**good.__dict__, "means": np.zeros((1, 2, 16), np.float32)}), "float32"),
            encode_means(MeansFrame(**{**good.__dict__, "layer": 99}), "float32"),  # no such layer
            encode_means(MeansFrame(**{**good.__dict__, "export_tag": tag ^ 1}), "float32"),  # other export
            encode_means(good, "float32")[:-1] + [b"short"],  # sizes do not match the header
            [MEANS_HEADER.pack(MAGIC, 1, 0, 7, 0, 0, 1, tag, 10**6, 10**3, 32)],  # declares 128 GB
            encode_means(MeansFrame(**{**good.__dict__, "src": 1}), "float32"),  # claims another device's key
            encode_means(good, "float32"),  # right key, but not on device 0's live connection
        ]
        for parts in bad:
            s.send_multipart(parts)
        rejected = poll_until(lambda: (cluster.operator_status()["rejected_frames"]["1"] >= len(bad)) and
                              cluster.operator_status(), f"device 1 reports {len(bad)} rejected frames")
        assert rejected["ready"]
        outputs, stats = cluster.client.infer(**request_kwargs(inputs))
        assert_same(outputs, as_served(ex, inputs, stats))
        raw = socket.create_connection(("127.0.0.1", cluster.ports[1]))  # not even ZeroMQ
        raw.sendall(os.urandom(4096))
        raw.close()
        outputs, stats = cluster.client.infer(**request_kwargs(inputs))
        assert_same(outputs, as_served(ex, inputs, stats))
        s.close(linger=0)
    log = cluster.logs[1].read_text()
    assert "rejected means message from device-0" in log and "not its live session" in log


def test_declared_size_beyond_limits_is_refused_before_allocating():
    header = MEANS_HEADER.pack(MAGIC, 1, 0, 1, 0, 0, 1, 0, 10**6, 10**3, 384)
    with pytest.raises(FrameError, match="beyond the limits"):
        decode_means([header, b"", b""], wire_dtype="float32", hidden=384, max_rows=10, max_batch=8)


def test_early_frame_that_does_not_fit_the_plan_is_rejected_when_its_turn_comes():
    """A frame for a later request waits in the inbox; when that request reaches the exchange point, the
    frame is checked against the plan like any other and a wrong one is rejected, not used."""
    from types import SimpleNamespace

    from prism_onnx.plan import make_plan
    from prism_onnx.runtime.exchange import LocalHub

    plan = make_plan(SimpleNamespace(causal=False, sinks=()), np.ones((1, 10), np.int64), devices=2,
                     compression_ratio=2)
    hub = LocalHub(2, wire_dtype="float32", width=4, points=["attn_in.0"], export_tag=7, max_rows=8, max_batch=2,
                   timeout=2.0)
    dev0, dev1 = hub.endpoints
    counts = plan.segments[0].counts  # [1, 3]: device 0 sends 3 means of its 5 tokens
    frame = lambda request, c: encode_means(MeansFrame(request, 0, 0, 1, 7, c,  # noqa: E731
                                                       np.full((1, c.shape[1], 4), float(request), np.float32)),
                                            "float32")
    dev0._send(1, frame(2, np.ones((1, 1), np.int32)))  # early, and one row where the plan says three
    dev0._send(1, frame(1, counts))
    assert np.all(dev1.gather(1, 0, plan) == 1.0)  # request 1 goes through; request 2's frame waits
    dev1.finish(1)
    assert dev1.traffic.rejected_frames == 0
    dev0._send(1, frame(2, counts))  # the real frame of request 2
    got = dev1.gather(2, 0, plan)
    assert got.shape == (1, 3, 4) and np.all(got == 2.0)
    assert dev1.traffic.rejected_frames == 1
    good = sum(len(p) for p in frame(1, counts))
    assert dev1.traffic.received == [2 * good]  # bytes received: accepted frames only


def refusals(pairs, peers, timeout):
    """Start a runner per (bundle folder, rank, extra args); wait for each to exit (a hang guard); -> their stderr."""
    procs = [subprocess.Popen(run_cmd(d, k, peers, "--peer-timeout", timeout, *extra), stderr=subprocess.PIPE,
                              text=True) for d, k, extra in pairs]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 1, err
        errs.append(err)
    return errs


def test_runners_of_different_exports_are_refused_both_naming_the_setting(make_bundle):
    """Two exports that differ in one setting, without keys (--insecure, where nothing else stops them): they
    meet at the handshake and each refuses the other, naming the setting. Each decides from the other's
    HELLO, and a runner that refuses keeps sending its HELLOs (its export id) until the other has refused it
    too, so neither depends on one message arriving before the other exits (this test failed 1 run in 3
    when the first to refuse exited at once)."""
    a = make_bundle("BertModel", devices=2, compression_ratio=2)
    b = make_bundle("BertModel", devices=2, compression_ratio=3)
    ports = free_ports(2)
    peers = f"127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    errs = refusals([(a / "device-0", 0, ["--insecure"]), (b / "device-1", 1, ["--insecure"])], peers, 30)
    for e in errs:
        assert ("bundle from another export" in e
                and ("compression_ratio 3 vs 2" in e or "compression_ratio 2 vs 3" in e))
        assert "did not come up" not in e, e


def test_a_device_folder_of_another_export_is_refused_on_both_sides_naming_the_keys(make_bundle):
    """The usual redeploy mistake: device 1's folder comes from another export of the same model (the same
    export id: the same content; another key set). CurveZMQ cannot connect them, and each runner names why
    from its own connection to the other (its handshake fails: the other holds other keys), then exits;
    within --peer-timeout 5, or it would say the peer did not come up."""
    a = make_bundle("BertModel", devices=2, compression_ratio=2)
    c = make_bundle("BertModel", devices=2, compression_ratio=2)  # same content as a, other keys
    ports = free_ports(2)
    peers = f"127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    errs = refusals([(a / "device-0", 0, []), (c / "device-1", 1, [])], peers, 5)
    for k, e in enumerate(errs):
        q = 1 - k
        assert f"device {k} refused device {q} at the handshake: the runner at 127.0.0.1:{ports[q]} (device {q} in " \
               f"--peers)" in e, e
        assert "another export or another `prism keys` run" in e and "did not come up" not in e, e
        assert "Traceback" not in e


def test_two_runners_claiming_the_same_rank_are_refused(make_bundle):
    bundle = make_bundle("BertModel", devices=2, compression_ratio=2)
    inputs = inputs_for_arch("BertModel")
    with LocalCluster(bundle) as cluster:
        port = free_ports(1)[0]
        peers = f"127.0.0.1:{cluster.ports[0]},127.0.0.1:{port}"  # a second "rank 1" on another port
        p = subprocess.run(run_cmd(bundle / "device-1", 1, peers, "--peer-timeout", 20), capture_output=True,
                           text=True, timeout=40)
        assert p.returncode == 1 and "two runners claim rank 1" in p.stderr
        outputs, _ = cluster.client.infer(**request_kwargs(inputs))  # the real cluster is unharmed
        assert_same(outputs, Executor(bundle).run(inputs).outputs)
    # and on one host, the same rank's port is already taken
    with LocalCluster(bundle) as cluster:
        p = subprocess.run(run_cmd(bundle / "device-1", 1, cluster.peers, "--peer-timeout", 5),
                           capture_output=True, text=True, timeout=40)
        assert p.returncode == 1 and "is another runner already device 1" in p.stderr


def test_multi_host_network_namespaces_with_rate_limited_links(make_bundle):
    """Each runner on its own emulated host (ip netns + veth + bridge), every link limited to 20 Mbit/s with
    tbf in both directions. Skipped only where network namespaces cannot be created."""
    from prism_onnx.testbed import Testbed

    ok, why = Testbed.available()
    if not ok:
        pytest.skip(f"multi-host test needs network namespaces: {why}")
    bundle = make_bundle("ViTForImageClassification", devices=3, compression_ratio=2, wire_dtype="float16")
    inputs = inputs_for_arch("ViTForImageClassification")
    expected = Executor(bundle).run(inputs).outputs
    with Testbed(3, rate="20mbit") as net:
        with LocalCluster(bundle, hosts=net.addresses, prefix=net.prefix) as cluster:
            assert cluster.peers.startswith(net.addresses[0])
            outputs, stats = cluster.client.infer(**request_kwargs(inputs))
            assert_same(outputs, expected)
            shown = subprocess.run(["tc", "-s", "qdisc", "show", "dev", net.veth[1][0]], capture_output=True,
                                   text=True).stdout
            assert "tbf" in shown and "rate 20Mbit" in shown
            sent = int(shown.split("Sent ")[1].split(" bytes")[0])
            assert sent >= stats["bytes_received"][1]  # device 1's means came through the limited link


@pytest.mark.long
def test_demo_minilm_over_two_runner_processes(tmp_path):
    """`make demo`: real MiniLM over 2 runners; traffic cut >= 75% by the runners' own counters, equal to
    simulate to fp32 rounding."""
    from prism_onnx.demo import run_demo

    lines = []
    report = run_demo(tmp_path / "demo", devices=2, cr=8, echo=lines.append)
    assert report["bytes"]["reduction"] >= 0.75
    assert report["max_abs_diff_vs_pytorch_simulate"] <= 1e-4
    assert 0.8 < report["embedding"]["cosine_vs_pytorch_full_model"] < 1.0
    assert any("bytes exchanged" in line for line in lines)
