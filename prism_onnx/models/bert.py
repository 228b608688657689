"""BERT (post-LN encoder): BertModel, BertForSequenceClassification."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions, SequenceClassifierOutput

from ..errors import ModelLoadError
from ..prism import Block
from .base import ModelSpec, PrismModel, TupleHead, expect_shape

MODEL_TYPE = "bert"
ARCHITECTURES = ("BertModel", "BertForSequenceClassification")  # the first is the default


class Embed(nn.Module):
    """word + token type + position (global ids) -> LayerNorm, for a device's own token range."""

    def __init__(self, emb):
        super().__init__()
        self.word, self.token_type, self.pos, self.ln = (
            emb.word_embeddings, emb.token_type_embeddings, emb.position_embeddings, emb.LayerNorm)

    def forward(self, input_ids, token_type_ids, position_ids):
        # input_ids, token_type_ids [B, n] int64; position_ids [n] int64
        x = self.word(input_ids) + self.token_type(token_type_ids)  # [B, n, D]
        x = x + self.pos(position_ids)[None, :, :]
        return self.ln(x)


def _block(layer, config, i: int) -> Block:
    D, I = config.hidden_size, config.intermediate_size
    att = layer.attention
    for name, mod, shape in [
        ("query", att.self.query, (D, D)), ("key", att.self.key, (D, D)), ("value", att.self.value, (D, D)),
        ("attention.output.dense", att.output.dense, (D, D)),
        ("intermediate.dense", layer.intermediate.dense, (I, D)), ("output.dense", layer.output.dense, (D, I)),
    ]:
        expect_shape(f"encoder.layer.{i}.{name}.weight", mod.weight, shape)
    return Block(
        norm="post",
        ln_attn=att.output.LayerNorm,  # post-LN: applied after the attention residual
        ln_mlp=layer.output.LayerNorm,
        q=att.self.query, k=att.self.key, v=att.self.value, o=att.output.dense,
        fc_in=layer.intermediate.dense, fc_out=layer.output.dense, act=layer.intermediate.intermediate_act_fn,
        num_heads=config.num_attention_heads, causal=False,
    )


def convert(model) -> PrismModel:
    config = model.config
    arch = type(model).__name__
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"bert: only absolute position embeddings are supported, got {config.position_embedding_type}")
    if config.is_decoder:
        raise ModelLoadError("bert: decoder (is_decoder=True) BERT models are not supported")
    bert = model.base_model
    D = config.hidden_size
    expect_shape("embeddings.word_embeddings.weight", bert.embeddings.word_embeddings.weight, (config.vocab_size, D))
    expect_shape("embeddings.position_embeddings.weight", bert.embeddings.position_embeddings.weight,
                 (config.max_position_embeddings, D))
    blocks = [_block(layer, config, i) for i, layer in enumerate(bert.encoder.layer)]

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
