"""What every model family adapter produces: a `PrismModel` (embed, blocks, heads) and its `ModelSpec`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import ModelLoadError
from ..prism import Block, EmbedStep, LayerStep


@dataclass(frozen=True)
class ModelSpec:
    """The facts about a model that the plan, the exporter and the runtime need (JSON-serialisable)."""

    model_type: str  # config.model_type: bert | vit | gpt2
    architecture: str  # the transformers class, e.g. BertForSequenceClassification
    hidden_size: int
    num_heads: int
    num_layers: int
    max_positions: int  # tokens the position embeddings allow (ViT: 1 + patches, fixed)
    causal: bool  # decoder: partition-aware causal mask
    sinks: tuple[str, ...]  # sink tokens of this family ("first", "last"), sent as own segments when kept
    input_kind: str  # "text" | "image"
    embed_inputs: tuple[str, ...]  # token-level inputs of the embed graph, before position_ids
    token_outputs: tuple[str, ...]  # per-token outputs (gathered along the sequence)
    pooled_outputs: tuple[str, ...]  # outputs read from token 0 on device 0
    vocab_size: int = 0
    image_size: int = 0
    patch_size: int = 0
    num_channels: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


class PrismModel(nn.Module):
    """A transformers model re-read as PRISM parts. Sub-modules share the original model's weights.

    embed(*token_inputs, position_ids) -> h [B, n, D]       (own token range, global positions)
    blocks[i](h, remote, local_bias, remote_bias) -> h      (see prism.Block)
    token_head(h) -> tuple of spec.token_outputs            (per token, on every device)
    pooled_head(h0) -> tuple of spec.pooled_outputs         (h0 = hidden state of token 0, device 0)
    """

    def __init__(self, spec: ModelSpec, embed: nn.Module, blocks: list[Block], token_head, pooled_head, output_class):
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
        self.eval()

    def embed_step(self) -> EmbedStep:
        return EmbedStep(self.embed, self.blocks[0])

    def layer_step(self, i: int) -> LayerStep:
        nxt = self.blocks[i + 1] if i + 1 < len(self.blocks) else None
        return LayerStep(self.blocks[i], nxt)


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
    """Assert a weight's shape with a message naming the weight (the adapters' reading contract)."""
    if tuple(tensor.shape) != tuple(shape):
        raise ModelLoadError(f"weight {name}: expected shape {tuple(shape)}, found {tuple(tensor.shape)}")
