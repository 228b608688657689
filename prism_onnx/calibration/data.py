"""Calibration inputs: unlabeled and in-domain, read through the export's own preprocessing (the bundle's
tokenizer.json or image config, as a board would read them).

    a text file      one input per line (blank lines skipped); a line longer than the export's --max-seq-len
                     tokens is cut into windows of --max-seq-len tokens, each with the tokenizer's special
                     tokens (the tokenizer's own truncation with overflow), and the cut is reported; or, with
                     `window=N`, the whole file as one running text cut into windows of N tokens (for
                     language models: inputs like the ones they serve)
    an image folder  every image file in it (.png, .jpg, ...), in name order

Inputs are grouped into batches of equal length, never padded: the plan splits a batch's padded length, so
each input must be split over its own tokens, as it would be alone on the devices. Then a seeded shuffle
puts some batches aside as held-out inputs (the loss reported before and after calibration).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..inputs import prepare
from .distill import Batch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def digest(path: str | Path) -> str:
    """sha256 of a data file; of a folder: sha256 over its image files' names and sha256s, in name order."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in image_files(path):
            h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).hexdigest().encode() + b"\n")
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_inputs(requests, path: str | Path, *, window: int | None = None, limit: int | None = None,
                cut: dict | None = None) -> list[dict]:
    """Model inputs, one input each ([1, N] arrays), from a text file or an image folder (module docstring).
    `requests` is the export's runtime.device.Requests; `limit` keeps the first inputs only; `cut` (a dict)
    is filled with the lines longer than --max-seq-len and the windows they were cut into."""
    path = Path(path)
    if path.is_dir():
        files = image_files(path)[:limit]
        if not files:
            raise InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return [requests.model_inputs(images=[str(p)]) for p in files]
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file (calibration data is a text file, one input per line, "
                         f"or a folder of images)") from None
    lines = [t for t in text.splitlines() if t.strip()]
    if not lines:
        raise InputError(f"{path}: no text lines")
    if window is None:
        return line_inputs(requests, lines, limit, cut if cut is not None else {})
    return windows(requests, text, window)[:limit]


def line_inputs(requests, lines: list[str], limit: int | None, cut: dict) -> list[dict]:
    """One input per line; a line of more than --max-seq-len tokens becomes several inputs of at most that
    many (`cut`: {"lines": how many were cut, "windows": into how many inputs, "max_seq_len": N})."""
    from tokenizers import Tokenizer

    if requests.text is None:
        return [requests.model_inputs(texts=[t]) for t in lines[:limit]]  # says there is no tokenizer
    n = requests.manifest.settings.max_seq_len
    tok = Tokenizer.from_str(requests.text.tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(n)
    out: list[dict] = []
    cut.update(lines=0, windows=0, max_seq_len=n)
    for line in lines:
        enc = tok.encode(line)
        pieces = [enc, *enc.overflowing]
        if len(pieces) > 1:
            cut["lines"] += 1
            cut["windows"] += len(pieces)
        out += [{"input_ids": np.asarray([e.ids], np.int64), "attention_mask": np.ones((1, len(e.ids)), np.int64),
                 "token_type_ids": np.asarray([e.type_ids], np.int64)} for e in pieces]
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def windows(requests, text: str, size: int) -> list[dict]:
    """The text tokenized whole (bundle tokenizer, no truncation) and cut into windows of `size` tokens."""
    from tokenizers import Tokenizer

    if requests.text is None:
        raise InputError("this export has no tokenizer: text windows need one")
    if size > requests.manifest.settings.max_seq_len:
        raise InputError(f"window of {size} tokens is longer than this export's --max-seq-len "
                         f"{requests.manifest.settings.max_seq_len}")
    tok = Tokenizer.from_str(requests.text.tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()
    ids = np.asarray(tok.encode(text).ids, np.int64)  # [T]
    n = len(ids) // size
    if n == 0:
        raise InputError(f"the text has {len(ids)} tokens, fewer than one window of {size}")
    return [{"input_ids": w[None], "attention_mask": np.ones((1, size), np.int64)}
            for w in ids[: n * size].reshape(n, size)]


def make_batches(spec, inputs: list[dict], batch_size: int) -> list[Batch]:
    """Batches of at most `batch_size` inputs of equal length (inputs.prepare of each, concatenated)."""
    prepared = [prepare(spec, x) for x in inputs]
    by_length: dict[int, list[int]] = {}
    for i, (_, mask) in enumerate(prepared):
        by_length.setdefault(int(mask.sum()), []).append(i)
    out = []
    for n in sorted(by_length):
        idx = by_length[n]
        for k in range(0, len(idx), batch_size):
            group = [prepared[i] for i in idx[k:k + batch_size]]
            token_inputs = {name: np.concatenate([g[0][name][:, :n] for g in group]) for name in group[0][0]}
            out.append(Batch(token_inputs, np.ones((len(group), n), np.int64)))
    return out


def split(batches: list[Batch], held_out: float, seed: int) -> tuple[list[Batch], list[Batch]]:
    """(training, held-out) after a seeded shuffle: whole batches are held out until they hold `held_out` of
    the inputs (at least one batch if held_out > 0), and at least one batch is always left for training."""
    order = np.random.default_rng(seed).permutation(len(batches))
    shuffled = [batches[i] for i in order]
    want = held_out * sum(b.size for b in batches)
    held, n = [], 0
    for b in shuffled[:-1]:
        if held_out <= 0 or (held and n >= want):
            break
        held.append(b)
        n += b.size
    return shuffled[len(held):], held
