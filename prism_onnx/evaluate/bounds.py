"""The bounds every PRISM accuracy number sits between, computed with the unpartitioned model itself.

    full model            every token sees every (earlier) token: the upper bound
    masked full model     each query sees only what a device sees at full resolution (Plan.visibility): its
                          own partition, its halo window and the kept sinks. With W=0 this is "each
                          partition alone" (remote tokens dropped); with W>0 "partition + window".
                          PRISM with far="none" equals it exactly (at any CR); PRISM with far="means" adds the
                          Segment Means of the other remote tokens, which should land between this and the
                          full model: the measure of what the means are worth.

The mask goes into the transformers model as an attention mask: a 4D float mask [B, 1, N, N] (0 = attend,
-inf = not) for decoders (transformers' 4D custom masks: Llama, Qwen2, GPT-2), a 3D 0/1 mask [B, N, N] for
encoders (BERT and RoBERTa take it through `get_extended_attention_mask`). A model that takes neither (ViT,
DistilBERT) is refused with an InputError.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError

def masked_forward(model, inputs: dict, visible: np.ndarray):
    """The transformers `model` on `inputs` (input_ids, attention_mask [B, N]) with each query restricted to
    the keys of `visible` [B, N, N] (bool, [query, key]). Decoders get position ids counted from each row's
    first real token, as PRISM's plan counts them. Returns the model's output object; InputError for a model
    that takes no attention mask per query."""
    from ..reference import prism_model

    ids = torch.as_tensor(np.asarray(inputs["input_ids"]))
    mask = torch.as_tensor(np.asarray(inputs.get("attention_mask", np.ones(ids.shape, np.int64))))
    vis = torch.as_tensor(np.asarray(visible, bool))
    if vis.shape != (*ids.shape, ids.shape[1]):
        raise InputError(f"visibility must be [batch, tokens, tokens] = {[*ids.shape, ids.shape[1]]}, "
                         f"got {list(vis.shape)}")
    try:
        with torch.no_grad():
            if prism_model(model).spec.causal:
                bias = torch.zeros(vis.shape, dtype=torch.float32).masked_fill(~vis, torch.finfo(torch.float32).min)
                return model(input_ids=ids, attention_mask=bias[:, None],
                             position_ids=(mask.cumsum(1) - 1).clamp(min=0))
            extra = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items() if k == "token_type_ids"}
            return model(input_ids=ids, attention_mask=vis.long(), **extra)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"masked full-model bounds need a model that takes an attention mask per query; "
                         f"{model.config.model_type} does not ({type(e).__name__})") from None


def decode_visibility(plan, total: int) -> np.ndarray:
    """[B, total, total]: Plan.visibility() of a prefilled prompt of N tokens, extended by total - N tokens
    decoded on the tail device: each sees what the tail's last prompt token sees (its compressed prefix cache:
    remote rows and its own tokens) and the new tokens up to itself (PRISM.md, "Generation")."""
    vis = plan.visibility()
    B, N, _ = vis.shape
    out = np.zeros((B, total, total), bool)
    out[:, :N, :N] = vis
    out[:, N:, :N] = vis[:, N - 1][:, None, :]
    out[:, N:, N:] = np.tril(np.ones((total - N, total - N), bool))[None]
    return out
