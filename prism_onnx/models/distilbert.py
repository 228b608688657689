"""DistilBERT (post-LN encoder, hidden-state exchange): DistilBertModel, DistilBertForSequenceClassification."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput

from ..errors import ModelLoadError
from ..manifest import ModelSpec
from .base import FeedForward, HiddenAttention, PostNormBlock, PrismModel, TupleHead, expect_linears, expect_shape

MODEL_TYPE = "distilbert"
ARCHITECTURES = ("DistilBertModel", "DistilBertForSequenceClassification")  # the first is the default


class Embed(nn.Module):
    """word + position (global ids) -> LayerNorm; DistilBERT has no token types."""

    def __init__(self, emb):
        super().__init__()
        self.word, self.pos, self.ln = emb.word_embeddings, emb.position_embeddings, emb.LayerNorm

    def forward(self, input_ids, position_ids):
        # input_ids, position_ids [B, n] int64
        return self.ln(self.word(input_ids) + self.pos(position_ids))  # [B, n, D]


def block(layer, config, i: int) -> PostNormBlock:
    D, I = config.dim, config.hidden_dim
    sa, ffn = layer.attention, layer.ffn
    expect_linears(f"transformer.layer.{i}", [
        ("attention.q_lin", sa.q_lin, (D, D)), ("attention.k_lin", sa.k_lin, (D, D)),
        ("attention.v_lin", sa.v_lin, (D, D)), ("attention.out_lin", sa.out_lin, (D, D)),
        ("ffn.lin1", ffn.lin1, (I, D)), ("ffn.lin2", ffn.lin2, (D, I))])
    attn = HiddenAttention(sa.q_lin, sa.k_lin, sa.v_lin, sa.out_lin, config.n_heads, causal=False)
    return PostNormBlock(attn, layer.sa_layer_norm, FeedForward(ffn.lin1, ffn.activation, ffn.lin2),
                         layer.output_layer_norm)


def convert(model) -> PrismModel:
    config = model.config
    arch = type(model).__name__
    distil = model.base_model
    D = config.dim
    expect_shape("embeddings.word_embeddings.weight", distil.embeddings.word_embeddings.weight, (config.vocab_size, D))
    expect_shape("embeddings.position_embeddings.weight", distil.embeddings.position_embeddings.weight,
                 (config.max_position_embeddings, D))
    blocks = [block(layer, config, i) for i, layer in enumerate(distil.transformer.layer)]

    token_head, token_outputs, pooled_head, pooled_outputs = None, (), None, ()
    if arch == "DistilBertModel":
        output_class = BaseModelOutput
        token_head, token_outputs = TupleHead(lambda m, h: h), ("last_hidden_state",)
    elif arch == "DistilBertForSequenceClassification":
        output_class = SequenceClassifierOutput
        expect_shape("pre_classifier.weight", model.pre_classifier.weight, (D, D))
        expect_shape("classifier.weight", model.classifier.weight, (config.num_labels, D))
        pooled_head = TupleHead(lambda m, h0: m.classifier(torch.relu(m.pre_classifier(h0))),
                                pre_classifier=model.pre_classifier, classifier=model.classifier)
        pooled_outputs = ("logits",)
    else:
        raise ModelLoadError(f"distilbert: unsupported architecture {arch}; supported: {', '.join(ARCHITECTURES)}")

    spec = ModelSpec(
        model_type=MODEL_TYPE, architecture=arch, hidden_size=D, num_heads=config.n_heads,
        num_layers=config.n_layers, max_positions=config.max_position_embeddings, causal=False,
        sinks=("first", "last"),  # [CLS] and the closing [SEP]
        input_kind="text", embed_inputs=("input_ids",), token_outputs=token_outputs, pooled_outputs=pooled_outputs,
        vocab_size=config.vocab_size,
    )
    return PrismModel(spec, Embed(distil.embeddings), blocks, token_head, pooled_head, output_class)


@torch.no_grad()
def example_inputs(spec: ModelSpec, batch: int, tokens: int) -> dict:
    return {"input_ids": torch.randint(0, spec.vocab_size, (batch, tokens))}
