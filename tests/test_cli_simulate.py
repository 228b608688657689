"""`prism simulate`: output summary, per-device stats, and clear errors with a non-zero exit."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from prism_onnx.cli import main
from prism_onnx.runtime.wire import MEANS_HEADER


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_simulate_text_json_reports_outputs_and_devices(tiny_dirs):
    r = invoke("simulate", tiny_dirs["BertModel"], "-P", 3, "--cr", 1, "--text", "a fine film , truly",
               "--text", "bad", "--no-keep-sinks", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert set(rep["outputs"]) == {"last_hidden_state", "pooler_output"}
    assert all(o["max_abs_diff_vs_model"] <= 1e-5 for o in rep["outputs"].values())
    assert [d["rank"] for d in rep["per_device"]] == [0, 1, 2]
    assert sum(d["tokens"] for d in rep["per_device"]) == rep["tokens"]
    # CR=1 without sinks: every token is its own row. Counted here from first principles: each device sends
    # one frame per receiver (P - 1 of them) holding, for B batch rows, a count (int32) and D float32 values
    # per token, after the fixed frame header.
    B, D, P = rep["batch"], 32, 3
    frame = lambda n: MEANS_HEADER.size + B * n * (4 + 4 * D)  # noqa: E731
    expected = [(P - 1) * frame(d["tokens"]) for d in rep["per_device"]]
    assert [d["bytes_sent_per_layer"] for d in rep["per_device"]] == expected
    assert rep["traffic"]["baseline_bytes_per_layer"] == sum(expected)


def test_simulate_compression_cuts_traffic_and_reports_difference(tiny_dirs):
    r = invoke("simulate", tiny_dirs["GPT2LMHeadModel"], "-P", 2, "--cr", 8, "--window", 0, "--input-ids",
               ",".join(str(i) for i in range(40)), "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["outputs"]["logits"]["max_abs_diff_vs_model"] > 1e-3
    assert rep["traffic"]["ratio_vs_baseline"] < 0.25
    assert rep["per_device"][1]["rows_sent"] == 0  # causal: the last device sends nothing
    # device 0 owns tokens 0..19: the first token as a sink row, then ceil(19 / 8) = 3 means, to device 1
    assert rep["per_device"][0]["rows_sent"] == 4
    assert rep["per_device"][0]["bytes_sent_per_layer"] == MEANS_HEADER.size + 4 * (4 + 4 * 32)


def test_simulate_image_human_output(tiny_dirs, tmp_path):
    from PIL import Image

    img = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)).save(img)
    r = invoke("simulate", tiny_dirs["ViTForImageClassification"], "-P", 2, "--cr", 2, "--image", img)
    assert r.exit_code == 0, r.output
    assert "logits [1, 5]" in r.output and "bytes/layer" in r.output


@pytest.mark.parametrize("args,match", [
    (["-P", 2, "--cr", 1, "--input-ids", "1,2,3", "MODEL=nonexistent/model-xyz"], "cannot load model"),
    (["-P", 0, "--cr", 1, "--input-ids", "1,2,3"], "Invalid value for '--devices'"),
    (["-P", 4, "--cr", 1, "--input-ids", "1,2,3"], "cannot split 3 tokens over 4 devices"),
    (["-P", 2, "--cr", 0, "--input-ids", "1,2,3"], "Invalid value for '--compression-ratio'"),
    (["-P", 2, "--cr", 1, "--input-ids", ",".join(["1"] * 65)], "longer than the model's 64 positions"),
    (["-P", 2, "--cr", 1, "--input-ids", "1,x"], "comma-separated integers"),
    (["-P", 2, "--cr", 1], "give exactly one of"),
])
def test_simulate_bad_input_exits_nonzero(tiny_dirs, args, match):
    model = str(tiny_dirs["BertModel"])
    args = [str(a) for a in args]
    if args[-1].startswith("MODEL="):
        model = args.pop()[len("MODEL="):]
    r = CliRunner().invoke(main, ["simulate", model, *args])
    assert r.exit_code != 0
    assert match in r.output


def test_simulate_wrong_image_size_and_unsupported_type(tiny_dirs, tmp_path):
    px = tmp_path / "px.npy"
    np.save(px, np.zeros((3, 32, 32), np.float32))
    r = CliRunner().invoke(main, ["simulate", str(tiny_dirs["ViTModel"]), "-P", "2", "--cr", "1", "--image", str(px)])
    assert r.exit_code == 1 and "image of the wrong size" in r.output

    import transformers as tf

    folder = tmp_path / "albert"
    tf.AlbertModel(tf.AlbertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                   embedding_size=16)).save_pretrained(folder)
    r = CliRunner().invoke(main, ["simulate", str(folder), "-P", "2", "--cr", "1", "--input-ids", "1,2,3"])
    assert r.exit_code == 1 and "unsupported model type 'albert'; supported: bert, distilbert, gpt2" in r.output


def test_console_script_exit_code(tiny_dirs):
    """The installed `prism` entry point, as a user runs it: error on stderr, exit status 1."""
    p = subprocess.run([sys.executable, "-m", "prism_onnx.cli", "simulate", str(tiny_dirs["GPT2Model"]), "-P", "9",
                        "--cr", "1", "--input-ids", "1,2,3"], capture_output=True, text=True)
    assert p.returncode == 1
    assert "cannot split 3 tokens over 9 devices" in p.stderr
