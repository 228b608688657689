"""The SST-2 probe on MiniLM: a logistic regression (scikit-learn) on the full model's mean-pooled
embeddings of SST-2 training phrases. PRISM is scored by feeding its embeddings to the same probe."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import models
from ..data import sst2
from .tasks import cached

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over real tokens, L2-normalised (sentence-transformers pooling for MiniLM)."""
    m = mask[..., None].astype(np.float32)
    v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)  # [B, D]
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch: int = 64) -> np.ndarray:
    """Full-model sentence embeddings [len(texts), D]."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state.numpy()  # [B, T, D]
        out.append(mean_pool(hidden, enc["attention_mask"].numpy()))
    return np.concatenate(out)


def build_sst2_probe(out_dir: Path | str, *, train_samples: int = 8000, C: float = 1.0, seed: int = 0) -> dict:
    """Fit the probe on `train_samples` random SST-2 training phrases; record full-model dev accuracy."""
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = models.load(MINILM)
    tok = AutoTokenizer.from_pretrained(models.resolve_source(MINILM))
    texts, labels = sst2("train")
    idx = np.random.default_rng(seed).permutation(len(texts))[:train_samples]
    x = embed(model, tok, [texts[i] for i in idx])
    clf = LogisticRegression(C=C, max_iter=2000).fit(x, labels[idx])
    dev_texts, dev_labels = sst2("dev")
    dev_acc = float(clf.score(embed(model, tok, dev_texts), dev_labels))
    out = Path(out_dir)
    np.savez(out / "probe.npz", coef=clf.coef_[0].astype(np.float32), intercept=np.float32(clf.intercept_[0]))
    record = {"task": "sst2-probe", "dev_accuracy_full_model": dev_acc,
              "train_accuracy": float(clf.score(x, labels[idx])),
              "train_seconds": round(time.perf_counter() - t0, 2),
              "settings": {"train_samples": train_samples, "C": C, "seed": seed}}
    (out / "task.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def sst2_probe(root=None, **kwargs) -> tuple[np.ndarray, float]:
    """(coef [D], intercept) of the cached probe: positive score = positive sentiment."""
    folder = cached("minilm-sst2-probe", build_sst2_probe, root, **kwargs)
    z = np.load(folder / "probe.npz")
    return z["coef"], float(z["intercept"])
