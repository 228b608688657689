"""`prism bench`: bytes on the wire, per-device FLOPs and time, end-to-end latency, in one run.

Three deployments of the same graphs are compared (bundles laid out from the export's own graphs, so
nothing is re-traced):
    prism      the export as given (its P, CR, wire precision, sinks)
    baseline   the same P at CR=1, no sinks, float32 wire: uncompressed position-wise partitioning
               (Voltage): every device receives every other token's hidden state
    single     the whole model on one device (P=1)

Bytes come from the runtime's counters, FLOPs from the graphs' shapes (flops.py) for exactly the calls
each device made, time from replaying each device's own calls on one onnxruntime thread, latency from
real runner processes pinned to cores in network namespaces joined by tbf-limited links.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..exporters.bundle import Graphs, write_bundles
from ..runtime.bundle import MANIFEST, read_manifest
from ..runtime.cluster import LocalCluster
from ..runtime.executor import Executor
from .flops import graph_flops
from .load import pinned


def bench_inputs(manifest, seq_len: int | None, seed: int = 0) -> dict:
    """One request: random token ids of `seq_len` (all real tokens), or one random image."""
    spec = manifest.model
    rng = np.random.default_rng(seed)
    if spec.input_kind == "image":
        S, C = spec.image_size, spec.num_channels
        return {"pixel_values": rng.standard_normal((1, C, S, S)).astype(np.float32)}
    n = seq_len or manifest.settings.max_seq_len
    return {"input_ids": rng.integers(1000 if spec.vocab_size > 2000 else 0, spec.vocab_size, (1, n))}


def requested_outputs(manifest) -> list[str] | None:
    """The pooled outputs when the model has them (a classifier's answer lives on device 0; token outputs
    would be gathered across the network), else everything."""
    return list(manifest.model.pooled_outputs) or None


_FLOPS: dict[tuple, dict] = {}


def _flops(bundle, name: str, shapes: tuple) -> dict:
    """graph_flops, memoised by the graph's sha256 and the shapes: every device (and every bundle laid out
    from the same graphs) runs identical files."""
    key = (bundle.manifest.files[bundle.manifest.graphs[name].file], shapes)
    if key not in _FLOPS:
        _FLOPS[key] = graph_flops(bundle.graph(name), {k: list(v) for k, v in shapes})
    return _FLOPS[key]


def received_inputs(program) -> dict[str, set[str]]:
    """Per graph: the inputs that carry received rows (recv:*) or their bias: their axis 1 is R."""
    return {step.graph: {n for n, ref in step.inputs.items() if ref.startswith("recv:") or ref == "plan:remote_bias"}
            for step in program.steps}


def device_work(executor: Executor, inputs: dict, outputs, repeats: int, count_means: bool = True) -> list[dict]:
    """Per device: FLOPs of the graph calls it made (by category), the linear FLOPs of the same calls
    with no received rows (R = 0: the bound that PRISM's means approach from above), and the median time
    to replay the calls alone on one onnxruntime thread."""
    for e in executor.engines:
        e.recorder = []
    executor.run(inputs, outputs)
    remote = received_inputs(executor.program)
    work = []
    for e in executor.engines:
        calls, e.recorder = e.recorder, None
        cats: dict[str, int] = {}
        linear_alone = 0
        for name, feeds in calls:
            shapes = tuple((k, v.shape) for k, v in feeds.items())
            f = _flops(e.bundle, name, shapes)
            for c, v in f["by_category"].items():
                cats[c] = cats.get(c, 0) + v
            alone = tuple((k, (s[0], 0, *s[2:]) if k in remote[name] else s) for k, s in shapes)
            linear_alone += _flops(e.bundle, name, alone)["by_category"]["linear"]
        if not count_means:  # the baseline sends raw hidden states: its identity averager is not real work
            cats.pop("segment_means", None)
        times = []
        # replay on the core the latency run pins this device's runner to (k % cores), not wherever the
        # scheduler puts the bench process: the same core as the runner it is compared with
        pin = hasattr(os, "sched_setaffinity")  # Linux
        mask = os.sched_getaffinity(0) if pin else None
        if pin:
            os.sched_setaffinity(0, {len(work) % (os.cpu_count() or 1)})
        try:
            for _ in range(repeats):  # repeats=0: FLOPs only
                t0 = time.perf_counter()
                for name, feeds in calls:
                    e.sessions[name].run(None, feeds)
                times.append(time.perf_counter() - t0)
        finally:
            if pin:
                os.sched_setaffinity(0, mask)
        work.append({"flops": sum(cats.values()), "by_category": cats, "linear_alone": linear_alone,
                     "time_ms": 1e3 * statistics.median(times) if times else None})
    return work


def latency_ms(bundle: Path, inputs: dict, outputs, bandwidth: str | None, repeats: int, timeout: float,
               secure: bool = True, compute: list | None = None) -> float:
    """Median end-to-end latency of `repeats` requests: one runner per device, each in its own network
    namespace behind a `bandwidth` tbf link, pinned to its own core, one onnxruntime thread; CurveZMQ on
    unless `secure` is False. `compute`: a list that gets, per request, the busiest runner's own
    onnxruntime time for that request (ms)."""
    per = {secure: compute} if compute is not None else None
    return statistics.median(latencies(bundle, inputs, outputs, bandwidth, repeats, timeout, [secure], per)[secure])


def latencies(bundle: Path, inputs: dict, outputs, bandwidth: str | None, repeats: int, timeout: float,
              modes=(True, False), compute: dict | None = None) -> dict[bool, list[float]]:
    """{secure: latencies in ms} for the same deployment run with and without CurveZMQ: one cluster per
    mode, each on its own emulated network, both up at once and asked in turn (A, B, A, B, ...), so that
    both see the same machine load; only one cluster computes at any time. `compute`: {secure: list}
    that gets each request's busiest-runner onnxruntime time (ms), measured inside the runners."""
    from contextlib import ExitStack

    from ..testbed import Testbed

    P = read_manifest(bundle / MANIFEST).devices
    kw = {"outputs": outputs, **{k: v for k, v in inputs.items()}}
    with ExitStack() as stack:
        clusters = {}
        for i, secure in enumerate(modes):
            net = stack.enter_context(Testbed(P, rate=bandwidth, subnet=f"10.{77 + i}.0"))
            pin = (lambda n: lambda k: pinned(k, n.prefix(k)))(net)
            c = stack.enter_context(LocalCluster(bundle, hosts=net.addresses, prefix=pin, timeout=timeout,
                                                 secure=secure))
            c.client.timeout = max(c.client.timeout, 20 * timeout)
            c.client.infer(**kw)  # warm-up
            clusters[secure] = c
        times = {secure: [] for secure in modes}
        for _ in range(repeats):
            for secure, c in clusters.items():
                stats = c.client.infer(**kw)[1]
                times[secure].append(stats["latency_ms"])
                if compute is not None:  # the same request's compute, under the same machine load
                    compute.setdefault(secure, []).append(max(stats["compute_ms"]))
    return times


def cut(a: float, b: float) -> float:
    return 1 - a / b if b else 0.0


def bench(export_dir: str | Path, *, bandwidth: str = "100mbit", seq_len: int | None = None, repeats: int = 3,
          latency: bool = True, sweep: list[str] | None = None, plot: str | Path | None = None,
          timeout: float = 60.0, curve: str = "on", window: int | None = None, far: str | None = None,
          echo=lambda *_: None) -> dict:
    """curve: "on" (latencies with CurveZMQ, as deployed), "off" (--insecure runners), or "both": also
    measure the export's own deployment without CurveZMQ, interleaved with it in the same run, and report
    the cost of encryption and authentication. `window`, `far`: measure the export's graphs with this halo
    window / far context instead of its own (a bundle laid out beside it)."""
    export_dir = Path(export_dir)
    m = read_manifest(export_dir / MANIFEST)
    graphs = Graphs.from_export(export_dir)
    inputs = bench_inputs(m, seq_len)
    outputs = requested_outputs(m)
    n_tokens = inputs["input_ids"].shape[1] if "input_ids" in inputs else m.model.max_positions
    s = m.settings
    changes = {k: v for k, v in (("window", window), ("far", far)) if v is not None}
    s = replace(s, **changes)
    report = {"export": str(export_dir), "model": m.model.architecture, "config": m.config_summary,
              "devices": s.devices, "compression_ratio": s.compression_ratio, "wire_dtype": s.wire_dtype,
              "keep_sinks": s.keep_sinks, "window": s.window, "far": s.far, "tokens": int(n_tokens),
              "outputs": outputs or "all", "bandwidth": bandwidth}
    with tempfile.TemporaryDirectory(prefix="prism-bench-", dir=export_dir.parent) as tmp:
        bundles = {
            "prism": write_bundles(graphs, Path(tmp) / "prism", s, link=True) if changes else export_dir,
            "baseline": write_bundles(graphs, Path(tmp) / "baseline", s.baseline(), link=True),
            "single_device": write_bundles(graphs, Path(tmp) / "single",
                                           replace(s.baseline(), devices=1, split_weights=None), link=True),
        }
        bytes_, work = {}, {}
        for name, b in bundles.items():
            echo(f"measuring bytes and compute: {name}")
            ex = Executor(b)
            res = ex.run(inputs, outputs)
            bytes_[name] = {"total": int(sum(res.stats.bytes_sent)), "sent_per_device": res.stats.bytes_sent}
            work[name] = device_work(ex, inputs, outputs, repeats, count_means=name == "prism")
            ex.close()
        report["bytes_per_inference"] = {"prism": bytes_["prism"]["total"], "baseline": bytes_["baseline"]["total"]}
        report["bytes_ratio_vs_baseline"] = bytes_["prism"]["total"] / bytes_["baseline"]["total"]
        report["bytes_sent_per_device"] = {k: v["sent_per_device"] for k, v in bytes_.items()}
        report["flops_per_device"] = {k: [w["flops"] for w in v] for k, v in work.items()}
        report["flops_by_category"] = {k: [w["by_category"] for w in v] for k, v in work.items()}
        report["compute_ms_per_device"] = {k: [round(w["time_ms"], 2) for w in v] for k, v in work.items()}
        pf, bf = max(report["flops_per_device"]["prism"]), max(report["flops_per_device"]["baseline"])
        lin = lambda k: max(c["linear"] for c in report["flops_by_category"][k])  # noqa: E731
        # the bound: the same calls with no received rows (PRISM with infinitely long segments)
        bound = max(w["linear_alone"] for w in work["prism"])
        report["flops_cut_vs_baseline"] = {"total": cut(pf, bf), "linear": cut(lin("prism"), lin("baseline")),
                                           "linear_bound": cut(bound, lin("baseline"))}
        pt, bt = max(report["compute_ms_per_device"]["prism"]), max(report["compute_ms_per_device"]["baseline"])
        report["compute_time_cut_vs_baseline"] = cut(pt, bt)

        if latency:
            report.update(latency_report(export_dir, bundles, inputs, outputs, bandwidth, sweep, repeats, timeout,
                                         curve, plot, m, n_tokens, echo))
    return report


def latency_report(export_dir: Path, bundles: dict, inputs: dict, outputs, bandwidth: str, sweep, repeats: int,
                   timeout: float, curve: str, plot, m, n_tokens: int, echo) -> dict:
    """Latency of each bundle (PRISM, the baseline, one device) over emulated links at `bandwidth` (and the
    `sweep` rates), with the busiest runner's own compute in the same requests; with curve="both", the
    export's deployment with and without CurveZMQ, interleaved. Without network namespaces: latency_ms None
    and why in latency_skipped."""
    from ..testbed import Testbed

    report, s = {}, m.settings
    ok, why = Testbed.available()
    if not ok:
        report["latency_ms"] = None
        report["latency_skipped"] = why
    else:
        rates = list(dict.fromkeys([bandwidth, *(sweep or [])]))
        table, runner = {}, {}
        report["curve"] = curve
        for rate in rates:
            table[rate] = {}
            for name, b in bundles.items():
                echo(f"measuring latency at {rate}: {name}")
                comp = runner.setdefault(rate, {}).setdefault(name, [])
                table[rate][name] = latency_ms(b, inputs, outputs, rate, repeats, timeout, curve != "off", comp)
        report["latency_ms"] = table[bandwidth]
        # latency against the busiest runner's onnxruntime time in the *same* requests: the replayed
        # compute_ms_per_device is measured minutes earlier, in another process, under another load
        # (a shared machine: other sessions' processes share the cores), so its ratio to latency
        # mixes the runtime's overhead with changes in machine load
        report["runner_compute_ms"] = {k: statistics.median(v) for k, v in runner[bandwidth].items()}
        report["latency_over_runner_compute"] = {k: table[bandwidth][k] / c
                                                 for k, c in report["runner_compute_ms"].items()}
        if curve == "both":
            echo(f"measuring latency at {bandwidth}: prism with and without CurveZMQ, interleaved")
            pair = latencies(export_dir, inputs, outputs, bandwidth, repeats, timeout)
            on, off = statistics.median(pair[True]), statistics.median(pair[False])
            report["curve_cost"] = {
                "latency_ms_curve": on, "latency_ms_plain": off, "overhead": on / off - 1, "repeats": repeats,
                # each request with CurveZMQ against the plain one asked right after it
                "overhead_paired_median": statistics.median(a / b - 1 for a, b in zip(pair[True], pair[False])),
                "latencies_ms": {"curve": pair[True], "plain": pair[False]}}
        report["speedup_vs_single_device"] = table[bandwidth]["single_device"] / table[bandwidth]["prism"]
        report["latency_vs_bandwidth_ms"] = table
        if plot and len(rates) > 1:
            plot_latency(table, plot, title=f"{m.model.architecture} P={s.devices} "
                                            f"CR={s.compression_ratio} N={n_tokens}")
            report["plot"] = str(plot)
    return report


def _mbit(rate: str) -> float:
    for unit, f in (("kbit", 1e-3), ("mbit", 1.0), ("gbit", 1e3)):
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * f
    raise ValueError(rate)


def plot_latency(table: dict, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted(table, key=_mbit)
    x = [_mbit(r) for r in rates]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("prism", "o-"), ("baseline", "s--"), ("single_device", "^:")):
        ax.plot(x, [table[r][name] for r in rates], style, label=name.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth (Mbit/s)")
    ax.set_ylabel("latency per inference (ms)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_load(export_dir, seq_len, clients, texts_file, n_requests: int, inflight: int, batch_pad: bool, slow,
               repeats: int, echo=lambda *_: None) -> dict:
    """`prism bench --clients/--slow-device`: throughput with `clients` concurrent clients (requests: the lines of
    `texts_file`, or the bench's own inputs), and latency with a slowed device (`slow`: (rank, fraction))."""
    from . import load

    export_dir = Path(export_dir)
    m = read_manifest(export_dir / MANIFEST)
    outputs = requested_outputs(m)
    inputs = {**bench_inputs(m, seq_len), "outputs": outputs}
    out = {}
    if clients:
        reqs = [inputs]
        if texts_file:
            lines = [t for t in Path(texts_file).read_text().splitlines() if t.strip()]
            reqs = [{"texts": [t], "outputs": outputs} for t in lines]
        t = load.throughput(export_dir, reqs, clients, n_requests, inflight=inflight, batch_pad=batch_pad, echo=echo)
        out.update(throughput=t, throughput_rps=t["throughput_rps"])
    if slow:
        s = load.slow_device(export_dir, inputs, *slow, repeats=repeats, echo=echo)
        out.update(slow_device=s, slow_device_latency_ms=s["latency_ms"])
    return out


def report_lines(r: dict) -> list[str]:
    """What `prism bench` prints for a report (without --json)."""
    out = []
    out.append(f"{r['model']} P={r['devices']} CR={r['compression_ratio']} wire={r['wire_dtype']} "
               f"sinks={'kept' if r['keep_sinks'] else 'averaged'} window={r['window']} far={r['far']}, "
               f"{r['tokens']} tokens, outputs {r['outputs']}")
    b = r["bytes_per_inference"]
    out.append(f"  bytes per inference: PRISM {b['prism']:,}, CR=1 baseline {b['baseline']:,} "
               f"({100 * r['bytes_ratio_vs_baseline']:.3f}%)")
    f = r["flops_per_device"]
    c = r["flops_cut_vs_baseline"]
    out.append(f"  GFLOPs per device: PRISM {[round(x / 1e9, 2) for x in f['prism']]}, baseline "
               f"{[round(x / 1e9, 2) for x in f['baseline']]}, single device {round(f['single_device'][0] / 1e9, 2)}")
    out.append(f"  FLOPs cut vs baseline (busiest device): total {100 * c['total']:.1f}%, linear layers "
               f"{100 * c['linear']:.1f}% (bound ignoring attention {100 * c['linear_bound']:.1f}%)")
    t = r["compute_ms_per_device"]
    out.append(f"  onnxruntime ms per device (1 thread): PRISM {t['prism']}, baseline {t['baseline']}, "
               f"single {t['single_device']}")
    if r.get("latency_ms"):
        lat = r["latency_ms"]
        out.append(f"  latency at {r['bandwidth']}: PRISM {lat['prism']:.1f} ms, baseline {lat['baseline']:.1f} ms, "
                   f"single device {lat['single_device']:.1f} ms: PRISM {r['speedup_vs_single_device']:.2f}x "
                   f"faster than one device")
    if r.get("latency_over_runner_compute"):
        rc, lo = r["runner_compute_ms"], r["latency_over_runner_compute"]
        out.append("  latency / the busiest runner's own onnxruntime time in the same requests: " + ", ".join(
            f"{k} {lo[k]:.3f}x ({rc[k]:.0f} ms)" for k in lo))
    if r.get("curve_cost"):
        cc = r["curve_cost"]
        out.append(f"  CurveZMQ cost at {r['bandwidth']}: {cc['latency_ms_curve']:.1f} ms with, "
                   f"{cc['latency_ms_plain']:.1f} ms without ({100 * cc['overhead']:+.2f}%; median of the "
                   f"{cc['repeats']} paired ratios {100 * cc['overhead_paired_median']:+.2f}%)")
    elif "latency_skipped" in r:
        out.append(f"  latency skipped: {r['latency_skipped']}")
    if r.get("throughput"):
        t = r["throughput"]
        seq = next(x for x in t["runs"] if x["runners"] == "sequential")
        out.append(f"  throughput (loopback, --max-inflight {t['settings']['max_inflight']}): " + ", ".join(
            f"{k} client(s) {v:.1f} req/s" for k, v in t["throughput_rps"].items()) +
            f"; one request at a time: {seq['throughput_rps']:.1f} req/s, p50 {seq['p50_ms']:.1f} ms")
        for x in t["runs"]:
            out.append(f"    {x['runners']:>10} {x['clients']:>3} client(s): {x['throughput_rps']:.1f} req/s, "
                       f"p50 {x['p50_ms']:.1f} ms, p90 {x['p90_ms']:.1f} ms, errors {x['errors']}")
    if r.get("slow_device"):
        s = r["slow_device"]
        lat = s["latency_ms"]
        out.append(f"  device {s['rank']} at {s['fraction']:g} speed ({s['slowed_by']}): even {lat['even']:.1f} ms, "
                   f"adaptive {lat['adaptive']:.1f} ms, ideal {lat['ideal']:.1f} ms (adaptive/ideal "
                   f"{s['adaptive_vs_ideal']:.3f}, even/ideal {s['even_vs_ideal']:.3f}); adaptive spans "
                   f"{s['spans']['adaptive']}")
    return out
