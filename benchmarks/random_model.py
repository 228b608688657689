"""A randomly initialised model folder of a published shape, for speed and traffic benchmarks.

Bytes on the wire, FLOPs and latency do not depend on the weights, so a BERT-base-shaped model with random
weights (seeded) stands in for bert-base-uncased, gpt2-medium or Llama-3.2-1B, which cannot be downloaded
here. A BERT folder carries MiniLM's tokenizer (the same 30,522-token uncased WordPiece vocabulary as
BERT-base); the decoders carry none (benchmarks send token ids).

    python benchmarks/random_model.py --shape bert-base --out out/bench/bert-base
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

SHAPES = {
    # transformers' BertConfig() defaults are BERT-base: 12 layers, hidden 768, 12 heads, FFN 3072, 512 positions
    "bert-base": ("BertForSequenceClassification", "BertConfig", {"num_labels": 2}),
    "bert-large": ("BertForSequenceClassification", "BertConfig", {
        "num_labels": 2, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
        "intermediate_size": 4096}),
    # GPT-2 medium: 24 layers, hidden 1024, 16 heads, 1024 positions, the GPT-2 vocabulary
    "gpt2-medium": ("GPT2LMHeadModel", "GPT2Config", {"n_embd": 1024, "n_layer": 24, "n_head": 16}),
    # Llama 3.2 1B (its published config.json): 16 layers, hidden 2048, 32 heads, 8 key/value heads, gated MLP
    # 8192, vocabulary 128256 with tied embeddings, rope theta 500000 with llama3 scaling
    "llama-3.2-1b": ("LlamaForCausalLM", "LlamaConfig", {
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}}),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@click.command()
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="bert-base", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
def main(shape, out, seed):
    import torch
    import transformers as tf

    from prism_onnx import models

    arch, config, overrides = SHAPES[shape]
    torch.manual_seed(seed)
    model = getattr(tf, arch)(getattr(tf, config)(**overrides)).eval()
    out = Path(out)
    model.save_pretrained(out)
    if config == "BertConfig":  # BERT-base's uncased WordPiece vocabulary is MiniLM's
        minilm = Path(models.resolve_source("sentence-transformers/all-MiniLM-L6-v2"))
        for f in TOKENIZER_FILES:
            shutil.copy(minilm / f, out / f)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"{shape} ({arch}, {n / 1e6:.1f}M parameters, random weights, seed {seed}) -> {out}")


if __name__ == "__main__":
    main()
