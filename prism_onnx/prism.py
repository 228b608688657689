"""The PRISM layer math in PyTorch: Segment Means and block attention over [own tokens; received means].

These modules are the single definition of what a device computes. `prism_onnx.simulate` runs them in a
per-device loop, and the exporter traces the very same modules into the per-device ONNX graphs.

Tensor names used throughout:
    h       [B, n, D]   a device's hidden states (its own n tokens)
    z       [B, n, D]   attention input of its tokens: LN1(h) for pre-LN blocks, h for post-LN blocks
    remote  [B, R, D]   received segment means of the other devices' attention inputs, in device order
    local_bias  [B, n]  additive bias on own keys (0 or MASKED for padding)
    remote_bias [B, R]  additive bias on remote keys (log(count) or 0; MASKED for empty segments)
    averager    [B, S, n]  segment averaging matrix from `prism_onnx.plan`
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .plan import MASKED


def segment_means(averager: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Segment Means: [B, S, n] @ [B, n, D] -> [B, S, D]. Padding and sinks are encoded in `averager`."""
    return torch.matmul(averager, z)


def block_attention(
    z: torch.Tensor,
    remote: torch.Tensor,
    local_bias: torch.Tensor,
    remote_bias: torch.Tensor,
    q_proj: nn.Module,
    k_proj: nn.Module,
    v_proj: nn.Module,
    num_heads: int,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Multi-head attention of a device's queries over [own keys; keys of the received means].

    K and V are projected for n + R rows (not N): that is PRISM's compute saving. Because the
    projections are affine, K of a mean row is exactly the mean of the remote tokens' keys. With
    `causal`, own keys follow the usual lower-triangular mask; the remote rows all come from earlier
    devices (see Plan.sources), so they are all visible.
    """
    B, n, D = z.shape
    dh = D // num_heads
    kv_in = torch.cat([z, remote], dim=1)  # [B, n+R, D]
    q = q_proj(z).view(B, n, num_heads, dh).transpose(1, 2)  # [B, H, n, dh]
    k = k_proj(kv_in).view(B, -1, num_heads, dh).transpose(1, 2)  # [B, H, n+R, dh]
    v = v_proj(kv_in).view(B, -1, num_heads, dh).transpose(1, 2)  # [B, H, n+R, dh]

    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, n, n+R]
    bias = torch.cat([local_bias, remote_bias], dim=-1)  # [B, n+R]
    scores = scores + bias[:, None, None, :]
    if causal:
        pos = torch.arange(n, device=z.device)
        future = pos[None, :] > pos[:, None]  # [n, n] own key after own query
        future = torch.cat([future, future.new_zeros(n, remote.shape[1])], dim=1)  # [n, n+R] means: visible
        scores = scores.masked_fill(future, MASKED)
    # one softmax over [S_loc, S_rem]: shared max and normaliser, means are never expanded to N rows
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)  # [B, H, n, dh]
    return out.transpose(1, 2).reshape(B, n, D)


class Block(nn.Module):
    """One Transformer layer as a PRISM device runs it, for post-LN (BERT) or pre-LN (ViT, GPT-2) blocks.

    The sub-modules are the Hugging Face model's own (shared, not copied) wherever their layout allows.
    """

    def __init__(
        self,
        *,
        norm: str,
        ln_attn: nn.Module,
        ln_mlp: nn.Module,
        q: nn.Module,
        k: nn.Module,
        v: nn.Module,
        o: nn.Module,
        fc_in: nn.Module,
        fc_out: nn.Module,
        act: nn.Module,
        num_heads: int,
        causal: bool,
        scale: float | None = None,
    ):
        super().__init__()
        assert norm in ("pre", "post"), norm
        self.norm = norm
        self.ln_attn, self.ln_mlp = ln_attn, ln_mlp
        self.q, self.k, self.v, self.o = q, k, v, o
        self.fc_in, self.fc_out, self.act = fc_in, fc_out, act
        self.num_heads = num_heads
        self.causal = causal
        hidden = o.weight.shape[0]
        assert hidden % num_heads == 0, f"hidden size {hidden} not divisible by {num_heads} heads"
        self.scale = scale if scale is not None else 1.0 / math.sqrt(hidden // num_heads)

    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        """z: what this layer's attention reads, and what devices average and exchange."""
        return self.ln_attn(h) if self.norm == "pre" else h

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))

    def forward(self, h, remote, local_bias, remote_bias):
        z = self.attn_input(h)  # [B, n, D]
        a = block_attention(
            z, remote, local_bias, remote_bias, self.q, self.k, self.v, self.num_heads, self.scale, self.causal
        )
        a = self.o(a)  # [B, n, D]
        if self.norm == "pre":
            h = h + a
            return h + self.mlp(self.ln_mlp(h))
        h = self.ln_attn(h + a)
        return self.ln_mlp(h + self.mlp(h))


class EmbedStep(nn.Module):
    """Device graph 'embed': own tokens -> hidden states, plus the means of layer 0's attention input."""

    def __init__(self, embed: nn.Module, first_block: Block):
        super().__init__()
        self.embed, self.first_block = embed, first_block

    def forward(self, *args):
        *inputs, averager = args
        h = self.embed(*inputs)  # [B, n, D]
        return h, segment_means(averager, self.first_block.attn_input(h))  # [B, n, D], [B, S, D]


class LayerStep(nn.Module):
    """Device graph 'layer_i': block i over [own; remote], then the means the next layer needs.

    The last layer has no next layer and returns only the hidden states.
    """

    def __init__(self, block: Block, next_block: Block | None):
        super().__init__()
        self.block, self.next_block = block, next_block

    def forward(self, h, remote, local_bias, remote_bias, averager=None):
        h = self.block(h, remote, local_bias, remote_bias)  # [B, n, D]
        if self.next_block is None:
            return (h,)
        return h, segment_means(averager, self.next_block.attn_input(h))  # [B, n, D], [B, S, D]
