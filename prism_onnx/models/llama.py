"""Llama (pre-norm decoder with RMSNorm, rotary positions, grouped-query attention, gated MLP; causal;
key/value exchange): LlamaModel, LlamaForCausalLM.

Rotary positions are not affine in the attention input, so devices exchange the Segment Means of their
rotated keys and values (PRISM.md, "Rotary models"): a row carries 2 * kv_heads * head_dim values and the
receiver projects nothing for it. Rotary frequencies come from the model's own rotary module, so
`rope_scaling` of type "llama3" is honoured; other rope types are refused.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..errors import ModelLoadError
from ..manifest import ModelSpec
from ..prism import prism_attention, split_kv_rows
from .base import PrismModel, TupleHead, expect_linears, expect_shape, heads

MODEL_TYPE = "llama"
ARCHITECTURES = ("LlamaModel", "LlamaForCausalLM")  # the first is the default

# PRISM settings a user leaves unset (PrismSettings None), measured on the real SmolLM2-135M (WikiText-2 valid,
# N=512, docs/RESULTS.md section 13): a window of the 128 tokens before each span at full resolution cuts the
# perplexity loss at P=4 from 2.0x to 1.09x (the means alone do no better than dropping remote tokens); the
# log(count) bias only hurts (38.2 vs 39.4 at P=4, CR=16, no window; equal with a window); sinks stay.
DEFAULTS = {"window": 128, "count_bias": False, "keep_sinks": True}
ROPE_TYPES = ("default", "llama3")


class Embed(nn.Module):
    """Token embeddings (positions enter through the rotary keys and queries)."""

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids, position_ids):
        # input_ids [B, n] int64; position_ids [B, n] (used by the blocks, not here)
        return self.embed_tokens(input_ids)  # [B, n, D]


class Rotary(nn.Module):
    """cos, sin [B, 1, n, dh] for positions [B, n], from the model's inverse frequencies and scaling."""

    def __init__(self, rotary_emb):
        super().__init__()
        self.register_buffer("inv_freq", rotary_emb.inv_freq.detach().clone().float(), persistent=False)
        self.scaling = float(rotary_emb.attention_scaling)

    def forward(self, position_ids):
        freqs = position_ids.float()[:, :, None] * self.inv_freq[None, None, :]  # [B, n, dh/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, n, dh]: the same for every head
        return emb.cos() * self.scaling, emb.sin() * self.scaling


def rotate(x, cos, sin):
    """Rotary embedding of x [B, heads, n, dh] at the positions of cos, sin [B, 1, n, dh]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention over [own rotated k, v; received k, v rows]."""

    def __init__(self, attn, num_heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.num_heads, self.kv_heads, self.head_dim = num_heads, kv_heads, head_dim
        self.scale = head_dim ** -0.5

    def keys_values(self, z, cos, sin):
        k = rotate(heads(self.k(z), self.kv_heads, self.head_dim), cos, sin)  # [B, Hkv, n, dh]
        return k, heads(self.v(z), self.kv_heads, self.head_dim)

    def forward(self, z, k, v, remote, local_bias, remote_bias, cos, sin):
        q = rotate(heads(self.q(z), self.num_heads, self.head_dim), cos, sin)  # [B, H, n, dh]
        k_rem, v_rem = split_kv_rows(remote, self.kv_heads, self.head_dim)  # [B, Hkv, R, dh]
        out = prism_attention(q, torch.cat([k, k_rem], dim=2), torch.cat([v, v_rem], dim=2), local_bias,
                              remote_bias, causal=True, scale=self.scale)  # [B, n, H*dh]
        return self.o(out)


class GatedMLP(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.gate, self.up, self.down, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """h + attn(norm(h)), then + mlp(norm(h)); keys_values gives what this layer's neighbours receive."""

    def __init__(self, layer, rotary: Rotary, num_heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.norm_attn, self.norm_mlp = layer.input_layernorm, layer.post_attention_layernorm
        self.attn = Attention(layer.self_attn, num_heads, kv_heads, head_dim)
        self.mlp = GatedMLP(layer.mlp)
        self.rotary = rotary

    def keys_values(self, h, position_ids):
        return self.attn.keys_values(self.norm_attn(h), *self.rotary(position_ids))

    def forward_kv(self, h, k, v, remote, local_bias, remote_bias, position_ids):
        cos, sin = self.rotary(position_ids)
        h = h + self.attn(self.norm_attn(h), k, v, remote, local_bias, remote_bias, cos, sin)  # [B, n, D]
        return h + self.mlp(self.norm_mlp(h))


def check_config(config, family: str):
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{family}: rope_scaling of type '{rope_type}' is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)})")


def convert_decoder(model, *, family: str, architectures: tuple[str, ...]) -> PrismModel:
    """A Llama-layout decoder (Llama, Qwen2) as PRISM parts."""
    config = model.config
    arch = type(model).__name__
    check_config(config, family)
    base = model.base_model
    D, H, Hkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    dh = getattr(config, "head_dim", None) or D // H
    I = config.intermediate_size
    expect_shape("embed_tokens.weight", base.embed_tokens.weight, (config.vocab_size, D))
    rotary = Rotary(base.rotary_emb)
    blocks = []
    for i, layer in enumerate(base.layers):
        a, m = layer.self_attn, layer.mlp
        expect_linears(f"layers.{i}", [
            ("self_attn.q_proj", a.q_proj, (H * dh, D)), ("self_attn.k_proj", a.k_proj, (Hkv * dh, D)),
            ("self_attn.v_proj", a.v_proj, (Hkv * dh, D)), ("self_attn.o_proj", a.o_proj, (D, H * dh)),
            ("mlp.gate_proj", m.gate_proj, (I, D)), ("mlp.up_proj", m.up_proj, (I, D)),
            ("mlp.down_proj", m.down_proj, (D, I))])
        blocks.append(Block(layer, rotary, H, Hkv, dh))

    if arch == architectures[0]:  # the bare model: final norm
        output_class = BaseModelOutputWithPast
        token_head, token_outputs = TupleHead(lambda m, h: m.norm(h), norm=base.norm), ("last_hidden_state",)
    elif arch == architectures[1]:  # causal LM: final norm, LM head (tied or not, as loaded)
        output_class = CausalLMOutputWithPast
        expect_shape("lm_head.weight", model.lm_head.weight, (config.vocab_size, D))
        token_head = TupleHead(lambda m, h: m.lm_head(m.norm(h)), norm=base.norm, lm_head=model.lm_head)
        token_outputs = ("logits",)
    else:
        raise ModelLoadError(f"{family}: unsupported architecture {arch}; supported: {', '.join(architectures)}")

    spec = ModelSpec(
        model_type=family, architecture=arch, hidden_size=D, num_heads=H, num_layers=config.num_hidden_layers,
        max_positions=config.max_position_embeddings, causal=True, sinks=("first",), input_kind="text",
        embed_inputs=("input_ids",), token_outputs=token_outputs, pooled_outputs=(), exchange="kv",
        kv_heads=Hkv, head_dim=dh, vocab_size=config.vocab_size,
    )
    return PrismModel(spec, Embed(base.embed_tokens), blocks, token_head, None, output_class)


def convert(model) -> PrismModel:
    return convert_decoder(model, family=MODEL_TYPE, architectures=ARCHITECTURES)


@torch.no_grad()
def example_inputs(spec: ModelSpec, batch: int, tokens: int) -> dict:
    return {"input_ids": torch.randint(0, spec.vocab_size, (batch, tokens))}
