"""Qwen2 (Llama's layout with biases on the q, k, v projections; key/value exchange): Qwen2Model,
Qwen2ForCausalLM. Sliding-window attention is refused (a window would change which rows a query sees)."""

from __future__ import annotations

from ..errors import ModelLoadError
from . import llama

MODEL_TYPE = "qwen2"
ARCHITECTURES = ("Qwen2Model", "Qwen2ForCausalLM")  # the first is the default
DEFAULTS = llama.DEFAULTS  # Llama's layout: the settings measured on a real Llama-family decoder (llama.py)


def convert(model):
    config = model.config
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None)
                                                                                or []):
        raise ModelLoadError("qwen2: sliding-window attention (use_sliding_window=True) is not supported")
    return llama.convert_decoder(model, family=MODEL_TYPE, architectures=ARCHITECTURES)


example_inputs = llama.example_inputs
