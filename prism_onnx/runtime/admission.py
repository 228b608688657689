"""A client REQUEST, checked against the bundle's limits before anything is tokenized, decoded or queued.

Order matters: the array descriptions are checked while the message is decoded (`request_rules`: names,
dtypes, ranks, batch and length, before any array exists); then the fields' types and bounds
(schema.Request); then their values (`check_request`): the number of texts and each text's length before
any tokenizer runs, the outputs asked for, ids within the vocabulary. Each refusal is an InputError (the
client's fault; of code too_long for what exceeds the export's limits) or FrameError, one line naming the problem.
"""

from __future__ import annotations

import io

import numpy as np

from ..errors import InputError, too_long
from .bundle import Limits
from .protocol import ArrayRules

ID_ARRAYS = ("input_ids", "attention_mask")


def _batch_len(shape: tuple) -> tuple[int, int]:
    return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])


def request_rules(limits: Limits) -> ArrayRules:
    """What a REQUEST may carry, checked on the declared shapes (decode calls `allow` before building)."""
    C, S = limits.image

    def text_array(name, dtype, shape):
        if name not in ID_ARRAYS:
            return f"not an input of this text model (send {' and '.join(ID_ARRAYS)}, or texts)"
        if dtype not in ("int64", "int32") or len(shape) not in (1, 2):
            return f"{dtype} {list(shape)}: must be int64 [batch, tokens]"
        B, N = _batch_len(shape)  # beyond the export's limits: the client's input, too long (not a bad frame)
        if B > limits.max_batch:
            raise too_long(f"{name}: a batch of {B} rows is larger than this export's --max-batch {limits.max_batch}")
        if N > limits.max_seq_len:
            raise too_long(f"{name}: a sequence of {N} tokens is longer than this export's --max-seq-len "
                           f"{limits.max_seq_len}")
        return None if B and N else f"empty {list(shape)}: a request needs at least one row of one token"

    def image_array(name, dtype, shape):
        if name == "pixel_values":
            if dtype != "float32" or len(shape) not in (3, 4) or tuple(shape[-3:]) != (C, S, S):
                return f"{dtype} {list(shape)}: must be float32 [batch, {C}, {S}, {S}]"
            if (shape[0] if len(shape) == 4 else 1) > limits.max_batch:
                raise too_long(f"pixel_values: a batch of {shape[0]} images is larger than this export's --max-batch "
                               f"{limits.max_batch}")
            if len(shape) == 4 and shape[0] < 1:
                return f"batch of {shape[0]}: this export takes 1 to {limits.max_batch} images (--max-batch)"
            return None
        if name.startswith("image_"):
            if dtype != "uint8" or len(shape) != 1 or not 0 < shape[0] <= limits.max_image_bytes:
                return f"{dtype} {list(shape)}: an image file must be 1 to {limits.max_image_bytes} bytes (uint8)"
            return None
        return "not an input of this image model (send pixel_values or image files)"

    allow = text_array if limits.input_kind == "text" else image_array
    return ArrayRules(limits.max_client_bytes, max_arrays=limits.max_batch + 2, allow=allow)


def check_texts(texts, limits: Limits) -> list[str]:
    if not isinstance(texts, list) or not texts:
        raise InputError("'texts' must be a non-empty list of strings")
    if len(texts) > limits.max_batch:
        raise too_long(f"a request of {len(texts)} texts exceeds this export's --max-batch {limits.max_batch}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"text {i} is a {type(t).__name__}, not a string")
        if len(t) > limits.max_text_chars:
            raise too_long(f"text {i} has {len(t):,} characters; the limit is {limits.max_text_chars:,} "
                             f"(this export reads at most {limits.max_seq_len} tokens)")
    return texts


def check_outputs(outputs, limits: Limits) -> set[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not outputs or len(outputs) > len(limits.outputs):
        raise InputError(f"'outputs' must be a non-empty list of names from {list(limits.outputs)}")
    unknown = [str(o)[:40] for o in outputs if not isinstance(o, str) or o not in limits.outputs]
    if unknown:
        raise InputError(f"unknown outputs {unknown}; this model returns {list(limits.outputs)}")
    return set(outputs)


def check_ids(ids: np.ndarray, mask: np.ndarray | None, limits: Limits) -> None:
    if ids.size == 0:
        raise InputError(f"input_ids of shape {list(ids.shape)} holds no token")
    if ids.min() < 0 or ids.max() >= limits.vocab_size:
        raise InputError(f"input_ids out of range [0, {limits.vocab_size}): min {ids.min()}, max {ids.max()}")
    if mask is not None:
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}")
        if not np.isin(mask, (0, 1)).all():
            raise InputError("attention_mask must hold only 0 and 1")
        if not np.atleast_2d(mask).any(axis=1).all():
            raise InputError("every batch row needs at least one real token (attention_mask is all zero in a row)")


def check_generate(options, limits: Limits) -> None:
    """A request's generation options (schema.GenerateOptions, their bounds checked), against what this
    export can do."""
    if not limits.generates:
        from ..generate import cannot_generate

        raise InputError(cannot_generate(limits.outputs))


def check_request(req, limits: Limits) -> None:
    """A REQUEST's values (schema.Request, its fields already typed and bounded): exactly one kind of input,
    what the model takes, within the export's limits. InputError (the client's fault) names the problem."""
    if req.outputs is not None:
        check_outputs(list(req.outputs), limits)
    if req.generate is not None:
        check_generate(req.generate, limits)
    elif req.stream:
        raise InputError("'stream' streams generated tokens: it needs 'generate'")
    arrays = req.arrays
    given = [k for k, present in (("texts", req.texts is not None), ("arrays", bool(arrays))) if present]
    if len(given) != 1:
        raise InputError("a request needs exactly one of: texts, image files, pixel_values, input_ids")
    if req.texts is not None:
        if limits.input_kind != "text":
            raise InputError("this is an image model: send images or pixel_values, not texts")
        check_texts(list(req.texts), limits)
        return
    images = [k for k in sorted(arrays) if k.startswith("image_")]
    if images:
        if len(images) != len(arrays):
            raise InputError("send either image files or pixel_values, not both")
        if len(images) > limits.max_batch:
            raise too_long(f"a request of {len(images)} images exceeds this export's --max-batch {limits.max_batch}")
    elif "pixel_values" in arrays:
        if not np.isfinite(arrays["pixel_values"]).all():
            raise InputError("pixel_values holds non-finite values")
    else:
        if "input_ids" not in arrays:
            raise InputError("attention_mask without input_ids")
        check_ids(arrays["input_ids"], arrays.get("attention_mask"), limits)


def model_kwargs(req) -> dict:
    """A checked request's inputs as keyword arguments of `device.Requests.model_inputs`."""
    if req.texts is not None:
        return {"texts": list(req.texts)}
    arrays = req.arrays
    images = [k for k in sorted(arrays) if k.startswith("image_")]
    if images:
        return {"images": [io.BytesIO(arrays[k].tobytes()) for k in images]}
    if "pixel_values" in arrays:
        return {"pixel_values": np.array(arrays["pixel_values"])}
    out = {"input_ids": np.atleast_2d(arrays["input_ids"]).astype(np.int64)}
    if arrays.get("attention_mask") is not None:
        out["attention_mask"] = np.atleast_2d(arrays["attention_mask"]).astype(np.int64)
    return out
