"""Dynamic batching and pipelining without sockets (batching.py, lanes.py, the coordinator's riders), then
over real runners: batched and pipelined requests return what they would alone."""

import os
import queue
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import as_served, text_batch
from prism_onnx.runtime.batching import Prepared, gather
from prism_onnx.runtime.lanes import Lane, Lanes
from prism_onnx.runtime.schema import Attempt, GenerateOptions, Request
from prism_onnx.runtime.jobs import Job


def job(request, n, generate=None, outputs=None):
    """A client request's Job on the coordinator (a record built here, not decoded: any request id)."""
    gen = GenerateOptions(**generate) if generate else None
    outputs = tuple(outputs) if outputs else None
    attempt = Attempt(request, 0, (0, 1), 10.0, outputs=outputs, generate=gen)
    return Job(attempt, 1e9, Request(outputs=outputs, generate=gen, arrays={"input_ids": np.ones((1, n), np.int64)}))


def tokenize_with(make_plan):
    def tokenize(j):
        ids = j.client.arrays["input_ids"]
        return Prepared.of(j, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, make_plan(np.ones_like(ids)))
    return tokenize


@pytest.fixture
def plan_of():
    from types import SimpleNamespace

    from prism_onnx.plan import make_plan

    return lambda mask: make_plan(SimpleNamespace(causal=False, sinks=("first",)), mask, devices=2, compression_ratio=4)


def test_queued_requests_of_equal_length_join_one_batch_the_others_wait_their_turn(plan_of):
    lane = Lane(0, exchange=None)
    for j in (job(2, 9), job(3, 7), job(4, 9), job(5, 9, generate={"max_new_tokens": 2}), job(6, 9, outputs={"x"})):
        lane.jobs.put(j)
    batch = gather(job(1, 9), lane, tokenize_with(plan_of), plan_of, max_rows=64, wait_s=0.0)
    assert batch.members == [(1, 0, 1, 9), (2, 1, 2, 9), (4, 2, 3, 9)] and batch.inputs["input_ids"].shape == (3, 9)
    assert batch.request == 1 and batch.plan.batch == 3 and batch.plan.spans == plan_of(np.ones((1, 9))).spans
    # what did not fit went back to the lane, in order, ahead of the queue
    assert [j.request for j in lane.ready] == [3, 5, 6] and lane.jobs.empty()
    assert isinstance(lane.next_job(0.0), Prepared)  # request 3: already tokenized


def test_requests_put_back_earlier_are_batched_first_and_keep_their_order(plan_of):
    """The head of the queue had another length: the others went back to the lane. The next one taken
    batches with them (they are candidates before the queue), and what does not fit keeps its order."""
    lane = Lane(0, exchange=None)
    for j in (job(2, 13), job(3, 13), job(4, 7), job(5, 13)):
        lane.jobs.put(j)
    alone = gather(job(1, 9), lane, tokenize_with(plan_of), plan_of, max_rows=64, wait_s=0.0)
    assert alone.members == [] and [j.request for j in lane.ready] == [2, 3, 4, 5]
    lane.jobs.put(job(6, 13))
    batch = gather(lane.next_job(0.0), lane, tokenize_with(plan_of), plan_of, max_rows=64, wait_s=0.0)
    assert [m[0] for m in batch.members] == [2, 3, 5, 6] and [j.request for j in lane.ready] == [4]


def test_a_request_that_cannot_be_tokenized_runs_alone_to_report_its_error(plan_of):
    lane = Lane(0, exchange=None)
    lane.jobs.put(job(2, 0))  # no tokens: tokenize raises
    lane.jobs.put(job(3, 9))
    ok = tokenize_with(plan_of)

    def tokenize(j):
        if j.client.arrays["input_ids"].shape[1] == 0:
            raise ValueError("a bug while tokenizing")
        return ok(j)

    batch = gather(job(1, 9), lane, tokenize, plan_of, max_rows=64, wait_s=0.0)
    assert [m[0] for m in batch.members] == [1, 3] and [j.request for j in lane.ready] == [2]
    assert gather(job(4, 0), Lane(0, exchange=None), tokenize, plan_of, 64, 0.0).request == 4  # itself, untouched


def test_a_batch_holds_at_most_max_rows_and_a_lone_request_is_not_waited_for(plan_of):
    lane = Lane(0, exchange=None)
    for r in range(2, 6):
        lane.jobs.put(job(r, 9))
    batch = gather(job(1, 9), lane, tokenize_with(plan_of), plan_of, max_rows=3, wait_s=60.0)
    assert [m[0] for m in batch.members] == [1, 2, 3] and lane.jobs.qsize() == 2
    lane2 = Lane(0, exchange=None)  # nothing queued, nothing else running: no wait (60 s would hang the test)
    alone = gather(job(7, 9), lane2, tokenize_with(plan_of), plan_of, max_rows=64, wait_s=60.0)
    assert isinstance(alone, Prepared) and alone.members == []


def test_with_batch_pad_requests_of_any_length_join_padded_to_the_longest(plan_of):
    lane = Lane(0, exchange=None)
    lane.jobs.put(job(2, 13))
    lane.jobs.put(job(3, 5))
    batch = gather(job(1, 9), lane, tokenize_with(plan_of), plan_of, max_rows=64, wait_s=0.0, pad=True)
    assert batch.members == [(1, 0, 1, 9), (2, 1, 2, 13), (3, 2, 3, 5)] and batch.inputs["input_ids"].shape == (3, 13)
    assert batch.plan.attention_mask.sum(axis=1).tolist() == [9, 13, 5]  # padding is masked
    assert batch.inputs["attention_mask"][0, 9:].sum() == 0 and batch.inputs["input_ids"][2, 5:].sum() == 0


def test_each_row_of_a_batch_gets_the_plan_it_would_get_alone(plan_of):
    """Equal N: the spans are equal, and segments, counts and biases are computed row by row."""
    masks = [np.array([[1] * 11 + [0] * 2]), np.ones((1, 13), np.int64), np.array([[1] * 5 + [0] * 8])]
    together = plan_of(np.concatenate(masks))
    for b, m in enumerate(masks):
        alone = plan_of(m)
        for p in range(2):
            assert np.array_equal(together.local_bias(p)[b], alone.local_bias(p)[0])
            seg_t, seg_a = together.segment(p), alone.segment(p)
            rows = seg_a.rows  # a batch may hold more segment slots; the extra ones have count 0 (masked)
            assert np.array_equal(seg_t.counts[b, :rows], seg_a.counts[0]) and not seg_t.counts[b, rows:].any()
            assert np.array_equal(seg_t.averager[b, :rows], seg_a.averager[0])


def test_a_lane_runs_up_to_slots_jobs_at_once():
    """Two jobs that each wait for the other to have started: done only if two run at once (a 1-slot lane
    would time out on the barrier)."""
    barrier = threading.Barrier(2, timeout=30)
    done, both = [], threading.Event()

    def run(lane, stop):
        while not stop.is_set():
            try:
                j = lane.next_job(timeout=0.1)
            except queue.Empty:
                continue
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
            done.append(j)
            if len(done) == 2:
                both.set()

    lanes = Lanes(lambda: None, run, devices=2, slots=2)
    stop = threading.Event()
    lanes.start(stop)
    lane = lanes.lane(0)
    lane.jobs.put("a")
    lane.jobs.put("b")
    both.wait(60)
    stop.set()
    assert sorted(done) == ["a", "b"] and not barrier.broken


def coordinator_of_two():
    """A coordinator of two devices over plain lists: -> (coordinator, jobs submitted, replies (client, meta,
    arrays))."""
    from test_coordinator import FakeMembership, manifest

    from prism_onnx.runtime.bundle import DeviceBundle
    from prism_onnx.runtime.coordinator import Coordinator

    jobs, replies = [], []
    c = Coordinator(DeviceBundle(".", manifest(devices=2)), 0, FakeMembership(2), lambda q, parts: True,
                    lambda client, record: replies.append((client, record)), lambda j: jobs.append(j) or True)
    return c, jobs, replies


def test_the_coordinator_answers_each_request_of_a_batch_with_its_rows_and_reruns_them_each():
    from dataclasses import replace

    from test_coordinator import result

    c, jobs, replies = coordinator_of_two()
    for client in (b"a", b"b", b"c"):
        c.on_request(client, Request(arrays={"input_ids": np.arange(1, 6)[None]}), 0.0)
    ids = [j.request for j in jobs]
    c.on_batch(ids[0], [(ids[0], 0, 1, 5), (ids[2], 1, 2, 5)], 0.0)  # a and c batched; b runs on its own
    assert sorted(c.pending) == sorted([ids[0], ids[1]])
    # a lost device: the batch reruns as two requests (the worker may batch them again)
    c.membership.down = [1]
    c.on_peer_lost(1, "gone", 0.1)
    assert len(jobs) == 6 and all(j.ranks == (0,) for j in jobs[3:])  # a, c (in batch order), then b
    new = {j.request for j in jobs[3:]}
    c.on_batch(jobs[3].request, [(jobs[3].request, 0, 1, 5), (jobs[4].request, 1, 2, 3)], 0.15)
    r = result(jobs[3].request, 0, n=5, span=(0, 5))
    out = {"last_hidden_state": np.stack([np.full((5, 8), 1.0), np.full((5, 8), 2.0)]).astype(np.float32),
           "pooler_output": np.array([[1.0] * 8, [2.0] * 8], np.float32)}
    c.on_result(replace(r, arrays=out), 0.2)
    answered = {client: reply for client, reply in replies}
    assert set(answered) == {b"a", b"c"} and all(reply.ok for reply in answered.values())
    assert answered[b"a"].arrays["pooler_output"].tolist() == [[1.0] * 8]
    assert answered[b"c"].arrays["pooler_output"].tolist() == [[2.0] * 8]
    assert answered[b"a"].arrays["last_hidden_state"].shape == (1, 5, 8)  # a token output: its own 5 tokens,
    assert answered[b"c"].arrays["last_hidden_state"].shape == (1, 3, 8)  # c was padded from 3 to 5
    assert answered[b"c"].batched == {"requests": 2, "rows": [1, 2]}
    # the adaptive split counts the batch's rows: 5 tokens x 2 rows in the 1 ms the device reported
    assert c.split.recent[0][-1] == pytest.approx(5 * 2 / 0.001)
    assert answered[b"c"].reruns == ("lost device 1 (gone)",) and set(c.pending) == {jobs[5].request} <= new


BATCH_EPS = 1e-5  # a batch runs the same graphs on more rows: onnxruntime may block its GEMMs differently


def assert_close(a: dict, b: dict, eps: float):
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and float(np.abs(a[k] - b[k]).max()) <= eps, k


def test_requests_queued_behind_a_stalled_one_run_as_one_batch_each_with_its_own_rows(make_bundle):
    """Device 1 is frozen (SIGSTOP; a long heartbeat timeout keeps it in the plan) while request A is in
    flight, so the next five requests provably queue in the coordinator's lane (STATUS shows them pending).
    Resumed: the four of equal length run as one batch, the fifth (another length) alone, and each reply
    equals the executor running that request alone over the plan it reports, at CR=4."""
    from prism_onnx.runtime.cluster import LocalCluster
    from prism_onnx.runtime.executor import Executor
    from test_runtime import poll_until

    bundle = make_bundle("BertModel", devices=2, compression_ratio=4)
    ex = Executor(bundle)
    rng = np.random.default_rng(5)
    requests = [text_batch(30522, rng, (n,)) for n in (13, 13, 13, 13, 13, 9)]
    with LocalCluster(bundle, extra_args=["--heartbeat-timeout", "60"]) as cluster:
        os.killpg(cluster.procs[1].pid, signal.SIGSTOP)
        clients = [cluster.new_client() for _ in requests]

        def send(k):
            out, stats = clients[k].infer(**requests[k])
            return out, stats, clients[k].last_reply

        with ThreadPoolExecutor(len(requests)) as pool:
            first = pool.submit(send, 0)
            poll_until(lambda: cluster.client.status()["pending"] == 1, "request A pending")
            rest = [pool.submit(send, k) for k in range(1, len(requests))]
            poll_until(lambda: cluster.client.status()["pending"] == len(requests), "all requests pending")
            os.killpg(cluster.procs[1].pid, signal.SIGCONT)
            replies = [first.result(timeout=120)] + [f.result(timeout=120) for f in rest]
        for c in clients:
            c.close()
    assert "batched" not in replies[0][2] and "batched" not in replies[5][2]
    # rows are in the order the requests reached the coordinator (their client threads race)
    assert sorted((r[2]["batched"]["requests"], r[2]["batched"]["rows"]) for r in replies[1:5]) == \
        [(4, [k, k + 1]) for k in range(4)]
    for req, (out, stats, _) in zip(requests, replies):
        assert_close(out, as_served(ex, req, stats), BATCH_EPS)


def test_pipelined_and_batched_requests_of_many_clients_equal_the_model_at_cr1(make_bundle, tiny_dirs):
    """Eight clients at once, three requests each of varied lengths, runners with --max-inflight 4 and
    --batch-pad (requests of different lengths batched, padded): every reply at CR=1 equals the unpartitioned
    transformers model within 1e-4 (fp32, exact path), whatever it was grouped with."""
    from conftest import hf_forward, tiny_model
    from prism_onnx.runtime.cluster import LocalCluster

    bundle = make_bundle("BertModel", devices=2, compression_ratio=1)
    model = tiny_model("BertModel")
    rng = np.random.default_rng(6)
    requests = [text_batch(30522, rng, (int(n),)) for n in rng.choice([7, 11, 19], 24)]
    want = [hf_forward(model, r).last_hidden_state.numpy() for r in requests]
    with LocalCluster(bundle, extra_args=["--max-inflight", "4", "--batch-pad"]) as cluster:
        def client_loop(k):
            with cluster.new_client() as c:
                return [(i, c.infer(**requests[i], outputs=["last_hidden_state"])[0]) for i in range(k, 24, 8)]

        with ThreadPoolExecutor(8) as pool:
            got = [x for f in [pool.submit(client_loop, k) for k in range(8)] for x in f.result(timeout=300)]
    assert len(got) == 24
    for i, out in got:
        assert np.abs(out["last_hidden_state"] - want[i]).max() < 1e-4


def test_requests_batched_into_an_attempt_that_failed_first_are_rerun_not_left_waiting():
    c, jobs, replies = coordinator_of_two()
    from prism_onnx.errors import ErrorInfo, InputError

    for client in (b"a", b"b"):
        c.on_request(client, Request(arrays={"input_ids": np.arange(1, 6)[None]}), 0.0)
    a, b = (j.request for j in jobs)
    c.fail(a, ErrorInfo.of(InputError("device 1: bad input")))  # a's attempt fails before the worker's Batched
    c.on_batch(a, [(a, 0, 1, 5), (b, 1, 2, 5)], 0.1)
    assert [cl for cl, _ in replies] == [b"a"] and len(jobs) == 3 and list(c.pending) == [jobs[2].request]
    assert c.pending[jobs[2].request].reruns == [f"batched into request {a}, which was abandoned"]
