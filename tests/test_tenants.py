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
    floor, g, t, last, lost_once = 1.0, Gaps(), 0.0, 0.0, []
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
    assert first.note and "the runner at 10.0.0.11:5555 (device 1 in --peers) does not hold device 1's key" in first.note
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
