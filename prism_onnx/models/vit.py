"""ViT (pre-LN encoder over image patches + class token, hidden-state exchange): ViTModel,
ViTForImageClassification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from ..errors import ModelLoadError
from ..manifest import ModelSpec
from .base import FeedForward, HiddenAttention, PreNormBlock, PrismModel, TupleHead, expect_linears, expect_shape

MODEL_TYPE = "vit"
ARCHITECTURES = ("ViTModel", "ViTForImageClassification")  # the first is the default


class Embed(nn.Module):
    """Patch rows -> patch projection (the Conv2d as a matmul), class token at position 0, + positions."""

    def __init__(self, emb):
        super().__init__()
        self.proj = emb.patch_embeddings.projection  # Conv2d(C, D, ps, stride=ps)
        self.cls = emb.cls_token  # [1, 1, D]
        self.pos = emb.position_embeddings  # [1, 1 + patches, D]

    def forward(self, patches, position_ids):
        # patches [B, n, C*ps*ps] float32 (row of position 0 is a placeholder); position_ids [B, n] int64
        x = F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # [B, n, D]
        x = torch.where((position_ids == 0)[:, :, None], self.cls, x)  # class token
        return x + self.pos[0][position_ids]  # [B, n, D]


def block(layer, config, i: int) -> PreNormBlock:
    D, I = config.hidden_size, config.intermediate_size
    sa, out = layer.attention.attention, layer.attention.output
    expect_linears(f"encoder.layer.{i}", [
        ("attention.attention.query", sa.query, (D, D)), ("attention.attention.key", sa.key, (D, D)),
        ("attention.attention.value", sa.value, (D, D)), ("attention.output.dense", out.dense, (D, D)),
        ("intermediate.dense", layer.intermediate.dense, (I, D)), ("output.dense", layer.output.dense, (D, I))])
    attn = HiddenAttention(sa.query, sa.key, sa.value, out.dense, config.num_attention_heads, causal=False)
    mlp = FeedForward(layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense)
    return PreNormBlock(layer.layernorm_before, attn, layer.layernorm_after, mlp)


def convert(model) -> PrismModel:
    config = model.config
    arch = type(model).__name__
    vit = model.base_model
    D = config.hidden_size
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    ps = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    if not isinstance(config.image_size, int) and len(set(config.image_size)) != 1:
        raise ModelLoadError(f"vit: only square images are supported, got image_size {config.image_size}")
    n_tokens = 1 + (size // ps) ** 2
    expect_shape("embeddings.patch_embeddings.projection.weight", vit.embeddings.patch_embeddings.projection.weight,
                 (D, config.num_channels, ps, ps))
    expect_shape("embeddings.cls_token", vit.embeddings.cls_token, (1, 1, D))
    expect_shape("embeddings.position_embeddings", vit.embeddings.position_embeddings, (1, n_tokens, D))
    blocks = [block(layer, config, i) for i, layer in enumerate(vit.encoder.layer)]

    final_ln = vit.layernorm
    token_head, token_outputs, pooled_head, pooled_outputs = None, (), None, ()
    if arch == "ViTModel":
        output_class = BaseModelOutputWithPooling
        token_head, token_outputs = TupleHead(lambda m, h: m.ln(h), ln=final_ln), ("last_hidden_state",)
        if vit.pooler is not None:
            pooled_head = TupleHead(lambda m, h0: m.pooler(m.ln(h0)[:, None, :]), ln=final_ln, pooler=vit.pooler)
            pooled_outputs = ("pooler_output",)
    elif arch == "ViTForImageClassification":
        output_class = ImageClassifierOutput
        pooled_head = TupleHead(lambda m, h0: m.classifier(m.ln(h0)), ln=final_ln, classifier=model.classifier)
        pooled_outputs = ("logits",)
    else:
        raise ModelLoadError(f"vit: unsupported architecture {arch}; supported: {', '.join(ARCHITECTURES)}")

    spec = ModelSpec(
        model_type=MODEL_TYPE, architecture=arch, hidden_size=D, num_heads=config.num_attention_heads,
        num_layers=config.num_hidden_layers, max_positions=n_tokens, causal=False, sinks=("first",),
        input_kind="image", embed_inputs=("patches",), token_outputs=token_outputs, pooled_outputs=pooled_outputs,
        image_size=size, patch_size=ps, num_channels=config.num_channels,
    )
    return PrismModel(spec, Embed(vit.embeddings), blocks, token_head, pooled_head, output_class)


@torch.no_grad()
def example_inputs(spec: ModelSpec, batch: int, tokens: int) -> dict:
    return {"patches": torch.randn(batch, tokens, spec.num_channels * spec.patch_size**2)}
