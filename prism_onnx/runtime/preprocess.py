"""Text and image preprocessing on the board: `tokenizers` and Pillow + numpy, no transformers.

A bundle carries `tokenizer.json` (text models) or `preprocessor_config.json` (image models, the
transformers image-processor format); these classes reproduce what the transformers tokenizer
(`padding=True, truncation=True`) and `ViTImageProcessor` return.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..errors import InputError, too_long

# PIL resample codes as stored by transformers image processors (PILImageResampling values)
_PIL_RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}

DEFAULT_IMAGE_CONFIG = {
    "do_resize": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}


class TextPreprocessor:
    """Texts -> input_ids, attention_mask, token_type_ids, padded to the longest (on the right; on the left
    for generation, so that every row ends with its last real token). A text longer than `max_length`
    tokens is refused, naming it: it is never cut silently."""

    def __init__(self, tokenizer_file: str | Path, max_length: int, pad_id: int | None = None):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.max_length = int(max_length)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        if pad_id is None:
            pad = self.tokenizer.padding
            pad_id = pad["pad_id"] if pad else 0
        self.pad_id = int(pad_id)

    def __call__(self, texts: list[str], left: bool = False) -> dict[str, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts or any(not isinstance(t, str) for t in texts):
            raise InputError("text input must be one or more strings")
        enc = self.tokenizer.encode_batch(list(texts))
        for i, e in enumerate(enc):
            if len(e.ids) > self.max_length:
                raise too_long(f"text {i} has {len(e.ids)} tokens, beyond this export's --max-seq-len "
                                 f"{self.max_length}; shorten it or export with a larger --max-seq-len")
        n = max(len(e.ids) for e in enc)
        out = {k: np.zeros((len(enc), n), np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
        out["input_ids"][:] = self.pad_id
        for i, e in enumerate(enc):
            row = slice(n - len(e.ids), n) if left else slice(0, len(e.ids))
            out["input_ids"][i, row], out["attention_mask"][i, row] = e.ids, 1
            out["token_type_ids"][i, row] = e.type_ids
        return out

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)


class ImagePreprocessor:
    """Images (paths, PIL images or HWC uint8 arrays) -> pixel_values [B, C, H, W] float32."""

    def __init__(self, config: dict, image_size: int, max_pixels: int = 4096 * 4096):
        self.config = {**DEFAULT_IMAGE_CONFIG, **config}
        self.image_size = int(image_size)
        self.max_pixels = max_pixels

    @classmethod
    def from_file(cls, path: str | Path, image_size: int) -> "ImagePreprocessor":
        return cls(json.loads(Path(path).read_text()), image_size)

    def _one(self, image) -> np.ndarray:
        from PIL import Image

        if isinstance(image, (str, Path, io.IOBase)):
            try:
                opened = Image.open(image)  # reads the header only: the size is checked before decoding
                if opened.size[0] * opened.size[1] > self.max_pixels:
                    raise too_long(f"image of {opened.size[0]}x{opened.size[1]} pixels exceeds the limit of "
                                     f"{self.max_pixels:,} pixels")
                opened.load()
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                name = image if isinstance(image, (str, Path)) else "sent by the client"
                raise InputError(f"cannot read image {name}: {e}") from None
            image = opened
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.stack([image] * 3, axis=-1)
            if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
                raise InputError(f"an image array must be HxW or HxWxC (C in 1, 3, 4), got {image.shape}")
            image = Image.fromarray(np.asarray(image, dtype=np.uint8).squeeze(-1) if image.shape[-1] == 1
                                    else np.asarray(image, dtype=np.uint8))
        image = image.convert("RGB")
        c = self.config
        if c["do_resize"]:
            size = c.get("size") or {"height": self.image_size, "width": self.image_size}
            resample = getattr(Image.Resampling, _PIL_RESAMPLE[int(c["resample"])])
            image = image.resize((int(size["width"]), int(size["height"])), resample=resample)
        x = np.asarray(image, dtype=np.float32)  # [H, W, C]
        if c["do_rescale"]:
            x = x * np.float32(c["rescale_factor"])
        if c["do_normalize"]:
            x = (x - np.asarray(c["image_mean"], np.float32)) / np.asarray(c["image_std"], np.float32)
        return x.transpose(2, 0, 1)  # [C, H, W]

    def __call__(self, images) -> dict[str, np.ndarray]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        return {"pixel_values": np.stack([self._one(im) for im in images]).astype(np.float32)}


def load_pixel_file(path: str | Path) -> np.ndarray:
    """A `.npy` file holding pixel_values ([C, H, W] or [B, C, H, W]) that are already preprocessed."""
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read pixel array {path}: {e}") from None
    return x[None] if x.ndim == 3 else x
