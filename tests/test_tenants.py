"""Many clients on one cluster, without sockets: each client's share (tenants.py), replies bound to the
connection that asked (clients.py), STATUS as each one may see it, unpredictable request ids, a failure
detector that learns each peer's jitter (detector.py), keys named at the handshake (membership.py), one
line per cause (counters.py). Everything is driven with plain functions and explicit times."""

import logging

import numpy as np
import pytest

from prism_onnx.errors import ErrorInfo, PeerError
from prism_onnx.runtime.clients import ClientRef, ClientSessions, auto_id
from prism_onnx.runtime.counters import CauseLog, FailureSummary
from prism_onnx.runtime.detector import CAP_MIN, Gaps
from prism_onnx.runtime.membership import KEY_FAILURES, Membership
from prism_onnx.runtime.replies import error_reply
from prism_onnx.runtime.schema import Reply, Request, Tokens
from prism_onnx.runtime.tenants import Tenants


# ---------------------------------------------------------------------------------------------- shares
class FakeCoordinator:
    """Admits every request; answers them when the test says so."""

    def __init__(self, tenants_of):
        self.admitted, self.tenants_of = [], tenants_of

    def on_request(self, ref, req, now):
        self.admitted.append((ref, req))

    def answer(self, i=0):
        ref, req = self.admitted.pop(i)
        self.tenants_of().reply(ref, Reply(call=req.call, stats={}))


def shares(**kw):
    sent, box = [], {}
    coord = FakeCoordinator(lambda: box["t"])
    t = box["t"] = Tenants(coord.on_request, lambda ref, rec: sent.append((ref.client, rec)), clock=lambda: 0.0, **kw)
    return t, coord, sent


def ref(client, n=0):
    return ClientRef(bytes([0, 0, 0, 0, n]), client, (n, 1))


def busy(sent):
    return [(c, r.error.message) for c, r in sent if isinstance(r, Reply) and r.error is not None]


def test_a_flooding_client_is_refused_busy_while_another_is_admitted_at_once():
    t, coord, sent = shares(max_inflight=2, max_queued=3, total_inflight=32)
    for k in range(40):  # the flood
        t.on_request(ref("client-mallory"), Request(call=k), 0.0)
    assert [r.client for r, _ in coord.admitted] == ["client-mallory"] * 2
    refused = busy(sent)
    assert len(refused) == 40 - 2 - 3 and all(c == "client-mallory" for c, _ in refused)
    assert "client 'client-mallory' has 2 requests running and 3 waiting" in refused[0][1]
    t.on_request(ref("client-alice", 1), Request(call=1), 0.0)  # another client: admitted now, not queued behind
    assert coord.admitted[-1][0].client == "client-alice" and len(busy(sent)) == 35
    assert t.usage() == {"client-alice": {"inflight": 1, "waiting": 0},
                         "client-mallory": {"inflight": 2, "waiting": 3}}


def test_waiting_requests_are_admitted_in_turn_one_client_after_another():
    t, coord, sent = shares(max_inflight=1, max_queued=8, total_inflight=2)
    for k in range(3):
        t.on_request(ref("a"), Request(call=k), 0.0)
    for k in range(3):
        t.on_request(ref("b", 1), Request(call=10 + k), 0.0)
    t.on_request(ref("c", 2), Request(call=20), 0.0)  # the total of 2 is reached: c waits too
    assert [(r.client, q.call) for r, q in coord.admitted] == [("a", 0), ("b", 10)]
    while coord.admitted:
        coord.answer(0)
    got = [c for c, r in sent if isinstance(r, Reply) and r.error is None]
    assert len(got) == 7 and not busy(sent)
    # after a's first, the waiting ones came a, b... in round robin: c's one request is not last
    calls = [r.call for c, r in sent]
    assert calls.index(20) < calls.index(12) and calls.index(20) < calls.index(2)


def test_a_reply_releases_the_share_tokens_do_not_and_queued_requests_expire_busy():
    t, coord, sent = shares(max_inflight=1, max_queued=2, max_wait=5.0)
    t.on_request(ref("a"), Request(call=1), 0.0)
    t.on_request(ref("a"), Request(call=2), 0.0)
    t.reply(coord.admitted[0][0], Tokens(1, 0, call=1, arrays={"ids": np.zeros(1, np.int64)}))  # streaming
    assert t.usage("a") == {"a": {"inflight": 1, "waiting": 1}}
    t.expire(6.0)
    assert busy(sent) == [("a", "busy: waited 6 s behind client 'a''s 1 running requests")]
    assert t.usage("a") == {"a": {"inflight": 1, "waiting": 0}}
    t.reply(coord.admitted[0][0], error_reply(1, ErrorInfo.of(PeerError("lost"))))  # an error ends it too
    assert t.usage() == {}


# ----------------------------------------------------------------------------------- who gets a reply
def test_replies_go_to_the_connection_that_asked_or_nowhere():
    s = ClientSessions()
    s.opened(7)
    alice = s.identify(b"\0\1\2\3\4", "client-alice", 7)
    assert isinstance(alice, ClientRef) and s.deliverable(alice)
    # another connection presenting the same id while alice's is open: refused
    s.opened(9)
    assert "in use by another open connection" in s.identify(b"\0\1\2\3\4", "client-mallory", 9)
    assert s.deliverable(alice)
    # alice's connection closes; mallory takes the id (ZeroMQ frees it) and even alice's descriptor: alice's
    # pending reply is not delivered to either
    s.closed(7)
    assert not s.deliverable(alice)
    s.opened(7)
    mallory = s.identify(b"\0\1\2\3\4", "client-mallory", 7)
    assert isinstance(mallory, ClientRef) and not s.deliverable(alice) and s.deliverable(mallory)


def test_routing_ids_chosen_by_the_client_are_refused():
    s = ClientSessions()
    s.opened(3)
    assert "set its own ZeroMQ routing id" in s.identify(b"victim-1", "client", 3)
    assert auto_id(b"\0abcd") and not auto_id(b"victim-1") and not auto_id(b"\0abc")


# ----------------------------------------------------------------------------------------- request ids
def test_request_ids_are_random_unique_and_name_their_coordinator():
    from prism_onnx.runtime.coordinator import new_request_id
    from prism_onnx.runtime.schema import coordinator_of

    pending = {}
    ids = [new_request_id(3, pending) for _ in range(2000)]
    assert len(set(ids)) == 2000 and all(coordinator_of(r) == 3 for r in ids)
    assert sorted(ids) != ids and sum(b > a for a, b in zip(ids, ids[1:])) < 1200  # not a counter


# ----------------------------------------------------------------------------------- failure detection
def test_a_jittery_peer_is_not_lost_a_dead_one_is_within_the_cap():
    """Synthetic HELLO arrival times: every 0.2 s, with pauses of up to 1.3 s now and then (a starved I/O
    loop). With the floor of 1 s alone, the first such pause would be a false loss; the detector learns
    from the earlier, shorter pauses that this peer pauses, and never loses it. Then it stops: lost."""
    rng = np.random.default_rng(0)
    floor, g, t, lost_once = 1.0, Gaps(), 0.0, []
    pauses = {50: 0.7, 120: 0.9, 200: 1.1, 300: 1.3, 420: 1.3, 650: 1.35}
    for k in range(700):
        gap = pauses.get(k, 0.2 + rng.uniform(-0.05, 0.15))
        # between two HELLOs, is the peer still alive at every moment? (its silence vs the timeout in force)
        if gap >= g.timeout(floor):
            lost_once.append((k, gap, g.timeout(floor)))
        t += gap
        g.observe(gap, floor)
    assert not lost_once, lost_once
    # the peer dies: its silence grows without bound, and it is lost once it passes its timeout, which is
    # above the floor (it learned the pauses) and never above the cap
    assert 1.5 * 1.35 <= g.timeout(floor) <= max(CAP_MIN, 10 * floor)
    assert max(pauses.values()) > floor  # with the floor alone (a fixed 1 s timeout) it would have been lost


def test_a_regular_peer_keeps_the_floor_and_a_long_silence_is_not_learned():
    g = Gaps()
    for _ in range(100):
        g.observe(0.2, 1.0)
    assert g.timeout(1.0) == 1.0  # 0.2 + 6 x 0.02 and 1.5 x 0.2 are below the floor
    g.observe(15.0, 1.0)  # SIGSTOP for 15 s: a stopped peer, not jitter
    assert g.timeout(1.0) == 1.0


def test_membership_says_how_long_and_against_which_timeout():
    m = Membership(0, {1: "tcp://h1:1"}, "e" * 64, {}, "n0")
    from prism_onnx.runtime.schema import Hello

    for k in range(10):
        t = 0.2 * k
        m.on_hello(Hello(1, "n1", "e" * 64, t, echo={"0": t}), t, b"s1", 1)
    why = m.describe(1, 1.8 + 1.05)
    assert "sent no heartbeat for 1.05 s (timeout 1 s)" in why, why


# ------------------------------------------------------------------------------------- keys at the start
def test_a_peer_with_other_keys_is_named_at_once_and_fatal_when_certain():
    m = Membership(0, {1: "tcp://10.0.0.11:5555"}, "e" * 64, {}, "n0")
    detail = "does not hold device 1's key of this key set (it closed our CURVE handshake)"
    first = m.on_key_failure(1, detail)
    assert first.note and ("the runner at 10.0.0.11:5555 (device 1 in --peers) does not hold device 1's key"
                           in first.note)
    assert "another export or another `prism keys` run" in first.note and first.fatal is None
    for _ in range(KEY_FAILURES - 2):
        assert m.on_key_failure(1, detail).fatal is None
    last = m.on_key_failure(1, detail)
    assert last.fatal.startswith("device 0 refused device 1 at the handshake: the runner at") and last.note is None
    m.on_handshake(1)  # a success resets the streak
    assert m.on_key_failure(1, detail).fatal is None
    assert Membership(0, {1: "x"}, "e", {}, "n").on_key_failure(1, "refuses", certain=True).fatal  # refused: at once


# --------------------------------------------------------------------------------------- quiet logs
class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def lines():
    logger, h = logging.getLogger("prism.test.tenants"), Lines()
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    yield logger, h.records
    logger.removeHandler(h)


def test_refused_connections_are_said_once_then_summed_up_per_host(lines):
    logger, records = lines
    now = [0.0]
    s = FailureSummary(logger, window=60.0, clock=lambda: now[0])
    for k in range(50):
        now[0] = k * 0.1
        s.record("client port", "10.0.0.7", "an unknown CURVE key")
    s.record("client port", "10.0.0.8", "an unknown CURVE key")
    assert [r.getMessage() for r in records] == [
        "client port: refused a connection from 10.0.0.7: an unknown CURVE key (more like it are summed up every "
        "60 s)", "client port: refused a connection from 10.0.0.8: an unknown CURVE key (more like it are summed "
        "up every 60 s)"]
    s.flush(61.0)
    assert records[-1].getMessage() == ("client port: 49 more connections from 10.0.0.7 refused in the last 60 s: "
                                        "an unknown CURVE key")
    assert len(records) == 3  # 10.0.0.8 had no more: nothing to sum up


def test_a_bug_is_one_error_line_per_cause_a_minute_its_traceback_at_debug(lines):
    logger, records = lines
    now = [0.0]
    log = CauseLog(logger, window=60.0, clock=lambda: now[0])

    def crash():
        return {}["missing"]

    for k in range(142):
        now[0] = k * 0.1
        try:
            crash()
        except KeyError as e:
            log.error(e, f"device 1: request {k} crashed")
    errors = [r for r in records if r.levelno == logging.ERROR]
    debug = [r for r in records if r.levelno == logging.DEBUG]
    assert len(errors) == 1 and len(debug) == 142 and all(r.exc_info for r in debug)
    assert "KeyError at test_tenants.py:" in errors[0].getMessage()
    now[0] = 100.0
    try:
        crash()
    except KeyError as e:
        log.error(e, "device 1: request 142 crashed")
    assert "(141 more since the last line)" in [r for r in records if r.levelno == logging.ERROR][-1].getMessage()


# ======================================================================= on a cluster of runner processes
ARCH = "BertModel"


@pytest.fixture(scope="module")
def shared(exported_graphs, tmp_path_factory):
    """One P=2 cluster shared by clients alice and mallory (keys added with `prism keys --add-client`), each
    allowed 2 requests at once and 2 waiting; device 1 emulates a board 40 times slower, so that a request
    of 32 rows is in flight long enough to be found pending."""
    from prism_onnx.exporters.bundle import ExportSettings, write_bundles
    from prism_onnx.runtime.cluster import LocalCluster
    from prism_onnx.runtime.keys import add_client

    root = tmp_path_factory.mktemp("tenants")
    bundle = write_bundles(exported_graphs[ARCH], root / "export", ExportSettings(devices=2, compression_ratio=2))
    for name in ("alice", "mallory"):
        add_client(bundle, name)
    with LocalCluster(bundle, log_dir=root / "logs", rank_args={1: ["--emulate-slowdown", "40"]},
                      serve_args=["--max-client-inflight", "2", "--max-client-queue", "2"]) as c:
        yield c


def keys_of(cluster, name):
    from prism_onnx.runtime.keys import ClientKeys

    return ClientKeys.load(cluster.root / name)


def raw(cluster, name, routing_id=None):
    """A DEALER holding client `name`'s key (optionally with a routing id of its choosing)."""
    import zmq

    k = keys_of(cluster, name)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        s.setsockopt(zmq.ROUTING_ID, routing_id)
    s.curve_publickey, s.curve_secretkey, s.curve_serverkey = k.public, k.secret, k.server
    s.connect(f"tcp://{cluster.serve_address}")
    return s


def slow_request(call: int):
    from prism_onnx.runtime.schema import encode_record

    ids = np.random.default_rng(call).integers(5, 30000, size=(32, 48))
    return encode_record(Request(call=call, arrays={"input_ids": ids, "attention_mask": np.ones_like(ids)}))


def replies(sock, timeout_ms):
    from prism_onnx.runtime.connection import REPLY_RULES
    from prism_onnx.runtime.schema import decode_record

    out = []
    while sock.poll(timeout_ms):
        out.append(decode_record(sock.recv_multipart(), None, REPLY_RULES))
        timeout_ms = 0
    return out


def pending_of(cluster, client):
    return [r for r in cluster.operator_status()["requests"] if r.get("client") == client]


def test_a_normal_client_connection_causes_no_handshake_warning_on_any_runner(shared):
    """Clients learn the client ports' one key (keys/server.key), so connecting never fails a handshake: the
    runners log no refused connection and count none. (The first test of the module: nothing else has
    connected yet.)"""
    from prism_onnx.runtime.client import Client

    for name in ("client", "client-alice"):
        with Client(shared.serve_address, keys=shared.root / name) as c:
            outputs, _ = c.infer(texts=["a gripping, funny film"])
            assert c.status()["ready"] and outputs["last_hidden_state"].shape[0] == 1
    health = shared.operator_status()["health"]  # answered after every connection above shook hands
    assert all(h["denied"] == 0 for h in health.values()), health
    for log in shared.logs:
        text = log.read_text()
        assert "refused a connection" not in text and "handshake" not in text.lower(), text


def test_a_reply_never_goes_to_another_connection_with_the_same_routing_id(shared):
    """Reply takeover, refused: alice's ZeroMQ-style id (zero-prefixed, as libzmq makes them) taken by mallory
    while alice waits (ZeroMQ ignores the second connection: handover is off), and after alice's connection
    closed (the reply is bound to alice's connection: dropped, not given to mallory); an id of the client's
    own choosing ("victim-1") is refused outright."""
    victim = b"\x00\x00\x00\x07\x01"
    alice = raw(shared, "client-alice", victim)
    alice.send_multipart(slow_request(1))
    poll_until(lambda: pending_of(shared, "client-alice"), "alice's request is pending")
    mallory = raw(shared, "client-mallory", victim)
    mallory.send_multipart(encode_record_status(2))
    got = replies(alice, 120_000)
    assert [r.call for r in got] == [1] and got[0].ok
    # not alice's reply (ZeroMQ ignores mallory's connection while alice's holds the id; it may later name
    # that connection after mallory's own first frame, whose rest is then refused like any chosen id)
    assert not [r for r in replies(mallory, 1000) if r.call == 1 or r.ok]
    mallory.close()

    # alice asks again and hangs up; mallory takes the id: the reply is dropped at the coordinator
    dropped = shared.operator_status()["counters"].get("replies_dropped", 0)
    alice.send_multipart(slow_request(3))
    poll_until(lambda: pending_of(shared, "client-alice"), "alice's second request is pending")
    connections = shared.operator_status()["connections"]
    alice.close()
    poll_until(lambda: shared.operator_status()["connections"] < connections, "the runner saw alice hang up")
    mallory = raw(shared, "client-mallory", victim)
    mallory.send_multipart(encode_record_status(4))
    mine = replies(mallory, 60_000)  # its own STATUS: mallory's connection now holds the id
    poll_until(lambda: shared.operator_status()["counters"].get("replies_dropped", 0) > dropped,
               "the coordinator dropped alice's reply")
    mine += replies(mallory, 1000)
    assert [r.call for r in mine] == [4] and mine[0].status["client"] == "client-mallory"
    assert not [r for r in mine[0].status["requests"] if r.get("client") != "client-mallory"]
    mallory.close()

    chooser = raw(shared, "client-alice", b"victim-1")
    chooser.send_multipart(slow_request(5))
    got = replies(chooser, 60_000)
    assert got[0].call == 5 and got[0].error.type == "FrameError"
    assert "set its own ZeroMQ routing id" in got[0].error.message
    chooser.close()


def test_one_client_flooding_does_not_starve_another_and_status_shows_each_its_own(shared):
    """mallory keeps 40 requests outstanding; alice sends 12, one at a time: every one of alice's is answered,
    mallory is refused busy beyond its share (2 running, 2 waiting). alice's STATUS shows none of
    mallory's requests, the operator's (a device key) shows them."""
    import threading

    from prism_onnx.errors import Busy
    from prism_onnx.runtime.client import Client

    stop, outcome = threading.Event(), {"busy": 0, "ok": 0}
    mallory = raw(shared, "client-mallory")

    def flood():
        call = 100
        for _ in range(40):
            mallory.send_multipart(slow_request(call))
            call += 1
        while not stop.is_set():
            for r in replies(mallory, 100):
                outcome["busy" if r.error is not None and r.error.code == "busy" else "ok"] += 1
                mallory.send_multipart(slow_request(call))
                call += 1

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        poll_until(lambda: len(pending_of(shared, "client-mallory")) >= 2, "mallory's share is running")
        answered = []
        with Client(shared.serve_address, keys=shared.root / "client-alice", timeout=300) as alice:
            for k in range(12):
                ids = np.random.default_rng(k).integers(5, 30000, size=(1, 16))
                try:
                    outputs, _ = alice.infer(input_ids=ids, attention_mask=np.ones_like(ids))
                    answered.append(outputs["last_hidden_state"].shape)
                except Busy as e:
                    answered.append(str(e))
            view = alice.status()
        operator = shared.operator_status()
    finally:
        stop.set()
        thread.join()
        mallory.close()
    print(f"alice: {len(answered)} answered; mallory: {outcome}; alice's STATUS {view['share']}, requests "
          f"{view['requests']}; the operator's clients {operator['clients']}")
    assert answered == [(1, 16, 32)] * 12
    assert outcome["busy"] >= 30 and outcome["ok"] >= 1
    assert view["client"] == "client-alice" and all(r["client"] == "client-alice" for r in view["requests"])
    assert "counters" not in view and "health" not in view and "clients" not in view
    assert operator["clients"].get("client-mallory", {}).get("inflight", 0) >= 1
    assert any(r.get("client") == "client-mallory" for r in operator["requests"])


def encode_record_status(call):
    from prism_onnx.runtime.schema import Status, encode_record

    return encode_record(Status(call=call))


def poll_until(fn, what, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:g} s: {what}")
