"""RoBERTa (post-LN encoder, hidden-state exchange): RobertaModel, RobertaForSequenceClassification.

The layers are BERT's (bert.block). What differs is the embedding: positions start at padding_idx + 1,
and a padding token gets position padding_idx, as transformers' create_position_ids_from_input_ids does
for right-padded inputs (a token equal to the pad id inside the text would shift later positions there,
not here).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions, SequenceClassifierOutput

from ..errors import ModelLoadError
from ..manifest import ModelSpec
from . import bert
from .base import PrismModel, TupleHead, expect_shape

MODEL_TYPE = "roberta"
ARCHITECTURES = ("RobertaModel", "RobertaForSequenceClassification")  # the first is the default


class Embed(nn.Module):
    """word + token type + position (global index + padding_idx + 1; padding_idx on pad tokens) -> LayerNorm."""

    def __init__(self, emb):
        super().__init__()
        self.word, self.token_type, self.pos, self.ln = (
            emb.word_embeddings, emb.token_type_embeddings, emb.position_embeddings, emb.LayerNorm)
        self.padding_idx = int(emb.padding_idx)

    def forward(self, input_ids, token_type_ids, position_ids):
        # input_ids, token_type_ids, position_ids [B, n] int64 (positions from 0)
        pad = self.padding_idx
        pos = torch.where(input_ids != pad, position_ids + (pad + 1), torch.full_like(input_ids, pad))
        x = self.word(input_ids) + self.token_type(token_type_ids)  # [B, n, D]
        return self.ln(x + self.pos(pos))


def convert(model) -> PrismModel:
    config = model.config
    arch = type(model).__name__
    bert.check_encoder_config(config, MODEL_TYPE)
    roberta = model.base_model
    D = config.hidden_size
    expect_shape("embeddings.word_embeddings.weight", roberta.embeddings.word_embeddings.weight,
                 (config.vocab_size, D))
    expect_shape("embeddings.position_embeddings.weight", roberta.embeddings.position_embeddings.weight,
                 (config.max_position_embeddings, D))
    blocks = [bert.block(layer, config, i) for i, layer in enumerate(roberta.encoder.layer)]

    token_head, token_outputs, pooled_head, pooled_outputs = None, (), None, ()
    if arch == "RobertaModel":
        output_class = BaseModelOutputWithPoolingAndCrossAttentions
        token_head, token_outputs = TupleHead(lambda m, h: h), ("last_hidden_state",)
        if roberta.pooler is not None:
            pooled_head = TupleHead(lambda m, h0: m.pooler(h0[:, None, :]), pooler=roberta.pooler)
            pooled_outputs = ("pooler_output",)
    elif arch == "RobertaForSequenceClassification":
        output_class = SequenceClassifierOutput
        head = model.classifier  # dense -> tanh -> out_proj on the <s> token
        expect_shape("classifier.dense.weight", head.dense.weight, (D, D))
        expect_shape("classifier.out_proj.weight", head.out_proj.weight, (config.num_labels, D))
        pooled_head = TupleHead(lambda m, h0: m.out_proj(torch.tanh(m.dense(h0))), dense=head.dense,
                                out_proj=head.out_proj)
        pooled_outputs = ("logits",)
    else:
        raise ModelLoadError(f"roberta: unsupported architecture {arch}; supported: {', '.join(ARCHITECTURES)}")

    spec = ModelSpec(
        model_type=MODEL_TYPE, architecture=arch, hidden_size=D, num_heads=config.num_attention_heads,
        num_layers=config.num_hidden_layers, max_positions=config.max_position_embeddings - config.pad_token_id - 1,
        causal=False, sinks=("first", "last"),  # <s> and the closing </s>
        input_kind="text", embed_inputs=("input_ids", "token_type_ids"),
        token_outputs=token_outputs, pooled_outputs=pooled_outputs, vocab_size=config.vocab_size,
    )
    return PrismModel(spec, Embed(roberta.embeddings), blocks, token_head, pooled_head, output_class)


example_inputs = bert.example_inputs
