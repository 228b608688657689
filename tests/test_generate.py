"""Generation: distributed prefill, then decoding on the tail device from its compressed prefix cache.

At CR=1 every step is exact, so greedy decoding must pick the same tokens as the unpartitioned
transformers model's `generate(do_sample=False)`, for every decoder family (GPT-2 exported with the key/
value exchange, and with its default hidden exchange), P in {1, 2, 3}, a single prompt and a left-padded
batch, in the PyTorch reference and through the exported graphs on onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import text_batch, tiny_model
from prism_onnx.errors import InputError
from prism_onnx.generate import GenerationConfig, Sampler, kv_rows_numpy
from prism_onnx.prism import kv_rows as torch_kv_rows
from prism_onnx.reference import generate
from prism_onnx.runtime.executor import Executor

DECODER_LMS = ["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM"]


def hf_greedy(model, inputs, n):
    """transformers' greedy generation: the n new ids of each row (finished rows padded with -1)."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(inputs["input_ids"]),
                             attention_mask=torch.from_numpy(inputs["attention_mask"]), max_new_tokens=n,
                             do_sample=False, pad_token_id=-1)
    return [[t for t in row if t != -1] for row in out[:, inputs["input_ids"].shape[1]:].tolist()]


@pytest.fixture(scope="module")
def lms():
    return {a: tiny_model(a) for a in DECODER_LMS}


@pytest.mark.parametrize("arch", DECODER_LMS)
@pytest.mark.parametrize("lengths", [(13,), (13, 9)], ids=["one", "left-padded"])
def test_greedy_at_cr1_equals_transformers_generate(lms, arch, lengths):
    model = lms[arch]
    inputs = text_batch(300, np.random.default_rng(1), lengths, left=True)
    expected = hf_greedy(model, inputs, 16)
    for devices in (1, 2, 3):
        got = generate(model, inputs, devices=devices, compression_ratio=1,
                       config=GenerationConfig(max_new_tokens=16))
        assert got.ids == expected, devices


@pytest.fixture
def decoder_graphs(exported_graphs):
    """{arch: Graphs} of the decoder LMs with the key/value exchange (GPT-2's is not its default), traced on
    first use."""

    class WithKV(dict):
        def __missing__(self, arch):
            return exported_graphs[arch + "/kv" if arch.startswith("GPT2") else arch]

    return WithKV()


def bundle(decoder_graphs, tmp_path, arch, **settings):
    from prism_onnx.exporters.bundle import write_bundles
    from prism_onnx.manifest import ExportSettings

    return write_bundles(decoder_graphs[arch], tmp_path / f"{arch}-{len(list(tmp_path.iterdir()))}",
                         ExportSettings(**settings))


@pytest.mark.parametrize("arch", DECODER_LMS)
def test_bundles_generate_like_transformers_at_cr1(lms, decoder_graphs, tmp_path, arch):
    inputs = text_batch(300, np.random.default_rng(2), (13, 9), left=True)
    expected = hf_greedy(lms[arch], inputs, 16)
    for devices in (1, 2, 3):
        gen, _ = Executor(bundle(decoder_graphs, tmp_path, arch, devices=devices, compression_ratio=1)).generate(
            inputs, GenerationConfig(max_new_tokens=16))
        assert gen.ids == expected, devices


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_compressed_decoding_first_token_is_the_prefill_argmax_and_moves_no_bytes(lms, decoder_graphs, tmp_path,
                                                                                 arch):
    """At CR=4 decoding runs from the compressed cache: its first token is the argmax of the prefill's last
    logits (the same export scoring the prompt), and the exchange's byte counters do not move while the
    tail device decodes; the bundle matches the PyTorch reference token for token."""
    b = bundle(decoder_graphs, tmp_path, arch, devices=3, compression_ratio=4)
    inputs = text_batch(300, np.random.default_rng(3), (21,), left=True)
    ex = Executor(b)
    prefill_logits = ex.run(inputs).outputs["logits"]  # [1, 21, V]
    counters = []
    gen, stats = ex.generate(inputs, GenerationConfig(max_new_tokens=12),
                             on_tokens=lambda step, ids: counters.append(
                                 [sum(e.traffic.sent) + sum(e.traffic.received) for e in ex.hub.endpoints]))
    assert gen.ids[0][0] == int(prefill_logits[0, -1].argmax())
    assert len(counters) == 12 and all(c == counters[0] for c in counters)  # no traffic after the prefill
    assert sum(stats.bytes_sent) > 0  # the prefill did exchange
    ref = generate(lms[arch], inputs, devices=3, compression_ratio=4, config=GenerationConfig(max_new_tokens=12))
    assert gen.ids == ref.ids
    assert gen.stats.generated == 12 and gen.stats.decode_tokens_per_s > 0


def test_sampling_is_reproducible_with_a_seed_and_stop_tokens_end_rows(lms):
    model = lms["LlamaForCausalLM"]
    inputs = text_batch(300, np.random.default_rng(4), (11, 7), left=True)
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    a = generate(model, inputs, devices=2, compression_ratio=2, config=cfg)
    b = generate(model, inputs, devices=2, compression_ratio=2, config=cfg)
    c = generate(model, inputs, devices=2, compression_ratio=2, config=GenerationConfig(
        max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=8))
    assert a.ids == b.ids and a.ids != c.ids
    stop = a.ids[0][3]  # a token the first row produces: with it as a stop token, that row ends there
    d = generate(model, inputs, devices=2, compression_ratio=2, config=GenerationConfig(
        max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=7, stop_token_ids=(stop,)))
    first = a.ids[0].index(stop)
    assert d.ids[0] == a.ids[0][:first + 1] and d.finish_reasons[0] == "stop"


def test_sampler_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    history = np.zeros((1, 0), np.int64)
    top1 = Sampler(GenerationConfig(temperature=1.0, top_k=1, seed=0))
    assert all(top1(logits, history)[0] == 0 for _ in range(20))
    nucleus = Sampler(GenerationConfig(temperature=1.0, top_p=0.7, seed=0))  # keeps {0.5, 0.3}
    assert set(int(nucleus(logits, history)[0]) for _ in range(200)) == {0, 1}
    penalized = Sampler(GenerationConfig(repetition_penalty=10.0))
    assert penalized(logits, np.array([[0]]))[0] == 1  # the repeated best token falls behind


def test_numpy_kv_rows_match_the_torch_layout():
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    assert np.array_equal(kv_rows_numpy(k.numpy(), v.numpy()), torch_kv_rows(k, v).numpy())


def test_generation_refuses_what_it_cannot_do(lms, tiny_dirs):
    from prism_onnx import models

    right_padded = text_batch(300, np.random.default_rng(5), (9, 5), left=False)
    with pytest.raises(InputError, match="pad on the left"):
        generate(lms["GPT2LMHeadModel"], right_padded, devices=2, compression_ratio=1)
    with pytest.raises(InputError, match="language-model head"):
        generate(models.load(tiny_dirs["LlamaModel"]), text_batch(300, left=True), devices=2, compression_ratio=1)


# ------------------------------------------------------------------------------- over ZeroMQ runners
@pytest.mark.parametrize("arch,devices", [("GPT2LMHeadModel", 2), ("LlamaForCausalLM", 3)])
def test_runners_generate_like_transformers_and_stream(lms, decoder_graphs, exported_graphs, tmp_path, arch,
                                                       devices):
    """Runner processes over CurveZMQ: greedy decoding at CR=1 equals transformers' generate (GPT-2 as exported
    by default, with the hidden exchange; Llama exchanging keys and values); the streamed tokens are the
    returned ones, in order; the exchange counters of a generation request are those of the same prompt
    scored without generation (nothing moves between devices while decoding)."""
    from prism_onnx.exporters.bundle import write_bundles
    from prism_onnx.manifest import ExportSettings
    from prism_onnx.runtime.cluster import LocalCluster

    inputs = text_batch(300, np.random.default_rng(6), (13, 9), left=True)
    expected = hf_greedy(lms[arch], inputs, 12)
    b = write_bundles(exported_graphs[arch], tmp_path / arch, ExportSettings(devices=devices, compression_ratio=1))
    with LocalCluster(b) as cluster:
        streamed = []
        ids, reply = cluster.client.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                             config=GenerationConfig(max_new_tokens=12),
                                             on_tokens=lambda step, new, texts: streamed.append((step, new.tolist())))
        _, scored = cluster.client.infer(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert ids == expected
    assert [s for s, _ in streamed] == list(range(12))
    assert [[new[b] for _, new in streamed if new[b] >= 0] for b in range(2)] == ids
    assert reply["stats"]["bytes_sent"] == scored["bytes_sent"]  # the prefill's frames, and no more
    assert sum(scored["bytes_sent"]) > 0
    g = reply["generation"]
    assert g["generated_tokens"] == 12 and g["finish_reasons"] == ["length", "length"]
    assert g["client_time_to_first_token_ms"] > 0 and g["decode_tokens_per_s"] > 0


def test_a_request_over_the_cache_limit_fails_clearly_and_the_runners_keep_serving(decoder_graphs, tmp_path):
    from prism_onnx.runtime.cluster import LocalCluster

    b = bundle(decoder_graphs, tmp_path, "LlamaForCausalLM", devices=2, compression_ratio=2)
    inputs = text_batch(300, np.random.default_rng(7), (20,), left=True)
    # the tiny Llama's cache: 2 layers x 32 values per row (float32) and a bias: ~260 bytes per row, so a
    # 10-token prompt and 40 new tokens need ~13 kB, over a limit of 0.01 MiB (10.5 kB); 4 new tokens fit
    with LocalCluster(b, extra_args=["--max-cache-mb", "0.01"]) as cluster:
        with pytest.raises(InputError, match=r"key/value cache of .* beyond the runner's limit of 0\.0 MiB"):
            cluster.client.generate(input_ids=inputs["input_ids"], config=GenerationConfig(max_new_tokens=40))
        ids, _ = cluster.client.generate(input_ids=inputs["input_ids"], config=GenerationConfig(max_new_tokens=4))
        assert len(ids[0]) == 4
        assert cluster.client.status()["ready"]


def test_cli_launch_generates_with_json(decoder_graphs, tmp_path):
    import json

    from click.testing import CliRunner

    from prism_onnx.cli import main

    b = bundle(decoder_graphs, tmp_path, "GPT2LMHeadModel", devices=2, compression_ratio=4)
    r = CliRunner().invoke(main, ["launch", str(b), "--input-ids", "5,6,7,8,9,10,11", "--input-ids", "12,13,14",
                                  "--max-new-tokens", "5", "--temperature", "0.8", "--seed", "3", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert [len(row) for row in rep["generated_ids"]] == [5, 5] and rep["finish_reasons"] == ["length", "length"]
    assert rep["time_to_first_token_ms"] > 0 and len(rep["stats"]["bytes_sent"]) == 2
    ex = Executor(b)  # the same seed in process: the same tokens
    ids = np.array([[5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 0, 12, 13, 14]])
    gen, _ = ex.generate({"input_ids": ids, "attention_mask": (np.arange(7) >= np.array([[0], [4]])).astype(int)},
                         GenerationConfig(max_new_tokens=5, temperature=0.8, seed=3, stop_token_ids=(50256,)))
    assert gen.ids == rep["generated_ids"]


def test_an_export_that_cannot_generate_says_why(make_bundle):
    """An encoder has no language-model head: the one line says so, naming what it returns (issue 23: not
    the --exchange, which is no reason any more)."""
    from click.testing import CliRunner

    from prism_onnx.cli import main

    r = CliRunner().invoke(main, ["launch", str(make_bundle("BertModel", devices=2, compression_ratio=2)),
                                  "--input-ids", "5,6,7", "--max-new-tokens", "3"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "this export cannot generate: its model has no language-model head (it returns last_hidden_state, " \
           "pooler_output, not token logits)" in r.output, r.output


@pytest.mark.parametrize("lengths", [(13, 9)], ids=["left-padded"])
def test_generation_after_the_hidden_exchange(lms, exported_graphs, tmp_path, lengths):
    """GPT-2 exported with defaults exchanges hidden states (attention inputs): the tail decodes from a cache of
    attention-input rows that its graphs project to keys and values at every step (PRISM.md, "Generation").
    At CR=1 greedy decoding equals transformers' for P = 1, 2, 3; at CR=4 it picks the tokens of the same
    model exported with --exchange kv (the same attention: the projections are affine)."""
    from prism_onnx.exporters.bundle import write_bundles
    from prism_onnx.manifest import ExportSettings

    inputs = text_batch(300, np.random.default_rng(2), lengths, left=True)
    expected = hf_greedy(lms["GPT2LMHeadModel"], inputs, 16)
    hidden, kv = exported_graphs["GPT2LMHeadModel"], exported_graphs["GPT2LMHeadModel/kv"]
    for devices in (1, 2, 3):
        b = write_bundles(hidden, tmp_path / f"hidden-{devices}", ExportSettings(devices=devices, compression_ratio=1))
        gen, _ = Executor(b).generate(inputs, GenerationConfig(max_new_tokens=16))
        assert gen.ids == expected, devices
    settings = ExportSettings(devices=3, compression_ratio=4)
    a, _ = Executor(write_bundles(hidden, tmp_path / "hidden-cr4", settings)).generate(
        inputs, GenerationConfig(max_new_tokens=16))
    b, _ = Executor(write_bundles(kv, tmp_path / "kv-cr4", settings)).generate(
        inputs, GenerationConfig(max_new_tokens=16))
    assert a.ids == b.ids


def test_streamed_text_is_the_decoded_text_on_stdout_then_the_report(tmp_path):
    """Issue 23: `--stream` prints the text as the tokenizer decodes it (incremental detokenization: WordPiece
    '##' pieces join their word, spaces fall between words), on stdout, ending with a newline; the report
    follows. A tiny GPT-2 over MiniLM's WordPiece vocabulary: its random tokens are words and '##' pieces."""
    import shutil

    import transformers as tf
    from click.testing import CliRunner
    from tokenizers import Tokenizer

    from conftest import minilm_path
    from prism_onnx.cli import main
    from prism_onnx.exporters.bundle import ExportSettings, export

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=30522, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
                        eos_token_id=102)
    tf.GPT2LMHeadModel(cfg).eval().save_pretrained(tmp_path / "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / f, tmp_path / "model" / f)
    b = export(tmp_path / "model", tmp_path / "export", ExportSettings(devices=2, compression_ratio=2))
    r = CliRunner().invoke(main, ["launch", str(b), "--text", "the film is", "--max-new-tokens", "24", "--stream",
                                  "--insecure"])
    assert r.exit_code == 0, r.output
    streamed, summary = r.stdout.split("\n", 1)
    assert summary.startswith("  row 0: "), r.stdout
    ids = [int(t) for t in summary.split(": [", 1)[1].split("]", 1)[0].split(", ")]
    decoded = Tokenizer.from_file(str(tmp_path / "model" / "tokenizer.json")).decode(ids, skip_special_tokens=True)
    assert streamed == decoded and len(ids) > 1
    assert "##" not in streamed or "##" in decoded  # no piece printed on its own
