"""The `prism` command line. Board-side commands (run, infer, launch) import no torch."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click
import numpy as np

from . import __version__
from .errors import InputError, PrismError
from .manifest import ExportSettings, PrismSettings


class CommandError(click.ClickException):
    """An error the CLI reports in one line: `kind` names it (a PrismError's class name such as InputError,
    or MissingDependency, UsageError), `message` says what to change."""

    def __init__(self, kind: str, message: str, exit_code: int = 1, named: bool = False):
        super().__init__(message)
        self.kind, self.exit_code, self.named = kind, exit_code, named

    def format_message(self) -> str:
        """The line on stderr: "InputError: ..." for a PrismError (`named`), the message otherwise."""
        return f"{self.kind}: {self.message}" if self.named else self.message


def error_kind(e: click.ClickException) -> str:
    """The `type` of an error in the JSON error shape: the PrismError class, or click's (UsageError,
    BadParameter, NoSuchOption, MissingParameter...)."""
    return e.kind if isinstance(e, CommandError) else type(e).__name__


def friendly_errors(fn):
    """A PrismError (bad model id, bad input, tampered bundle...) -> one line naming it, exit 1 (printed by
    PrismGroup: on stderr, or as the JSON error shape under --json)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PrismError as e:
            raise CommandError(type(e).__name__, str(e), named=True) from None

    return wrapper


EXPORT_EXTRA = ("torch", "transformers", "onnx")


def needs_export_extra(fn):
    """Commands that load PyTorch models: on a board's core install (no torch, no transformers) they say
    what to install, in one line, instead of failing on an import."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import importlib.util

        missing = [m for m in EXPORT_EXTRA if importlib.util.find_spec(m) is None]
        if missing:
            raise CommandError("MissingDependency",
                               f"`prism {fn.__name__}` needs {', '.join(missing)}: pip install "
                               f"\"prism-onnx[export]\" (a board runs, infers, launches and inspects without them)")
        return fn(*args, **kwargs)

    return wrapper


GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")  # runtime.device.GRAPH_OPTIMIZATION's keys
JSON_HELP = "Print one JSON object on stdout (errors too: {\"error\": {\"type\", \"message\"}})."


def json_option(fn):
    """--json: the one output shape of every command (README, "Output and errors")."""
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(fn)


class PrismGroup(click.Group):
    """The `prism` group: every error of a subcommand, whether click's (a bad option value, a missing
    argument) or ours, is one line on stderr (`Error: ...`), or with --json the error shape
    `{"error": {"type": ..., "message": ...}}` on stdout; the exit code stays non-zero (2 for usage
    errors, 1 otherwise). Bugs keep their traceback."""

    def parse_args(self, ctx, args):
        head = args[:args.index("--")] if "--" in args else args
        ctx.meta["prism.json"] = "--json" in head
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except click.ClickException as e:
            if ctx.meta.get("prism.json"):
                message = e.message if isinstance(e, CommandError) else e.format_message()
                click.echo(json.dumps({"error": {"type": error_kind(e), "message": message}}))
            else:
                line = e.format_message()
                if isinstance(e, click.UsageError) and e.ctx is not None and e.ctx.command is not self:
                    line += f" (see `{e.ctx.command_path} --help`)"
                click.echo(f"Error: {line}", err=True)
            ctx.exit(e.exit_code)


def parse_ids(values: tuple[str, ...], left: bool = False) -> dict[str, np.ndarray]:
    """--input-ids '1,2,3' (repeatable: one per batch row, padded with 0 and masked: on the right, or on the
    left for generation)."""
    rows = []
    for v in values:
        try:
            rows.append([int(x) for x in v.replace(" ", "").split(",") if x != ""])
        except ValueError:
            raise InputError(f"--input-ids must be comma-separated integers, got '{v}'") from None
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("--input-ids needs at least one id per row")
    n = max(len(r) for r in rows)
    ids = np.zeros((len(rows), n), np.int64)
    mask = np.zeros((len(rows), n), np.int64)
    for i, r in enumerate(rows):
        row = slice(n - len(r), n) if left else slice(0, len(r))
        ids[i, row] = r
        mask[i, row] = 1
    return {"input_ids": ids, "attention_mask": mask}


def input_options(fn):
    """--text / --image / --input-ids, each repeatable (one per batch row)."""
    fn = click.option("--input-ids", "input_ids", multiple=True, help="Comma-separated token ids (repeatable).")(fn)
    fn = click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
                      help="Image file, or a .npy of pixel_values (repeatable).")(fn)
    fn = click.option("--text", "texts", multiple=True, help="Input text (repeatable: one per batch row).")(fn)
    return fn


def one_input_kind(texts, images, input_ids):
    given = [name for name, v in (("--text", texts), ("--image", images), ("--input-ids", input_ids)) if v]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --text, --image, --input-ids")
    return given[0]


def settings_options(cls, exclude: tuple[str, ...] = ()):
    """Click options for the fields of a settings dataclass (manifest.PrismSettings, ExportSettings), built
    from the fields' own metadata: one statement of each setting's name, type, default and help."""
    from .manifest import setting_fields, field_default

    def decorate(fn):
        for f in reversed(setting_fields(cls)):
            if f.name in exclude:
                continue
            meta = f.metadata
            flag = meta.get("flag", "--" + f.name.replace("_", "-"))
            names = [flag] + ([meta["short"]] if "short" in meta else [])
            default = field_default(f)
            kw = {"help": meta["help"], "default": default, "show_default": default is not None}
            if f.type in ("bool", bool):
                names = [f"{flag}/--no-{flag[2:]}"]
            elif "choices" in meta:
                kw["type"] = click.Choice(list(meta["choices"]))
            elif f.type in ("int", "int | None", int):
                kw["type"] = click.IntRange(min=meta.get("min"))
            if f.name == "split_weights":
                kw["callback"] = lambda ctx, param, value: _parse_split(value, ctx.params.get("devices"))
            if default is None and f.name in ("devices", "compression_ratio"):
                kw["required"] = True
                kw.pop("default")
            fn = click.option(*names, f.name, **kw)(fn)
        return fn

    return decorate


INPUT_PARAMS = ("texts", "images", "input_ids", "texts_file", "ids_file", "as_json", "api_key", "api_key_file")


def command_options() -> dict:
    """The options the current command was given (not its inputs, not secrets, not the unset ones): the
    `settings` of its JSON report when the report has no settings of its own."""
    ctx = click.get_current_context()
    return {k: v for k, v in ctx.params.items() if k not in INPUT_PARAMS and v is not None and v != ()}


def emit(obj: dict, as_json: bool, human, settings: dict | None = None):
    """Print a command's report: `human(obj)` as text, or with --json the one shape of every command:
    `{"command": NAME, "settings": {...}, ...results}`. `settings` is what the command ran with: the
    report's own `settings` (an export's or a plan's), else `settings`, else the command's options."""
    if not as_json:
        return human(obj)
    own = obj.get("settings")
    shaped = {"command": click.get_current_context().info_name,
              "settings": own if own is not None else (settings if settings is not None else command_options()),
              **{k: v for k, v in obj.items() if k not in ("settings", "command")}}
    click.echo(json.dumps(shaped, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


@click.group(cls=PrismGroup)
@click.version_option(__version__, prog_name="prism")
def main():
    """PRISM: one Transformer inference across several devices, with Segment Means compression."""


# ----------------------------------------------------------------------------------------------- simulate
@main.command()
@click.argument("model")
@settings_options(PrismSettings)
@input_options
@json_option
@friendly_errors
@needs_export_extra
def simulate(model, texts, images, input_ids, as_json, **settings):
    """Run MODEL as P simulated devices (PyTorch) and compare with the unpartitioned model."""
    from .reference import simulate_report

    kind = one_input_kind(texts, images, input_ids)
    report = simulate_report(model, PrismSettings(**settings), kind=kind, texts=texts, images=images,
                             input_ids=parse_ids(input_ids) if input_ids else None)
    emit(report, as_json, _print_simulate)


def _parse_split(split, devices: int | None = None):
    """--split '2,1,1' -> [2.0, 1.0, 1.0]: one finite, positive weight per device (refused otherwise, naming
    the bad entry)."""
    import math

    if split is None:
        return None
    weights = []
    for x in split.split(","):
        try:
            w = float(x)
        except ValueError:
            raise click.BadParameter(f"'{split}': '{x.strip()}' is not a number (comma-separated positive "
                                     f"weights, one per device, e.g. 2,1,1)") from None
        if not (math.isfinite(w) and w > 0):
            raise click.BadParameter(f"'{split}': every weight must be a positive number, got '{x.strip()}'")
        weights.append(w)
    if devices is not None and len(weights) != devices:
        raise click.BadParameter(f"'{split}' has {len(weights)} weights for {devices} devices (--devices)")
    return weights


def _print_simulate(r):
    m = r["model"]
    click.echo(f"model {m['model_type']} {m['architecture']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
               f"{m['num_heads']} heads")
    s = r["settings"]
    click.echo(f"P={s['devices']} CR={s['compression_ratio']} count_bias={'on' if s['count_bias'] else 'off'} "
               f"sinks={'kept' if s['keep_sinks'] else 'averaged'} wire={s['wire_dtype']}; "
               f"input {r['batch']} x {r['tokens']} tokens")
    for name, o in r["outputs"].items():
        click.echo(f"  {name} {o['shape']}: mean {o['mean']:+.5f} std {o['std']:.5f} first {o['first']}; "
                   f"max |diff| vs unpartitioned {o['max_abs_diff_vs_model']:.3g}, cosine {o['cosine_vs_model']:.6f}")
    click.echo(f"  {'device':>6} {'tokens':>12} {'owned':>6} {'K/V rows':>9} {'rows sent':>10} {'bytes sent/layer':>17}")
    for d in r["per_device"]:
        click.echo(f"  {d['rank']:>6} {str(d['span']):>12} {d['tokens']:>6} {d['kv_rows']:>9} {d['rows_sent']:>10} "
                   f"{d['bytes_sent_per_layer']:>17,}")
    t = r["traffic"]
    click.echo(f"  bytes/layer, all devices: {t['bytes_per_layer']:,} vs {t['baseline_bytes_per_layer']:,} "
               f"uncompressed (CR=1 float32): {100 * t['ratio_vs_baseline']:.2f}%")


# ------------------------------------------------------------------------------------------------- export
@main.command()
@click.argument("model")
@click.option("--out", "-o", type=click.Path(file_okay=False), required=True, help="Output folder.")
@settings_options(ExportSettings)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Reuse and keep this model's graphs in the graph cache ($PRISM_GRAPH_CACHE, default "
                   "~/.cache/prism-onnx/graphs): another export of the same model with other settings traces nothing.")
@json_option
@friendly_errors
@needs_export_extra
def export(model, out, overwrite, cache, as_json, **settings):
    """Export MODEL (hub id or folder) to one ONNX bundle per device in OUT/device-K."""
    import time

    from .exporters.bundle import export as do_export
    from .runtime.bundle import MANIFEST, read_manifest

    from .exporters.bundle import disk_bytes

    settings = ExportSettings(**settings)
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


# ----------------------------------------------------------------------------------------------- validate
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
    from .validate import validate as run_validate

    report = run_validate(export_dir, samples=samples, model=model, data=data, progress=not as_json, rtol=rtol,
                          atol=atol, min_model_cosine=min_model_cosine)
    emit(report, as_json, _print_validate)
    if not report["passed"]:
        sys.exit(1)


def _print_validate(r):
    s = r["settings"]
    click.echo(f"{r['export']}: P={s['devices']} CR={s['compression_ratio']} wire={s['wire_dtype']} "
               f"quantize={s['quantize']} exchange={s['exchange']}, {r['samples']} inputs")
    click.echo(f"  rows sent at the exchange points vs the reference: max |diff| {r['max_abs_diff_sent_rows']:.3g} "
               f"({r['rel_diff_sent_rows']:.2g} of max |value|)")
    for name, o in r["outputs"].items():
        click.echo(f"  {name}: vs the PyTorch reference (same received rows) max |diff| "
                   f"{o['max_abs_diff_vs_reference']:.3g} ({o['rel_diff_vs_reference']:.2g} of max |value| "
                   f"{o['max_abs_value']:.3g}), cosine mean {o['mean_cosine_vs_reference']:.5f} min "
                   f"{o['min_cosine_vs_reference']:.5f}; vs simulate (own rounding) max |diff| "
                   f"{o['max_abs_diff_vs_simulate']:.3g}")
        what = "checked: CR=1 is exact" if s["compression_ratio"] == 1 and s["quantize"] == "none" else \
            "not checked: what " + " and ".join(([f"CR={s['compression_ratio']}"] if s["compression_ratio"] > 1 else [])
                                                + ([f"{s['quantize']} weights"] if s["quantize"] != "none" else [])
                                                + ([f"a {s['wire_dtype']} wire"] if s["wire_dtype"] != "float32" else [])) \
            + " cost"
        top1 = f", top-1 agreement {100 * o['top1_agreement_vs_model']:.1f}%" if "top1_agreement_vs_model" in o else ""
        click.echo(f"  {name}: vs the unpartitioned model ({what}): max |diff| {o['max_abs_diff_vs_model']:.3g} "
                   f"({o['rel_diff_vs_model']:.2g} of max |value|), cosine mean {o['mean_cosine_vs_model']:.5f} "
                   f"worst {o['min_cosine_vs_model']:.5f}{top1}")
    click.echo(f"  bound: {', '.join(f'{k} {v}' for k, v in r['tolerance'].items())}")
    for f in r["failures"]:
        click.echo(f"  FAIL {f}")
    click.echo("passed" if r["passed"] else "FAILED")


# ---------------------------------------------------------------------------------------------- calibrate
def _params(ctx, param, value):
    groups = tuple(g.strip() for g in value.split(",") if g.strip())
    if not groups:
        raise click.BadParameter("give at least one parameter group")
    return groups


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
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True, help="Adam learning rate.")
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
    from .calibration.export import calibrate as run_calibrate
    from .calibration.train import TrainSettings

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
        if r["exact_steps"]:
            click.echo(f"  {r['exact_steps']} steps changed nothing: PRISM was already exact on their inputs")
        click.echo(f"wrote {r['export']} (export {r['export_id'][:12]}); check it with: prism validate {r['export']}")

    emit(report, as_json, human)


# ------------------------------------------------------------------------------------------------ inspect
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

    from .runtime.bundle import MANIFEST, DeviceBundle, Export, read_manifest

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
                   f"count_bias={s['count_bias']} keep_sinks={s['keep_sinks']} max_seq_len={s['max_seq_len']}")
        for name, g in r["graphs"].items():
            ops = ", ".join(f"{k} {v}" for k, v in g["ops"].items()) if "ops" in g else "(op counts need onnx)"
            data = f" (+ {', '.join(g['data'])}, {g['data_bytes'] / 1e6:.2f} MB)" if g["data"] else ""
            click.echo(f"  {name:<12} {g['bytes'] / 1e6:8.2f} MB{data}  {ops}")
        click.echo(f"  {len(r['files'])} files, {r['total_bytes'] / 1e6:.1f} MB on disk (hard-linked files once; "
                   f"{r['listed_bytes'] / 1e6:.1f} MB as listed)" +
                   ("; every sha256 and the export id verified" if r["verified"] else ""))

    emit(report, as_json, human)


# ---------------------------------------------------------------------------------------------- runtime
@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--rank", type=click.IntRange(min=0), default=None, help="This device's rank (default: the bundle's).")
@click.option("--peers", required=True, help="HOST:PORT of every device, in rank order (this one included).")
@click.option("--serve", type=click.IntRange(1, 65535), default=None, help="Accept client requests on this port.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="onnxruntime threads.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to wait for a peer's means at one exchange point.")
@click.option("--peer-timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds to wait at start-up for every peer to come up.")
@click.option("--heartbeat-timeout", type=click.FloatRange(min=0.3), default=1.0, show_default=True,
              help="A peer silent for this long is lost: the requests it was part of are rerun without it.")
@click.option("--bind", default=None, help="Address to listen on (default: this device's own HOST in --peers; "
                                           "'*' for every interface).")
@click.option("--keys", "keys", type=click.Path(file_okay=False), default=None,
              help="This device's CurveZMQ keys (default: BUNDLE/keys, written by `prism keys`).")
@click.option("--insecure", is_flag=True, help="No authentication or encryption (a trusted, isolated network only).")
@click.option("--max-cache-mb", type=click.FloatRange(min=0), default=1024.0, show_default=True,
              help="Key/value cache one generation request may hold on this device (the tail decodes).")
@click.option("--min-devices", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --serve: below this many live devices, requests fail at once, naming the lost devices "
                   "(above it, a lost device's requests are rerun over the others).")
@click.option("--http", "http", type=click.IntRange(1, 65535), default=None,
              help="Also serve the OpenAI-compatible HTTP API on this port (needs --serve and the `serve` extra).")
@click.option("--api-key", default=None, envvar="PRISM_API_KEY", show_envvar=True,
              help="HTTP requests must send 'Authorization: Bearer KEY' (prefer --api-key-file: argv is visible).")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A file of accepted API keys, one per line.")
@click.option("--served-model-name", default=None,
              help="The model name of the HTTP API (default: the export's source id or folder name).")
@click.option("--provider", "providers", default="CPU", show_default=True, metavar="NAME[,NAME]",
              help="onnxruntime execution providers in order of preference (CPU, CUDA, TensorRT, CoreML, XNNPACK... "
                   "as the installed onnxruntime has them; the ExecutionProvider suffix is optional); CPU is "
                   "always the last resort.")
@click.option("--graph-optimization", "optimization", type=click.Choice(GRAPH_OPTIMIZATION_LEVELS), default="all",
              show_default=True, help="onnxruntime graph optimization level of the device's sessions.")
@click.option("--split", "split", default=None, metavar="auto|even|W,W,...",
              help="With --serve: how requests are split over the devices: auto (weights from each device's "
                   "measured speed, so they finish together), even, or one weight per device. Default: the "
                   "export's --split if it has one, else auto.")
@click.option("--max-inflight", "inflight", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Requests of one coordinator this device runs at once (pipelining: while one waits for "
                   "another device's means, the next computes).")
@click.option("--batch-wait-ms", "batch_wait_ms", type=click.FloatRange(0, 100), default=2.0, show_default=True,
              help="With --serve: concurrent requests that get the same plan (equal token count) run as one batch; "
                   "while other requests are running, wait up to this long for more to join (0: no batching).")
@click.option("--batch-pad", is_flag=True,
              help="With --serve: also batch text requests of different lengths, padded to the longest. Exact at CR=1; "
                   "at CR > 1 a request's outputs then depend on what it was batched with.")
@click.option("--emulate-slowdown", "slowdown", type=click.FloatRange(min=1.0), default=1.0, show_default=True,
              help="Emulate a board this many times slower (sleep after each onnxruntime call): for testing mixed "
                   "fleets on one machine.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Log lines on stderr at this level and above.")
@json_option
@friendly_errors
def run(bundle, rank, peers, serve, threads, timeout, peer_timeout, heartbeat_timeout, bind, keys, insecure,
        max_cache_mb, min_devices, http, api_key, api_key_file, served_model_name, providers, optimization, split,
        inflight, batch_wait_ms, batch_pad, slowdown, log_level, as_json):
    """Run one device BUNDLE (device-K folder) and serve until SIGINT/SIGTERM; with --http, also the HTTP API
    (/v1/embeddings, /v1/completions, /v1/chat/completions, /embed, /health, /metrics).

    Any rank may --serve clients: it coordinates the requests it receives, planned over the devices that are
    live at that moment; when a device is lost, its requests are rerun over the others, and it rejoins from
    the next request on when it comes back. With --json, a start-up error is the JSON error shape on stdout
    (the logs stay on stderr)."""
    import logging
    import signal

    from .runtime.device import check_providers
    from .runtime.host import DeviceHost

    providers = check_providers(providers)  # before anything binds: one line listing the available ones

    api_keys = None
    if http is not None:
        from .serve import read_api_keys, require_serve

        require_serve()  # before anything binds: the one-line hint to install the extra
        if serve is None:
            raise click.UsageError("--http needs --serve PORT: the HTTP server talks to this runner's client port")
        api_keys = read_api_keys(api_key, api_key_file)
    elif api_key_file or served_model_name or (api_key and click.get_current_context().get_parameter_source(
            "api_key") != click.core.ParameterSource.ENVIRONMENT):
        raise click.UsageError("--api-key, --api-key-file and --served-model-name go with --http")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host = DeviceHost(bundle, rank=rank, peers=peers, serve=serve, threads=threads, timeout=timeout,
                      peer_timeout=peer_timeout, bind=bind, keys=keys, insecure=insecure,
                      dead_after=heartbeat_timeout, max_cache_mb=max_cache_mb, min_devices=min_devices,
                      local_client=http is not None, providers=providers, optimization=optimization, split=split,
                      slowdown=slowdown, inflight=inflight, batch_wait_ms=batch_wait_ms,
                      batch_pad=batch_pad)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: host.stop.set())
    server = None
    if http is not None:
        from .serve import start_http

        try:
            server = start_http(host, http, api_keys, served_model_name)
        except BaseException:
            host.transport.close()  # its authenticator thread would keep the process alive
            raise
    try:
        code = host.run()
    finally:
        if server is not None:
            server.stop()
    sys.exit(code)


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
    from .runtime.keys import add_client, generate_keys

    if add:
        folder = add_client(export_dir, add)
        return emit({"clients": [str(folder)]}, as_json, lambda r: click.echo(
            f"client key in {folder}; copy device-K/keys/clients/{folder.name}.key to every board "
            f"(or all of device-K/keys) and restart its runner"))
    clients = generate_keys(export_dir)
    emit({"clients": [str(c) for c in clients]}, as_json, lambda r: click.echo(
        f"new keys in {export_dir}/device-*/keys and {', '.join(r['clients'])}: copy each "
        f"device-K/keys to board K and restart the runners; old keys no longer work"))


def _summarise_outputs(outputs: dict) -> dict:
    return {name: {"shape": list(v.shape), "dtype": str(v.dtype), "mean": float(v.mean()), "std": float(v.std()),
                   "first": [round(float(x), 5) for x in v.reshape(-1)[:4]]} for name, v in outputs.items()}


def _print_run(r):
    for name, o in r["outputs"].items():
        click.echo(f"  {name} {o['shape']}: mean {o['mean']:+.5f} std {o['std']:.5f} first {o['first']}")
    st = r["stats"]
    click.echo(f"  latency {st['latency_ms']:.1f} ms")
    click.echo(f"  {'device':>6} {'bytes sent':>12} {'bytes received':>15} {'compute ms':>11}")
    for k, (a, b, c) in enumerate(zip(st["bytes_sent"], st["bytes_received"], st["compute_ms"])):
        click.echo(f"  {k:>6} {a:>12,} {b:>15,} {c:>11.2f}")


def generation_options(fn):
    """--max-new-tokens and the sampling options: with them, `infer` and `launch` generate text."""
    opts = [
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
                     help="Generate this many tokens after the prompt (a decoder exported with --exchange kv)."),
        click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="0: greedy; above 0: sample."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0: no top-k cut."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     help="Nucleus sampling: keep the smallest set of tokens whose probability reaches this."),
        click.option("--seed", type=click.IntRange(min=0), default=None, help="Makes sampling reproducible."),
        click.option("--stop-token-ids", default=None, help="Comma-separated ids that end a row (default: EOS)."),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0,
                     show_default=True, help="Above 1: tokens already in the row become less likely."),
        click.option("--stream", is_flag=True, help="Print tokens as they come."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _generation_config(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, repetition_penalty, **_):
    from .generate import GenerationConfig

    stops = () if stop_token_ids is None else [int(x) for x in stop_token_ids.split(",") if x.strip()]
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop_token_ids=tuple(stops), repetition_penalty=repetition_penalty)


def _request(client, texts, images, input_ids, gen=None):
    """One request: inference, or generation when gen (the generation options) asks for new tokens."""
    kind = one_input_kind(texts, images, input_ids)
    if gen and gen["max_new_tokens"]:
        if kind == "--image":
            raise click.UsageError("generation takes --text or --input-ids")
        ids = parse_ids(input_ids, left=True) if kind == "--input-ids" else {}
        on_tokens = _stream_printer() if gen["stream"] else None
        return client.generate(texts=list(texts) or None, input_ids=ids.get("input_ids"),
                               attention_mask=ids.get("attention_mask"), config=_generation_config(**gen),
                               on_tokens=on_tokens)
    if kind == "--text":
        return client.infer(texts=list(texts))
    if kind == "--image":
        return client.infer(images=list(images))
    ids = parse_ids(input_ids)
    return client.infer(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])


def _stream_printer():
    """Prints each row's new text (or ids) as tokens arrive, on stderr (stdout stays one report)."""

    def show(step, ids, texts):
        for b, t in enumerate(ids.tolist()):
            if t < 0:
                continue
            piece = texts[b] if texts is not None else f"{t} "
            click.echo(f"[{b}] {piece}" if len(ids) > 1 else piece, nl=False, err=True)
        if len(ids) > 1:
            click.echo("", err=True)

    return show


def _finish(result, save, as_json, extra=None, generated=False):
    if generated:
        ids, reply = result
        g = reply["generation"]
        report = {**(extra or {}), "generated_ids": ids, "texts": g.get("texts"),
                  "finish_reasons": g.get("finish_reasons"),
                  "time_to_first_token_ms": g.get("time_to_first_token_ms_at_coordinator",
                                                  g.get("time_to_first_token_ms")),
                  "decode_tokens_per_s": g.get("decode_tokens_per_s"), "generation": g, "stats": reply["stats"]}
        if save:
            width = max(map(len, ids)) if ids else 0
            np.savez(save, generated_ids=np.array([r + [-1] * (width - len(r)) for r in ids], np.int64))
            report["saved"] = save
        return emit(report, as_json, _print_generation)
    outputs, stats = result
    if save:
        np.savez(save, **outputs)
    report = {**(extra or {}), "outputs": _summarise_outputs(outputs), "stats": stats}
    if save:
        report["saved"] = save
    emit(report, as_json, _print_run)


def _print_generation(r):
    for b, ids in enumerate(r["generated_ids"]):
        text = f" {r['texts'][b]!r}" if r.get("texts") else ""
        click.echo(f"  row {b}: {len(ids)} tokens ({r['finish_reasons'][b]}){text}: {ids}")
    tps = r["decode_tokens_per_s"]
    click.echo(f"  time to first token {r['time_to_first_token_ms']:.1f} ms, decoding "
               f"{'%.1f tokens/s' % tps if tps else 'one token'} on the tail device")
    st = r["stats"]
    click.echo(f"  prefill bytes sent per device {st['bytes_sent']} (nothing moves between devices while decoding)")


def batch_options(fn):
    """--texts-file / --ids-file: one request per line (the batch client, runtime/batch.py)."""
    fn = click.option("--ids-file", type=click.Path(exists=True, dir_okay=False, allow_dash=True), default=None,
                      help="One request per line: comma-separated token ids ('-': stdin).")(fn)
    fn = click.option("--texts-file", type=click.Path(exists=True, dir_okay=False, allow_dash=True), default=None,
                      help="One request per line: a text ('-': stdin). Prints one JSON line per request (index, "
                           "ok, error, latency_ms, devices, bytes, ...); exits 1 if any failed.")(fn)
    return fn


def batch_kind(texts_file, ids_file, texts, images, input_ids) -> tuple[str, str] | None:
    """("texts" | "ids", path) for a batch file, None for a single request; one kind of input only."""
    files = [(k, f) for k, f in (("texts", texts_file), ("ids", ids_file)) if f]
    if not files:
        return None
    if len(files) > 1 or texts or images or input_ids:
        raise click.UsageError("give one of --texts-file, --ids-file, --text, --image, --input-ids")
    return files[0]


def _run_batch(client, kind, save, gen) -> None:
    """The batch client: one JSON line per request on stdout, a summary on stderr, exit 1 if any failed."""
    from .runtime.batch import read_lines, run_batch

    if save and Path(save).exists() and not Path(save).is_dir():
        raise click.UsageError(f"--save {save}: with a batch file, --save names a folder (NNNNNN.npz per request)")
    config = _generation_config(**gen) if gen and gen["max_new_tokens"] else None
    n, failed = run_batch(client, read_lines(kind[1]), kind[0], save, config)
    click.echo(f"{n} requests, {failed} failed", err=True)
    if failed:
        sys.exit(1)


@main.command()
@click.option("--server", required=True,
              help="HOST:PORT of a serving runner, or several comma-separated: the next one is used (and the "
                   "request resent) when one is lost.")
@input_options
@batch_options
@generation_options
@click.option("--keys", "keys", type=click.Path(exists=True, file_okay=False), default=None,
              help="The client folder `prism keys` wrote (EXPORT_DIR/client).")
@click.option("--insecure", is_flag=True, help="Plain text, for a cluster started with --insecure.")
@click.option("--save", type=click.Path(), default=None,
              help="Write the outputs to an .npz file (with a batch file: a folder, NNNNNN.npz per request).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds to wait for one request's reply (a server that stops answering fails sooner).")
@json_option
@friendly_errors
def infer(server, texts, images, input_ids, texts_file, ids_file, keys, insecure, save, timeout, as_json, **gen):
    """Send one request to a running cluster and print (or --save) its outputs and per-device stats; with
    --max-new-tokens, generate text (prefill over the devices, decoding on the last). With --texts-file or
    --ids-file, one request per line, in order."""
    from .runtime.client import Client

    kind = batch_kind(texts_file, ids_file, texts, images, input_ids)
    if bool(keys) == bool(insecure):
        raise click.UsageError("give --keys EXPORT_DIR/client (or --insecure for a cluster started with --insecure)")
    client = Client(server, timeout=timeout, keys=keys)
    try:
        if kind:
            return _run_batch(client, kind, save, gen)
        result = _request(client, texts, images, input_ids, gen)
    finally:
        client.close()
    _finish(result, save, as_json, generated=bool(gen["max_new_tokens"]),
            extra={"server": client.last_server.removeprefix("tcp://"), "failovers": client.last_failovers,
                   "attempts": client.last_reply.get("attempts")})


def _faults(values: tuple[str, ...], what: str, devices: int) -> list[tuple[int, float]]:
    """--kill/--restart RANK@SECONDS -> [(rank, seconds)]."""
    out = []
    for v in values:
        rank, _, when = v.partition("@")
        try:
            out.append((int(rank), float(when)))
        except ValueError:
            raise click.UsageError(f"--{what} {v}: expected RANK@SECONDS, e.g. 2@1.5") from None
        if not 0 <= out[-1][0] < devices or out[-1][1] < 0:
            raise click.UsageError(f"--{what} {v}: rank must be in 0..{devices - 1}, seconds >= 0")
    return out


@main.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@input_options
@batch_options
@generation_options
@click.option("--save", type=click.Path(), default=None,
              help="Write the outputs to an .npz file (with a batch file: a folder, NNNNNN.npz per request).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="onnxruntime threads per runner.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds a runner waits for a peer's means at one exchange point.")
@click.option("--insecure", is_flag=True, help="Run the runners without CurveZMQ.")
@click.option("--kill", "kills", multiple=True, metavar="RANK@SECONDS",
              help="Kill runner RANK (SIGKILL) this many seconds after the requests start (repeatable). With it, "
                   "every runner serves clients and the client fails over between them.")
@click.option("--restart", "restarts", multiple=True, metavar="RANK@SECONDS",
              help="Start runner RANK again at this time (repeatable): it rejoins the plan of later requests.")
@click.option("--min-devices", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests fail, naming the lost devices, when fewer runners than this are live.")
@json_option
@friendly_errors
def launch(export_dir, texts, images, input_ids, texts_file, ids_file, save, threads, timeout, insecure, kills,
           restarts, min_devices, as_json, **gen):
    """Start one runner per device bundle on loopback (with the export's keys), run the inputs, print
    outputs and stats, stop them; with --max-new-tokens, generate text. With --texts-file/--ids-file, one
    request per line; with --kill/--restart, show a device failing and coming back in the middle of them."""
    import threading

    from .runtime.client import LocalCluster

    kind = batch_kind(texts_file, ids_file, texts, images, input_ids)
    if not kind:
        one_input_kind(texts, images, input_ids)
    from .runtime.bundle import Export

    devices = len(Export.load(export_dir).devices)
    faults = [("kill", k, t) for k, t in _faults(kills, "kill", devices)] + \
        [("restart", k, t) for k, t in _faults(restarts, "restart", devices)]
    elastic = bool(faults) or min_devices > 1
    with LocalCluster(export_dir, threads=threads, timeout=timeout, secure=not insecure, serve_all=elastic,
                      extra_args=["--min-devices", str(min_devices)] if min_devices > 1 else []) as cluster:
        client = cluster.new_client(failover=True) if elastic else cluster.client

        def act(what, k):
            click.echo(f"[launch] {what} runner {k}", err=True)
            cluster.kill(k) if what == "kill" else cluster.start_device(k)

        timers = [threading.Timer(t, act, (what, k)) for what, k, t in faults]
        for timer in timers:
            timer.daemon = True
            timer.start()
        try:
            if kind:
                return _run_batch(client, kind, save, gen)
            result = _request(client, texts, images, input_ids, gen)
        finally:
            for timer in timers:
                timer.cancel()
            if client is not cluster.client:
                client.close()
    _finish(result, save, as_json, {"devices": len(cluster.procs), "peers": cluster.peers},
            generated=bool(gen["max_new_tokens"]))


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
    from .demo import run_demo

    report = run_demo(out, devices, cr, echo=(lambda *_: None) if as_json else click.echo)
    emit(report, as_json, lambda r: None)  # the human report was echoed as it came


# -------------------------------------------------------------------------------------- bench, evaluate
@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--seq-len", "lengths", default="64,128,256", show_default=True,
              help="Comma-separated token counts to time (capped at the export's --max-seq-len).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per length (median).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="onnxruntime threads.")
@json_option
@friendly_errors
def profile(bundle, lengths, repeats, threads, as_json):
    """How fast this board computes BUNDLE (a device-K folder, or an export: its device-0): tokens per second,
    the weight to give this board in `prism run --split w0,w1,...`."""
    from .runtime.profile import profile as run_profile

    root = Path(bundle)
    if (root / "device-0").is_dir():  # an export folder
        root = root / "device-0"
    report = run_profile(root, _int_list(lengths), repeats, threads,
                         echo=(lambda *_: None) if as_json else (lambda msg: click.echo(msg, err=True)))
    emit(report, as_json, lambda r: click.echo(
        f"device {r['rank']}: {r['weight']:.0f} tokens/s at {r['points'][-1]['tokens']} tokens on {r['threads']} "
        f"thread(s): use {r['weight']:.0f} as this board's weight in `prism run --split`"))


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
@click.option("--slow-device", default=None, metavar="RANK:FRACTION",
              help="Also measure latency with device RANK at FRACTION of a core (cgroup CPU quota; emulated where "
                   "cgroups are not available) under an even, the adaptive and the ideal split.")
@json_option
@friendly_errors
@needs_export_extra
def bench(export_dir, bandwidth, seq_len, repeats, sweep, plot, no_latency, curve, clients, texts_file, n_requests,
          inflight, bench_batch_pad, slow_device, as_json):
    """Bytes, per-device FLOPs and time, and latency of EXPORT_DIR vs CR=1 and vs one device; with --clients,
    throughput; with --slow-device, the adaptive split against an even and the ideal one."""
    from .evaluate.bench import bench as run_bench
    from .evaluate import load

    counts = _int_list(clients) if clients else None
    if counts and any(k < 1 for k in counts):
        raise click.BadParameter("client counts must be >= 1", param_hint="--clients")
    from .runtime.bundle import MANIFEST, read_manifest

    m = read_manifest(Path(export_dir) / MANIFEST)
    slow = None
    if slow_device:
        try:
            slow = load.parse_slow_device(slow_device, m.devices)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--slow-device") from None
    echo = (lambda *_: None) if as_json else (lambda m: click.echo(m, err=True))
    report = run_bench(export_dir, bandwidth=bandwidth, seq_len=seq_len, repeats=repeats, latency=not no_latency,
                       sweep=sweep.split(",") if sweep else None, plot=plot, curve=curve, echo=echo)
    if counts or slow:
        from .evaluate.bench import bench_inputs, requested_outputs

        outputs = requested_outputs(m)
        inputs = {**bench_inputs(m, seq_len), "outputs": outputs}
        if counts:
            if texts_file:
                lines = [t for t in Path(texts_file).read_text().splitlines() if t.strip()]
                reqs = [{"texts": [t], "outputs": outputs} for t in lines]
            else:
                reqs = [inputs]
            t = load.throughput(Path(export_dir), reqs, counts, n_requests, inflight=inflight,
                                batch_pad=bench_batch_pad, echo=echo)
            report["throughput"] = t
            report["throughput_rps"] = t["throughput_rps"]
        if slow:
            s = load.slow_device(Path(export_dir), inputs, *slow, repeats=repeats, echo=echo)
            report["slow_device"] = s
            report["slow_device_latency_ms"] = s["latency_ms"]

    def human(r):
        click.echo(f"{r['model']} P={r['devices']} CR={r['compression_ratio']} wire={r['wire_dtype']} "
                   f"sinks={'kept' if r['keep_sinks'] else 'averaged'}, {r['tokens']} tokens, outputs {r['outputs']}")
        b = r["bytes_per_inference"]
        click.echo(f"  bytes per inference: PRISM {b['prism']:,}, CR=1 baseline {b['baseline']:,} "
                   f"({100 * r['bytes_ratio_vs_baseline']:.3f}%)")
        f = r["flops_per_device"]
        c = r["flops_cut_vs_baseline"]
        click.echo(f"  GFLOPs per device: PRISM {[round(x / 1e9, 2) for x in f['prism']]}, baseline "
                   f"{[round(x / 1e9, 2) for x in f['baseline']]}, single device {round(f['single_device'][0] / 1e9, 2)}")
        click.echo(f"  FLOPs cut vs baseline (busiest device): total {100 * c['total']:.1f}%, linear layers "
                   f"{100 * c['linear']:.1f}% (bound ignoring attention {100 * c['linear_bound']:.1f}%)")
        t = r["compute_ms_per_device"]
        click.echo(f"  onnxruntime ms per device (1 thread): PRISM {t['prism']}, baseline {t['baseline']}, "
                   f"single {t['single_device']}")
        if r.get("latency_ms"):
            lat = r["latency_ms"]
            click.echo(f"  latency at {r['bandwidth']}: PRISM {lat['prism']:.1f} ms, baseline {lat['baseline']:.1f} ms, "
                       f"single device {lat['single_device']:.1f} ms: PRISM {r['speedup_vs_single_device']:.2f}x "
                       f"faster than one device")
        if r.get("latency_over_runner_compute"):
            rc, lo = r["runner_compute_ms"], r["latency_over_runner_compute"]
            click.echo("  latency / the busiest runner's own onnxruntime time in the same requests: " + ", ".join(
                f"{k} {lo[k]:.3f}x ({rc[k]:.0f} ms)" for k in lo))
        if r.get("curve_cost"):
            cc = r["curve_cost"]
            click.echo(f"  CurveZMQ cost at {r['bandwidth']}: {cc['latency_ms_curve']:.1f} ms with, "
                       f"{cc['latency_ms_plain']:.1f} ms without ({100 * cc['overhead']:+.2f}%; median of the "
                       f"{cc['repeats']} paired ratios {100 * cc['overhead_paired_median']:+.2f}%)")
        elif "latency_skipped" in r:
            click.echo(f"  latency skipped: {r['latency_skipped']}")
        if r.get("throughput"):
            t = r["throughput"]
            seq = next(x for x in t["runs"] if x["runners"] == "sequential")
            click.echo(f"  throughput (loopback, --max-inflight {t['settings']['max_inflight']}): " + ", ".join(
                f"{k} client(s) {v:.1f} req/s" for k, v in t["throughput_rps"].items()) +
                f"; one request at a time: {seq['throughput_rps']:.1f} req/s, p50 {seq['p50_ms']:.1f} ms")
            for x in t["runs"]:
                click.echo(f"    {x['runners']:>10} {x['clients']:>3} client(s): {x['throughput_rps']:.1f} req/s, "
                           f"p50 {x['p50_ms']:.1f} ms, p90 {x['p90_ms']:.1f} ms, errors {x['errors']}")
        if r.get("slow_device"):
            s = r["slow_device"]
            lat = s["latency_ms"]
            click.echo(f"  device {s['rank']} at {s['fraction']:g} speed ({s['slowed_by']}): even {lat['even']:.1f} ms, "
                       f"adaptive {lat['adaptive']:.1f} ms, ideal {lat['ideal']:.1f} ms (adaptive/ideal "
                       f"{s['adaptive_vs_ideal']:.3f}, even/ideal {s['even_vs_ideal']:.3f}); adaptive spans "
                       f"{s['spans']['adaptive']}")

    emit(report, as_json, human)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{text}'") from None


def _switch(text: str) -> list[bool]:
    return {"both": [True, False], "on": [True], "off": [False]}[text]


@main.command()
@click.option("--task", type=click.Choice(["sst2", "longtext", "digits", "wikitext", "wikitext-llama"]), required=True,
              help="Task and its model: SST-2 accuracy, long-text agreement, digits accuracy, WikiText perplexity.")
@click.option("--devices", "-P", default="2,4", show_default=True, help="Comma-separated P values.")
@click.option("--compression-ratio", "--cr", "crs", default="1,4,16,64,128", show_default=True,
              help="Comma-separated CR values.")
@click.option("--count-bias", type=click.Choice(["both", "on", "off"]), default="both", show_default=True,
              help="Rows with the log(count) attention bias, without, or both.")
@click.option("--sinks", type=click.Choice(["both", "on", "off"]), default="both", show_default=True,
              help="Rows with sink tokens kept as their own segments, averaged, or both.")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Inputs to evaluate (default: task's).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="PNG: metric vs CR and vs bytes.")
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
def evaluate(task, devices, crs, count_bias, sinks, samples, plot, save, calibrate_data, calibrate_steps,
             calibrate_time_budget, calibrate_params, calibrate_lr, calibrate_window, as_json):
    """Task metric of the full model and of PRISM (through exported bundles) over P, CR and the switches;
    with --calibrate-data, also after calibration."""
    from .calibration.train import TrainSettings
    from .evaluate.evaluate import Calibration, evaluate as run_eval, plot as plot_report, summarize

    calibration = None
    if calibrate_data is not None:
        if calibrate_data != "task" and not Path(calibrate_data).exists():
            raise InputError(f"{calibrate_data}: no such file or folder")
        calibration = Calibration(TrainSettings(steps=calibrate_steps, time_budget=calibrate_time_budget,
                                                params=calibrate_params, lr=calibrate_lr),
                                  None if calibrate_data == "task" else calibrate_data, calibrate_window)
    report = run_eval(task, devices=_int_list(devices), compression_ratios=_int_list(crs),
                      count_bias=_switch(count_bias), keep_sinks=_switch(sinks), samples=samples,
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
        cols = ["P", "CR", "count bias", "sinks", r["metric"], "delta"] + (["calibrated", "delta"] if cal else [])
        for col in cols + ["bytes/inference", "vs baseline"]:
            table.add_column(col, justify="right")
        for row in r["rows"]:
            after = ([f"{row['calibrated']:.4f}", f"{row['delta_calibrated']:+.4f}"] if "calibrated" in row
                     else ["", ""]) if cal else []
            table.add_row(str(row["devices"]), str(row["compression_ratio"]), "on" if row["count_bias"] else "off",
                          "on" if row["keep_sinks"] else "off", f"{row[r['metric']]:.4f}", f"{row['delta']:+.4f}",
                          *after, f"{row['bytes_per_inference']:,.0f}", f"{100 * row['bytes_vs_baseline']:.2f}%")
        Console().print(table)
        for k, v in r["summary"].items():
            click.echo(f"  {k}: {v}")

    emit(report, as_json, human)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
