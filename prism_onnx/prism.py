"""The PRISM math in PyTorch, shared by every model family: Segment Means and one softmax over
[own keys; received rows] with the count bias and the partition-aware causal routing.

Model families (prism_onnx/models/) own their embeddings, attention projections and MLPs and call these
functions; `prism_onnx.simulate` runs the family modules and the exporter traces the very same modules
into ONNX graphs, so this is the single definition of what a device computes.

Tensor names used throughout:
    q           [B, H, n, dh]     queries of a device's own n tokens
    k, v        [B, Hkv, n+R, dh] keys and values: own rows first, then the R received rows in device order
    local_bias  [B, n]            additive bias on own keys (0, or MASKED for padding)
    remote_bias [B, R]            additive bias on received rows (log(count) or 0; MASKED for empty segments);
                [B, H, R]         per head, after a RemoteCalibration
    averager    [B, S, n]         segment averaging matrix from `prism_onnx.plan`
    kv rows     [B, n, 2*Hkv*dh]  keys and values of n tokens side by side, as they travel ("kv" exchange)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .plan import MASKED


def segment_means(averager: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Segment Means: [B, S, n] @ [B, n, W] -> [B, S, W]. Padding and sinks are encoded in `averager`."""
    return torch.matmul(averager, x)


def prism_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local_bias: torch.Tensor,
                    remote_bias: torch.Tensor, *, causal: bool, scale: float) -> torch.Tensor:
    """Attention of a device's queries over [own rows; received rows] -> [B, n, H*dh].

    One softmax over [S_loc, S_rem] (a shared max and normaliser): a received mean row stands for `count`
    tokens through its log(count) bias and is never expanded back to N rows. With `causal`, own keys follow
    the lower-triangular mask; received rows all come from earlier devices (Plan.sources), so all are
    visible. Grouped-query attention: each of the Hkv key/value heads serves H / Hkv query heads.
    """
    B, H, n, dh = q.shape
    Hkv, rows = k.shape[1], k.shape[2]
    if Hkv != H:  # [B, Hkv, rows, dh] -> [B, H, rows, dh], each kv head repeated for its group
        k = k[:, :, None].expand(B, Hkv, H // Hkv, rows, dh).reshape(B, H, rows, dh)
        v = v[:, :, None].expand(B, Hkv, H // Hkv, rows, dh).reshape(B, H, rows, dh)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, n, n+R]
    if remote_bias.dim() == 3:  # per head (RemoteCalibration): [B, H, R]
        bias = torch.cat([local_bias[:, None, :].expand(B, H, n), remote_bias], dim=-1)  # [B, H, n+R]
        scores = scores + bias[:, :, None, :]
    else:
        bias = torch.cat([local_bias, remote_bias], dim=-1)  # [B, n+R]
        scores = scores + bias[:, None, None, :]
    if causal:
        pos = torch.arange(n, device=q.device)
        future = pos[None, :] > pos[:, None]  # [n, n] own key after own query
        future = torch.cat([future, future.new_zeros(n, rows - n)], dim=1)  # [n, n+R]: received rows visible
        scores = scores.masked_fill(future, MASKED)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)  # [B, H, n, dh]
    return out.transpose(1, 2).reshape(B, n, H * dh)


def kv_rows(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Keys and values [B, Hkv, n, dh] each -> rows [B, n, 2*Hkv*dh] ([k heads | v heads]), the layout the
    "kv" exchange averages and sends."""
    B, Hkv, n, dh = k.shape
    return torch.cat([k.transpose(1, 2).reshape(B, n, Hkv * dh), v.transpose(1, 2).reshape(B, n, Hkv * dh)], dim=-1)


def split_kv_rows(rows: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of kv_rows: [B, R, 2*Hkv*dh] -> k, v [B, Hkv, R, dh]."""
    B, R, _ = rows.shape
    k, v = rows.split(kv_heads * head_dim, dim=-1)
    return (k.reshape(B, R, kv_heads, head_dim).transpose(1, 2), v.reshape(B, R, kv_heads, head_dim).transpose(1, 2))


class RemoteCalibration(nn.Module):
    """Learned corrections of the rows one layer receives (`prism calibrate`); the identity as created.

    A mean row stands for c > 1 tokens, and it approximates them: the softmax of a mean key is not the mean
    of the softmaxes, and a mean vector is shorter than the vectors it averages. These parameters let
    calibration correct that, for mean rows only (those with remote_bias = log(count) > 0, i.e. the count
    bias marks them): a row of one token (a sink, any row at CR=1, a decoding cache's own tokens) is exact
    and passes unchanged, and so does a masked row. With the count bias off no row is marked and this is
    the identity.

        rows [B, R, W], remote_bias [B, R] -> rows [B, R, W], remote_bias [B, H, R]
        bias of a mean row, head h:  bias_scale[h] * log(count) + bias_offset[h]     (2H parameters)
        a mean row:                  row + (row @ down) @ up                         (2 W rank parameters)
    W is the row width (D for hidden-state exchange, 2 * kv_heads * head_dim for key/value exchange).
    `up` starts at zero (a low-rank correction as in LoRA), so a new module changes nothing.
    """

    def __init__(self, width: int, heads: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.bias_scale = nn.Parameter(torch.ones(heads))
        self.bias_offset = nn.Parameter(torch.zeros(heads))
        self.down = nn.Parameter(torch.randn(width, rank, generator=generator) / math.sqrt(width))
        self.up = nn.Parameter(torch.zeros(rank, width))

    def forward(self, rows: torch.Tensor, remote_bias: torch.Tensor):
        mean_row = remote_bias > 0  # [B, R]: stands for count > 1 tokens
        bias = remote_bias[:, None, :] * self.bias_scale[None, :, None] + self.bias_offset[None, :, None]  # [B, H, R]
        bias = torch.where(mean_row[:, None, :], bias, remote_bias[:, None, :])
        corrected = rows + torch.matmul(torch.matmul(rows, self.down), self.up)  # [B, R, W]
        return torch.where(mean_row[:, :, None], corrected, rows), bias
