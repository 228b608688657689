"""The halo window (PRISM.md, "Halo window"): each device also receives the W tokens before its span
(encoders: and after it) at full resolution, and never a token twice.

Tolerances: at CR=1, and whenever every row a device receives stands for one token (far="none", or a
window covering every remote token), PRISM is exact, so outputs equal the unpartitioned (or masked) model up
to fp32 rounding of re-ordered sums: 1e-5 absolute, as in test_reference.py (largest seen ~3e-6).
"""

import numpy as np
import pytest
import torch

from conftest import ARCHS, DECODERS, hf_forward, inputs_for_arch, text_batch, tiny_model
from prism_onnx import simulate
from prism_onnx.evaluate.bounds import masked_forward
from prism_onnx.manifest import PrismSettings
from prism_onnx.models import convert
from prism_onnx.plan import MEAN, SINK, WINDOW, Plan, plan_for, segment_tokens
from test_reference import outputs_match

EXACT = 1e-5


@pytest.fixture(scope="module")
def tiny():
    return {a: tiny_model(a) for a in ARCHS}


def worst_diff(out, ref, inputs) -> float:
    """Largest |diff| over the fields the model returns; token outputs at real tokens only."""
    mask = torch.from_numpy(inputs["attention_mask"]).bool() if "attention_mask" in inputs else None
    return outputs_match(out, ref, mask, 0.0)


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("devices,weights", [(2, None), (3, [3, 1, 2]), (5, None)])
def test_cr1_with_any_window_equals_the_model(tiny, arch, devices, weights):
    model = tiny[arch]
    inputs = inputs_for_arch(arch)  # batch 2 with padding (left for decoders, right for encoders)
    ref = hf_forward(model, inputs)
    for window, far in ((1, "means"), (3, "means"), (6, "means"), (4, "none")):
        if far == "none":  # CR=1 with far="none" drops the far tokens: exact only when the window covers them
            window = 64
        out = simulate(model, inputs, devices=devices, compression_ratio=1, split_weights=weights, window=window,
                       far=far)
        assert worst_diff(out, ref, inputs) < EXACT, (window, far)


@pytest.mark.parametrize("arch", ["BertModel", "LlamaForCausalLM", "GPT2LMHeadModel", "ViTModel"])
@pytest.mark.parametrize("cr", [3, 8])
def test_a_window_over_every_remote_token_is_the_model_at_any_cr(tiny, arch, cr):
    """No token is counted twice: if the window covers the whole sequence, every mean is replaced by its
    tokens (and every sink by its window row), which is the unpartitioned model."""
    model = tiny[arch]
    inputs = inputs_for_arch(arch)
    ref = hf_forward(model, inputs)
    for far in ("means", "none"):
        out = simulate(model, inputs, devices=3, compression_ratio=cr, window=64, far=far)
        assert worst_diff(out, ref, inputs) < EXACT, far
    compressed = simulate(model, inputs, devices=3, compression_ratio=cr, window=2)
    assert worst_diff(compressed, ref, inputs) > 1e-3  # a partial window does change the output


@pytest.mark.parametrize("arch", ["BertModel", "RobertaModel", "LlamaForCausalLM", "Qwen2ForCausalLM",
                                  "GPT2LMHeadModel"])
@pytest.mark.parametrize("window", [0, 2, 5])
def test_far_none_equals_the_masked_full_model(tiny, arch, window):
    """An independent computation: with far="none" every received row is one token at full resolution, so
    PRISM equals the transformers model whose queries see only their partition, window and sinks
    (Plan.visibility, applied as an attention mask) at any CR and split."""
    model = tiny[arch]
    inputs = inputs_for_arch(arch, lengths=(17, 11))
    spec = convert(model).spec
    for cr, weights in ((4, None), (16, [1, 3, 2])):
        settings = PrismSettings(devices=3, compression_ratio=cr, split_weights=weights, window=window, far="none")
        plan = plan_for(spec, inputs["attention_mask"], settings)
        ref = masked_forward(model, inputs, plan.visibility())
        out = simulate(model, inputs, devices=3, compression_ratio=cr, split_weights=weights, window=window,
                       far="none")
        assert worst_diff(out, ref, inputs) < EXACT, (cr, weights)


def test_window_zero_is_the_papers_plan():
    """W=0 (the default) cuts every device's tokens exactly as the paper does and sends every row to every
    receiver, so every output and byte count of PRISM without a window is unchanged."""
    rng = np.random.default_rng(0)
    for causal, sinks in ((True, ("first",)), (False, ("first", "last"))):
        mask = text_batch(300, rng, lengths=(40, 29), left=causal)["attention_mask"]
        plan = Plan(mask, devices=4, compression_ratio=3, causal=causal, sinks=sinks, window=0)
        for q in plan.ranks:
            s, e = plan.span(q)
            paper = segment_tokens(s, e, mask, 3, sinks)
            seg = plan.segment(q)
            assert np.array_equal(seg.averager, paper.averager) and np.array_equal(seg.counts, paper.counts)
            assert WINDOW not in seg.kinds
            for p in plan.receivers(q):
                assert plan.rows_to(q, p).tolist() == list(range(seg.rows))
                assert np.array_equal(plan.counts_to(q, p), seg.counts)


def received_tokens(plan: Plan, p: int) -> np.ndarray:
    """[B, N] how many received rows hold each global token (for device p), from the rows themselves."""
    B, N = plan.attention_mask.shape
    held = np.zeros((B, N), np.int64)
    for q in plan.sources(p):
        s, e = plan.span(q)
        seg, index, counts = plan.segment(q), plan.rows_to(q, p), plan.counts_to(q, p)
        member = (seg.averager[:, index] > 0) & (counts[:, :, None] > 0)  # [B, k, n_q]
        held[:, s:e] += member.sum(axis=1)
    return held


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("far", ["means", "none"])
def test_every_remote_token_reaches_a_receiver_once(causal, far):
    """For random splits, windows, CRs and padding: each remote real token a device may see is in exactly
    one received row (far="means"), or in one if it is in the window or a sink and in none otherwise
    (far="none"); window tokens travel as rows of count 1."""
    rng = np.random.default_rng(1)
    sinks = ("first",) if causal else ("first", "last")
    for trial in range(60):
        P = int(rng.integers(2, 6))
        N = int(rng.integers(P, 60))
        lengths = [int(rng.integers(1, N + 1)) for _ in range(2)] + [N]
        mask = text_batch(300, rng, lengths=tuple(lengths), left=causal)["attention_mask"]
        weights = [float(w) for w in rng.integers(1, 5, P)] if trial % 2 else None
        plan = Plan(mask, devices=P, compression_ratio=int(rng.integers(1, 9)), causal=causal, sinks=sinks,
                    weights=weights, window=int(rng.integers(0, 20)), far=far)
        vis = plan.visibility()  # what p sees at full resolution: own tokens, window, sinks
        for p in plan.ranks:
            s, e = plan.span(p)
            held = received_tokens(plan, p)
            remote = np.zeros(N, bool)
            for q in plan.sources(p):
                a, b = plan.span(q)
                remote[a:b] = True
            real = mask.astype(bool) & remote[None, :]
            if far == "means":
                assert np.array_equal(held, real.astype(np.int64)), (trial, p)
            else:
                exact = vis[:, s, :] & real  # the window and sinks as the first query of p sees them
                assert np.array_equal(held, exact.astype(np.int64)), (trial, p)
            for q in plan.sources(p):
                seg, index = plan.segment(q), plan.rows_to(q, p)
                win = seg.kinds[index] == WINDOW
                assert np.all(plan.counts_to(q, p)[:, win] <= 1)
                assert set(seg.kinds[index].tolist()) <= {MEAN, SINK, WINDOW}


def test_window_rows_follow_the_definition():
    """P=3 decoder, N=12 (spans 0-4, 4-8, 8-12), W=3, CR=2: device 2 receives tokens 5, 6, 7 of device 1 as
    rows, device 1's other tokens (4) as a mean, and device 0's means (its sink 0 apart); device 1's
    segments are cut at 5 (device 2's window edge)."""
    plan = Plan(np.ones((1, 12)), devices=3, compression_ratio=2, causal=True, sinks=("first",), window=3)
    seg = plan.segment(1)
    to2 = plan.rows_to(1, 2)
    assert [tuple(r) for r in seg.ranges[to2]] == [(4, 5), (5, 6), (6, 7), (7, 8)]
    assert seg.kinds[to2].tolist() == [MEAN, WINDOW, WINDOW, WINDOW]
    assert plan.remote_counts(2).tolist() == [[1, 2, 1, 1, 1, 1, 1]]  # sink 0, mean (1,2,3)->[1-2][3], 4, 5..7
    assert plan.counts_to(0, 2).tolist() == [[1, 2, 1]]
    assert plan.counts_to(0, 1).tolist() == [[1, 1, 1, 1]]  # device 1's window is 1..3: the sink and 3 rows
    assert plan.counts_to(1, 2).tolist() == [[1, 1, 1, 1]]
    assert plan.sent_rows(1) == 4 and plan.projected_rows(2) == 4 + 7
    none = Plan(np.ones((1, 12)), devices=3, compression_ratio=2, causal=True, sinks=("first",), window=3,
                far="none")
    assert none.remote_counts(2).tolist() == [[1, 1, 1, 1]]  # the sink, then the window 5..7
    assert none.averager(0).shape == (1, 4, 4)  # device 0 computes its sink and device 1's window 1..3 only
    assert none.counts_to(0, 2).tolist() == [[1]]  # device 2 gets the sink of device 0, nothing else


# ------------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_a_change_never_reaches_an_earlier_partition_with_a_window(tiny, arch):
    model = tiny[arch]
    inputs = text_batch(300, np.random.default_rng(3), lengths=(24,))
    base = simulate(model, inputs, devices=3, compression_ratio=4, window=5).logits
    for p, token in ((1, 10), (2, 20)):  # a token of partition p (spans 0-8, 8-16, 16-24)
        changed = {k: v.copy() for k, v in inputs.items()}
        changed["input_ids"][0, token] = (changed["input_ids"][0, token] + 7) % 300
        out = simulate(model, changed, devices=3, compression_ratio=4, window=5).logits
        start = 8 * p
        assert torch.equal(out[:, :start], base[:, :start]), p  # earlier partitions: bit-identical
        assert not torch.allclose(out[:, token:], base[:, token:])


# ------------------------------------------------------------------------------------------ generation
def test_greedy_generation_with_a_window_at_cr1_equals_hf(tiny):
    from prism_onnx.reference import generate

    model = tiny["LlamaForCausalLM"]
    inputs = text_batch(300, np.random.default_rng(4), lengths=(19, 14), left=True)
    ids = torch.from_numpy(inputs["input_ids"])
    mask = torch.from_numpy(inputs["attention_mask"])
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              pad_token_id=0)[:, ids.shape[1]:].tolist()
    from prism_onnx.generate import GenerationConfig

    got = generate(model, inputs, devices=3, compression_ratio=1, window=4,
                   config=GenerationConfig(max_new_tokens=8)).ids
    assert got == want


def test_generation_decodes_from_the_window_rows(tiny):
    """With far="none" the tail's compressed prefix cache is [sink; window rows; own tokens]; greedy decoding
    from it equals greedy decoding of the masked full model (each new token sees what the tail sees)."""
    from prism_onnx.generate import GenerationConfig
    from prism_onnx.reference import generate

    model = tiny["LlamaForCausalLM"]
    spec = convert(model).spec
    inputs = text_batch(300, np.random.default_rng(5), lengths=(21,))
    settings = PrismSettings(devices=3, compression_ratio=4, window=3, far="none")
    got = generate(model, inputs, **{k: getattr(settings, k) for k in ("devices", "compression_ratio", "window",
                                                                       "far")},
                   config=GenerationConfig(max_new_tokens=6)).ids[0]
    ids = inputs["input_ids"][0].tolist()
    for _ in range(6):  # the masked model over the prompt + the tokens so far: new tokens join the tail
        mask = np.ones((1, len(ids)), np.int64)
        plan = plan_for(spec, inputs["attention_mask"], settings)
        vis = np.zeros((1, len(ids), len(ids)), bool)
        n = plan.n_tokens
        vis[:, :n, :n] = plan.visibility()
        tail_row = plan.visibility()[0, n - 1]  # what the tail's last prompt token sees ...
        vis[0, n:, :n] = tail_row  # ... new tokens see it too
        vis[0, n:, n:] = np.tril(np.ones((len(ids) - n,) * 2, bool))  # and the new tokens before them
        logits = masked_forward(model, {"input_ids": np.array([ids]), "attention_mask": mask}, vis).logits
        ids.append(int(logits[0, -1].argmax()))
    assert got == ids[len(inputs["input_ids"][0]):]


# ----------------------------------------------------------------------------------------- entry points
def test_simulate_refuses_unknown_keywords(tiny):
    model = tiny["BertModel"]
    inputs = inputs_for_arch("BertModel")
    with pytest.raises(TypeError, match="'windw'"):
        simulate(model, inputs, devices=2, compression_ratio=4, windw=8)
    with pytest.raises(TypeError, match="'position_ids'"):
        simulate(model, devices=2, compression_ratio=4, position_ids=inputs["input_ids"], **inputs)
    from prism_onnx.errors import InputError
    with pytest.raises(InputError, match="unknown model inputs"):
        simulate(model, {**inputs, "labels": inputs["input_ids"]}, devices=2, compression_ratio=4)
    with pytest.raises(Exception, match="window must be an integer >= 0"):
        simulate(model, inputs, devices=2, compression_ratio=4, window=-1)
    with pytest.raises(Exception, match="far context 'all'"):
        simulate(model, inputs, devices=2, compression_ratio=4, far="all")


def test_decoder_device0_receives_no_window():
    plan = Plan(np.ones((1, 20)), devices=4, compression_ratio=2, causal=True, window=8)
    assert plan.remote_counts(0).shape == (1, 0)
    encoder = Plan(np.ones((1, 20)), devices=4, compression_ratio=2, window=3)  # spans of 5 tokens

    def window_rows(q, p):
        seg, index = encoder.segment(q), encoder.rows_to(q, p)
        return [tuple(int(x) for x in r) for r, k in zip(seg.ranges[index], seg.kinds[index]) if k == WINDOW]

    assert window_rows(1, 0) == [(5, 6), (6, 7), (7, 8)]  # device 0: the 3 tokens after its span
    assert window_rows(1, 2) == [(7, 8), (8, 9), (9, 10)]  # device 2: 3 before ...
    assert window_rows(3, 2) == [(15, 16), (16, 17), (17, 18)]  # ... and 3 after
    assert window_rows(0, 2) == [] and window_rows(3, 0) == []


@pytest.mark.parametrize("arch", sorted(DECODERS & {"LlamaForCausalLM", "GPT2LMHeadModel"}))
def test_bytes_count_the_window_rows(arch):
    """The analytic traffic of a plan with a window: device p-1 sends W more rows to p (less the means they
    replace); at W=0 it is the paper's."""
    from prism_onnx.runtime.wire import plan_traffic

    mask = np.ones((1, 64), np.int64)
    spec = convert(tiny_model(arch)).spec
    base = plan_for(spec, mask, PrismSettings(devices=4, compression_ratio=8, window=0))
    win = plan_for(spec, mask, PrismSettings(devices=4, compression_ratio=8, window=8))
    sent0, _ = plan_traffic(base, spec.row_width, 1, "float32")
    sent8, _ = plan_traffic(win, spec.row_width, 1, "float32")
    # spans of 16: a window of 8 replaces one mean of 8 tokens by 8 rows for each of 3 receivers
    row = 4 * (spec.row_width + 1)
    assert sum(s[0] for s in sent8) - sum(s[0] for s in sent0) == 3 * (8 - 1) * row


# ------------------------------------------------------------------------------------- bundles, runtime
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "BertModel"])
def test_bundles_with_a_window_equal_the_reference_over_zeromq(arch, tiny_dirs, make_bundle):
    """A CR=4, W=8 export: the in-process executor equals simulate (fp32 graphs vs PyTorch eager: 1e-4, as in
    test_export.py), a cluster of runner processes equals the executor bit for bit, and the runtime's byte
    counters equal the plan's traffic, window rows included."""
    from prism_onnx import models
    from prism_onnx.runtime.cluster import LocalCluster
    from prism_onnx.runtime.executor import Executor
    from prism_onnx.runtime.wire import plan_traffic

    inputs = inputs_for_arch(arch, lengths=(29, 22))
    bundle = make_bundle(arch, devices=3, compression_ratio=4, window=8)
    ex = Executor(bundle)
    expected = ex.run(inputs)
    sim = simulate(models.load(tiny_dirs[arch]), inputs, devices=3, compression_ratio=4, window=8)
    mask = inputs["attention_mask"].astype(bool)
    for name, value in expected.outputs.items():
        ref = getattr(sim, name).numpy()
        a, b = (value[mask], ref[mask]) if value.ndim == 3 else (value, ref)
        assert np.abs(a - b).max() <= 1e-4, name
    swept = Executor(make_bundle(arch, devices=5, compression_ratio=1)).with_settings(devices=3, compression_ratio=4,
                                                                                       window=8)
    for name, value in swept.run(inputs).outputs.items():  # a sweep's executor: the same graphs, other settings
        assert np.array_equal(value, expected.outputs[name]), name
    _, plan = ex.requests.prepare(inputs)
    spec = ex.manifest.model
    sent, received = plan_traffic(plan, spec.row_width, spec.num_layers, "float32")
    assert [d["sent"] for d in expected.stats.per_layer] == sent
    assert [d["received"] for d in expected.stats.per_layer] == received
    no_window, _ = plan_traffic(plan_for(spec, inputs["attention_mask"], PrismSettings(3, 4, window=0)), spec.row_width,
                                spec.num_layers, "float32")
    assert sum(map(sum, sent)) > sum(map(sum, no_window))  # the window rows are on the wire and counted
    with LocalCluster(bundle) as cluster:
        outputs, stats = cluster.client.infer(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    served = ex.run(inputs, split_weights=stats["split_weights"], ranks=stats["ranks"])
    for name in outputs:
        assert np.array_equal(outputs[name], served.outputs[name]), name
    _, plan = ex.requests.prepare(inputs, stats["split_weights"], stats["ranks"])
    sent, received = plan_traffic(plan, spec.row_width, spec.num_layers, "float32")
    assert [d["sent"] for d in stats["per_layer"]] == sent
    assert [d["received"] for d in stats["per_layer"]] == received
    ex.close()


def test_cli_simulate_reports_the_window(tiny_dirs):
    import json

    from click.testing import CliRunner

    from prism_onnx.cli import main

    args = ["simulate", str(tiny_dirs["LlamaForCausalLM"]), "-P", "4", "--cr", "4", "--input-ids", "5 6 7 8 9 10 11 "
            "12 13 14 15 16 17 18 19 20 21 22 23 24", "--json"]
    r0 = CliRunner().invoke(main, args)
    r8 = CliRunner().invoke(main, args + ["--window", "3"])
    rw = CliRunner().invoke(main, args + ["--window", "0"])
    assert r0.exit_code == 0 and r8.exit_code == 0, r0.output + r8.output
    a, b = json.loads(r0.output), json.loads(r8.output)
    # 128: the Llama family's default
    assert a["settings"]["window"] == 128 and b["settings"]["window"] == 3 and b["settings"]["far"] == "means"
    a = json.loads(rw.output)  # no window: the paper's PRISM
    assert b["traffic"]["bytes_per_layer"] > a["traffic"]["bytes_per_layer"]
    assert [d["rows_sent"] for d in b["per_device"]][:3] != [d["rows_sent"] for d in a["per_device"]][:3]
    bad = CliRunner().invoke(main, args + ["--far", "everything"])
    assert bad.exit_code == 2 and "everything" in bad.output


@pytest.mark.parametrize("arch", ["ViTModel", "DistilBertModel"])
def test_masked_bounds_refuse_a_model_without_per_query_masks(tiny, arch):
    from prism_onnx.errors import InputError

    inputs = {"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64)}
    with pytest.raises(InputError, match="attention mask per query"):
        masked_forward(tiny[arch], inputs, np.ones((1, 4, 4), bool))


def test_a_manifest_from_before_the_window_reads_as_no_window():
    """A decoder exported before the halo window existed ran the paper's PRISM: its manifest (no `window`,
    no `far`) must not pick up the family's window default of today; a manifest of today keeps what it
    recorded, and one with the settings left unset takes the family's DEFAULTS."""
    from dataclasses import replace

    from prism_onnx.manifest import Manifest
    from prism_onnx.models import llama
    from test_coordinator import manifest

    m = manifest(devices=2)
    decoder = replace(m, model=replace(m.model, model_type="llama", causal=True, defaults=dict(llama.DEFAULTS)),
                      settings=replace(m.settings, window=None, count_bias=None))
    assert decoder.settings.window == llama.DEFAULTS["window"] and decoder.settings.count_bias is False
    d = decoder.to_dict()
    assert Manifest.from_dict(d).settings.window == llama.DEFAULTS["window"]
    for k in ("window", "far"):
        del d["settings"][k]
    old = Manifest.from_dict(d).settings
    assert old.window == 0 and old.far == "means" and old.count_bias is False  # recorded values stay
