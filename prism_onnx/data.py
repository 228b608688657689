"""Where the evaluation data lives (`../shared/data` beside the checkout, or $PRISM_DATA), and readers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def data_dir() -> Path | None:
    """$PRISM_DATA, else the first `shared/data` found beside the working directory or this checkout."""
    candidates = [os.environ.get("PRISM_DATA"), Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[2] / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "sst2").is_dir():
            return Path(c)
    return None


def sst2(split: str = "dev", limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """SST-2 (sentence, label) from `sst2/{split}.tsv`."""
    root = data_dir()
    if root is None:
        raise FileNotFoundError("SST-2 not found: set PRISM_DATA to the folder holding sst2/ and wikitext2/")
    texts, labels = [], []
    with open(root / "sst2" / f"{split}.tsv", encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            sentence, _, label = line.rstrip("\n").rpartition("\t")
            if label.strip() in ("0", "1"):
                texts.append(sentence.strip())
                labels.append(int(label))
            if limit and len(texts) >= limit:
                break
    return texts, np.array(labels)


def wikitext(split: str = "test") -> str:
    root = data_dir()
    if root is None:
        raise FileNotFoundError("WikiText-2 not found: set PRISM_DATA to the folder holding wikitext2/")
    return (root / "wikitext2" / f"{split}.txt").read_text(encoding="utf-8")


def digits_images(size: int, channels: int = 3, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 HxWxC images upscaled to `size` (nearest), and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255).astype(np.uint8)  # [n, 8, 8]
    if limit:
        imgs, labels = imgs[:limit], d.target[:limit]
    else:
        labels = d.target
    rep = -(-size // 8)
    imgs = imgs.repeat(rep, axis=1).repeat(rep, axis=2)[:, :size, :size]
    return np.repeat(imgs[..., None], channels, axis=-1), np.asarray(labels)
