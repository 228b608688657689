"""Issue 21: bundles for boards with little disk and memory.

    * each distinct file stored once per export (device folders hard-link one copy), and every device folder
      still verifies and runs alone after being copied elsewhere;
    * the tied embedding stored once per device (embed and token_head read one external-data file);
    * layer graphs made from one traced layer with the other layers' weights equal the traced graphs;
    * a second export of the same model with another CR traces nothing (the graph cache);
    * --quantize int4 bundles run, within a stated bound of the int4 reference.

Tiny random models of conftest.py (GPT-2 ties its head to the embedding; 2 layers, hidden 32).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import hf_forward, inputs_for_arch, tiny_config
from prism_onnx.cli import main
from prism_onnx.exporters.bundle import ExportSettings, write_bundles
from prism_onnx.runtime.bundle import DeviceBundle, Export
from prism_onnx.runtime.executor import Executor

TOL = 1e-4  # fp32 graphs vs PyTorch at CR=1 (tests/test_export.py)


def payload(bundle: Path) -> list[Path]:
    return [bundle / f for f in json.loads((bundle / "manifest.json").read_text())["files"]]


# --------------------------------------------------------------------------------------- store once
def test_export_stores_each_distinct_file_once(make_bundle):
    out = make_bundle("GPT2LMHeadModel", devices=3, compression_ratio=2)
    files = payload(out / "device-0")
    assert len(files) >= 5
    for f in files:
        inodes = {os.stat(out / f"device-{k}" / f.name).st_ino for k in range(3)}
        assert len(inodes) == 1, f.name  # one file, three names
    on_disk = {(s.st_dev, s.st_ino): s.st_size for s in (p.stat() for p in out.rglob("*") if p.is_file())}
    one_device = sum(p.stat().st_size for p in (out / "device-0").rglob("*") if p.is_file())
    assert sum(on_disk.values()) <= 1.3 * one_device  # the whole export: one bundle plus manifests and keys


def test_every_device_folder_verifies_and_runs_alone_when_copied(make_bundle, tmp_path):
    """`scp -r DIR/device-K`: a copy has no hard links; every copied folder verifies on its own, and the
    copies run the same request to the same outputs."""
    out = make_bundle("GPT2LMHeadModel", devices=2, compression_ratio=1)
    boards = tmp_path / "boards"
    boards.mkdir()
    shutil.copy(out / "manifest.json", boards / "manifest.json")
    for k in range(2):
        shutil.copytree(out / f"device-{k}", boards / f"device-{k}")  # copies file contents: no links
        assert all(os.stat(f).st_nlink == 1 for f in payload(boards / f"device-{k}"))
        assert DeviceBundle.load(boards / f"device-{k}").rank == k  # every sha256 and the export id
    inputs = inputs_for_arch("GPT2LMHeadModel")
    want = Executor(out).run(inputs).outputs["logits"]
    got = Executor(boards).run(inputs).outputs["logits"]
    np.testing.assert_array_equal(got, want)


def test_a_change_to_the_shared_copy_is_refused_naming_the_link(make_bundle):
    out = make_bundle("GPT2LMHeadModel", devices=2, compression_ratio=1)
    with open(out / "device-1" / "layer_0.onnx", "r+b") as f:  # in place: device-0's name sees it too
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    from prism_onnx.errors import BundleError

    with pytest.raises(BundleError, match="layer_0.onnx: sha256 mismatch.*hard link"):
        Export.load(out)


# ------------------------------------------------------------------------------------- tied embedding
def test_tied_embedding_is_stored_once_and_read_by_the_head(make_bundle, tiny_dirs):
    from prism_onnx import models

    out = make_bundle("GPT2LMHeadModel", devices=2, compression_ratio=1)
    m = json.loads((out / "device-0" / "manifest.json").read_text())
    data = "embed.onnx.data"
    assert m["graphs"]["embed"]["data"] == [data] and m["graphs"]["token_head"]["data"] == [data]
    assert f"{data}" in m["files"]  # verified like every file
    model = models.load(tiny_dirs["GPT2LMHeadModel"])
    table = model.transformer.wte.weight.detach().numpy()
    assert (out / "device-0" / data).stat().st_size >= table.nbytes
    for graph in ("embed", "token_head"):  # neither graph file holds the table itself
        proto = onnx.load(str(out / "device-0" / f"{graph}.onnx"), load_external_data=False)
        inline = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        assert all(np.prod(t.dims) < table.size for t in inline), graph
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer), graph
    inputs = inputs_for_arch("GPT2LMHeadModel")
    logits = Executor(out).run(inputs).outputs["logits"]
    ref = hf_forward(model, inputs).logits.numpy()
    mask = inputs["attention_mask"].astype(bool)
    assert np.abs(logits[mask] - ref[mask]).max() <= TOL  # the head reads the right bytes, transposed


# ------------------------------------------------------------------------------------ faster tracing
@pytest.fixture(scope="module")
def four_layer_llama():
    import torch
    import transformers as tf

    cfg = tiny_config("LlamaForCausalLM")
    cfg.num_hidden_layers, cfg.initializer_range = 4, 0.2
    torch.manual_seed(0)
    model = getattr(tf, "LlamaForCausalLM")(cfg).eval()
    with torch.no_grad():  # distinct norm weights per layer (a fresh model's are all ones)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_substituted_layer_graph_equals_the_traced_one(four_layer_llama):
    """Layers 0-2 share one structure (layer 3 sends nothing, traced): 1 template trace, 3 substitutions. The
    substituted layer_1 has the traced graph's nodes and its outputs under onnxruntime."""
    import onnxruntime as ort

    from prism_onnx.exporters.graphs import graph_specs, trace_graph
    from prism_onnx.exporters.reuse import LayerGraphs, agrees
    from prism_onnx.program import build_program
    from prism_onnx.reference import prism_model

    pm = prism_model(four_layer_llama)
    specs = {g.name: g for g in graph_specs(pm, build_program(pm.spec))}
    layers = LayerGraphs(list(specs.values()), 20)
    made = {name: layers.graph(specs[name]) for name in ("layer_0", "layer_1", "layer_2", "layer_3")}
    assert layers.counts == {"traced": 2, "substituted": 3}  # the template and the last layer traced
    traced = trace_graph(specs["layer_1"], 20)
    assert [n.op_type for n in made["layer_1"].graph.node] == [n.op_type for n in traced.graph.node]
    g = specs["layer_1"]
    feeds = {n: a.numpy() for n, a in zip(g.input_names, g.args)}
    run = lambda p: ort.InferenceSession(p.SerializeToString()).run(None, feeds)  # noqa: E731
    for a, b in zip(run(made["layer_1"]), run(traced)):
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()  # the same graph: equal but for kernel order
    # and the check that guards every substitution sees a wrong one: layer_1's graph is not layer_2's step
    assert agrees(made["layer_1"], g) and not agrees(made["layer_1"], specs["layer_2"])


# -------------------------------------------------------------------------------------- graph cache
def test_second_export_with_another_cr_traces_nothing(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_GRAPH_CACHE", str(tmp_path / "cache"))
    args = ["export", str(tiny_dirs["GPT2LMHeadModel"]), "-P", "2", "--json"]
    r = CliRunner().invoke(main, [*args, "--cr", "1", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["graphs"]["traced"] >= 1

    import prism_onnx.exporters.reuse as reuse

    def no_tracing(*a, **k):
        raise AssertionError("traced again")

    monkeypatch.setattr(reuse, "trace_graph", no_tracing)
    r = CliRunner().invoke(main, [*args, "--cr", "4", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["graphs"] == {"cached": 4}  # embed, 2 layers, token_head
    a, b = (json.loads((tmp_path / x / "manifest.json").read_text()) for x in "ab")
    assert a["export_id"] != b["export_id"] and a["graphs"] == b["graphs"]
    assert a["files"]["device-0/layer_0.onnx"] == b["files"]["device-0/layer_0.onnx"]
    # a cached file that changed is not used: the entry is dropped and the graphs traced again
    entry = next(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    with open(entry / "layer_0.onnx", "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\xff\xfe")
    r = CliRunner().invoke(main, [*args, "--cr", "2", "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "traced again" in str(r.exception)


# ---------------------------------------------------------------------------------------------- int4
@pytest.fixture(scope="module")
def int4_graphs(exported_graphs, tmp_path_factory):
    """{arch: Graphs}: the session's float32 graphs quantized to int4 (block size 32)."""
    from prism_onnx.exporters.build import quantize_set

    out = {}
    for arch in ("GPT2LMHeadModel", "LlamaForCausalLM"):
        g = exported_graphs[arch]
        folder = tmp_path_factory.mktemp(f"int4-{arch}")
        files = quantize_set(g.folder, g.files, folder, "int4", 32, progress=False)
        for f in g.preprocessing.files():
            shutil.copy(g.folder / f, folder / f)
        out[arch] = replace(g, folder=folder, files=files, quantize="int4", block_size=32)
    return out


def int4_reference(bundle: Path, dst: Path) -> Path:
    """A copy of an int4 export whose graphs compute in float32 with the int4 weights' own values
    (quantize.dequantized); manifests and hashes left as they were (loaded unverified)."""
    from prism_onnx.exporters.quantize import dequantized
    from prism_onnx.exporters.tied import load_graph

    shutil.copytree(bundle, dst)
    for graph in dst.glob("device-*/*.onnx"):
        proto = dequantized(load_graph(graph))
        graph.unlink()
        onnx.save(proto, str(graph))
    return dst


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_int4_bundles_run_within_the_bound_of_the_int4_reference(arch, int4_graphs, tmp_path):
    """Bound: 5e-2 of max |logit| against float32 arithmetic on the same int4 weights. MatMulNBits at
    accuracy level 4 rounds each block of 32 activations to int8 (up to 1/254 of the block's largest value per
    element); over 2 layers and the head that was 1.0e-2 here (GPT-2). Against the float32 model the int4
    weights themselves cost more: checked by `prism validate`'s cosine bound."""
    from prism_onnx.validate import validate

    out = write_bundles(int4_graphs[arch], tmp_path / "int4", ExportSettings(devices=2, compression_ratio=4))
    m = json.loads((out / "device-0" / "manifest.json").read_text())
    assert m["settings"]["quantize"] == "int4" and m["settings"]["block_size"] == 32
    ops = {n.op_type for n in onnx.load(str(out / "device-0" / "layer_0.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and m["graphs"]["layer_0"]["domains"] == ["com.microsoft"]
    if arch == "GPT2LMHeadModel":  # tied: the 8-bit table and the head's weight are one set of bytes
        assert m["graphs"]["token_head"]["data"] == ["embed.onnx.data"]
    inputs = inputs_for_arch(arch)
    mask = inputs["attention_mask"].astype(bool)
    got = Executor(out).run(inputs).outputs["logits"][mask]
    ref = int4_reference(out, tmp_path / "reference")
    want = Executor(Export.load(ref, verify=False)).run(inputs).outputs["logits"][mask]
    assert np.abs(got - want).max() <= 5e-2 * np.abs(want).max()
    report = validate(out, samples=4)
    assert report["tolerance"]["kind"] == "cosine"
    # Against the float32 reference: the weights really are 4-bit, and the outputs keep their direction. These
    # random 2-layer models (hidden 32, weights N(0, 0.2): no structure for 4 bits to keep) measured a mean
    # logits cosine of 0.96 (Llama) and 0.99 (GPT-2); a broken quantization gives ~0. Real models pass
    # validate's own bound (mean 0.98, worst 0.9): SmolLM2 0.9995 / 0.984, docs/RESULTS.md section 12.
    assert report["max_abs_diff_vs_reference"] > 1e-3
    assert report["outputs"]["logits"]["mean_cosine_vs_reference"] > 0.9


def test_int4_bad_block_size_is_one_line(tiny_dirs, tmp_path):
    r = CliRunner().invoke(main, ["export", str(tiny_dirs["GPT2Model"]), "-P", "2", "--cr", "1", "--quantize", "int4",
                                  "--block-size", "48", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "block size 48: choose one of 16, 32, 64, 128, 256" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "x").exists()
