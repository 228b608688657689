"""BERT (post-LN encoder, hidden-state exchange): BertModel, BertForSequenceClassification."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions, SequenceClassifierOutput

from ..errors import ModelLoadError
from ..manifest import ModelSpec
from .base import FeedForward, HiddenAttention, PostNormBlock, PrismModel, TupleHead, expect_linears, expect_shape

MODEL_TYPE = "bert"
ARCHITECTURES = ("BertModel", "BertForSequenceClassification")  # the first is the default


class Embed(nn.Module):
    """word + token type + position (global ids) -> LayerNorm, for a device's own token range."""

    def __init__(self, emb):
        super().__init__()
        self.word, self.token_type, self.pos, self.ln = (
            emb.word_embeddings, emb.token_type_embeddings, emb.position_embeddings, emb.LayerNorm)

    def forward(self, input_ids, token_type_ids, position_ids):
        # input_ids, token_type_ids, position_ids [B, n] int64
        x = self.word(input_ids) + self.token_type(token_type_ids)  # [B, n, D]
        x = x + self.pos(position_ids)
        return self.ln(x)


def block(layer, config, i: int) -> PostNormBlock:
    """One BertLayer (also RobertaLayer: the same layout) as a post-LN PRISM block."""
    D, I = config.hidden_size, config.intermediate_size
    att = layer.attention
    expect_linears(f"encoder.layer.{i}", [
        ("attention.self.query", att.self.query, (D, D)), ("attention.self.key", att.self.key, (D, D)),
        ("attention.self.value", att.self.value, (D, D)), ("attention.output.dense", att.output.dense, (D, D)),
        ("intermediate.dense", layer.intermediate.dense, (I, D)), ("output.dense", layer.output.dense, (D, I))])
    attn = HiddenAttention(att.self.query, att.self.key, att.self.value, att.output.dense,
                           config.num_attention_heads, causal=False)
    mlp = FeedForward(layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense)
    return PostNormBlock(attn, att.output.LayerNorm, mlp, layer.output.LayerNorm)


def check_encoder_config(config, family: str):
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"{family}: only absolute position embeddings are supported, got "
                             f"{config.position_embedding_type}")
    if getattr(config, "is_decoder", False):
        raise ModelLoadError(f"{family}: decoder (is_decoder=True) models are not supported")


def convert(model) -> PrismModel:
    config = model.config
    arch = type(model).__name__
    check_encoder_config(config, MODEL_TYPE)
    bert = model.base_model
    D = config.hidden_size
    expect_shape("embeddings.word_embeddings.weight", bert.embeddings.word_embeddings.weight, (config.vocab_size, D))
    expect_shape("embeddings.position_embeddings.weight", bert.embeddings.position_embeddings.weight,
                 (config.max_position_embeddings, D))
    blocks = [block(layer, config, i) for i, layer in enumerate(bert.encoder.layer)]

    token_head, token_outputs = None, ()
    pooled_head, pooled_outputs = None, ()
    if arch == "BertModel":
        output_class = BaseModelOutputWithPoolingAndCrossAttentions
        token_head, token_outputs = TupleHead(lambda m, h: h), ("last_hidden_state",)
        if bert.pooler is not None:
            expect_shape("pooler.dense.weight", bert.pooler.dense.weight, (D, D))
            pooled_head = TupleHead(lambda m, h0: m.pooler(h0[:, None, :]), pooler=bert.pooler)
            pooled_outputs = ("pooler_output",)
    elif arch == "BertForSequenceClassification":
        output_class = SequenceClassifierOutput
        if bert.pooler is None:
            raise ModelLoadError("bert: BertForSequenceClassification without a pooler is not supported")
        expect_shape("classifier.weight", model.classifier.weight, (config.num_labels, D))
        pooled_head = TupleHead(lambda m, h0: m.classifier(m.pooler(h0[:, None, :])),
                                pooler=bert.pooler, classifier=model.classifier)
        pooled_outputs = ("logits",)
    else:
        raise ModelLoadError(f"bert: unsupported architecture {arch}; supported: {', '.join(ARCHITECTURES)}")

    spec = ModelSpec(
        model_type=MODEL_TYPE, architecture=arch, hidden_size=D, num_heads=config.num_attention_heads,
        num_layers=config.num_hidden_layers, max_positions=config.max_position_embeddings, causal=False,
        sinks=("first", "last"),  # [CLS] and the closing [SEP]
        input_kind="text", embed_inputs=("input_ids", "token_type_ids"),
        token_outputs=token_outputs, pooled_outputs=pooled_outputs, vocab_size=config.vocab_size,
    )
    return PrismModel(spec, Embed(bert.embeddings), blocks, token_head, pooled_head, output_class)


@torch.no_grad()
def example_inputs(spec: ModelSpec, batch: int, tokens: int) -> dict:
    """Random token-level inputs for tracing the embed graph."""
    return {
        "input_ids": torch.randint(0, spec.vocab_size, (batch, tokens)),
        "token_type_ids": torch.zeros(batch, tokens, dtype=torch.long),
    }
