"""`simulate` (the PyTorch PRISM reference) against the unpartitioned transformers model: one generic
runner over a tiny config of every supported architecture (conftest.ARCHS).

Tolerance: at CR=1 every PRISM step is exact, so outputs must equal the unpartitioned model up to fp32
rounding of re-ordered sums; 1e-5 absolute is over 3x the largest difference seen (about 3e-6 on the
tiny Llama and Qwen2, whose sharpened random init gives logits of magnitude ~10; ~1e-6 elsewhere).
"""

import numpy as np
import pytest
import torch

from conftest import ARCHS, hf_forward, inputs_for_arch, minilm_path, sst2_sentences, text_batch, tiny_model
from prism_onnx import simulate
from prism_onnx.errors import InputError, ModelLoadError, PlanError
from prism_onnx.reference import DeviceTrace

EXACT = 1e-5


def inputs_for(model, seed=0):
    """Batch 2 with padding (left for decoders, right for encoders), or two images."""
    return inputs_for_arch(type(model).__name__, seed)


def outputs_match(out, ref, mask, atol):
    """Largest |diff| over all fields the model returns; token outputs compared at real tokens only."""
    worst = 0.0
    for name in ("last_hidden_state", "pooler_output", "logits"):
        if getattr(ref, name, None) is None:
            continue
        a, b = getattr(out, name), getattr(ref, name)
        assert a.shape == b.shape, name
        if a.dim() == 3 and mask is not None and a.shape[1] == mask.shape[1]:
            a, b = a[mask], b[mask]
        worst = max(worst, (a - b).abs().max().item())
    return worst


def run_both(model, inputs, **kw):
    ref = hf_forward(model, inputs)
    out = simulate(model, inputs, **kw)
    mask = torch.from_numpy(inputs["attention_mask"]).bool() if "attention_mask" in inputs else None
    return out, ref, mask


@pytest.fixture(scope="module")
def tiny():
    return {a: tiny_model(a) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("devices", [1, 2, 3, 5])
@pytest.mark.parametrize("split", ["even", "uneven"])
def test_cr1_equals_unpartitioned(tiny, arch, devices, split):
    model = tiny[arch]
    weights = list(range(1, devices + 1)) if split == "uneven" else None
    for count_bias in (True, False):
        out, ref, mask = run_both(model, inputs_for(model), devices=devices, compression_ratio=1,
                                  split_weights=weights, count_bias=count_bias)
        assert type(out) is type(ref)
        assert outputs_match(out, ref, mask, EXACT) <= EXACT


@pytest.mark.parametrize("arch", ARCHS)
def test_compression_changes_the_output(tiny, arch):
    """Negative test: at CR=4 the means really replace the remote tokens."""
    model = tiny[arch]
    inputs = inputs_for(model)
    out, ref, mask = run_both(model, inputs, devices=3, compression_ratio=4, window=0)  # paper PRISM: no halo
    diff = outputs_match(out, ref, mask, 0)
    name = "logits" if getattr(ref, "logits", None) is not None else "last_hidden_state"
    a, b = getattr(out, name), getattr(ref, name)
    if a.dim() == 3 and mask is not None:  # real tokens only
        a, b = a[mask], b[mask]
    a, b = a.flatten(), b.flatten()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    print(f"{arch} P=3 CR=4: max |diff| {diff:.3g}, cosine {cos:.5f}")
    assert diff > 1e-3
    assert 0.5 < cos < 1.0


def test_count_bias_and_sinks_switches_change_compressed_output(tiny):
    model = tiny["BertModel"]
    inputs = inputs_for(model)
    base = simulate(model, inputs, devices=2, compression_ratio=4).last_hidden_state
    no_bias = simulate(model, inputs, devices=2, compression_ratio=4, count_bias=False).last_hidden_state
    no_sinks = simulate(model, inputs, devices=2, compression_ratio=4, keep_sinks=False).last_hidden_state
    assert (base - no_bias).abs().max() > 1e-4
    assert (base - no_sinks).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM"])
@pytest.mark.parametrize("cr", [1, 3, 64])
def test_decoder_device0_is_exact_at_any_cr(tiny, arch, cr):
    model = tiny[arch]
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    out = simulate(model, {"input_ids": ids}, devices=3, compression_ratio=cr, window=0).logits
    n0 = 7  # even split of 20 tokens over 3 devices: 7, 7, 6
    assert (out[:, :n0] - ref[:, :n0]).abs().max().item() <= EXACT
    if cr > 1:
        assert (out[:, n0:] - ref[:, n0:]).abs().max().item() > 1e-3  # the later devices do see means


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
@pytest.mark.parametrize("p", [1, 2])
def test_decoder_change_in_partition_p_leaves_earlier_partitions_unchanged(tiny, arch, p):
    model = tiny[arch]
    ids = torch.randint(0, 300, (1, 21))  # spans [0,7) [7,14) [14,21)
    changed = ids.clone()
    changed[0, 7 * p + 3] = (changed[0, 7 * p + 3] + 1) % 300
    a = simulate(model, {"input_ids": ids}, devices=3, compression_ratio=4).logits
    b = simulate(model, {"input_ids": changed}, devices=3, compression_ratio=4).logits
    assert torch.equal(a[:, : 7 * p], b[:, : 7 * p])  # bit-identical: earlier devices never see it
    assert (a[:, 7 * p + 3:] - b[:, 7 * p + 3:]).abs().max() > 0


def test_trace_records_what_each_device_sends(tiny):
    model = tiny["ViTModel"]
    trace = DeviceTrace(sent=[])
    simulate(model, inputs_for(model), devices=2, compression_ratio=4, keep_sinks=False, trace=trace)
    # 17 tokens -> 9 + 8 -> ceil(9/4)=3 and 2 rows; one exchange before each of the 2 layers
    assert len(trace.sent) == 2
    assert [tuple(m.shape) for m in trace.sent[0]] == [(2, 3, 32), (2, 2, 32)]


@pytest.mark.long
def test_minilm_real_weights_cr1_exact_and_cr8_close():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    enc = dict(tok(sst2_sentences(4), padding=True, return_tensors="np"))
    for devices in (2, 3):
        out, ref, mask = run_both(model, enc, devices=devices, compression_ratio=1)
        assert outputs_match(out, ref, mask, EXACT) <= EXACT
    out, ref, mask = run_both(model, enc, devices=2, compression_ratio=8)
    cos = torch.nn.functional.cosine_similarity(out.last_hidden_state[mask], ref.last_hidden_state[mask]).mean()
    print(f"MiniLM P=2 CR=8 token cosine {cos:.4f}")
    assert 0.8 < cos < 1.0


# ----------------------------------------------------------------------------------------- bad input
def test_unsupported_model_type_lists_supported():
    import transformers as tf

    model = tf.AlbertModel(tf.AlbertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64, embedding_size=16)).eval()
    with pytest.raises(ModelLoadError, match="unsupported model type 'albert'; supported: bert, distilbert, gpt2, "
                                             "llama, qwen2, roberta, vit"):
        simulate(model, {"input_ids": np.ones((1, 4), np.int64)}, devices=2, compression_ratio=1)


@pytest.mark.parametrize("change,match", [
    (lambda c: setattr(c, "rope_scaling", {"rope_type": "yarn", "factor": 2.0}), "rope_scaling of type 'yarn'"),
    (lambda c: setattr(c, "use_sliding_window", True), "sliding-window attention"),
])
def test_unsupported_decoder_variants_are_refused(change, match):
    import transformers as tf

    from conftest import tiny_config

    arch = "Qwen2ForCausalLM"
    cfg = tiny_config(arch)
    change(cfg)
    cfg.layer_types = None  # recomputed from use_sliding_window
    model = getattr(tf, arch)(type(cfg)(**cfg.to_dict())).eval()
    with pytest.raises(ModelLoadError, match=match):
        simulate(model, {"input_ids": np.ones((1, 4), np.int64)}, devices=2, compression_ratio=1)


@pytest.mark.parametrize("kw,err,match", [
    ({"devices": 0, "compression_ratio": 1}, PlanError, "devices must be an integer >= 1"),
    ({"devices": 14, "compression_ratio": 1}, PlanError, "cannot split 13 tokens over 14 devices"),
    ({"devices": 2, "compression_ratio": 0}, PlanError, "compression ratio must be an integer >= 1"),
])
def test_bad_partitioning_is_refused(tiny, kw, err, match):
    with pytest.raises(err, match=match):
        simulate(tiny["BertModel"], text_batch(100), **kw)


def test_sequence_longer_than_positions_is_refused(tiny):
    ids = np.ones((1, 65), np.int64)  # tiny configs have 64 positions
    with pytest.raises(InputError, match="65 tokens is longer than the model's 64 positions"):
        simulate(tiny["GPT2Model"], {"input_ids": ids}, devices=2, compression_ratio=1)


def test_image_of_wrong_size_is_refused(tiny):
    with pytest.raises(InputError, match=r"image of the wrong size.*\[batch, 3, 16, 16\], got \[1, 3, 32, 32\]"):
        simulate(tiny["ViTModel"], {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)}, devices=2,
                 compression_ratio=1)


HIDDEN_FAMILIES = ["BertModel", "ViTForImageClassification", "GPT2LMHeadModel", "RobertaModel", "DistilBertModel"]


@pytest.mark.parametrize("arch", HIDDEN_FAMILIES)
def test_kv_exchange_is_the_same_math_as_hidden_exchange(tiny, arch):
    """The projections are affine and a segment's weights sum to one, so the means of keys and values equal
    the keys and values of the mean hidden state: a family that exchanges hidden states computes the same
    outputs when it exchanges keys and values instead (PRISM.md, "Rotary models"), at CR=1 (exact) and at
    CR=4 (to float rounding: 1e-5)."""
    model = tiny[arch]
    inputs = inputs_for(model)
    out, ref, mask = run_both(model, inputs, devices=3, compression_ratio=1, exchange="kv")
    assert outputs_match(out, ref, mask, EXACT) <= EXACT
    hidden = simulate(model, inputs, devices=3, compression_ratio=4, exchange="hidden", window=0)
    kv = simulate(model, inputs, devices=3, compression_ratio=4, exchange="kv", window=0)
    assert outputs_match(kv, hidden, mask, EXACT) <= EXACT
    assert outputs_match(kv, ref, mask, 0) > 1e-3  # and CR=4 did compress


def test_rotary_models_refuse_hidden_exchange(tiny):
    with pytest.raises(ModelLoadError, match="llama cannot exchange 'hidden' rows; it supports kv"):
        simulate(tiny["LlamaForCausalLM"], text_batch(300), devices=2, compression_ratio=2, exchange="hidden")
