"""GPT-2 (pre-LN decoder, causal, hidden-state exchange): GPT2Model, GPT2LMHeadModel."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions

from ..errors import ModelLoadError
from ..manifest import ModelSpec
from .base import FeedForward, HiddenAttention, PreNormBlock, PrismModel, TupleHead, expect_shape, linear_from_conv1d

MODEL_TYPE = "gpt2"
ARCHITECTURES = ("GPT2Model", "GPT2LMHeadModel")  # the first is the default

# PRISM settings a user leaves unset (PrismSettings None), measured on the real SmolLM2-135M (WikiText-2 valid,
# N=512, docs/RESULTS.md section 13): a window of the 128 tokens before each span at full resolution cuts the
# perplexity loss at P=4 from 2.0x to 1.09x (the means alone do no better than dropping remote tokens); the
# log(count) bias only hurts (38.2 vs 39.4 at P=4, CR=16, no window; equal with a window); sinks stay.
DEFAULTS = {"window": 128, "count_bias": False, "keep_sinks": True}
# (measured on a Llama-family decoder: a causal LM attends mostly to recent tokens the same way)


class Embed(nn.Module):
    """Token + position (global ids) embeddings for a device's own token range."""

    def __init__(self, gpt2):
        super().__init__()
        self.wte, self.wpe = gpt2.wte, gpt2.wpe

    def forward(self, input_ids, position_ids):
        # input_ids, position_ids [B, n] int64
        return self.wte(input_ids) + self.wpe(position_ids)  # [B, n, D]


def block(layer, config, i: int) -> PreNormBlock:
    D = config.hidden_size
    I = config.n_inner if config.n_inner is not None else 4 * D
    attn, mlp = layer.attn, layer.mlp
    for name, mod, shape in [("attn.c_attn", attn.c_attn, (D, 3 * D)), ("attn.c_proj", attn.c_proj, (D, D)),
                             ("mlp.c_fc", mlp.c_fc, (D, I)), ("mlp.c_proj", mlp.c_proj, (I, D))]:
        expect_shape(f"h.{i}.{name}.weight", mod.weight, shape)  # Conv1D stores [in, out]
    dh = D // config.num_attention_heads
    scale = (1.0 / dh**0.5) if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= float(i + 1)
    # c_attn packs q|k|v column-wise; PRISM projects Q for own rows only, so split it
    attention = HiddenAttention(
        linear_from_conv1d(attn.c_attn, slice(0, D)), linear_from_conv1d(attn.c_attn, slice(D, 2 * D)),
        linear_from_conv1d(attn.c_attn, slice(2 * D, 3 * D)), attn.c_proj, config.num_attention_heads,
        causal=True, scale=scale)
    return PreNormBlock(layer.ln_1, attention, layer.ln_2, FeedForward(mlp.c_fc, mlp.act, mlp.c_proj))


def convert(model) -> PrismModel:
    config = model.config
    arch = type(model).__name__
    if config.add_cross_attention:
        raise ModelLoadError("gpt2: cross-attention (add_cross_attention=True) is not supported")
    gpt2 = model.base_model
    D = config.hidden_size
    expect_shape("wte.weight", gpt2.wte.weight, (config.vocab_size, D))
    expect_shape("wpe.weight", gpt2.wpe.weight, (config.n_positions, D))
    blocks = [block(layer, config, i) for i, layer in enumerate(gpt2.h)]

    if arch == "GPT2Model":
        output_class = BaseModelOutputWithPastAndCrossAttentions
        token_head, token_outputs = TupleHead(lambda m, h: m.ln_f(h), ln_f=gpt2.ln_f), ("last_hidden_state",)
    elif arch == "GPT2LMHeadModel":
        output_class = CausalLMOutputWithCrossAttentions
        expect_shape("lm_head.weight", model.lm_head.weight, (config.vocab_size, D))
        token_head = TupleHead(lambda m, h: m.lm_head(m.ln_f(h)), ln_f=gpt2.ln_f, lm_head=model.lm_head)
        token_outputs = ("logits",)
    else:
        raise ModelLoadError(f"gpt2: unsupported architecture {arch}; supported: {', '.join(ARCHITECTURES)}")

    spec = ModelSpec(
        model_type=MODEL_TYPE, architecture=arch, hidden_size=D, num_heads=config.num_attention_heads,
        num_layers=config.num_hidden_layers, max_positions=config.n_positions, causal=True, sinks=("first",),
        input_kind="text", embed_inputs=("input_ids",), token_outputs=token_outputs, pooled_outputs=(),
        vocab_size=config.vocab_size,
    )
    return PrismModel(spec, Embed(gpt2), blocks, token_head, None, output_class)


@torch.no_grad()
def example_inputs(spec: ModelSpec, batch: int, tokens: int) -> dict:
    return {"input_ids": torch.randint(0, spec.vocab_size, (batch, tokens))}
