"""The `prism` command line. Board-side commands (run, infer, launch) import no torch."""

from __future__ import annotations

import functools
import json

import click
import numpy as np

from .. import __version__
from ..errors import InputError, PrismError


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
    """--input-ids '1,2,3' or '1 2 3' (repeatable: one per batch row, padded with 0 and masked: on the right,
    or on the left for generation)."""
    import re

    rows = []
    for v in values:
        try:
            rows.append([int(x) for x in re.split(r"[,\s]+", v.strip()) if x != ""])
        except ValueError:
            raise InputError(f"--input-ids must be comma-separated integers, got '{v}'") from None
        if any(not -2**63 <= x < 2**63 for x in rows[-1]):
            raise InputError(f"--input-ids: '{v}' holds an id beyond 64-bit integers")
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
    """Click options for the fields of a settings dataclass (manifest.PrismSettings, ExportSettings,
    runtime.settings.RunnerSettings), built from the fields' own metadata: one statement of each setting's
    name, type, default, bounds and help."""
    from ..manifest import setting_fields, field_default

    def decorate(fn):
        for f in reversed(setting_fields(cls)):
            if f.name in exclude:
                continue
            meta = f.metadata
            flag = meta.get("flag", "--" + f.name.replace("_", "-"))
            names = [flag] + ([meta["short"]] if "short" in meta else [])
            default = field_default(f)
            kw = {"help": meta["help"], "default": default, "show_default": default is not None}
            kind = str(f.type).split(" |")[0]
            if kind == "bool":
                if meta.get("flag_only"):
                    kw.update(is_flag=True, show_default=False)
                else:
                    names = [f"{flag}/--no-{flag[2:]}"]
            elif "choices" in meta:
                kw["type"] = click.Choice(list(meta["choices"]))
            elif kind == "int":
                kw["type"] = click.IntRange(min=meta.get("min"), max=meta.get("max"))
            elif kind == "float":
                kw["type"] = click.FloatRange(min=meta.get("min"), max=meta.get("max"))
            elif meta.get("path"):
                kw["type"] = click.Path(file_okay=False)
            if "metavar" in meta:
                kw["metavar"] = meta["metavar"]
            if f.name == "split_weights":
                kw["callback"] = lambda ctx, param, value: _parse_split(value, ctx.params.get("devices"))
            if meta.get("required") or (default is None and f.name in ("devices", "compression_ratio")):
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


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{text}'") from None


def _params(ctx, param, value):
    groups = tuple(g.strip() for g in value.split(",") if g.strip())
    if not groups:
        raise click.BadParameter("give at least one parameter group")
    return groups
