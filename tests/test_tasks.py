"""Task models (prism_onnx.evaluate.tasks): tiny builds load with from_pretrained, record sane metrics that an
evaluator can reproduce from the saved folder, are deterministic, and are cached by settings.

Every build here uses tiny settings and `root=tmp_path`, never the real cache.
"""

import json
import math

import numpy as np
import pytest
import torch
import transformers as tf

from prism_onnx.data import digits_images, wikitext
from prism_onnx.evaluate import tasks

VIT_TINY = dict(epochs=4, hidden=32, layers=2, heads=2, batch_size=16, lr=1e-3, max_shift=0)
GPT2_TINY = dict(steps=30, vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64, context=64,
                 batch_size=8, warmup=5)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return tasks.cached("vit", tasks.build_vit_digits, tmp_path_factory.mktemp("cache"), **VIT_TINY)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return tasks.cached("gpt2", tasks.build_gpt2_wikitext, tmp_path_factory.mktemp("cache"), **GPT2_TINY)


def task_json(folder):
    return json.loads((folder / "task.json").read_text())


# ---------------------------------------------------------------- ViT digits


def test_digits_split_is_seeded_and_holds_out_360():
    train, test = tasks.digits_split(0)
    assert len(test) == 360 and len(train) == 1797 - 360
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    assert np.array_equal(test, tasks.digits_split(0)[1])
    assert not np.array_equal(test, tasks.digits_split(1)[1])


def test_vit_pixels_are_rescaled_and_normalised():
    pixels, labels = tasks.digits_pixels(tasks.vit_processor())
    images, expected_labels = digits_images(32, 3)
    expected = (images.astype(np.float32) / 255 - 0.5) / 0.5  # [n, 32, 32, 3]
    np.testing.assert_allclose(pixels.numpy(), expected.transpose(0, 3, 1, 2), atol=1e-6)
    assert np.array_equal(labels.numpy(), expected_labels)


def test_random_shift_moves_each_image_and_fills_the_border():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    gen = torch.Generator().manual_seed(0)
    shifted = tasks.random_shift(x, 2, -1.0, gen)
    assert shifted.shape == x.shape and tasks.random_shift(x, 0, -1.0, gen) is x
    for img, out in zip(x, shifted):
        padded = torch.nn.functional.pad(img, (2,) * 4, value=-1.0)  # [3, 10, 10]
        windows = [padded[:, top:top + 6, left:left + 6] for top in range(5) for left in range(5)]
        assert sum(torch.equal(out, w) for w in windows) == 1  # exactly one shift in [-2, 2]^2 explains it


@pytest.mark.long
def test_vit_folder_loads_and_reproduces_recorded_accuracy(vit_dir):
    record = task_json(vit_dir)
    assert record["task"] == "digits"
    assert {k: record["settings"][k] for k in VIT_TINY} == VIT_TINY and record["settings"]["seed"] == 0
    assert record["test_indices"] == tasks.digits_split(0)[1].tolist()
    assert 0.25 < record["test_accuracy"] <= 1  # well above chance (0.1) after 4 short epochs (~0.46)
    assert record["train_seconds"] > 0

    model = tf.ViTForImageClassification.from_pretrained(vit_dir).eval()
    processor = tf.ViTImageProcessor.from_pretrained(vit_dir)
    images, labels = digits_images(32, 3)
    idx = record["test_indices"]
    pixels = processor(images=list(images[idx]), return_tensors="pt")["pixel_values"]  # [360, 3, 32, 32]
    assert tasks.accuracy(model, pixels, torch.from_numpy(labels[idx])) == record["test_accuracy"]


@pytest.mark.long
def test_vit_cache_hit_does_not_retrain(vit_dir):
    mtime = (vit_dir / "model.safetensors").stat().st_mtime_ns
    assert tasks.cached("vit", tasks.build_vit_digits, vit_dir.parent, **VIT_TINY) == vit_dir
    assert (vit_dir / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.long
def test_vit_same_seed_same_weights(vit_dir, tmp_path):
    record = tasks.build_vit_digits(tmp_path, **VIT_TINY)
    assert record["test_accuracy"] == task_json(vit_dir)["test_accuracy"]
    assert (tmp_path / "model.safetensors").read_bytes() == (vit_dir / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- GPT-2 WikiText


@pytest.mark.long
def test_gpt2_folder_loads_and_reproduces_recorded_perplexity(gpt2_dir):
    record = task_json(gpt2_dir)
    assert record["task"] == "wikitext"
    assert {k: record["settings"][k] for k in GPT2_TINY} == GPT2_TINY and record["settings"]["seed"] == 0
    assert 1 < record["test_perplexity"] < 300  # below the vocabulary size: it learned something

    model = tf.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(gpt2_dir)
    assert (gpt2_dir / "tokenizer.json").is_file() and len(tokenizer) == 300
    assert tokenizer.eos_token == tokenizer.pad_token == tasks.EOT
    text = " The song was released in 1998 .\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    ids = tasks.encode(tokenizer, wikitext("test"))
    assert tasks.perplexity(model, ids, context=64, batch=32) == pytest.approx(record["test_perplexity"], rel=1e-6)


@pytest.mark.long
def test_gpt2_same_seed_same_weights_and_perplexity(gpt2_dir, tmp_path):
    record = tasks.build_gpt2_wikitext(tmp_path, **GPT2_TINY)
    assert record["test_perplexity"] == task_json(gpt2_dir)["test_perplexity"]
    assert (tmp_path / "model.safetensors").read_bytes() == (gpt2_dir / "model.safetensors").read_bytes()


@pytest.mark.long
def test_perplexity_is_exp_of_mean_cross_entropy(gpt2_dir):
    model = tf.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    ids = np.random.default_rng(0).integers(0, 300, size=2 * 64 + 21)  # two full windows and a short one
    windows = [ids[:64], ids[64:128], ids[128:]]
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor(w)[None], labels=torch.tensor(w)[None]).loss for w in windows]
    mean_ce = sum(float(loss) * (len(w) - 1) for loss, w in zip(losses, windows)) / (len(ids) - 3)
    assert tasks.perplexity(model, ids, context=64, batch=1) == pytest.approx(math.exp(mean_ce), rel=1e-5)
    assert tasks.perplexity(model, ids.tolist(), context=64, batch=8) == pytest.approx(math.exp(mean_ce), rel=1e-5)


# ---------------------------------------------------------------- cache


def counting_builder():
    """A stand-in builder (with the real builders' signature shape) that counts its calls."""
    calls = []

    def build(out_dir, *, size=1, seed=0, fail=False):
        calls.append(size)
        (out_dir / "weights.bin").write_bytes(bytes(size))
        if fail:
            raise RuntimeError("training diverged")
        return tasks._write_task(out_dir, {"task": "fake", "settings": dict(size=size, seed=seed, fail=fail)})

    return build, calls


def test_cache_hits_when_settings_match(tmp_path):
    build, calls = counting_builder()
    folder = tasks.cached("fake", build, tmp_path, size=3)
    mtime = (folder / "task.json").stat().st_mtime_ns
    assert folder == tmp_path / "fake" and calls == [3]
    assert tasks.cached("fake", build, tmp_path, size=3, seed=0) == folder  # defaults filled in before comparing
    assert calls == [3] and (folder / "task.json").stat().st_mtime_ns == mtime


def test_cache_rebuilds_when_settings_differ(tmp_path):
    build, calls = counting_builder()
    tasks.cached("fake", build, tmp_path, size=3)
    folder = tasks.cached("fake", build, tmp_path, size=5)
    assert calls == [3, 5] and (folder / "weights.bin").stat().st_size == 5
    assert [p.name for p in tmp_path.iterdir()] == ["fake"]  # no temporary folders left


def test_cache_failed_build_leaves_previous_folder(tmp_path):
    build, calls = counting_builder()
    tasks.cached("fake", build, tmp_path, size=3)
    with pytest.raises(RuntimeError, match="diverged"):
        tasks.cached("fake", build, tmp_path, size=5, fail=True)
    assert [p.name for p in tmp_path.iterdir()] == ["fake"]
    assert (tmp_path / "fake" / "weights.bin").stat().st_size == 3


def test_default_root_follows_prism_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path))
    assert tasks.default_root() == tmp_path
    monkeypatch.delenv("PRISM_CACHE")
    assert tasks.default_root().parts[-2:] == (".cache", "tasks")
