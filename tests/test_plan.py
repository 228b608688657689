"""The partition plan (pure numpy): splits, segments, sinks, padding, causal routing."""

import numpy as np
import pytest

from prism_onnx.errors import PlanError
from prism_onnx.plan import MASKED, Plan, remote_bias, segment_tokens, split_tokens


@pytest.mark.parametrize("n,P", [(13, 1), (13, 2), (13, 3), (13, 5), (512, 4), (5, 5)])
def test_even_split_is_contiguous_and_balanced(n, P):
    spans = split_tokens(n, P)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    sizes = [e - s for s, e in spans]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_weighted_split_follows_weights_and_gives_everyone_a_token():
    spans = split_tokens(100, 3, [2, 1, 1])
    sizes = [e - s for s, e in spans]
    assert sum(sizes) == 100 and sizes[0] == 50 and abs(sizes[1] - 25) <= 1
    spans = split_tokens(4, 3, [1000, 1, 1])  # tiny weights still get one token
    assert [e - s for s, e in spans] == [2, 1, 1]


@pytest.mark.parametrize("args,match", [
    ((4, 0), "devices must be >= 1"),
    ((3, 4), "cannot split 3 tokens over 4 devices"),
    ((10, 2, [1]), "expected 2 values"),
    ((10, 2, [1, -1]), "positive"),
])
def test_bad_splits_are_refused(args, match):
    with pytest.raises(PlanError, match=match):
        split_tokens(*args)


def test_segments_ragged_last_and_padding_excluded():
    mask = np.array([[1] * 10, [1] * 6 + [0] * 4])
    seg = segment_tokens(0, 10, mask, compression_ratio=4)
    assert seg.counts.tolist() == [[4, 4, 2], [4, 2, 0]]  # last segment shorter; padding not counted
    z = np.arange(10, dtype=np.float32)[None, :, None].repeat(2, 0)
    means = seg.averager @ z
    assert means[0, :, 0].tolist() == [1.5, 5.5, 8.5]
    assert means[1, :2, 0].tolist() == [1.5, 4.5] and means[1, 2, 0] == 0.0


def test_sinks_get_their_own_segment():
    mask = np.array([[1] * 10, [1] * 7 + [0] * 3])
    seg = segment_tokens(0, 10, mask, compression_ratio=4, sinks=("first", "last"))
    # layout: [first] + 3 positional + [last]; the last real token is 9 in row 0 and 6 in row 1
    assert seg.counts.tolist() == [[1, 3, 4, 1, 1], [1, 3, 2, 0, 1]]
    z = np.arange(10, dtype=np.float32)[None, :, None].repeat(2, 0)
    means = (seg.averager @ z)[..., 0]
    assert means[0].tolist() == [0, 2, 5.5, 8, 9]
    assert means[1].tolist() == [0, 2, 4.5, 0, 6]


def test_sinks_cost_nothing_at_cr1_and_padding_only_rows_are_dropped():
    mask = np.array([[1] * 6 + [0] * 4])
    seg = segment_tokens(0, 10, mask, compression_ratio=1, sinks=("first", "last"))
    assert seg.counts.tolist() == [[1, 1, 1, 1, 1, 1]]  # [CLS], 4 positional, [SEP]; no padding rows


def test_sink_slots_only_on_the_owning_device():
    mask = np.ones((1, 12))
    plan = Plan(mask, devices=3, compression_ratio=8, sinks=("first", "last"))
    assert [s.counts.tolist() for s in plan.segments] == [[[1, 3]], [[4]], [[3, 1]]]


def test_causal_plan_sends_only_forward():
    plan = Plan(np.ones((1, 12)), devices=3, compression_ratio=2, causal=True)
    assert [plan.sources(p) for p in range(3)] == [[], [0], [0, 1]]
    assert [plan.receivers(q) for q in range(3)] == [[1, 2], [2], []]
    assert plan.averager(2).shape == (1, 0, 4)  # nobody receives from the last device
    assert plan.remote_counts(0).shape == (1, 0)


def test_bidirectional_plan_rows_and_bias():
    mask = np.array([[1] * 8 + [0] * 4, [1] * 12])
    plan = Plan(mask, devices=2, compression_ratio=4, count_bias=True)
    assert plan.sources(0) == [1] and plan.sources(1) == [0]
    # device 1 owns 6..11: row 0 has 6,7 real and 8..11 padding -> counts [2, 0]; row 1 is full -> [4, 2]
    assert plan.remote_counts(0).tolist() == [[2, 0], [4, 2]]
    np.testing.assert_allclose(plan.remote_bias(0), [[np.log(2), MASKED], [np.log(4), np.log(2)]])
    assert plan.local_bias(1)[0].tolist() == [0, 0, MASKED, MASKED, MASKED, MASKED]
    assert plan.projected_rows(0) == 6 + 2
    assert remote_bias(np.array([[3]]), count_bias=False).tolist() == [[0.0]]
    # a row that is padding in every batch row is not sent at all
    assert Plan(mask[:1], devices=2, compression_ratio=4).remote_counts(0).tolist() == [[2]]


def test_compression_ratio_must_be_positive_integer():
    with pytest.raises(PlanError, match="compression_ratio"):
        Plan(np.ones((1, 4)), devices=2, compression_ratio=0)
    with pytest.raises(PlanError, match="compression_ratio"):
        Plan(np.ones((1, 4)), devices=2, compression_ratio=1.5)


def test_a_plan_over_some_ranks_is_the_plan_over_that_many_devices_with_ranks_renamed():
    """Elastic partitions: a plan over live ranks (1, 2, 4) of an export of 5 has the spans, segments and
    routing of a 3-device plan; position i is computed by ranks[i], and every method takes ranks."""
    from types import SimpleNamespace

    from prism_onnx.manifest import PrismSettings
    from prism_onnx.plan import make_plan, member_weights, plan_for

    mask = np.ones((1, 12))
    sub = Plan(mask, devices=3, compression_ratio=2, causal=True, sinks=("first",), ranks=(1, 2, 4))
    full = Plan(mask, devices=3, compression_ratio=2, causal=True, sinks=("first",))
    assert sub.spans == full.spans and sub.tail == 4
    for i, r in enumerate(sub.ranks):
        assert sub.span(r) == full.span(i)
        assert [sub.position(q) for q in sub.sources(r)] == full.sources(i)
        assert [sub.position(q) for q in sub.receivers(r)] == full.receivers(i)
        assert np.array_equal(sub.averager(r), full.averager(i))
        assert np.array_equal(sub.remote_bias(r), full.remote_bias(i))
        assert np.array_equal(sub.position_ids(r), full.position_ids(i))
    assert sub.sources(4) == [1, 2] and sub.receivers(1) == [2, 4]
    with pytest.raises(PlanError, match="device 0 is not in this plan"):
        sub.span(0)
    for bad in [(2, 1, 4), (1, 1, 4), (1, 2), (-1, 2, 4)]:
        with pytest.raises(PlanError, match="increasing device ranks"):
            Plan(mask, devices=3, compression_ratio=2, ranks=bad)
    # an export's split weights follow their devices: rank 2's weight stays rank 2's
    assert member_weights([4, 1, 2, 1], [0, 2]) == [4.0, 2.0] and member_weights(None, [1]) is None
    settings = PrismSettings(devices=4, compression_ratio=1, keep_sinks=False, split_weights=[4, 1, 2, 1])
    spec = SimpleNamespace(causal=False, sinks=())
    p = plan_for(spec, np.ones((1, 13)), settings, ranks=[2, 0])
    assert p.ranks == (0, 2) and p.weights == (4.0, 2.0) and p.describe()["spans"] == [[0, 8], [8, 13]]
    assert make_plan(spec, mask, devices=2, compression_ratio=1, ranks=[0, 3]).describe() == \
        {"ranks": [0, 3], "split_weights": None, "spans": [[0, 6], [6, 12]]}
    with pytest.raises(PlanError, match="distinct devices of 0..3"):
        plan_for(spec, mask, settings, ranks=[1, 5])
