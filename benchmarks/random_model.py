"""A randomly initialised model folder of a published shape, for speed and traffic benchmarks.

Bytes on the wire, FLOPs and latency do not depend on the weights, so a BERT-base-shaped model with random
weights (seeded) stands in for bert-base-uncased, which cannot be downloaded here. The folder carries
MiniLM's tokenizer (the same 30,522-token uncased WordPiece vocabulary as BERT-base).

    python benchmarks/random_model.py --shape bert-base --out out/bench/bert-base
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

SHAPES = {
    # transformers' BertConfig() defaults are BERT-base: 12 layers, hidden 768, 12 heads, FFN 3072, 512 positions
    "bert-base": ("BertForSequenceClassification", {"num_labels": 2}),
    "bert-large": ("BertForSequenceClassification", {"num_labels": 2, "hidden_size": 1024, "num_hidden_layers": 24,
                                                      "num_attention_heads": 16, "intermediate_size": 4096}),
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

    arch, overrides = SHAPES[shape]
    torch.manual_seed(seed)
    model = getattr(tf, arch)(tf.BertConfig(**overrides)).eval()
    out = Path(out)
    model.save_pretrained(out)
    minilm = Path(models.resolve_source("sentence-transformers/all-MiniLM-L6-v2"))
    for f in TOKENIZER_FILES:
        shutil.copy(minilm / f, out / f)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"{shape} ({arch}, {n / 1e6:.1f}M parameters, random weights, seed {seed}) -> {out}")


if __name__ == "__main__":
    main()
