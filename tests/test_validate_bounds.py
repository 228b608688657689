"""`prism validate`'s bounds (prism_onnx/validate.py): relative to the output's magnitude, so that they hold
for a 30-layer model with logits up to ~40 as for a 2-layer test model, and still fail a changed weight;
at CR > 1 the distance from the unpartitioned model is reported in full and fails only when asked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from prism_onnx.cli import main
from prism_onnx.manifest import ExportSettings
from prism_onnx.runtime.bundle import content_digest, sha256_file
from prism_onnx.validate import RTOL, tolerance, validate

SMOLLM2 = Path(os.environ.get("PRISM_SMOLLM2", "/work/cache/smollm2-135m"))  # float32 transformers folder


def test_the_bound_is_relative_to_the_outputs_magnitude():
    bound = tolerance(ExportSettings(devices=2, compression_ratio=1))
    assert bound.kind == "relative" and bound.rtol == RTOL
    # the SmolLM2 run: 6.1e-4 on logits up to ~28 is float32 kernel order (2.2e-5 relative) ...
    assert bound.allows(6.1e-4, 28.0)
    # ... while the same difference on values of order 1 is not
    assert not bound.allows(6.1e-4, 1.0)
    quantized = ExportSettings(devices=2, compression_ratio=1, quantize="int4")
    assert tolerance(quantized).kind == "cosine"
    assert tolerance(quantized, rtol=0.05).kind == "relative"  # asked for: the user's bound


def test_cr_above_1_reports_the_cost_and_fails_only_when_asked(make_bundle):
    out = make_bundle("GPT2LMHeadModel", devices=2, compression_ratio=4, window=0)  # no halo: compression shows
    report = validate(out, samples=4)
    assert report["passed"], report["failures"]
    o = report["outputs"]["logits"]
    assert o["min_cosine_vs_model"] <= o["mean_cosine_vs_model"] < 1.0  # compression cost, reported
    assert 0.0 <= report["top1_agreement_vs_model"] <= 1.0 and o["rel_diff_vs_model"] > RTOL
    asked = validate(out, samples=4, min_model_cosine=o["mean_cosine_vs_model"] + 1e-4)
    assert not asked["passed"] and "--min-cosine-vs-model" in asked["failures"][0]
    r = CliRunner().invoke(main, ["validate", str(out), "--samples", "4"])
    assert r.exit_code == 0 and "not checked: what CR=4 cost" in r.output and "top-1 agreement" in r.output
    r = CliRunner().invoke(main, ["validate", str(out), "--samples", "4", "--min-cosine-vs-model", "0.99999"])
    assert r.exit_code == 1 and "FAIL logits: mean cosine vs the unpartitioned model" in r.output


def rewrite_weight(out: Path, graph: str, factor: float) -> None:
    """Scale the first 2-D weight of `graph` on every device by `factor`, and rewrite every sha256 and the
    export id to match (as a buggy exporter would leave it): only the numbers can tell."""
    export_id = None
    for dev in sorted(out.glob("device-*")):
        path = dev / f"{graph}.onnx"
        proto = onnx.load(str(path))
        init = next(i for i in proto.graph.initializer if len(i.dims) == 2)
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * factor, init.name))
        onnx.save(proto, str(path.with_suffix(".new")))  # a file of its own: the devices hard-link one copy
        path.with_suffix(".new").replace(path)
        m = json.loads((dev / "manifest.json").read_text())
        m["files"][path.name] = sha256_file(path)
        m["export_id"] = export_id = content_digest(m, m["files"])
        (dev / "manifest.json").write_text(json.dumps(m))
    top = json.loads((out / "manifest.json").read_text())
    top["export_id"] = export_id
    top["files"] = {rel: sha256_file(out / rel) for rel in top["files"]}
    (out / "manifest.json").write_text(json.dumps(top))


@pytest.mark.long
@pytest.mark.skipif(not SMOLLM2.is_dir(), reason=f"no SmolLM2 folder at {SMOLLM2} (PRISM_SMOLLM2)")
def test_smollm2_passes_at_cr1_and_a_changed_weight_fails(tmp_path):
    """30 layers, 49,152 logits: the relative bound holds at CR=1 (the absolute 1e-4 did not, issue 21), and
    a 5% change of one projection in layer 14 is caught."""
    out = tmp_path / "smollm2"
    r = CliRunner().invoke(main, ["export", str(SMOLLM2), "-P", "2", "--cr", "1", "--max-seq-len", "512",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["validate", str(out), "--samples", "8", "--json"])
    rep = json.loads(r.output)
    print("SmolLM2 CR=1:", {k: rep[k] for k in ("max_abs_diff_vs_model", "rel_diff_vs_model", "rel_diff_sent_rows")})
    assert r.exit_code == 0 and rep["passed"], rep["failures"]
    assert rep["rel_diff_vs_model"] <= RTOL and rep["top1_agreement_vs_model"] == 1.0
    rewrite_weight(out, "layer_14", 1.05)
    r = CliRunner().invoke(main, ["validate", str(out), "--samples", "8", "--json"])
    rep = json.loads(r.output)
    print("SmolLM2, layer 14 changed by 5%:", rep["rel_diff_vs_reference"], rep["failures"])
    assert r.exit_code == 1 and not rep["passed"] and rep["rel_diff_vs_reference"] > RTOL
    assert np.isfinite(rep["max_abs_diff_vs_reference"])
