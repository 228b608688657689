"""Tiny GGUF files written in code (the `gguf` package's GGUFWriter), for the GGUF import tests.

`write_tiny_llama(path)` writes what transformers' GGUF reader needs to build a LlamaForCausalLM and its
tokenizer, laid out as llama.cpp lays out SmolLM2's file: `llama.*` hyper-parameters, a byte-level BPE
vocabulary (`tokenizer.ggml.model = "gpt2"`: 3 special tokens, the 256 byte symbols, a few merges) with
bos/eos/unk/padding ids, `add_bos_token = false` and a chat template; tensors under llama.cpp's names
(`token_embd`, `blk.N.attn_q`, ...), matrices quantized (Q8_0 embeddings, Q4_1 projections) so that the
reader dequantizes them; tied embeddings (no `output.weight`). 2 layers, hidden 64, 4 heads of 16, 2 kv heads.
`write_metadata_only(path, architecture)` writes a file with hyper-parameters and no tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ c", "a p", "i t", "a l", "Ġc ap", "Ġcap it",
          "Ġcapit al", "Ġ o", "Ġo f", "Ġ F", "r a", "Ġ i", "Ġi s", "Ġ P", "Ġ .", "Ġ p", "Ġ s", "Ġ w", "o r",
          "Ġw or", "e l", "Ġ h", "Ġh el"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}")
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128


def byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte value, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary() -> list[str]:
    """Special tokens, byte symbols, then each merge's result (so every merge's parts come before it)."""
    return SPECIALS + byte_symbols() + ["".join(m.split(" ")) for m in MERGES]


def _writer(path: Path, architecture: str):
    import gguf

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name(f"tiny {architecture}")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    return w


def write_tiny_llama(path: str | Path, seed: int = 0) -> Path:
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens = vocabulary()
    w = _writer(path, "llama")
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    q41, q80 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0

    def matrix(name, rows, cols, qtype=q41, scale=0.2):
        data = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name, scale=1.0):
        w.add_tensor(name, (scale * (1 + 0.1 * rng.standard_normal(HIDDEN))).astype(np.float32))

    head_dim = HIDDEN // HEADS
    matrix("token_embd.weight", len(tokens), HIDDEN, q80, scale=0.5)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        matrix(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    norm("output_norm.weight", scale=0.2)  # logits of order 1
    _finish(w)
    return path


def write_metadata_only(path: str | Path, architecture: str) -> Path:
    path = Path(path)
    _finish(_writer(path, architecture))
    return path


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
