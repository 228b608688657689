"""What every model family builds: a `PrismModel` (embed, blocks, heads) whose step modules are the graphs
of the device program (`prism_onnx.program.build_program`), plus building blocks families may share.

A family's blocks implement one or both of two interfaces, one per exchange kind (ModelSpec.exchange):
    hidden   block.attn_input(h) -> z [B, n, D]                  (what devices average and send)
             block(h, remote [B, R, D], local_bias, remote_bias) -> h
    kv       block.keys_values(h, position_ids) -> k, v [B, Hkv, n, dh]   (rotated; what devices average)
             block.forward_kv(h, k, v, rows [B, R, 2*Hkv*dh], local_bias, remote_bias, position_ids) -> h
The kv interface also decodes: a key/value cache is passed as received rows (PRISM.md, "Generation").
The step modules below turn those into the graph signatures the program declares.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..errors import ModelLoadError
from ..manifest import ModelSpec
from ..prism import RemoteCalibration, kv_rows, prism_attention, segment_means, split_kv_rows


def heads(x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """[B, n, n_heads*head_dim] -> [B, n_heads, n, head_dim]."""
    B, n, _ = x.shape
    return x.view(B, n, n_heads, head_dim).transpose(1, 2)


class HiddenAttention(nn.Module):
    """Multi-head attention for families that exchange hidden states: K and V are projected for the n own
    rows and the R received means (not for N tokens): PRISM's compute saving. The projections are affine,
    so K of a mean row is exactly the mean of the remote tokens' keys."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, o: nn.Module, num_heads: int, causal: bool,
                 scale: float | None = None):
        super().__init__()
        self.q, self.k, self.v, self.o = q, k, v, o
        self.num_heads, self.causal = num_heads, causal
        self.head_dim = o.weight.shape[0] // num_heads
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.head_dim)

    def forward(self, z, remote, local_bias, remote_bias):
        kv_in = torch.cat([z, remote], dim=1)  # [B, n+R, D]
        q = heads(self.q(z), self.num_heads, self.head_dim)  # [B, H, n, dh]
        k = heads(self.k(kv_in), self.num_heads, self.head_dim)  # [B, H, n+R, dh]
        v = heads(self.v(kv_in), self.num_heads, self.head_dim)
        return self.o(prism_attention(q, k, v, local_bias, remote_bias, causal=self.causal, scale=self.scale))

    def keys_values(self, z):
        """kv exchange: own keys and values [B, H, n, dh] (means of them equal the projections of means)."""
        return heads(self.k(z), self.num_heads, self.head_dim), heads(self.v(z), self.num_heads, self.head_dim)

    def attend(self, z, k, v, rows, local_bias, remote_bias):
        """kv exchange: attention over [own k, v; received key/value rows [B, R, 2*H*dh]]."""
        q = heads(self.q(z), self.num_heads, self.head_dim)
        k_rem, v_rem = split_kv_rows(rows, self.num_heads, self.head_dim)
        out = prism_attention(q, torch.cat([k, k_rem], dim=2), torch.cat([v, v_rem], dim=2), local_bias, remote_bias,
                              causal=self.causal, scale=self.scale)
        return self.o(out)


class FeedForward(nn.Module):
    """fc_out(act(fc_in(x))): the MLP of BERT-like, ViT and GPT-2 blocks."""

    def __init__(self, fc_in: nn.Module, act: nn.Module, fc_out: nn.Module):
        super().__init__()
        self.fc_in, self.act, self.fc_out = fc_in, act, fc_out

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class PreNormBlock(nn.Module):
    """h + attn(ln_attn(h)), then + mlp(ln_mlp(h)) (ViT, GPT-2). The attention input is ln_attn(h)."""

    def __init__(self, ln_attn: nn.Module, attn: nn.Module, ln_mlp: nn.Module, mlp: nn.Module):
        super().__init__()
        self.ln_attn, self.attn, self.ln_mlp, self.mlp = ln_attn, attn, ln_mlp, mlp

    def attn_input(self, h):
        return self.ln_attn(h)

    def forward(self, h, remote, local_bias, remote_bias):
        h = h + self.attn(self.ln_attn(h), remote, local_bias, remote_bias)  # [B, n, D]
        return h + self.mlp(self.ln_mlp(h))

    def keys_values(self, h, position_ids):  # positions enter through the embeddings
        return self.attn.keys_values(self.ln_attn(h))

    def forward_kv(self, h, k, v, rows, local_bias, remote_bias, position_ids):
        h = h + self.attn.attend(self.ln_attn(h), k, v, rows, local_bias, remote_bias)  # [B, n, D]
        return h + self.mlp(self.ln_mlp(h))


class PostNormBlock(nn.Module):
    """ln_attn(h + attn(h)), then ln_mlp(h + mlp(h)) (BERT, RoBERTa, DistilBERT). The attention input is h."""

    def __init__(self, attn: nn.Module, ln_attn: nn.Module, mlp: nn.Module, ln_mlp: nn.Module):
        super().__init__()
        self.attn, self.ln_attn, self.mlp, self.ln_mlp = attn, ln_attn, mlp, ln_mlp

    def attn_input(self, h):
        return h

    def forward(self, h, remote, local_bias, remote_bias):
        h = self.ln_attn(h + self.attn(h, remote, local_bias, remote_bias))  # [B, n, D]
        return self.ln_mlp(h + self.mlp(h))

    def keys_values(self, h, position_ids):
        return self.attn.keys_values(h)

    def forward_kv(self, h, k, v, rows, local_bias, remote_bias, position_ids):
        h = self.ln_attn(h + self.attn.attend(h, k, v, rows, local_bias, remote_bias))  # [B, n, D]
        return self.ln_mlp(h + self.mlp(h))


# ------------------------------------------------------------------------------------------ step modules
class HiddenEmbedStep(nn.Module):
    """Graph 'embed' (hidden exchange): own tokens -> hidden [B, n, D], means of layer 0's attention input."""

    def __init__(self, embed: nn.Module, first_block: nn.Module):
        super().__init__()
        self.embed, self.first_block = embed, first_block

    def forward(self, *args):  # (*embed_inputs, position_ids, averager)
        *inputs, averager = args
        h = self.embed(*inputs)  # [B, n, D]
        return h, segment_means(averager, self.first_block.attn_input(h))  # [B, S, D]


class HiddenLayerStep(nn.Module):
    """Graph 'layer_i' (hidden exchange): block i over [own; remote], then the means layer i+1 needs.
    `calibration`: this layer's RemoteCalibration, applied to the received rows first (None: none)."""

    def __init__(self, block: nn.Module, next_block: nn.Module | None, calibration: nn.Module | None = None):
        super().__init__()
        self.block, self.next_block, self.calibration = block, next_block, calibration

    def forward(self, hidden, remote, local_bias, remote_bias, averager=None):
        if self.calibration is not None:
            remote, remote_bias = self.calibration(remote, remote_bias)  # [B, R, D], [B, H, R]
        h = self.block(hidden, remote, local_bias, remote_bias)  # [B, n, D]
        if self.next_block is None:
            return (h,)
        return h, segment_means(averager, self.next_block.attn_input(h))  # [B, S, D]


class KVEmbedStep(nn.Module):
    """Graph 'embed' (kv exchange): own tokens -> hidden, layer 0's rotated k, v, and the means of [k | v]."""

    def __init__(self, embed: nn.Module, first_block: nn.Module):
        super().__init__()
        self.embed, self.first_block = embed, first_block

    def forward(self, *args):  # (*embed_inputs, position_ids, averager)
        *inputs, position_ids, averager = args
        h = self.embed(*inputs, position_ids)  # [B, n, D]
        k, v = self.first_block.keys_values(h, position_ids)  # [B, Hkv, n, dh] each
        return h, k, v, segment_means(averager, kv_rows(k, v))  # means [B, S, 2*Hkv*dh]


class KVLayerStep(nn.Module):
    """Graph 'layer_i' (kv exchange): block i over [own k, v; received rows], then layer i+1's own k, v and
    the means of [k | v]. `calibration` as for HiddenLayerStep."""

    def __init__(self, block: nn.Module, next_block: nn.Module | None, calibration: nn.Module | None = None):
        super().__init__()
        self.block, self.next_block, self.calibration = block, next_block, calibration

    def forward(self, hidden, k, v, remote, local_bias, remote_bias, position_ids, averager=None):
        if self.calibration is not None:
            remote, remote_bias = self.calibration(remote, remote_bias)  # [B, R, 2*Hkv*dh], [B, H, R]
        h = self.block.forward_kv(hidden, k, v, remote, local_bias, remote_bias, position_ids)  # [B, n, D]
        if self.next_block is None:
            return (h,)
        k, v = self.next_block.keys_values(h, position_ids)
        return h, k, v, segment_means(averager, kv_rows(k, v))


class PrismModel(nn.Module):
    """A transformers model re-read as PRISM parts. Sub-modules share the original model's weights.

    embed(*token_inputs, position_ids) -> h [B, n, D]   (own token range, global positions)
    blocks[i]                                           (see the module docstring for the two interfaces)
    token_head(h) -> tuple of spec.token_outputs        (per token, on every device)
    pooled_head(h0) -> tuple of spec.pooled_outputs     (h0 = hidden state of token 0, device 0)
    """

    def __init__(self, spec: ModelSpec, embed: nn.Module, blocks: list[nn.Module], token_head, pooled_head,
                 output_class):
        super().__init__()
        assert len(blocks) == spec.num_layers, (len(blocks), spec.num_layers)
        assert (token_head is None) == (not spec.token_outputs)
        assert (pooled_head is None) == (not spec.pooled_outputs)
        self.spec = spec
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.token_head = token_head
        self.pooled_head = pooled_head
        self.output_class = output_class
        self.calibration: nn.ModuleList | None = None  # one RemoteCalibration per layer, for spec.exchange
        self.eval()

    def add_calibration(self, rank: int, seed: int = 0) -> nn.ModuleList:
        """Give every layer an identity RemoteCalibration (rows of spec.row_width, `rank`) and return them.
        Outputs do not change until they are trained; an uncalibrated model has none (its graphs stay as
        they were)."""
        gen = torch.Generator().manual_seed(seed)
        self.calibration = nn.ModuleList(
            RemoteCalibration(self.spec.row_width, self.spec.num_heads, rank, gen) for _ in self.blocks).eval()
        return self.calibration

    def exchanges(self) -> tuple[str, ...]:
        """The exchange kinds this model's blocks implement (see the module docstring)."""
        b = self.blocks[0]
        kinds = {"hidden": hasattr(b, "attn_input"), "kv": hasattr(b, "keys_values") and hasattr(b, "forward_kv")}
        return tuple(k for k, ok in kinds.items() if ok)

    def with_exchange(self, exchange: str | None) -> "PrismModel":
        """This model with another exchange kind (None: as converted). The modules are shared, not copied."""
        if exchange in (None, self.spec.exchange):
            return self
        if exchange not in self.exchanges():
            raise ModelLoadError(f"{self.spec.model_type} cannot exchange '{exchange}' rows; it supports "
                                 f"{', '.join(self.exchanges())}")
        if self.calibration is not None:
            raise ModelLoadError(f"this model's received rows were calibrated for '{self.spec.exchange}' exchange; "
                                 f"it cannot exchange '{exchange}' rows")
        return PrismModel(replace(self.spec, exchange=exchange), self.embed, list(self.blocks), self.token_head,
                          self.pooled_head, self.output_class)

    def step_modules(self) -> dict[str, nn.Module]:
        """{graph name: module} for every step of the device program; each module's forward takes the
        step's inputs in the program's order and returns its outputs in order."""
        embed_step, layer_step = (KVEmbedStep, KVLayerStep) if self.spec.exchange == "kv" else \
            (HiddenEmbedStep, HiddenLayerStep)
        L = len(self.blocks)
        out = {"embed": embed_step(self.embed, self.blocks[0])}
        cal = self.calibration
        for i in range(L):
            out[f"layer_{i}"] = layer_step(self.blocks[i], self.blocks[i + 1] if i + 1 < L else None,
                                           cal[i] if cal is not None else None)
        if self.token_head is not None:
            out["token_head"] = self.token_head
        if self.pooled_head is not None:
            out["pooled_head"] = self.pooled_head
        return out


class TupleHead(nn.Module):
    """Wraps a head function so that it always returns a tuple (one ONNX output per name)."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, m in modules.items():
            setattr(self, k, m)

    def forward(self, x):
        out = self.fn(self, x)
        return out if isinstance(out, tuple) else (out,)


def linear_from_conv1d(conv, rows: slice | None = None) -> nn.Linear:
    """transformers' Conv1D (weight [in, out]) -> nn.Linear (weight [out, in]), optionally a column slice."""
    w, b = conv.weight, conv.bias
    if rows is not None:
        w, b = w[:, rows], b[rows]
    lin = nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
        lin.weight.copy_(w.t())
        lin.bias.copy_(b)
    return lin


def expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]):
    """Assert a weight's shape with a message naming the weight (the families' reading contract)."""
    if tuple(tensor.shape) != tuple(shape):
        raise ModelLoadError(f"weight {name}: expected shape {tuple(shape)}, found {tuple(tensor.shape)}")


def expect_linears(prefix: str, named: list[tuple[str, nn.Module, tuple[int, int]]]):
    """expect_shape for a list of (name, linear module, (out, in)) under a weight-name prefix."""
    for name, mod, shape in named:
        expect_shape(f"{prefix}.{name}.weight", mod.weight, shape)
