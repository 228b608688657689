"""Small task models with real, reproducibly trained weights, cached on disk.

    vit_digits()      ViTForImageClassification on scikit-learn's digits (upscaled to 32x32 RGB)
    gpt2_wikitext()   GPT2LMHeadModel with its own byte-level BPE tokenizer, trained on WikiText-2 valid
    llama_wikitext()  LlamaForCausalLM (RMSNorm, rotary, grouped-query attention, gated MLP), the same data,
                      tokenizer recipe and training loop

Each builder writes a `from_pretrained` folder plus `task.json` (task metric, training time, the settings
it was built with). `cached` rebuilds a folder only when the requested settings differ from the recorded ones.
Training is seeded and deterministic on CPU (fixed thread count, deterministic algorithms).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..data import digits_images, wikitext

EOT = "<|endoftext|>"
DIGITS = 1797  # len(sklearn.datasets.load_digits().images)
THREADS = 2  # fixed, so that summation order (and so the weights) does not depend on the machine


# ---------------------------------------------------------------- cache


def default_root() -> Path:
    """$PRISM_CACHE, else `<repo>/.cache/tasks`."""
    env = os.environ.get("PRISM_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "tasks"


def requested_settings(builder: Callable, **kwargs) -> dict:
    """The builder's keyword arguments with its defaults filled in, as JSON would record them."""
    bound = inspect.signature(builder).bind(None, **kwargs)
    bound.apply_defaults()
    settings = dict(bound.arguments)
    settings.pop(next(iter(settings)))  # out_dir
    return json.loads(json.dumps(settings))


def recorded_settings(folder: Path) -> dict | None:
    """The settings stored in `folder/task.json`, or None when there is no (readable) record."""
    try:
        return json.loads((Path(folder) / "task.json").read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return None


def cached(name: str, builder: Callable, root: Path | str | None = None, **kwargs) -> Path:
    """`root/name`, built by `builder(folder, **kwargs)` unless it already holds a build with these settings.

    The build happens in a temporary folder beside the target, renamed into place when complete, so an
    interrupted build never leaves a half-written model behind.
    """
    root = Path(root) if root is not None else default_root()
    dest = root / name
    want = requested_settings(builder, **kwargs)
    if recorded_settings(dest) == want:
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-build-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not
    try:
        builder(tmp, **kwargs)
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _replace_dir(src: Path, dest: Path) -> None:
    """Rename `src` to `dest`, moving a previous `dest` aside first (rename is atomic on one filesystem)."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-old-")) / "old"
        os.rename(dest, old)
    os.rename(src, dest)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def vit_digits(root: Path | str | None = None) -> Path:
    """The cached ViT digits classifier (default settings)."""
    return cached("vit-digits", build_vit_digits, root)


def gpt2_wikitext(root: Path | str | None = None) -> Path:
    """The cached GPT-2 WikiText-2 language model with its tokenizer (default settings)."""
    return cached("gpt2-wikitext", build_gpt2_wikitext, root)


def llama_wikitext(root: Path | str | None = None) -> Path:
    """The cached Llama WikiText-2 language model with its tokenizer (default settings)."""
    return cached("llama-wikitext", build_llama_wikitext, root)


# ---------------------------------------------------------------- shared


@contextmanager
def deterministic(seed: int):
    """Seed torch, fix the thread count and enable deterministic algorithms; restore the global state (RNG
    included) after."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(THREADS)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(strict)
            torch.set_num_threads(threads)


def _write_task(out_dir: Path, record: dict) -> dict:
    """Write `record` as `out_dir/task.json` and return it."""
    (Path(out_dir) / "task.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# ---------------------------------------------------------------- ViT digits


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx) into `load_digits()`: a seeded permutation, the last 20% (360 images) held out."""
    order = np.random.default_rng(seed).permutation(DIGITS)
    n_train = int(0.8 * DIGITS)
    return order[:n_train], order[n_train:]


def vit_processor():
    """The image processor saved with the ViT: rescale 1/255, normalise (x - 0.5) / 0.5, 32x32."""
    return tf.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def digits_pixels(processor) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits through `processor`: pixel_values [1797, 3, 32, 32] float32 and labels [1797] int64."""
    images, labels = digits_images(32, 3)  # [1797, 32, 32, 3] uint8
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]  # [1797, 3, 32, 32]
    return pixels, torch.from_numpy(labels).long()


def random_shift(x: torch.Tensor, max_shift: int, fill: float, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random (dy, dx) in [-max_shift, max_shift], uncovered pixels set to `fill`."""
    if max_shift == 0:
        return x
    B, _, H, W = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, value=fill)  # [B, C, H + 2m, W + 2m]
    tops, lefts = torch.randint(0, 2 * max_shift + 1, (2, B), generator=gen).tolist()
    return torch.stack([padded[i, :, t:t + H, l:l + W] for i, (t, l) in enumerate(zip(tops, lefts))])  # [B, C, H, W]


@torch.no_grad()
def accuracy(model, pixels: torch.Tensor, labels: torch.Tensor, batch: int = 128) -> float:
    """Top-1 accuracy of an image classifier on pixel_values [N, 3, H, W]."""
    was_training = model.training
    model.eval()
    hits = sum(int((model(pixel_values=x).logits.argmax(-1) == y).sum())  # logits [b, labels]
               for x, y in zip(pixels.split(batch), labels.split(batch)))
    model.train(was_training)
    return hits / len(labels)


def build_vit_digits(out_dir: Path | str, *, epochs: int = 150, seed: int = 0, hidden: int = 64, layers: int = 4,
                     heads: int = 4, limit: int | None = None, lr: float = 2e-3, batch_size: int = 64,
                     max_shift: int = 2) -> dict:
    """Train a ViTForImageClassification on the digits (first `limit` training images if given), save it with
    its image processor, and record the held-out accuracy in `task.json`. Returns the task.json dict."""
    settings = {k: v for k, v in locals().items() if k != "out_dir"}

    processor = vit_processor()
    pixels, labels = digits_pixels(processor)
    train_idx, test_idx = digits_split(seed)
    train_idx = train_idx[:limit]
    fill = (0.0 - processor.image_mean[0]) / processor.image_std[0]  # a black pixel after normalisation
    with deterministic(seed):
        cfg = tf.ViTConfig(image_size=32, patch_size=4, num_channels=3, num_labels=10, hidden_size=hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden)
        model = tf.ViTForImageClassification(cfg)
        start = time.perf_counter()
        _train_vit(model, pixels[train_idx], labels[train_idx], epochs=epochs, lr=lr, batch_size=batch_size,
                   shift=lambda x, gen: random_shift(x, max_shift, fill, gen), seed=seed)
        seconds = time.perf_counter() - start
        acc = accuracy(model, pixels[test_idx], labels[test_idx])
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return _write_task(out_dir, {"task": "digits", "test_accuracy": acc, "train_seconds": round(seconds, 2),
                                 "settings": settings, "test_indices": test_idx.tolist()})


def _train_vit(model, pixels: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
               shift: Callable, seed: int) -> None:
    """AdamW with linear warmup (first epoch) and cosine decay; each batch augmented by `shift`."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(labels) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = tf.get_cosine_schedule_with_warmup(opt, per_epoch, epochs * per_epoch)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=gen).split(batch_size):
            loss = model(pixel_values=shift(pixels[idx], gen), labels=labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


# ---------------------------------------------------------------- GPT-2 WikiText


def train_tokenizer(text: str, vocab_size: int, max_length: int):
    """A byte-level BPE tokenizer trained on `text`, as a PreTrainedTokenizerFast (all special tokens EOT)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                                      pad_token=EOT, model_max_length=max_length,
                                      clean_up_tokenization_spaces=False)


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids [T] of a whole text, without the model-length check of `tokenizer(text)`."""
    return np.asarray(tokenizer.backend_tokenizer.encode(text).ids, dtype=np.int64)


@torch.no_grad()
def perplexity(model, token_ids, context: int = 256, batch: int = 8) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of `context` tokens (the last may be
    shorter); every token but the first of each window is predicted once."""
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)  # [T]
    n_full = len(ids) // context
    windows = list(ids[:n_full * context].view(n_full, context).split(batch))  # each [b, context]
    if len(ids) - n_full * context > 1:
        windows.append(ids[n_full * context:][None])  # [1, rest]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w).logits[:, :-1]  # [b, L-1, vocab]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum")
        total, count = total + float(ce), count + w[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def build_gpt2_wikitext(out_dir: Path | str, *, steps: int = 800, seed: int = 0, vocab_size: int = 4096,
                        n_embd: int = 128, n_layer: int = 4, n_head: int = 4, n_positions: int = 512,
                        context: int = 256, lr: float = 3e-3, batch_size: int = 8, warmup: int = 50) -> dict:
    """Train a byte-level BPE tokenizer and a GPT2LMHeadModel on WikiText-2 valid, save both, and record the
    test perplexity (windows of `context` tokens) in `task.json`. Returns the task.json dict."""
    settings = {k: v for k, v in locals().items() if k != "out_dir"}

    def model(tokenizer):
        eot = tokenizer.eos_token_id
        return tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            bos_token_id=eot, eos_token_id=eot, pad_token_id=eot))

    return _build_wikitext_lm(out_dir, model, settings, steps=steps, seed=seed, vocab_size=vocab_size,
                              positions=n_positions, context=context, lr=lr, batch_size=batch_size, warmup=warmup)


def build_llama_wikitext(out_dir: Path | str, *, steps: int = 800, seed: int = 0, vocab_size: int = 4096,
                         hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2, intermediate: int = 352,
                         positions: int = 512, context: int = 256, lr: float = 3e-3, batch_size: int = 8,
                         warmup: int = 50) -> dict:
    """The Llama counterpart of build_gpt2_wikitext: a LlamaForCausalLM of about the GPT-2 task model's size
    (grouped-query attention: `kv_heads` < `heads`; gated MLP of `intermediate` ~ 8/3 hidden, tied embeddings),
    on the same data with the same tokenizer recipe and training loop."""
    settings = {k: v for k, v in locals().items() if k != "out_dir"}

    def model(tokenizer):
        eot = tokenizer.eos_token_id
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=positions,
            tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot))

    return _build_wikitext_lm(out_dir, model, settings, steps=steps, seed=seed, vocab_size=vocab_size,
                              positions=positions, context=context, lr=lr, batch_size=batch_size, warmup=warmup)


def _build_wikitext_lm(out_dir, make_model: Callable, settings: dict, *, steps: int, seed: int, vocab_size: int,
                       positions: int, context: int, lr: float, batch_size: int, warmup: int) -> dict:
    """Tokenizer and `make_model(tokenizer)` trained on WikiText-2 valid; saved with task.json (test perplexity)."""
    text = wikitext("valid")
    tokenizer = train_tokenizer(text, vocab_size, positions)
    train_ids = torch.from_numpy(encode(tokenizer, text))  # [T]
    with deterministic(seed):
        model = make_model(tokenizer)
        start = time.perf_counter()
        _train_lm(model, train_ids, steps=steps, context=context, lr=lr, batch_size=batch_size, warmup=warmup,
                  seed=seed)
        seconds = time.perf_counter() - start
        test_ppl = perplexity(model, encode(tokenizer, wikitext("test")), context)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return _write_task(out_dir, {"task": "wikitext", "test_perplexity": test_ppl, "train_seconds": round(seconds, 2),
                                 "settings": settings})


def _train_lm(model, ids: torch.Tensor, *, steps: int, context: int, lr: float, batch_size: int, warmup: int,
              seed: int) -> None:
    """AdamW with linear warmup and cosine decay on random windows of `context` tokens from ids [T]."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = tf.get_cosine_schedule_with_warmup(opt, min(warmup, steps), steps)
    offsets = torch.arange(context)  # [context]
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - context + 1, (batch_size, 1), generator=gen)  # [b, 1]
        batch = ids[starts + offsets]  # [b, context]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
