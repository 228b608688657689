"""The dispatch of a runner's messages without sockets (dispatch.PeerMessages): each peer message checked
against its sender before it has any effect, each effect a plain callable recorded here."""

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from prism_onnx.runtime.bundle import DeviceBundle
from prism_onnx.runtime.counters import Counters
from prism_onnx.runtime.dispatch import Effects, PeerMessages
from prism_onnx.runtime.membership import Membership
from prism_onnx.runtime.protocol import Kind, encode
from prism_onnx.runtime.schema import (Abort, Attempt, Hello, Refuse, Result, Tokens, TrafficInfo, decode_record,
                                       encode_record, request_id)
from prism_onnx.runtime.wire import MeansFrame, encode_means
from prism_onnx.runtime.jobs import Batched
from test_coordinator import manifest

EXPORT = "e" * 64
TAG = int(EXPORT[:8], 16)


class Recorder:
    """The runner as dispatch sees it: every effect appended to `calls`."""

    def __init__(self, coordinating: bool):
        self.calls = []
        self.coordinator = self if coordinating else None

    def __getattr__(self, name):  # on_result, on_tokens, on_batch of the coordinator
        if name.startswith("on_"):
            return lambda *args: self.calls.append((name, *args))
        raise AttributeError(name)


@pytest.fixture(params=[False, True], ids=["device", "coordinator"])
def runner(request):
    """Device 0 of a 3-device export whose peers 1 and 2 said HELLO on sessions b"s1" and b"s2"."""
    limits = replace(DeviceBundle(Path("."), manifest(devices=3)).limits, generates=True)  # it streams TOKENS too
    m = Membership(0, {1: "tcp://h1:1", 2: "tcp://h2:1"}, EXPORT, {}, "n0")
    for q in (1, 2):
        assert m.on_hello(Hello(q, f"n{q}", EXPORT, 0.0), 0.0, f"s{q}".encode(), key_rank=q).accept
    rec = Recorder(coordinating=request.param)
    fx = Effects(submit=lambda job: rec.calls.append(("submit", job)) or True,
                 abort=lambda r, why: rec.calls.append(("abort", r, why)),
                 deliver_means=lambda h, parts, n, now: rec.calls.append(("means", h)),
                 reply_peer=lambda session, parts: rec.calls.append(("reply", session, decode_record(parts))),
                 fatal=lambda why: rec.calls.append(("fatal", why)), coordinator=rec.coordinator)
    counters = Counters(logging.getLogger("test-dispatch"))
    return PeerMessages(0, limits, TAG, m, counters, fx), rec, counters


def start(coordinator: int, ranks=(0, 1, 2), n: int = 2) -> list:
    return encode_record(Attempt(request_id(5, coordinator), coordinator, ranks, 3.0, arrays={
        "attention_mask": np.ones((1, 6), np.int64), "input_ids": np.ones((1, n), np.int64)}))


def test_a_start_from_its_coordinators_key_on_its_session_queues_a_job(runner):
    pm, rec, counters = runner
    pm.on_peer(b"s1", "device-1", start(1), now=10.0)
    ((what, job),) = rec.calls
    assert what == "submit" and job.attempt.coordinator == 1 and job.deadline == 13.0
    assert job.attempt.arrays["input_ids"].shape == (1, 2) and counters.accepted == {"attempt": 1}


@pytest.mark.parametrize("session,user,parts,why", [
    (b"s2", "device-2", start(1), "carries device 2's key"),  # another device's key claims coordinator 1
    (b"s2", "device-1", start(1), "not its live session"),  # device 1's key on device 2's connection
    (b"s1", "device-1", start(1, ranks=(1, 2)), "not of this device"),  # a plan without device 0
    (b"s1", "device-1", encode(Kind.START, {"request": request_id(5, 1), "coordinator": 1, "budget_s": 3.0}),
     "field 'ranks' is missing"),
    (b"s1", "device-1", encode(Kind.REQUEST, {"texts": ["a"]}), "unexpected REQUEST"),
    (b"s1", "device-1", [b"GARBAGE!", b"{}"], "not a PRISM"),
])
def test_a_message_that_fails_its_checks_has_no_effect_and_is_counted(runner, session, user, parts, why):
    pm, rec, counters = runner
    pm.on_peer(session, user, parts, now=1.0)
    assert rec.calls == [] and sum(counters.rejected.values()) == 1
    assert any(why in line for line in counters.recent_reasons), counters.recent_reasons


def test_results_and_tokens_reach_only_a_coordinator_and_only_its_own(runner):
    pm, rec, counters = runner
    result = Result(request_id(9, 0), 1, traffic=TrafficInfo((1, 1), (2, 2)),
                    arrays={"last_hidden_state": np.zeros((1, 2, 8), np.float32)})
    tokens = Tokens(request_id(9, 0), 0, rank=1, arrays={"ids": np.array([3])})
    for rec_ in (result, tokens):
        pm.on_peer(b"s1", "device-1", encode_record(rec_), now=1.0)
    if rec.coordinator is None:
        assert rec.calls == [] and sum(counters.rejected.values()) == 2  # "does not coordinate"
    else:
        assert [c[0] for c in rec.calls] == ["on_result", "on_tokens"]
        assert rec.calls[0][1].arrays["last_hidden_state"].shape == (1, 2, 8)
    rec.calls.clear()
    other = Result(request_id(9, 2), 1, traffic=TrafficInfo((1, 1), (2, 2)))  # a result of device 2's request
    pm.on_peer(b"s1", "device-1", encode_record(other), now=1.0)
    assert rec.calls == []


def test_aborts_means_and_a_refused_hello(runner):
    pm, rec, counters = runner
    pm.on_peer(b"s2", "device-2", encode_record(Abort(request_id(4, 2), "lost device 1")), now=1.0)
    frame = encode_means(MeansFrame(request_id(4, 2), 0, 2, 0, TAG, np.ones((1, 1), np.int32),
                                    np.zeros((1, 1, 8), np.float32)), "float32")
    pm.on_peer(b"s2", "device-2", frame, now=1.0)
    pm.on_peer(b"s1", "device-1", frame, now=1.0)  # device 2's frame on device 1's key: refused
    pm.on_peer(b"s9", "device-1", encode_record(Hello(1, "other", "f" * 64, 0.0)), now=1.0)
    kinds = [c[0] for c in rec.calls]
    assert kinds[:2] == ["abort", "means"] and rec.calls[1][1].src == 2
    assert kinds[2] == "reply" and isinstance(rec.calls[2][2], Refuse) and "another export" in rec.calls[2][2].reason
    assert kinds[3] == "fatal"  # this runner has not formed a cluster yet: another export is fatal
    assert sum(counters.rejected.values()) == 2  # the frame on the wrong key and the refused HELLO


def test_the_workers_own_records_reach_the_coordinator_in_process(runner):
    pm, rec, _ = runner
    if rec.coordinator is None:
        pytest.skip("only a coordinator's worker has records for it")
    pm.on_local(Batched(7, ((7, 0, 1, 4), (8, 1, 2, 4))), now=1.0)
    pm.on_local(Result(7, 0), now=1.0)
    assert [c[0] for c in rec.calls] == ["on_batch", "on_result"] and rec.calls[0][1:3] == (7, [(7, 0, 1, 4),
                                                                                              (8, 1, 2, 4)])


def test_a_refuse_during_start_up_is_fatal(runner):
    pm, rec, _ = runner
    pm.on_refused(1, encode_record(Refuse(1, "bundle from another export")))
    assert rec.calls == [("fatal", "device 1 refused device 0 at the handshake: bundle from another export")]


def test_an_accepted_hello_with_a_note_is_logged_and_counted(runner, caplog):
    """Device 1 restarted (a new nonce, after its old HELLO went stale): accepted, noted in one INFO line."""
    pm, rec, counters = runner
    with caplog.at_level(logging.INFO, "prism.run"):
        pm.on_peer(b"s1b", "device-1", encode_record(Hello(1, "n1-restarted", EXPORT, 5.0)), now=5.0)
    assert rec.calls == [] and counters.accepted["hello"] == 1
    assert "device 0: device 1 restarted" in caplog.text
