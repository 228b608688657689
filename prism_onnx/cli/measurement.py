"""Measurement commands (the `export` extra): demo, bench, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import InputError
from .base import (emit, friendly_errors, json_option,
                   main, needs_export_extra, _int_list, _params)


@main.command()
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the export (replaced).")
@click.option("--devices", "-P", type=click.IntRange(min=2), default=2, show_default=True,
              help="Number of devices (runner processes).")
@click.option("--compression-ratio", "--cr", "cr", type=click.IntRange(min=1), default=8, show_default=True,
              help="Segment length CR: one mean row per CR tokens.")
@json_option
@friendly_errors
@needs_export_extra
def demo(out, devices, cr, as_json):
    """MiniLM (real weights) over P runner processes: embedding, bytes exchanged, difference from PyTorch."""
    from ..demo import run_demo

    report = run_demo(out, devices, cr, echo=(lambda *_: None) if as_json else click.echo)
    emit(report, as_json, lambda r: None)  # the human report was echoed as it came


@main.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--bandwidth", default="100mbit", show_default=True, help="Link rate for the latency run (tc tbf).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Tokens per request (default: max).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs per measurement (the median is reported).")
@click.option("--sweep", default=None, help="More bandwidths for the latency plot, e.g. 10mbit,1gbit.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="PNG: latency vs bandwidth.")
@click.option("--no-latency", is_flag=True, help="Skip the multi-process latency run.")
@click.option("--curve", type=click.Choice(["on", "off", "both"]), default="on", show_default=True,
              help="Latency runs with CurveZMQ (on), without (off), or both: the export's deployment run both "
                   "ways, interleaved in one run, and the cost of CurveZMQ reported.")
@click.option("--clients", default=None, metavar="K[,K...]",
              help="Also measure throughput with K concurrent closed-loop clients (e.g. 1,8), against one client "
                   "of runners that take one request at a time.")
@click.option("--texts-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --clients: the requests are these texts, one per line (default: random ids of --seq-len).")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=200, show_default=True,
              help="With --clients: requests per client count.")
@click.option("--max-inflight", "inflight", type=click.IntRange(1, 16), default=1, show_default=True,
              help="With --clients: the runners' --max-inflight.")
@click.option("--batch-pad", "bench_batch_pad", is_flag=True,
              help="With --clients: the runners batch requests of different lengths too (prism run --batch-pad).")
@click.option("--window", type=click.IntRange(min=0), default=None,
              help="Measure with this halo window W instead of the export's (the same graphs, re-planned).")
@click.option("--far", type=click.Choice(["means", "none"]), default=None,
              help="Measure with this far context instead of the export's.")
@click.option("--slow-device", default=None, metavar="RANK:FRACTION",
              help="Also measure latency with device RANK at FRACTION of a core (cgroup CPU quota; emulated where "
                   "cgroups are not available) under an even, the adaptive and the ideal split.")
@json_option
@friendly_errors
@needs_export_extra
def bench(export_dir, bandwidth, seq_len, repeats, sweep, plot, no_latency, curve, clients, texts_file, n_requests,
          inflight, bench_batch_pad, window, far, slow_device, as_json):
    """Bytes, per-device FLOPs and time, and latency of EXPORT_DIR vs CR=1 and vs one device; with --clients,
    throughput; with --slow-device, the adaptive split against an even and the ideal one."""
    from ..evaluate import load
    from ..evaluate.bench import bench as run_bench, bench_load, report_lines

    counts = _int_list(clients) if clients else None
    if counts and any(k < 1 for k in counts):
        raise click.BadParameter("client counts must be >= 1", param_hint="--clients")
    from ..runtime.bundle import MANIFEST, read_manifest

    m = read_manifest(Path(export_dir) / MANIFEST)
    slow = None
    if slow_device:
        try:
            slow = load.parse_slow_device(slow_device, m.devices)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--slow-device") from None
    echo = (lambda *_: None) if as_json else (lambda m: click.echo(m, err=True))
    report = run_bench(export_dir, bandwidth=bandwidth, seq_len=seq_len, repeats=repeats, latency=not no_latency,
                       sweep=sweep.split(",") if sweep else None, plot=plot, curve=curve, window=window, far=far,
                       echo=echo)
    if counts or slow:
        report.update(bench_load(export_dir, seq_len, counts, texts_file, n_requests, inflight, bench_batch_pad, slow,
                                 repeats, echo))
    emit(report, as_json, lambda r: click.echo("\n".join(report_lines(r))))


def _wire_list(text: str) -> list[str]:
    from ..manifest import WIRE_DTYPES

    wires = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in wires if w not in WIRE_DTYPES]
    if bad or not wires:
        raise click.BadParameter(f"'{text}': wire precisions are {', '.join(WIRE_DTYPES)}", param_hint="--wire")
    return wires


def _switch(text: str) -> list[bool]:
    return {"both": [True, False], "on": [True], "off": [False]}[text]


@main.command()
@click.option("--task", type=click.Choice(["sst2", "longtext", "digits", "wikitext", "wikitext-llama",
                                           "wikitext-smollm2"]), required=True,
              help="Task and its model: SST-2 accuracy, long-text agreement, digits accuracy, WikiText perplexity "
                   "(task models trained here, or the real SmolLM2-135M).")
@click.option("--devices", "-P", default="2,4", show_default=True, help="Comma-separated P values.")
@click.option("--compression-ratio", "--cr", "crs", default="1,4,16,64,128", show_default=True,
              help="Comma-separated CR values.")
@click.option("--count-bias", type=click.Choice(["both", "on", "off"]), default="both", show_default=True,
              help="Rows with the log(count) attention bias, without, or both.")
@click.option("--sinks", type=click.Choice(["both", "on", "off"]), default="both", show_default=True,
              help="Rows with sink tokens kept as their own segments, averaged, or both.")
@click.option("--window", "windows", default="0", show_default=True,
              help="Comma-separated halo windows W (tokens each device receives at full resolution).")
@click.option("--far", type=click.Choice(["means", "none", "both"]), default="means", show_default=True,
              help="Remote tokens outside the window: their Segment Means, nothing (window and sinks only), or both.")
@click.option("--wire", "wire_dtypes", default="float32", show_default=True,
              help="Comma-separated wire precisions of the exchanged rows (float32, float16, int8).")
@click.option("--bounds/--no-bounds", default=True, show_default=True,
              help="Also score the masked full model of every (P, W, sinks): each partition alone and partition + "
                   "window (decoders, BERT and RoBERTa).")
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Language tasks: tokens per window (default 256; 512 for wikitext-smollm2).")
@click.option("--prefix", type=click.IntRange(min=1), default=None,
              help="Language tasks: score generation continuations: prefill this many tokens of each window over "
                   "the devices, decode the rest on the tail from its compressed prefix cache.")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Inputs to evaluate (default: task's).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="PNG: metric vs CR and vs bytes (and NAME-pareto.png: bytes vs metric, with windows).")
@click.option("--save", type=click.Path(dir_okay=False), default=None, help="Also write the JSON report here.")
@click.option("--calibrate-data", default=None,
              help="Also calibrate every setting with CR > 1 (prism calibrate) and score it again: 'task' for the "
                   "task's own calibration data (disjoint from what is scored), or a text file / image folder.")
@click.option("--calibrate-steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Training steps per setting.")
@click.option("--calibrate-time-budget", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds of training per setting at most.")
@click.option("--calibrate-params", default="remote,norms", show_default=True, callback=_params,
              help="Parameter groups to train (remote, norms, biases).")
@click.option("--calibrate-lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True,
              help="Adam learning rate.")
@click.option("--calibrate-window", type=click.IntRange(min=2), default=None,
              help="Read a --calibrate-data text file as running text in windows of this many tokens.")
@json_option
@friendly_errors
@needs_export_extra
def evaluate(task, devices, crs, count_bias, sinks, windows, far, wire_dtypes, bounds, seq_len, prefix, samples, plot,
             save,
             calibrate_data, calibrate_steps, calibrate_time_budget, calibrate_params, calibrate_lr, calibrate_window,
             as_json):
    """Task metric of the full model and of PRISM (through exported bundles) over P, CR and the switches;
    with --calibrate-data, also after calibration."""
    from ..calibration.train import TrainSettings
    from ..evaluate.evaluate import Calibration, evaluate as run_eval, make_task, plot as plot_report, summarize

    if (seq_len or prefix) and not task.startswith("wikitext"):
        raise click.BadParameter("--seq-len and --prefix are for the language tasks (wikitext*)", param_hint="--task")
    try:
        task_obj = make_task(task, samples, seq_len, prefix)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--prefix") from None

    calibration = None
    if calibrate_data is not None:
        if calibrate_data != "task" and not Path(calibrate_data).exists():
            raise InputError(f"{calibrate_data}: no such file or folder")
        calibration = Calibration(TrainSettings(steps=calibrate_steps, time_budget=calibrate_time_budget,
                                                params=calibrate_params, lr=calibrate_lr),
                                  None if calibrate_data == "task" else calibrate_data, calibrate_window)
    report = run_eval(task, devices=_int_list(devices), compression_ratios=_int_list(crs),
                      count_bias=_switch(count_bias), keep_sinks=_switch(sinks), windows=_int_list(windows),
                      far={"both": ["means", "none"]}.get(far, [far]), wire_dtypes=_wire_list(wire_dtypes),
                      bounds=bounds, task_obj=task_obj,
                      calibration=calibration,
                      echo=(lambda *_: None) if as_json else (lambda m: click.echo(m, err=True)),
                      progress=not as_json)
    report["summary"] = summarize(report)
    if plot:
        plot_report(report, plot)
        report["plot"] = plot
    if save:
        Path(save).write_text(json.dumps(report, indent=2))

    def human(r):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{r['task']} ({r['metric']}), full model {r['full_model']:.4f}, {r['inputs']} inputs")
        cal = r.get("calibration") is not None
        agree = any("agreement" in row for row in r["rows"])
        cols = ["P", "CR", "W", "count bias", "sinks", r["metric"], "delta"] + (["top-1 agree"] if agree else []) + \
            (["calibrated", "delta"] if cal else [])
        for col in cols + ["bytes/inference", "vs baseline"]:
            table.add_column(col, justify="right")
        for row in r["rows"]:
            after = ([f"{row['calibrated']:.4f}", f"{row['delta_calibrated']:+.4f}"] if "calibrated" in row
                     else ["", ""]) if cal else []
            table.add_row(str(row["devices"]), str(row["compression_ratio"]) if row["far"] == "means" else "no means",
                          str(row["window"]), "on" if row["count_bias"] else "off",
                          "on" if row["keep_sinks"] else "off",
                          f"{row[r['metric']]:.4f}", f"{row['delta']:+.4f}",
                          *([f"{100 * row['agreement']:.1f}%"] if agree else []), *after,
                          f"{row['bytes_per_inference']:,.0f}", f"{100 * row['bytes_vs_baseline']:.2f}%")
        Console().print(table)
        for b in r.get("bounds", []):
            click.echo(f"  bound P={b['devices']} W={b['window']} sinks={'on' if b['keep_sinks'] else 'off'} "
                       f"({b['bound']}): {r['metric']} {b[r['metric']]:.4f}" +
                       (f", top-1 agreement {100 * b['agreement']:.1f}%" if "agreement" in b else ""))
        for k, v in r["summary"].items():
            click.echo(f"  {k}: {v}")

    emit(report, as_json, human)
