"""Sentence embeddings from token embeddings, pooled as the model folder says. Numpy only (the board).

A sentence-transformers model folder lists its modules in `modules.json`: the Transformer, a `Pooling`
module whose `config.json` (usually `1_Pooling/config.json`) switches on one or more pooling modes, and
optionally `Normalize` (L2). `pooling_of_folder` reads that at export into a small record that the bundle
manifest keeps (manifest.Preprocessing.pooling); a folder without it gets mean pooling, not normalized:

    {"modes": ["mean"], "normalize": true, "source": "sentence-transformers", "skipped_modules": []}

`pool` reproduces sentence-transformers' `Pooling.forward` for the modes it knows, concatenated in its
order (cls, max, mean, mean_sqrt_len, weightedmean, lasttoken), padding excluded by the attention mask.
Modules after pooling that are not Normalize (e.g. Dense) cannot run on a board: they are recorded as
`skipped_modules`, and the server says so when it starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import BundleError

MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")  # sentence-transformers' order
_ST_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
            "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "weightedmean": "pooling_mode_weightedmean_tokens",
            "lasttoken": "pooling_mode_lasttoken"}
DEFAULT = {"modes": ["mean"], "normalize": False, "source": "default (no sentence-transformers modules)",
           "skipped_modules": []}
_KNOWN = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
          "sentence_transformers.models.Normalize")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from None


def pooling_of_folder(folder: str | Path) -> dict:
    """The pooling record of a model folder: from sentence-transformers' modules.json and its Pooling
    config when present, else DEFAULT (mean, not normalized)."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return dict(DEFAULT)
    modules = _read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise BundleError(f"{modules_file}: expected a list of modules")
    types = [str(m.get("type", "")) for m in modules]
    pooling = next((m for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
    if pooling is None:
        return {**DEFAULT, "skipped_modules": [t for t in types if t not in _KNOWN]}
    config = _read_json(folder / str(pooling.get("path", "")) / "config.json")
    modes = [m for m in MODES if config.get(_ST_KEYS[m])]
    if not modes:
        raise BundleError(f"{folder / str(pooling.get('path', ''))}/config.json switches on no pooling mode")
    return {"modes": modes, "normalize": any(t.endswith(".Normalize") for t in types),
            "source": "sentence-transformers", "skipped_modules": [t for t in types if t not in _KNOWN]}


def check_pooling(record: dict | None) -> dict:
    """A manifest's pooling record, checked (None: DEFAULT, for bundles exported before it existed)."""
    if record is None:
        return dict(DEFAULT)
    modes = record.get("modes")
    if not isinstance(modes, list) or not modes or any(m not in MODES for m in modes):
        raise BundleError(f"pooling modes {modes!r}: expected a non-empty list from {list(MODES)}")
    return {**DEFAULT, **record}


def pool(hidden: np.ndarray, mask: np.ndarray, record: dict | None = None) -> np.ndarray:
    """Token embeddings [B, N, D] and attention mask [B, N] -> sentence embeddings [B, D * len(modes)]
    (float32), L2-normalized when the record says so."""
    record = check_pooling(record)
    h = np.asarray(hidden, np.float32)
    m = np.asarray(mask, np.float32)[:, :, None]  # [B, N, 1]
    out = []
    for mode in record["modes"]:
        if mode == "cls":
            out.append(h[:, 0])
        elif mode == "max":
            out.append(np.where(m > 0, h, -1e9).max(1))
        elif mode in ("mean", "mean_sqrt_len"):
            total, count = (h * m).sum(1), np.maximum(m.sum(1), 1e-9)
            out.append(total / (count if mode == "mean" else np.sqrt(count)))
        elif mode == "weightedmean":
            w = m * np.arange(1, h.shape[1] + 1, dtype=np.float32)[None, :, None]
            out.append((h * w).sum(1) / np.maximum(w.sum(1), 1e-9))
        elif mode == "lasttoken":
            last = h.shape[1] - 1 - np.argmax(m[:, ::-1, 0] > 0, axis=1)  # last real token, any padding side
            out.append(h[np.arange(h.shape[0]), last])
    x = np.concatenate(out, axis=-1).astype(np.float32)
    if record["normalize"]:
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x
