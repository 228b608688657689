"""Membership without sockets: heartbeats, liveness, readiness and the handshake, driven by explicit times."""

from dataclasses import replace

import pytest

from prism_onnx.errors import FrameError
from prism_onnx.runtime.membership import DEAD_AFTER_S, HEARTBEAT_S, Membership
from prism_onnx.runtime.schema import Hello, parse, to_meta

SETTINGS = {"devices": 3, "compression_ratio": 2}


def cluster(n=3, export="e" * 64, serving=(0,)):
    return [Membership(r, {q: f"tcp://h{q}:1" for q in range(n) if q != r}, export, {**SETTINGS, "devices": n},
                       f"nonce{r}", serving=r in serving) for r in range(n)]


def exchange(ms, now, skip=(), sessions=None):
    """Every runner's HELLO reaches every other, except the (src, dst) pairs in skip."""
    hellos = {m.rank: m.hello(now) for m in ms}
    for m in ms:
        for src, meta in hellos.items():
            if src != m.rank and (src, m.rank) not in skip:
                v = m.on_hello(meta, now, (sessions or {}).get(src, f"s{src}".encode()), key_rank=src)
                assert v.accept, v


def run(ms, start, stop, skip=()):
    t = start
    while t < stop:
        exchange(ms, t, skip)
        for m in ms:
            m.tick(t)
        t += HEARTBEAT_S
    return t


def test_ready_after_two_rounds_of_hellos_and_not_before():
    ms = cluster()
    exchange(ms, 0.0)
    assert not any(m.ready(0.0) for m in ms)  # nobody has heard its own HELLO echoed yet
    run(ms, 0.2, 0.7)
    assert all(m.ready(0.7) for m in ms) and all(m.ever_ready for m in ms)


def test_a_silent_peer_is_lost_after_dead_after_and_back_after_one_round():
    """The stalled-runner case (SIGSTOP 15 s, SIGCONT): while device 1 is silent the others lose it within
    dead_after; when it resumes, one round of HELLOs makes everyone ready again, whatever it held before."""
    ms = cluster()
    t = run(ms, 0.0, 1.0)
    assert all(m.ready(t) for m in ms)
    stop = t
    silent = {(1, 0), (1, 2), (0, 1), (2, 1)}  # device 1 neither sends nor receives
    lost_at = None
    while t < stop + 15.0:
        exchange(ms, t, skip=silent)
        lost, _ = ms[0].tick(t)
        if 1 in lost:
            lost_at = t
        t += HEARTBEAT_S
    assert lost_at is not None and lost_at - stop <= DEAD_AFTER_S + HEARTBEAT_S + 1e-9
    assert not ms[0].ready(t) and ms[0].missing(t) == [1, 2]  # 2 is alive but does not see 1 either
    assert "sent no heartbeat" in ms[0].describe(1, t) and "does not see devices [1]" in ms[0].describe(2, t)
    # device 1 resumes: its own view is stale (everyone silent for 15 s) until fresh HELLOs arrive
    assert not ms[1].ready(t)
    t = run(ms, t, t + 3 * HEARTBEAT_S)
    assert all(m.ready(t) for m in ms)


def test_a_peer_that_does_not_hear_us_is_not_alive_even_if_we_hear_it():
    """One direction broken (e.g. our connection to it black-holes our messages): its HELLOs still arrive,
    but they echo only old HELLOs of ours, so it is not alive and requests are refused, not sent into a hole."""
    ms = cluster(2)
    t = run(ms, 0.0, 1.0)
    assert ms[0].ready(t)
    t = run(ms, t, t + 2.0, skip={(0, 1)})  # device 0's HELLOs no longer reach device 1
    assert not ms[0].alive(1, t) and "does not hear" in ms[0].describe(1, t)
    assert not ms[1].alive(0, t)


def test_readiness_needs_every_pair_not_only_the_coordinator():
    ms = cluster(3)
    t = run(ms, 0.0, 2.0, skip={(1, 2), (2, 1)})  # devices 1 and 2 cannot reach each other
    assert ms[0].alive(1, t) and ms[0].alive(2, t)
    assert not ms[0].ready(t) and ms[0].missing(t) == [1, 2]
    assert "does not see devices [2]" in ms[0].describe(1, t)


def test_handshake_refusals():
    a, b = cluster(2)
    meta = b.hello(0.0)
    assert "came with the key of device 0" in a.on_hello(replace(meta, rank=1), 0.0, b"s", key_rank=0).refuse
    other = Membership(1, {0: "x"}, "f" * 64, {**SETTINGS, "devices": 2, "compression_ratio": 3}, "n")
    v = a.on_hello(other.hello(0.0), 0.0, b"s", key_rank=1)
    assert "another export" in v.refuse and "compression_ratio 3 vs 2" in v.refuse and v.fatal  # before ready
    assert a.on_hello(replace(meta, serving=True), 0.0, b"s").accept  # any number of runners may serve clients
    assert "not in 0..1" in a.on_hello(replace(meta, rank=5), 0.0, b"s").refuse
    assert "two runners claim rank 0" in a.on_hello(replace(meta, rank=0), 0.0, b"s").refuse


def test_second_runner_for_a_live_rank_is_refused_and_a_restarted_one_replaces_a_lost_one():
    ms = cluster(2)
    t = run(ms, 0.0, 1.0)
    impostor = replace(ms[1].hello(t), nonce="other")
    assert "a live one is already connected" in ms[0].on_hello(impostor, t, b"x", key_rank=1).refuse
    later = t + DEAD_AFTER_S + 0.1
    ms[0].tick(later)
    v = ms[0].on_hello(replace(impostor, t=later), later, b"x", key_rank=1)
    assert v.accept and v.note == "device 1 restarted" and ms[0].is_session(1, b"x")


def test_messages_are_bound_to_the_session_of_the_last_hello():
    ms = cluster(2)
    run(ms, 0.0, 1.0)
    assert ms[0].is_session(1, b"s1") and not ms[0].is_session(1, b"s0")
    v = ms[0].on_hello(ms[1].hello(1.0), 1.0, b"new", key_rank=1)  # same runner, new connection
    assert v.accept and v.note == "device 1 reconnected" and ms[0].is_session(1, b"new")


@pytest.mark.parametrize("bad", [{"rank": "1"}, {"rank": -1}, {"t": "now"}, {"nonce": "n" * 100}, {"echo": []},
                                 {"echo": {"0": "x"}}, {"sees": [1, "2"]}, {"serving": 1}, {"settings": [1]}])
def test_malformed_hello_is_a_frame_error(bad):
    a, b = cluster(2)
    with pytest.raises(FrameError):  # the HELLO's fields are checked when it is decoded (schema.Hello)
        a.on_hello(parse(Hello, {**to_meta(b.hello(0.0)), **bad}), 0.0, b"s")


def test_an_echo_from_the_future_is_ignored():
    a, b = cluster(2)
    run([a, b], 0.0, 1.0)
    a.on_hello(replace(b.hello(1.0), echo={"0": 1e9}), 1.0, b"s1", key_rank=1)
    assert a.peers[1].echo < 2.0


def test_members_are_the_live_devices_that_see_each_other():
    """Requests are planned over the members: after a loss, the survivors; a device that some member cannot
    reach is left out (the one that misses most, ties to the highest rank), so every pair can exchange."""
    ms = cluster(4, serving=(0, 1, 2, 3))  # every runner serves clients
    t = run(ms, 0.0, 1.0)
    assert all(m.members(t) == [0, 1, 2, 3] for m in ms)
    silent = {(2, q) for q in (0, 1, 3)} | {(q, 2) for q in (0, 1, 3)}
    t = run(ms, t, t + DEAD_AFTER_S + 2 * HEARTBEAT_S, skip=silent)  # device 2 is gone
    assert ms[0].members(t) == [0, 1, 3] and ms[3].members(t) == [0, 1, 3] and not ms[0].ready(t)
    assert ms[2].members(t) == [2]
    t = run(ms, t, t + 3 * HEARTBEAT_S)  # it comes back: a member again after one round of HELLOs
    assert all(m.members(t) == [0, 1, 2, 3] for m in ms)
    t = run(ms, t, t + 2.0, skip={(1, 3), (3, 1)})  # 1 and 3 cannot reach each other: 3 is left out
    assert ms[0].members(t) == [0, 1, 2] and ms[2].members(t) == [0, 1, 2]
    assert ms[1].members(t) == [0, 1, 2] and ms[3].members(t) == [0, 2, 3]


def test_a_runner_restarted_while_another_device_is_down_joins_the_formed_cluster():
    """A fresh cluster forms when every device is up (a missing peer at start-up is reported); a runner
    restarted into a cluster that formed joins its members even while another device is still down."""
    ms = cluster(3)
    t = run(ms, 0.0, 1.0)
    assert all(m.ever_ready for m in ms)
    fresh = Membership(1, {0: "a", 2: "b"}, "e" * 64, SETTINGS, "nonce1-again")  # device 1 restarted, 2 is down
    ms = [ms[0], fresh]
    t = run(ms, t + DEAD_AFTER_S, t + DEAD_AFTER_S + 1.0)
    assert fresh.ever_ready and fresh.members(t) == [0, 1] and not fresh.ready(t)
    lonely = cluster(3)
    run(lonely[:2], 0.0, 2.0)
    assert not lonely[0].ever_ready  # never formed: device 2 never came up


def test_a_rejoining_device_yields_while_it_and_a_member_do_not_see_each_other_yet():
    """Device 2 restarts: for a heartbeat or two, device 1 may not see it yet while it already sees device 1.
    The rejoining device is the one left out (not device 1, which never left), whichever side lags."""
    ms = cluster(3)
    t = run(ms, 0.0, 1.0)
    silent = {(2, q) for q in (0, 1)} | {(q, 2) for q in (0, 1)}
    t = run(ms, t, t + DEAD_AFTER_S + 2 * HEARTBEAT_S, skip=silent)
    t = run(ms, t, t + 3 * HEARTBEAT_S)
    m = ms[0]
    assert m.members(t) == [0, 1, 2] and m.peers[2].up_since > m.peers[1].up_since
    m.peers[1].sees, m.peers[2].sees = frozenset({0}), frozenset({0, 1})  # 1 does not see 2 yet
    assert m.members(t) == [0, 1]
    m.peers[1].sees, m.peers[2].sees = frozenset({0, 2}), frozenset({0})  # 2 does not see 1 yet
    assert m.members(t) == [0, 1]


def test_hellos_queued_before_a_connection_closed_do_not_revive_a_dead_runner():
    """Device 0 dies while device 2 is frozen: when device 2 resumes it learns that its connection closed,
    then reads the dead runner's last HELLOs still queued on the old session. They must neither make it
    alive again nor block the restarted runner; a live runner whose own connection survived is bound again
    as soon as it echoes a HELLO sent after the close."""
    ms = cluster(3)
    t = run(ms, 0.0, 1.0)
    m = ms[2]
    stale = ms[0].hello(t)
    m.on_disconnect(0, now=t + 0.1)
    assert not m.alive(0, t + 0.1) and not m.is_session(0, b"s0")
    v = m.on_hello(stale, t + 0.2, b"s0", key_rank=0)
    assert not v.accept and not v.refuse and not m.alive(0, t + 0.2)
    fresh = Membership(0, {1: "a", 2: "b"}, "e" * 64, SETTINGS, "nonce0-again")
    v = m.on_hello(fresh.hello(t + 0.3), t + 0.3, b"new", key_rank=0)
    assert v.accept and v.note == "device 0 restarted" and m.is_session(0, b"new")
    # the other case: device 1's process lives, only our connection to it closed and came back
    m.on_disconnect(1, now=t + 0.4)
    assert not m.on_hello(ms[1].hello(t + 0.5), t + 0.5, b"s1", key_rank=1).accept  # echoes an old HELLO of ours
    ours = m.hello(t + 0.6)
    ms[1].on_hello(ours, t + 0.6, b"s2", key_rank=2)
    v = m.on_hello(ms[1].hello(t + 0.7), t + 0.7, b"s1", key_rank=1)
    assert v.accept and m.is_session(1, b"s1") and m.alive(1, t + 0.7)


def lists_cluster(lists):
    """Two runners, each started with its own --peers list."""
    return [Membership(r, {1 - r: f"tcp://{lists[r][1 - r]}"}, "e" * 64, {**SETTINGS, "devices": 2}, f"nonce{r}",
                       peer_list=tuple(lists[r])) for r in range(2)]


def test_peers_lists_that_differ_in_a_port_are_refused_naming_the_entry():
    a, b = lists_cluster([("h0:5000", "h1:5001"), ("h0:5000", "h1:5002")])
    v = a.on_hello(b.hello(0.0), 0.0, b"s1", key_rank=1)
    assert not v.accept and "rank 1 is h1:5002 for device 1, h1:5001 for device 0" in v.refuse
    assert v.fatal and "--peers lists differ" in v.fatal  # before the cluster formed: the runner stops


def test_peers_lists_that_differ_in_host_names_only_are_noted_once():
    a, b = lists_cluster([("h0:5000", "h1:5001"), ("h0:5000", "10.0.0.2:5001")])
    v = a.on_hello(b.hello(0.0), 0.0, b"s1", key_rank=1)
    assert v.accept and "names hosts differently" in v.note and "rank 1 is 10.0.0.2:5001 for device 1" in v.note
    v = a.on_hello(b.hello(0.2), 0.2, b"s1", key_rank=1)
    assert v.accept and v.note is None


def test_same_peers_lists_and_a_hello_without_one_are_accepted():
    a, b = lists_cluster([("h0:5000", "h1:5001")] * 2)
    assert a.on_hello(b.hello(0.0), 0.0, b"s1", key_rank=1).accept
    old = replace(b.hello(0.2), peers=())  # a HELLO that sends no list
    assert a.on_hello(old, 0.2, b"s1", key_rank=1).accept
