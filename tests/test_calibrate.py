"""`prism calibrate` on tiny configs: calibration reduces the distillation loss on held-out inputs, changes
nothing at CR=1 (PRISM is already exact there), and writes a normal export that validates against its own
reference; bad inputs fail with one clear line.

Tolerances:
  * identity at CR=1: every trained value within 1e-6 of where it started (the issue's bound). The student
    equals the teacher to float rounding there (losses ~1e-13, train.EXACT_LOSS is 1e-9), so no step updates.
  * the calibrated export against its own PyTorch reference: validate's fp32 bound, 1e-4 (observed ~1e-6).
  * "reduces the loss": by at least 10% of the held-out loss (3% for Llama, see the test), on inputs never
    trained on. Tiny random models are far from what calibration is for (sharpened random attention), so
    the margin asks for a clear drop, not a particular size.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import inputs_for_arch, sst2_sentences, text_batch, tiny_model
from prism_onnx import models, simulate
from prism_onnx.calibration.distill import Batch, Distiller
from prism_onnx.calibration.train import TrainSettings, calibrate_model
from prism_onnx.cli import main
from prism_onnx.inputs import prepare
from prism_onnx.manifest import PrismSettings
from prism_onnx.reference import prism_model
from prism_onnx.runtime.bundle import Export
from prism_onnx.validate import validate

LONG_PARAGRAPH = " ".join(sst2_sentences(12))  # about 130 tokens
IDENTITY_TOL = 1e-6
EXACT_TOL = 1e-4


def batches(arch, spec, seeds, rows=8, length=16):
    """One batch of `rows` unpadded inputs per seed: random ids of `length` tokens, or random 16x16 images."""
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        if arch.startswith("ViT"):
            x = {"pixel_values": rng.standard_normal((rows, 3, 16, 16)).astype(np.float32)}
        else:
            x = text_batch(30522 if arch.startswith("Bert") else 300, rng, (length,) * rows)
        out.append(Batch(*prepare(spec, x)))
    return out


# Llama (key/value exchange, 2 kv heads) drops least in 60 steps on these random weights: 5% (ViT 29%, BERT
# 18%, GPT-2 16%); its margin is 3%.
@pytest.mark.parametrize("arch,margin", [("ViTForImageClassification", 0.9), ("BertModel", 0.9),
                                         ("GPT2LMHeadModel", 0.9), ("LlamaForCausalLM", 0.97)])
def test_calibration_reduces_held_out_loss(arch, margin):
    model = tiny_model(arch)
    spec = prism_model(model).spec
    train, held = batches(arch, spec, range(20)), batches(arch, spec, range(100, 102))
    settings = PrismSettings(devices=2, compression_ratio=4, window=0)
    _, report = calibrate_model(model, settings, train, held, TrainSettings(steps=60, lr=1e-2))
    assert report.loss_before > 1e-3  # compression costs something here
    assert report.loss_after < margin * report.loss_before, report.to_dict()
    teacher = prism_model(tiny_model(arch))  # an independent measurement of the held-out loss
    measured = Distiller(teacher, prism_model(model), settings).mean_loss(held)
    assert measured == pytest.approx(report.loss_after, rel=1e-6)


@pytest.mark.parametrize("arch", ["BertForSequenceClassification", "GPT2LMHeadModel", "LlamaForCausalLM"])
def test_calibration_at_cr1_changes_nothing(arch):
    model = tiny_model(arch)
    spec = prism_model(model).spec
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm, report = calibrate_model(model, PrismSettings(devices=3, compression_ratio=1), batches(arch, spec, range(6)),
                                 [], TrainSettings(steps=12, lr=2e-2, params=("remote", "norms", "biases")))
    assert report.exact_steps == report.steps == 12
    assert report.max_change <= IDENTITY_TOL
    assert all((v - before[k]).abs().max() <= IDENTITY_TOL for k, v in model.state_dict().items())
    for c in pm.calibration:  # the remote rows' correction is still the identity
        assert float((c.bias_scale.detach() - 1).abs().max()) <= IDENTITY_TOL
        assert float(c.bias_offset.detach().abs().max()) <= IDENTITY_TOL and float(c.up.detach().abs().max()) == 0


def test_new_remote_calibration_is_the_identity():
    """A fresh RemoteCalibration changes no output at CR > 1, bit for bit; a trained one does (so the check
    can fail), and only on rows that stand for several tokens."""
    arch = "GPT2LMHeadModel"
    model = tiny_model(arch)
    inputs = inputs_for_arch(arch)
    ref = simulate(model, inputs, devices=3, compression_ratio=4, window=0, count_bias=True).logits
    pm = prism_model(model)
    try:
        pm.add_calibration(rank=4)
        assert torch.equal(simulate(model, inputs, devices=3, compression_ratio=4, window=0,
                                    count_bias=True).logits, ref)
        with torch.no_grad():
            for c in pm.calibration:
                c.bias_offset.fill_(0.5)
        assert not torch.equal(simulate(model, inputs, devices=3, compression_ratio=4, window=0,
                                        count_bias=True).logits, ref)
        # at CR=1 every row is one token: the calibration is skipped, outputs are the model's
        assert torch.equal(simulate(model, inputs, devices=3, compression_ratio=1).logits,
                           simulate(tiny_model(arch), inputs, devices=3, compression_ratio=1).logits)
    finally:
        pm.calibration = None


@pytest.fixture(scope="module")
def calibrated(exported_graphs, tmp_path_factory):
    """A tiny BERT export (P=2, CR=4) calibrated on SST-2 train sentences through the CLI, and one paragraph
    longer than its --max-seq-len (64): cut into windows, not refused (issue 23). -> (export, calibrated
    export, the data file, the report)."""
    from prism_onnx.exporters.bundle import write_bundles
    from prism_onnx.manifest import ExportSettings

    root = tmp_path_factory.mktemp("calibrate")
    export = write_bundles(exported_graphs["BertModel"], root / "export",
                           ExportSettings(devices=2, compression_ratio=4))
    data = root / "train.txt"
    data.write_text("\n".join(sst2_sentences(120, "train") + [LONG_PARAGRAPH]) + "\n")
    r = CliRunner().invoke(main, ["calibrate", str(export), "--data", str(data), "--out", str(root / "cal"),
                                  "--steps", "20", "--json"])
    assert r.exit_code == 0, r.output
    return export, root / "cal", data, json.loads(r.output[r.output.index("{"):])


def test_calibrated_export_validates_and_records_calibration(calibrated):
    export, out, data, report = calibrated
    m = Export.load(out).manifest
    assert m.export_id != Export.load(export).manifest.export_id
    assert m.settings == Export.load(export).manifest.settings  # the same P, CR, switches, wire
    cal = m.calibration
    assert cal["data_sha256"] == __import__("hashlib").sha256(data.read_bytes()).hexdigest()
    assert cal["steps"] == 20 and cal["trained_parameters"] == report["trained_parameters"] > 0
    assert m.source == str((out / "model").resolve()) and (out / "model" / models.CALIBRATION_FILE).is_file()
    v = validate(out, samples=6)
    assert v["passed"], v["failures"]
    assert v["max_abs_diff_vs_reference"] <= EXACT_TOL and v["max_abs_diff_sent_rows"] <= EXACT_TOL
    assert v["model"] == cal["base_source"]  # cosine_vs_model is against the model calibration started from
    assert 0.5 < v["cosine_vs_model"] < 1.0
    r = CliRunner().invoke(main, ["validate", str(out), "--data", str(data), "--samples", "4", "--json"])  # 4 lines
    assert r.exit_code == 0, r.output
    assert "cosine_vs_model" in json.loads(r.output[r.output.index("{"):])


def test_calibrated_graphs_differ_from_the_uncalibrated(calibrated):
    export, out, _, _ = calibrated
    from prism_onnx.runtime.executor import Executor

    inputs = inputs_for_arch("BertModel")
    a = Executor(export).run(inputs).outputs["last_hidden_state"]
    b = Executor(out).run(inputs).outputs["last_hidden_state"]
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("case", ["no data file", "empty data", "not an export", "bad params"])
def test_bad_input_is_one_clear_line(case, calibrated, tmp_path):
    export, _, data, _ = calibrated
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = {"no data file": [str(export), "--data", str(tmp_path / "missing.txt")],
            "empty data": [str(export), "--data", str(tmp_path / "empty.txt")],
            "not an export": [str(tmp_path), "--data", str(data)],
            "bad params": [str(export), "--data", str(data), "--params", "weights"]}[case]
    r = CliRunner().invoke(main, ["calibrate", *args, "--out", str(tmp_path / "out")])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "Traceback" not in r.output
    expect = {"no data file": "no such file", "empty data": "no text lines", "not an export": "not a prism export",
              "bad params": "unknown parameter group"}[case]
    assert expect in lines[0]
    assert not (tmp_path / "out").exists()


def test_every_text_task_writes_its_calibration_data_into_a_new_folder(tmp_path):
    """`prism evaluate --calibrate-data task` hands each task a folder that does not exist yet (SST-2 once
    failed there); the data is disjoint from what is scored: SST-2 train phrases, WikiText-2 valid."""
    from prism_onnx.data import sst2
    from prism_onnx.evaluate.evaluate import LongText, SST2Probe, WikiTextLM

    path, window = SST2Probe().calibration_data(tmp_path / "a" / "sst2")
    lines = path.read_text().splitlines()
    assert window is None and len(lines) == 8000 and not set(lines) & set(sst2("dev")[0])
    for task in (LongText(), WikiTextLM()):
        path, _ = task.calibration_data(tmp_path / "b" / type(task).__name__)
        assert "valid" in path.name and path.stat().st_size > 10_000


def test_a_line_longer_than_max_seq_len_is_cut_into_windows_not_refused(exported_graphs, calibrated, tmp_path):
    """Issue 23: one paragraph over --max-seq-len (WikiText-2 valid has one of 532 tokens for MiniLM's 512) made
    `prism calibrate` refuse the whole file. Now it is cut into inputs of at most --max-seq-len tokens, each
    with [CLS] ... [SEP] as the tokenizer's own truncation makes them, and the cut is reported (the
    `calibrated` fixture's data holds such a paragraph)."""
    from prism_onnx.calibration.data import read_inputs
    from prism_onnx.exporters.bundle import write_bundles
    from prism_onnx.manifest import ExportSettings
    from prism_onnx.runtime.device import Requests

    export = write_bundles(exported_graphs["BertModel"], tmp_path / "export",
                           ExportSettings(devices=2, compression_ratio=4, max_seq_len=16))
    data = tmp_path / "paragraphs.txt"
    data.write_text(f"a gripping, funny film\n{' '.join(sst2_sentences(6))}\ndull\n")
    cut = {}
    inputs = read_inputs(Requests(Export.load(export).devices[0]), data, cut=cut)
    lengths = [x["input_ids"].shape[1] for x in inputs]
    assert cut["lines"] == 1 and cut["windows"] == len(inputs) - 2 >= 3 and max(lengths) == 16
    assert all(x["input_ids"][0, 0] == 101 and x["input_ids"][0, -1] == 102 for x in inputs)
    _, out, _, report = calibrated  # the CLI run: 120 sentences and one paragraph of more than 64 tokens
    assert report["long_lines_cut"]["lines"] == 1 and report["long_lines_cut"]["windows"] >= 2
    assert report["long_lines_cut"]["max_seq_len"] == 64
    assert Export.load(out).manifest.calibration["long_lines_cut"] == report["long_lines_cut"]
