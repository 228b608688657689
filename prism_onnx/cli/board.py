"""Board commands (the core install: no torch): run, infer, launch, profile."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from ..errors import PrismError
from ..runtime.settings import RunnerSettings
from .base import (CommandError, emit, friendly_errors, input_options, json_option,
                   main, one_input_kind, parse_ids, settings_options, _int_list)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@settings_options(RunnerSettings)
@click.option("--api-key", default=None, envvar="PRISM_API_KEY", show_envvar=True,
              help="HTTP requests must send 'Authorization: Bearer KEY' (prefer --api-key-file: argv is visible).")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A file of accepted API keys, one per line.")
@json_option
@friendly_errors
def run(bundle, api_key, api_key_file, as_json, **options):
    """Run one device BUNDLE (device-K folder) and serve until SIGINT/SIGTERM; with --http, also the HTTP API
    (/v1/embeddings, /v1/completions, /v1/chat/completions, /embed, /health, /metrics).

    Any rank may --serve clients: it coordinates the requests it receives, planned over the devices that are
    live at that moment; when a device is lost, its requests are rerun over the others, and it rejoins from
    the next request on when it comes back. With --json, a start-up error is the JSON error shape on stdout
    (the logs stay on stderr)."""
    import logging
    import signal

    from ..runtime.device import check_providers
    from ..runtime.host import DeviceHost

    try:
        settings = RunnerSettings(**options)  # every check of the options together, before anything binds
    except PrismError as e:
        raise click.UsageError(str(e)) from None
    from ..errors import BundleError

    try:
        settings.check_options(bundle)  # the options against the bundle's manifest: --peers, --serve, --split
    except BundleError:
        raise
    except PrismError as e:
        raise click.UsageError(str(e)) from None
    check_providers(settings.providers)  # one line listing the available ones
    api_keys = None
    if settings.http is not None:
        from ..serve import read_api_keys, require_serve

        require_serve()  # the one-line hint to install the extra
        api_keys = read_api_keys(api_key, api_key_file)
    elif api_key_file or settings.served_model_name or (api_key and click.get_current_context().get_parameter_source(
            "api_key") != click.core.ParameterSource.ENVIRONMENT):
        raise click.UsageError("--api-key, --api-key-file and --served-model-name go with --http")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host = DeviceHost(bundle, settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: host.stop.set())
    server = None
    if settings.http is not None:
        from ..serve import start_http

        try:
            server = start_http(host, settings.http, api_keys, settings.served_model_name)
        except BaseException:
            host.transport.close()  # its authenticator thread would keep the process alive
            raise
    try:
        code = host.run()
    finally:
        if server is not None:
            server.stop()
    sys.exit(code)


def _summarise_outputs(outputs: dict) -> dict:
    return {name: {"shape": list(v.shape), "dtype": str(v.dtype), "mean": float(v.mean()), "std": float(v.std()),
                   "first": [round(float(x), 5) for x in v.reshape(-1)[:4]]} for name, v in outputs.items()}


def _print_run(r):
    for name, o in r["outputs"].items():
        note = " (the sentence embedding: pooled as the model folder says, what /v1/embeddings returns)" \
            if name == "sentence_embedding" else ""
        click.echo(f"  {name} {o['shape']}: mean {o['mean']:+.5f} std {o['std']:.5f} first {o['first']}{note}")
    st = r["stats"]
    click.echo(f"  latency {st['latency_ms']:.1f} ms; plan: devices {st['ranks']}, spans {st['spans']} "
               f"(reproduce it with --split {st.get('split')})")
    click.echo(f"  {'device':>6} {'bytes sent':>12} {'bytes received':>15} {'compute ms':>11}")
    for k, (a, b, c) in enumerate(zip(st["bytes_sent"], st["bytes_received"], st["compute_ms"])):
        click.echo(f"  {k:>6} {a:>12,} {b:>15,} {c:>11.2f}")
    if r.get("saved"):
        click.echo(f"  saved {r['saved']}")


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
        click.option("--stream", is_flag=True,
                     help="Print the text as it is generated (on stdout; on stderr with --json), then the report."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _generation_config(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, repetition_penalty, **_):
    from ..generate import GenerationConfig

    stops = () if stop_token_ids is None else [int(x) for x in stop_token_ids.split(",") if x.strip()]
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop_token_ids=tuple(stops), repetition_penalty=repetition_penalty)


def _request(client, texts, images, input_ids, gen=None, split=None, printer=None):
    """One request: inference, or generation when gen (the generation options) asks for new tokens (streamed
    to `printer`, a StreamPrinter, with --stream)."""
    kind = one_input_kind(texts, images, input_ids)
    if gen and gen["max_new_tokens"]:
        if kind == "--image":
            raise click.UsageError("generation takes --text or --input-ids")
        ids = parse_ids(input_ids, left=True) if kind == "--input-ids" else {}
        return client.generate(texts=list(texts) or None, input_ids=ids.get("input_ids"),
                               attention_mask=ids.get("attention_mask"), config=_generation_config(**gen),
                               on_tokens=printer, split=split)
    if kind == "--text":
        return client.infer(texts=list(texts), split=split)
    if kind == "--image":
        return client.infer(images=list(images), split=split)
    ids = parse_ids(input_ids)
    return client.infer(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], split=split)


class StreamPrinter:
    """--stream: each row's text as the coordinator decodes it (incremental detokenization), on stdout (on
    stderr under --json, where stdout is the one report), then a newline; the report follows. One row: its
    text as it grows; several: a line per step, `[row] new text` for each row that grew. Without a tokenizer
    in the bundle, the ids."""

    def __init__(self, as_json: bool):
        self.err, self.shown, self.started = as_json, [], False

    def __call__(self, step, ids, texts):
        if not self.shown:
            self.shown = [""] * len(ids)
        pieces = []
        for b, t in enumerate(ids.tolist()):
            piece = (texts[b] if texts is not None else f"{t} ") if t >= 0 else ""
            self.shown[b] += piece
            if piece:
                pieces.append(f"[{b}] {piece}" if len(ids) > 1 else piece)
        if pieces:
            self.started = True
            click.echo(" ".join(pieces), nl=len(ids) > 1, err=self.err)

    def finish(self, texts) -> None:
        """The reply is in: print what the stream held back (an incomplete character at the end), then end
        the line."""
        if len(self.shown) == 1 and texts and texts[0].startswith(self.shown[0]) and texts[0] != self.shown[0]:
            click.echo(texts[0][len(self.shown[0]):], nl=False, err=self.err)
            self.started = True
        if self.started and len(self.shown) == 1:
            click.echo("", err=self.err)


def _finish(result, target, as_json, extra=None, generated=False, printer=None):
    """Print (and with --save write to `target`, batch_client.save_target's) one request's result. A file that
    cannot be written after all (a full disk) is reported after the results, which are printed anyway."""
    report = _report(result, target, extra, generated, printer)
    emit(report, as_json, _print_generation if generated else _print_run)
    if "save_error" in report:
        if as_json:
            sys.exit(1)
        raise CommandError("InputError", report["save_error"], named=True)


def _report(result, target, extra, generated, printer) -> dict:
    from ..runtime.batch_client import write_npz

    def save(report, outputs):
        try:
            report["saved"] = write_npz(target, outputs)
        except PrismError as e:
            report["save_error"] = str(e)

    if generated:
        ids, reply = result
        g = reply["generation"]
        if printer is not None:
            printer.finish(g.get("texts"))
        report = {**(extra or {}), "generated_ids": ids, "texts": g.get("texts"),
                  "finish_reasons": g.get("finish_reasons"),
                  "time_to_first_token_ms": g.get("time_to_first_token_ms_at_coordinator",
                                                  g.get("time_to_first_token_ms")),
                  "decode_tokens_per_s": g.get("decode_tokens_per_s"), "generation": g, "stats": reply["stats"]}
        if target:
            width = max(map(len, ids)) if ids else 0
            save(report, {"generated_ids": np.array([r + [-1] * (width - len(r)) for r in ids], np.int64)})
        return report
    outputs, stats = result
    report = {**(extra or {}), "outputs": _summarise_outputs(outputs), "stats": stats}
    if target:
        save(report, outputs)
    return report


def _print_generation(r):
    for b, ids in enumerate(r["generated_ids"]):
        text = f" {r['texts'][b]!r}" if r.get("texts") else ""
        click.echo(f"  row {b}: {len(ids)} tokens ({r['finish_reasons'][b]}){text}: {ids}")
    tps = r["decode_tokens_per_s"]
    click.echo(f"  time to first token {r['time_to_first_token_ms']:.1f} ms, decoding "
               f"{'%.1f tokens/s' % tps if tps else 'one token'} on the tail device")
    st = r["stats"]
    click.echo(f"  prefill bytes sent per device {st['bytes_sent']} (nothing moves between devices while decoding)")
    if r.get("saved"):
        click.echo(f"  saved {r['saved']}")


SAVE_HELP = ("Write the outputs to this .npz file (the suffix added when missing; folders created; an existing "
             "folder or a path ending with '/': FOLDER/000000.npz). With a batch file: a folder, NNNNNN.npz per "
             "request.")


def batch_options(fn):
    """--texts-file / --ids-file: one request per line (the batch client, runtime/batch_client.py)."""
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
    from ..runtime.batch_client import read_lines, run_batch

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
@click.option("--save", type=click.Path(), default=None, help=SAVE_HELP)
@click.option("--split", default=None, metavar="W,W,...",
              help="This request's plan: one weight per device of the export, 0 to leave a device out (a reply's "
                   "`split`, to reproduce its outputs; default: the cluster's split).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds to wait for one request's reply (a server that stops answering fails sooner).")
@json_option
@friendly_errors
def infer(server, texts, images, input_ids, texts_file, ids_file, keys, insecure, save, split, timeout, as_json,
          **gen):
    """Send one request to a running cluster and print (or --save) its outputs and per-device stats; with
    --max-new-tokens, generate text (prefill over the devices, decoding on the last). With --texts-file or
    --ids-file, one request per line, in order."""
    from ..runtime.batch_client import save_target
    from ..runtime.client import Client
    from ..runtime.split import parse_request_split

    kind = batch_kind(texts_file, ids_file, texts, images, input_ids)
    if bool(keys) == bool(insecure):
        raise click.UsageError("give --keys EXPORT_DIR/client (or --insecure for a cluster started with --insecure)")
    try:
        weights = parse_request_split(split) if split is not None else None
    except PrismError as e:
        raise click.BadParameter(str(e).removeprefix("--split "), param_hint="--split") from None
    target = save_target(save) if save and not kind else None  # before any work: a path that cannot be written
    printer = StreamPrinter(as_json) if gen["stream"] else None
    client = Client(server, timeout=timeout, keys=keys)
    try:
        if kind:
            return _run_batch(client, kind, save, gen)
        result = _request(client, texts, images, input_ids, gen, weights, printer)
    finally:
        client.close()
    _finish(result, target, as_json, generated=bool(gen["max_new_tokens"]), printer=printer,
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
@click.option("--save", type=click.Path(), default=None, help=SAVE_HELP)
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

    from ..runtime.batch_client import save_target
    from ..runtime.bundle import Export
    from ..runtime.cluster import LocalCluster

    kind = batch_kind(texts_file, ids_file, texts, images, input_ids)
    if not kind:
        one_input_kind(texts, images, input_ids)
    target = save_target(save) if save and not kind else None  # before any work: a path that cannot be written
    printer = StreamPrinter(as_json) if gen["stream"] else None

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
            result = _request(client, texts, images, input_ids, gen, printer=printer)
        finally:
            for timer in timers:
                timer.cancel()
            if client is not cluster.client:
                client.close()
    _finish(result, target, as_json, {"devices": len(cluster.procs), "peers": cluster.peers},
            generated=bool(gen["max_new_tokens"]), printer=printer)


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
    from ..runtime.profile import profile as run_profile

    root = Path(bundle)
    if (root / "device-0").is_dir():  # an export folder
        root = root / "device-0"
    report = run_profile(root, _int_list(lengths), repeats, threads,
                         echo=(lambda *_: None) if as_json else (lambda msg: click.echo(msg, err=True)))
    emit(report, as_json, lambda r: click.echo(
        f"device {r['rank']}: {r['weight']:.0f} tokens/s at {r['points'][-1]['tokens']} tokens on {r['threads']} "
        f"thread(s): use {r['weight']:.0f} as this board's weight in `prism run --split`"))
