"""Authoring commands (a workstation with the `export` extra, except inspect and keys): simulate, export,
validate, calibrate, inspect, keys."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..manifest import ExportSettings, PrismSettings
from .base import (emit, friendly_errors, input_options, json_option,
                   main, needs_export_extra, one_input_kind, parse_ids, settings_options, _params)


@main.command()
@click.argument("model")
@settings_options(PrismSettings)
@input_options
@json_option
@friendly_errors
@needs_export_extra
def simulate(model, texts, images, input_ids, as_json, **settings):
    """Run MODEL as P simulated devices (PyTorch) and compare with the unpartitioned model."""
    from ..reference import simulate_report

    kind = one_input_kind(texts, images, input_ids)
    report = simulate_report(model, PrismSettings(**settings), kind=kind, texts=texts, images=images,
                             input_ids=parse_ids(input_ids) if input_ids else None)
    emit(report, as_json, _print_simulate)


def _print_simulate(r):
    m = r["model"]
    click.echo(f"model {m['model_type']} {m['architecture']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
               f"{m['num_heads']} heads")
    s = r["settings"]
    click.echo(f"P={s['devices']} CR={s['compression_ratio']} count_bias={'on' if s['count_bias'] else 'off'} "
               f"sinks={'kept' if s['keep_sinks'] else 'averaged'} window={s['window']} far={s['far']} "
               f"wire={s['wire_dtype']}; input {r['batch']} x {r['tokens']} tokens")
    for name, o in r["outputs"].items():
        click.echo(f"  {name} {o['shape']}: mean {o['mean']:+.5f} std {o['std']:.5f} first {o['first']}; "
                   f"max |diff| vs unpartitioned {o['max_abs_diff_vs_model']:.3g}, cosine {o['cosine_vs_model']:.6f}")
    click.echo(f"  {'device':>6} {'tokens':>12} {'owned':>6} {'K/V rows':>9} {'rows sent':>10} "
               f"{'bytes sent/layer':>17}")
    for d in r["per_device"]:
        click.echo(f"  {d['rank']:>6} {str(d['span']):>12} {d['tokens']:>6} {d['kv_rows']:>9} {d['rows_sent']:>10} "
                   f"{d['bytes_sent_per_layer']:>17,}")
    t = r["traffic"]
    click.echo(f"  bytes/layer, all devices: {t['bytes_per_layer']:,} vs {t['baseline_bytes_per_layer']:,} "
               f"uncompressed (CR=1 float32): {100 * t['ratio_vs_baseline']:.2f}%")


@main.command()
@click.argument("model")
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True, help="Output folder.")
@settings_options(ExportSettings)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Reuse and keep this model's graphs in the graph cache ($PRISM_GRAPH_CACHE, default "
                   "~/.cache/prism-onnx/graphs): another export of the same model with other settings traces "
                   "nothing.")
@json_option
@friendly_errors
@needs_export_extra
def export(model, out, overwrite, cache, as_json, **settings):
    """Export MODEL (hub id, folder, or .gguf file) to one ONNX bundle per device in OUT/device-K."""
    import time

    from ..precheck import OptionProblem, check_export

    settings = ExportSettings(**settings)
    try:
        check_export(model, out, settings, overwrite)  # before torch and the model load: seconds, not at the end
    except OptionProblem as e:
        raise click.BadParameter(str(e), param_hint=e.option) from None
    from ..exporters.bundle import disk_bytes, export as do_export
    from ..runtime.bundle import MANIFEST, read_manifest

    t0 = time.perf_counter()
    made: dict = {}
    path = do_export(model, out, settings, overwrite=overwrite, progress=not as_json, made=made,
                     cache="default" if cache else None)
    report = {"settings": settings.to_dict(), "model": model, "out": str(path), "devices": settings.devices,
              "export_id": read_manifest(Path(path) / MANIFEST).export_id, "total_bytes": disk_bytes(path),
              "device_bytes": disk_bytes(Path(path) / "device-0"), "graphs": made,
              "seconds": round(time.perf_counter() - t0, 3)}
    emit(report, as_json, lambda r: click.echo(
        f"exported {model} to {path}: {settings.devices} device bundles of {r['device_bytes'] / 1e6:.1f} MB, "
        f"{r['total_bytes'] / 1e6:.1f} MB on disk (each file once), {r['seconds']:.1f} s; graphs "
        + ", ".join(f"{v} {k}" for k, v in made.items())))


@main.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--samples", type=click.IntRange(min=1), default=8, show_default=True,
              help="Inputs to run (SST-2 dev sentences, digits images or random ids, unless --data).")
@click.option("--data", type=click.Path(exists=True), default=None,
              help="Your own inputs: a text file (one per line) or a folder of images.")
@click.option("--model", "model", default=None, help="PyTorch model to compare with (default: the export's source).")
@click.option("--rtol", type=click.FloatRange(min=0), default=None,
              help="Relative term of the bound: max |diff| <= atol + rtol * max |reference| (default 1e-4; "
                   "given for a --quantize export, it replaces the cosine bound).")
@click.option("--atol", type=click.FloatRange(min=0), default=None, help="Absolute term of the bound (default 1e-6).")
@click.option("--min-cosine-vs-model", "min_model_cosine", type=click.FloatRange(-1, 1), default=None,
              help="Also fail when an output's mean cosine against the unpartitioned model is below this "
                   "(at CR > 1 it is otherwise reported, never failed on).")
@json_option
@friendly_errors
@needs_export_extra
def validate(export_dir, samples, data, model, rtol, atol, min_model_cosine, as_json):
    """Run EXPORT_DIR's bundles (onnxruntime) and PyTorch on the same inputs.

    \b
    Exit 1 when the bundles differ from the PyTorch PRISM reference run with the
    rows the devices really received, in the rows sent or in any output, by more
    than  atol + rtol * max |reference value|  (default rtol 1e-4, atol 1e-6), or,
    for --quantize exports, below a mean / worst cosine per output row of 0.98 /
    0.9 (int8) or 0.95 / 0.8 (int4). At CR=1 (fp32 weights and wire) the outputs
    must also be within that bound of the unpartitioned model.
    \b
    Why relative: onnxruntime and PyTorch sum the same float32 math in other
    orders, which differ by a few float32 roundings (6e-8) of the values summed
    at every operation; depth carries them to the output, so the difference
    scales with the output's magnitude and the number of layers. Observed:
    ~1e-6 of max |value| for 2-layer models, 3e-6 to 2.2e-5 for SmolLM2-135M
    (30 layers, logits up to ~40): 1e-4 leaves 4.5x; a changed weight moves
    outputs by 1e-2 of max |value| or more.
    \b
    Reported, not failed on (unless --min-cosine-vs-model): how far the bundles
    are from the unpartitioned model at CR > 1 (max |diff|, mean and worst
    cosine per row, top-1 agreement of logits): what compression costs.
    """
    from ..validate import summary_lines, validate as run_validate

    report = run_validate(export_dir, samples=samples, model=model, data=data, progress=not as_json, rtol=rtol,
                          atol=atol, min_model_cosine=min_model_cosine)
    emit(report, as_json, lambda r: click.echo("\n".join(summary_lines(r))))
    if not report["passed"]:
        sys.exit(1)


@main.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--data", required=True, type=click.Path(),
              help="Unlabeled in-domain inputs: a text file (one input per line) or a folder of images.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder of the calibrated export.")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="Optimiser steps.")
@click.option("--time-budget", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds of training at most (stops before --steps if reached).")
@click.option("--params", default="remote,norms", show_default=True, callback=_params,
              help="Parameter groups to train: remote (per-layer correction of received mean rows: count-bias "
                   "scale and offset per head, low-rank row correction), norms (LayerNorm/RMSNorm affine), biases.")
@click.option("--rank", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rank of the remote rows' correction.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True,
              help="Adam learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Inputs per step (inputs of equal length are batched together).")
@click.option("--window", type=click.IntRange(min=2), default=None,
              help="Read the text file as one running text cut into windows of this many tokens (language models).")
@click.option("--max-inputs", type=click.IntRange(min=1), default=None, help="Use the first inputs of --data only.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data order and the held-out split.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch threads while training (one is fastest on a busy machine).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@json_option
@friendly_errors
def calibrate(export_dir, data, out, steps, time_budget, params, rank, lr, batch_size, window, max_inputs, seed,
              threads, overwrite, as_json):
    """Calibrate EXPORT_DIR for its own P, CR and switches on unlabeled data, without labels: the
    unpartitioned model is the teacher, PRISM the student; writes a normal export to OUT.

    \b
    The calibrated model (OUT/model) is the source of OUT's graphs: `prism validate
    OUT` checks them against it, and reports agreement with the model EXPORT_DIR
    came from (cosine_vs_model). OUT/manifest.json records the data's sha256,
    the steps and the number of trained parameters.
    """
    from ..calibration.export import calibrate as run_calibrate
    from ..calibration.train import TrainSettings

    cfg = TrainSettings(steps=steps, time_budget=time_budget, params=params, rank=rank, lr=lr, batch_size=batch_size,
                        seed=seed, threads=threads)
    report = run_calibrate(export_dir, data, out, cfg, window=window, max_inputs=max_inputs, overwrite=overwrite,
                           progress=not as_json)

    def human(r):
        before, after = r["loss_before"], r["loss_after"]
        loss = (f"held-out distillation loss {before:.4g} -> {after:.4g} ({r['held_out_inputs']} inputs)"
                if before is not None else "no held-out inputs")
        click.echo(f"calibrated {export_dir} on {r['train_inputs']} inputs of {data}: {r['steps']} steps in "
                   f"{r['seconds']:.1f} s, {r['trained_parameters']:,} trained parameters "
                   f"({', '.join(r['settings']['params'])}); {loss}")
        cut = r.get("long_lines_cut")
        if cut and cut["lines"]:
            click.echo(f"  {cut['lines']} line(s) longer than --max-seq-len {cut['max_seq_len']} tokens were cut into "
                       f"{cut['windows']} inputs of at most {cut['max_seq_len']} tokens")
        if r["exact_steps"]:
            click.echo(f"  {r['exact_steps']} steps changed nothing: PRISM was already exact on their inputs")
        click.echo(f"wrote {r['export']} (export {r['export_id'][:12]}); check it with: prism validate {r['export']}")

    emit(report, as_json, human)


@main.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--verify", is_flag=True, help="Check every file's sha256 and the export id; exit 1 naming what differs.")
@json_option
@friendly_errors
def inspect(export_dir, verify, as_json):
    """Manifest, file sizes and op counts per graph of an export (or of one device bundle). Needs no
    torch; the op counts need the onnx package (skipped without it)."""
    import importlib.util
    from collections import Counter

    from ..runtime.bundle import MANIFEST, DeviceBundle, Export, read_manifest

    root = Path(export_dir)
    manifest = read_manifest(root / MANIFEST)
    if verify:
        (DeviceBundle if manifest.rank is not None else Export).load(root, verify=True)
    dev = root if manifest.rank is not None else root / "device-0"
    has_onnx = importlib.util.find_spec("onnx") is not None
    graphs = {}
    for name, g in manifest.graphs.items():
        graphs[name] = {"file": g.file, "bytes": (dev / g.file).stat().st_size, "data": list(g.data),
                        "data_bytes": sum((dev / f).stat().st_size for f in g.data)}
        if has_onnx:
            import onnx

            proto = onnx.load(str(dev / g.file), load_external_data=False)
            graphs[name].update(ops=dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
                                domains=sorted({n.domain or "ai.onnx" for n in proto.graph.node}))
    stats = {rel: (root / rel).stat() for rel in manifest.files}
    files = {rel: st.st_size for rel, st in stats.items()}
    on_disk = {(st.st_dev, st.st_ino): st.st_size for st in stats.values()}  # hard links once, as du counts
    report = {"export_id": manifest.export_id, "package_version": manifest.package_version,
              "created": manifest.created, "source": manifest.source, "settings": manifest.settings.to_dict(),
              "model": manifest.model.to_dict(),
              "exchange_points": [p.name for p in manifest.program.points], "graphs": graphs, "files": files,
              "total_bytes": sum(on_disk.values()), "listed_bytes": sum(files.values()), "verified": bool(verify)}

    def human(r):
        m, s = r["model"], r["settings"]
        click.echo(f"export {r['export_id'][:12]} ({r['created']}, prism-onnx {r['package_version']}) of {r['source']}")
        click.echo(f"  {m['model_type']} {m['architecture']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
                   f"{m['exchange']} exchange ({len(r['exchange_points'])} points)")
        split = ",".join(f"{w:g}" for w in s["split_weights"]) if s["split_weights"] else "even"
        click.echo(f"  P={s['devices']} (split {split}) CR={s['compression_ratio']} "
                   f"wire={s['wire_dtype']} quantize={s['quantize']} opset={s['opset']} "
                   f"count_bias={s['count_bias']} keep_sinks={s['keep_sinks']} window={s['window']} far={s['far']} "
                   f"max_seq_len={s['max_seq_len']}")
        for name, g in r["graphs"].items():
            ops = ", ".join(f"{k} {v}" for k, v in g["ops"].items()) if "ops" in g else "(op counts need onnx)"
            data = f" (+ {', '.join(g['data'])}, {g['data_bytes'] / 1e6:.2f} MB)" if g["data"] else ""
            click.echo(f"  {name:<12} {g['bytes'] / 1e6:8.2f} MB{data}  {ops}")
        click.echo(f"  {len(r['files'])} files, {r['total_bytes'] / 1e6:.1f} MB on disk (hard-linked files once; "
                   f"{r['listed_bytes'] / 1e6:.1f} MB as listed)" +
                   ("; every sha256 and the export id verified" if r["verified"] else ""))

    emit(report, as_json, human)


@main.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--add-client", "add", default=None, metavar="NAME",
              help="Add one client keypair (EXPORT_DIR/client-NAME) instead of regenerating every key.")
@json_option
@friendly_errors
def keys(export_dir, add, as_json):
    """(Re)generate the CurveZMQ keys of an export: one keypair per device and per client.

    Without --add-client every key is replaced (rotation): copy device-K/keys to board K, the client
    folders to their users, and restart the runners."""
    from ..runtime.keys import add_client, generate_keys

    if add:
        folder = add_client(export_dir, add)
        return emit({"clients": [str(folder)]}, as_json, lambda r: click.echo(
            f"client key in {folder}; copy device-K/keys/clients/{folder.name}.key to every board "
            f"(or all of device-K/keys) and restart its runner"))
    clients = generate_keys(export_dir)
    emit({"clients": [str(c) for c in clients]}, as_json, lambda r: click.echo(
        f"new keys in {export_dir}/device-*/keys and {', '.join(r['clients'])}: copy each "
        f"device-K/keys to board K and restart the runners; old keys no longer work"))
