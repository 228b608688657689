"""`prism bench` on a tiny export: the pipeline end to end, and numbers that must hold by construction."""

import json

import pytest
from click.testing import CliRunner

from prism_onnx.cli import main
from prism_onnx.evaluate.bench import bench


@pytest.fixture(scope="module")
def tiny_export(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "export"
    r = CliRunner().invoke(main, ["export", str(tiny_dirs["BertForSequenceClassification"]), "-P", "2", "--cr", "16",
                                  "--no-keep-sinks", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_bench_bytes_flops_and_time(tiny_export):
    r = bench(tiny_export, latency=False, seq_len=64, repeats=1)
    b = r["bytes_per_inference"]
    # 64 tokens, P=2, CR=16: each device sends 2 rows instead of 32 (plus the fixed frame overhead)
    assert 0.05 < b["prism"] / b["baseline"] < 0.1
    f = r["flops_per_device"]
    assert len(f["prism"]) == len(f["baseline"]) == 2 and len(f["single_device"]) == 1
    assert max(f["prism"]) < max(f["baseline"]) < f["single_device"][0]
    assert all(c["segment_means"] > 0 for c in r["flops_by_category"]["prism"])
    # Voltage: every device projects K and V for all N tokens, so the devices' linear FLOPs together exceed
    # the single device's by (P - 1) K/V projections of N rows: 2 matrices of D x D, 2 FLOPs per
    # multiply-add, per layer (tiny BERT: D = 32, 2 layers; N = 64, P = 2). Measured from two sets of graphs.
    lin = lambda k: [c["linear"] for c in r["flops_by_category"][k]]  # noqa: E731
    D, L, N, P = 32, 2, 64, 2
    assert sum(lin("baseline")) - lin("single_device")[0] == (P - 1) * L * 2 * (2 * N * D * D)
    cut = r["flops_cut_vs_baseline"]
    assert cut["linear"] <= cut["linear_bound"] + 1e-9  # the means add K/V rows: never better than the bound
    assert cut["linear_bound"] - cut["linear"] < 0.05
    # the bound (graphs run with no received rows) is the textbook one for an even split with I = 2D (the
    # tiny BERT): PRISM projects Q, O and the MLP (2 + 2r matrices) and K, V (2) for n rows, the baseline
    # K, V for N = P n rows: 1 - (4 + 2r) / (2 + 2r + 2P) with r = 2
    assert cut["linear_bound"] == pytest.approx(1 - 8 / (6 + 2 * P), abs=0.01)  # pooled head on device 0 only
    assert all(t > 0 for t in r["compute_ms_per_device"]["prism"])


def test_bench_with_a_window_counts_its_rows(tiny_export):
    """--window: the export's graphs re-planned with a halo window: per layer, each device sends W more
    rows (less the one mean of W=16 tokens they replace) to the other (an encoder: window on both sides)."""
    from prism_onnx.runtime.wire import frame_nbytes

    plain = bench(tiny_export, latency=False, seq_len=64, repeats=1)
    win = bench(tiny_export, latency=False, seq_len=64, repeats=1, window=16)
    assert (win["window"], win["far"], plain["window"]) == (16, "means", 0)
    assert win["bytes_per_inference"]["baseline"] == plain["bytes_per_inference"]["baseline"]
    extra = win["bytes_per_inference"]["prism"] - plain["bytes_per_inference"]["prism"]
    row = frame_nbytes(1, 1, 32, "float32") - frame_nbytes(1, 0, 32, "float32")  # one row of D=32 and its count
    assert extra == 2 * 2 * (16 - 1) * row  # 2 layers x 2 devices x (16 rows - 1 mean)


def test_bench_cli_latency_over_emulated_links(tiny_export, tmp_path):
    from prism_onnx.testbed import Testbed

    ok, why = Testbed.available()
    if not ok:
        pytest.skip(f"latency needs network namespaces: {why}")
    png = tmp_path / "lat.png"
    r = CliRunner().invoke(main, ["bench", str(tiny_export), "--seq-len", "32", "--repeats", "2",
                                  "--sweep", "1gbit", "--plot", str(png), "--curve", "both", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert set(rep["latency_ms"]) == {"prism", "baseline", "single_device"}
    assert all(v > 0 for v in rep["latency_ms"].values())
    assert set(rep["latency_vs_bandwidth_ms"]) == {"100mbit", "1gbit"}
    assert png.stat().st_size > 1000
    cc = rep["curve_cost"]  # the same deployment with and without CurveZMQ, in this one run
    assert cc["latency_ms_curve"] > 0 and cc["latency_ms_plain"] > 0 and cc["repeats"] == 2


def test_bench_clients_slow_device_and_profile_report_their_fields(tiny_export):
    """The shapes the issue names: `throughput_rps` keyed by client count, `slow_device_latency_ms` with
    even/adaptive/ideal, and a board's weight from `prism profile` (values are timings: only their presence
    and sign are checked here; the measured numbers live in docs/RESULTS.md)."""
    r = CliRunner().invoke(main, ["bench", str(tiny_export), "--no-latency", "--seq-len", "32", "--repeats", "1",
                                  "--clients", "1,2", "--requests", "6", "--slow-device", "1:0.5", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    runs = rep["throughput"]["runs"]
    assert all(run["errors"] == 0 and run["requests"] == 6 and run["p50_ms"] <= run["p90_ms"] for run in runs)
    concurrent = {str(r["clients"]): r["throughput_rps"] for r in runs if r["runners"] == "concurrent"}
    assert rep["throughput_rps"] == concurrent and set(concurrent) == {"1", "2"}  # the summary is the runs'
    assert [r["runners"] for r in runs] == ["sequential", "concurrent", "concurrent"]
    assert set(rep["slow_device_latency_ms"]) == {"even", "adaptive", "ideal"}
    assert rep["slow_device"]["spans"]["even"] == [[0, 16], [16, 32]]
    assert rep["slow_device"]["spans"]["ideal"] == [[0, 21], [21, 32]]  # weights 1 : 0.5 of 30 free tokens
    r = CliRunner().invoke(main, ["profile", str(tiny_export), "--seq-len", "16,32", "--repeats", "1", "--json"])
    assert r.exit_code == 0, r.output
    prof = json.loads(r.output)
    assert ([p["tokens"] for p in prof["points"]] == [16, 32]
            and prof["weight"] == prof["points"][-1]["tokens_per_s"] > 0)
