"""Model inputs -> token-level arrays a device can slice. Pure numpy: shared by simulate and the runtime.

A request is the usual transformers inputs (`input_ids`, `attention_mask`, `token_type_ids` for text,
`pixel_values` for images). `prepare` turns them into arrays with a token axis ([B, N, ...]) so that
device p simply takes [:, start:end], plus the [B, N] attention mask the partition plan is built from.
ViT images become patch rows ([B, 1 + patches, C*ps*ps], row 0 a placeholder for the class token).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import InputError

TEXT, IMAGE = "text", "image"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


def merge_inputs(inputs: Mapping | None, kwargs: dict, caller: str) -> dict:
    """`inputs` (what a tokenizer or image processor returns) and keyword inputs as one dict. A keyword that
    is no model input is refused as Python refuses an unknown keyword (TypeError), and so is a key of
    `inputs` that no model reads: a misspelt setting must not pass silently for an input."""
    unknown = sorted(set(kwargs) - set(MODEL_INPUTS))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; model "
                        f"inputs are {', '.join(MODEL_INPUTS)}")
    merged = {**(dict(inputs) if inputs is not None else {}), **kwargs}
    unknown = sorted(set(merged) - set(MODEL_INPUTS))
    if unknown:
        raise InputError(f"{caller}(): unknown model inputs {unknown}; model inputs are {', '.join(MODEL_INPUTS)}")
    return merged


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def patchify(pixel_values: np.ndarray, patch_size: int) -> np.ndarray:
    """[B, C, H, W] -> [B, 1 + (H/ps)(W/ps), C*ps*ps], rows in ViT's patch order (row-major over the grid),
    each patch flattened as (C, ps, ps) to match the Conv2d weight; row 0 is zeros (class token slot)."""
    B, C, H, W = pixel_values.shape
    ps = patch_size
    gh, gw = H // ps, W // ps
    x = pixel_values.reshape(B, C, gh, ps, gw, ps).transpose(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, ps, ps]
    x = x.reshape(B, gh * gw, C * ps * ps)
    cls_slot = np.zeros((B, 1, C * ps * ps), dtype=x.dtype)
    return np.ascontiguousarray(np.concatenate([cls_slot, x], axis=1).astype(np.float32))


def prepare(spec, inputs: Mapping) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Validate a request against the model spec; return (token-level inputs, attention mask [B, N]).

    `spec` is the model's ModelSpec (every bundle manifest carries it).
    """
    if spec.input_kind == IMAGE:
        return _prepare_image(spec, inputs)
    return _prepare_text(spec, inputs)


def _prepare_text(spec, inputs):
    if "input_ids" not in inputs or inputs["input_ids"] is None:
        raise InputError(f"{spec.model_type} needs input_ids (got {sorted(inputs)})")
    ids = _as_numpy(inputs["input_ids"])
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be integer [batch, tokens], got {ids.dtype} {ids.shape}")
    B, N = ids.shape
    if N < 1:
        raise InputError("input_ids is empty")
    if N > spec.max_positions:
        raise InputError(
            f"sequence of {N} tokens is longer than the model's {spec.max_positions} positions"
        )
    if ids.min() < 0 or ids.max() >= spec.vocab_size:
        raise InputError(f"input_ids out of range [0, {spec.vocab_size}): min {ids.min()}, max {ids.max()}")
    mask = inputs.get("attention_mask")
    mask = np.ones((B, N), np.int64) if mask is None else _as_numpy(mask)
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.shape != (B, N):
        raise InputError(f"attention_mask must have shape {(B, N)} like input_ids, got {mask.shape}")
    if not np.all(mask.astype(bool).any(axis=1)):
        raise InputError("every batch row needs at least one real token (attention_mask is all zero in a row)")
    token_inputs = {"input_ids": ids.astype(np.int64)}
    if "token_type_ids" in spec.embed_inputs:
        tt = inputs.get("token_type_ids")
        tt = np.zeros((B, N), np.int64) if tt is None else _as_numpy(tt)
        if tt.shape != (B, N):
            raise InputError(f"token_type_ids must have shape {(B, N)} like input_ids, got {tt.shape}")
        token_inputs["token_type_ids"] = tt.astype(np.int64)
    return token_inputs, mask.astype(np.int64)


def _prepare_image(spec, inputs):
    if "pixel_values" not in inputs or inputs["pixel_values"] is None:
        raise InputError(f"{spec.model_type} needs pixel_values (got {sorted(inputs)})")
    px = _as_numpy(inputs["pixel_values"]).astype(np.float32)
    if px.ndim == 3:
        px = px[None]
    C, S = spec.num_channels, spec.image_size
    if px.ndim != 4 or px.shape[1:] != (C, S, S):
        raise InputError(
            f"image of the wrong size: the model takes pixel_values [batch, {C}, {S}, {S}], got {list(px.shape)}"
        )
    patches = patchify(px, spec.patch_size)
    return {"patches": patches}, np.ones(patches.shape[:2], np.int64)
