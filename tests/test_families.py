"""Model families are files under prism_onnx/models/, found by importlib on config.model_type: adding one
touches nothing else. Also the kv exchange's wire cost, read from the runtime's own byte counters."""

from __future__ import annotations

import io
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import hf_forward, inputs_for_arch
from prism_onnx import models, simulate
from prism_onnx.runtime.executor import Executor
from prism_onnx.runtime.wire import MEANS_HEADER, WIRE_ENCODINGS

PACKAGE = Path(models.__file__).resolve().parents[1]


def test_no_module_outside_models_names_a_family():
    """The registry is models/ alone: no other module has a string equal to a family's model_type, nor
    imports a family file (a list of families elsewhere would have to be edited to add one)."""
    families = set(models.supported())
    assert {"bert", "distilbert", "gpt2", "llama", "qwen2", "roberta", "vit"} <= families
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "models":
            continue
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.STRING and tok.string.strip("'\"") in families:
                offenders.append(f"{path.relative_to(PACKAGE)}:{tok.start[0]} {tok.string}")
            if tok.type == tokenize.NAME and tok.string in families and "models" in tok.line and "import" in tok.line:
                offenders.append(f"{path.relative_to(PACKAGE)}:{tok.start[0]} imports {tok.string}")
    assert offenders == []


FAMILY_FILE = '''
"""A test family: GPT-2's layout under another model_type, written as a family file would be."""
from dataclasses import replace
from prism_onnx.models import gpt2

MODEL_TYPE = "pocketgpt"
ARCHITECTURES = ("GPT2LMHeadModel",)


def convert(model):
    pm = gpt2.convert(model)
    pm.spec = replace(pm.spec, model_type=MODEL_TYPE)
    return pm


example_inputs = gpt2.example_inputs
'''


def test_a_family_file_is_all_it_takes(tmp_path):
    """Drop a family file on the models package's path: simulate, export and the onnxruntime executor find
    it by model_type, and it is exact at CR=1, with no other change."""
    import transformers as tf

    from prism_onnx.exporters.bundle import export_graphs, write_bundles
    from prism_onnx.manifest import ExportSettings

    (tmp_path / "pocketgpt.py").write_text(FAMILY_FILE)

    class PocketConfig(tf.GPT2Config):
        model_type = "pocketgpt"

    torch.manual_seed(0)
    cfg = PocketConfig(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2)
    model = tf.GPT2LMHeadModel(cfg).eval()
    inputs = inputs_for_arch("GPT2LMHeadModel")
    models.__path__.append(str(tmp_path))
    try:
        assert "pocketgpt" in models.supported()
        with torch.no_grad():
            ref = hf_forward(model, inputs).logits.numpy()
        mask = inputs["attention_mask"].astype(bool)
        out = simulate(model, inputs, devices=3, compression_ratio=1).logits.numpy()
        assert np.abs(out[mask] - ref[mask]).max() <= 1e-5
        graphs = export_graphs(model, tmp_path / "graphs")
        bundle = write_bundles(graphs, tmp_path / "bundle", ExportSettings(devices=3, compression_ratio=1))
        got = Executor(bundle).run(inputs).outputs["logits"]
        assert np.abs(got[mask] - ref[mask]).max() <= 1e-4
    finally:
        models.__path__.remove(str(tmp_path))
        sys.modules.pop("prism_onnx.models.pocketgpt", None)
    assert "pocketgpt" not in models.supported()


@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_kv_exchange_row_bytes_from_the_runtime_counters(wire, make_bundle):
    """Llama-layout decoders exchange rotated keys and values: a row on the wire is 2 * kv_heads * head_dim
    values, whatever the hidden size. The tiny Qwen2 has 1 kv head of 8 dims: 16 values, half of D = 32
    (the tiny Llama's 2 kv heads would give 32 = D and could not tell the two apart)."""
    bundle = make_bundle("Qwen2ForCausalLM", devices=2, compression_ratio=4, wire_dtype=wire, window=0)
    ex = Executor(bundle)
    spec = ex.manifest.model
    assert (spec.kv_heads, spec.head_dim, spec.hidden_size) == (1, 8, 32)
    width = 2 * spec.kv_heads * spec.head_dim
    assert spec.row_width == width == 16
    inputs = inputs_for_arch("Qwen2ForCausalLM", lengths=(21,))
    result = ex.run(inputs)
    _, plan = ex.requests.prepare(inputs)
    rows = plan.segments[0].rows  # device 0 -> device 1 (causal: device 1 sends nothing)
    assert rows == 1 + -(-10 // 4)  # the first token as a sink, then ceil(10 / 4) means of its other tokens
    frame = MEANS_HEADER.size + rows * 4 + rows * width * WIRE_ENCODINGS[wire].itemsize  # header, counts, rows
    assert result.stats.per_layer[0]["sent"] == [frame] * spec.num_layers
    assert result.stats.per_layer[1]["received"] == [frame] * spec.num_layers
    assert result.stats.bytes_sent[1] == 0
