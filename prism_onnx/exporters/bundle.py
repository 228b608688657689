"""`prism export`: a transformers model -> DIR/manifest.json + DIR/device-K/ bundles (one per device).

Every device folder holds the same files (the split is computed at run time), so an export stores each
distinct file once: device-0 holds them, and device-1.. hard-link them (a copy where the filesystem has no
hard links). `du -sh DIR` counts them once; `scp -r DIR/device-K` copies a complete, self-contained bundle.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from .. import __version__, models
from ..errors import BundleError
from ..manifest import ExportSettings, Manifest, Preprocessing
from ..pooling import DEFAULT as POOLING_DEFAULT, pooling_of_folder
from ..reference import prism_model
from ..runtime.bundle import MANIFEST, content_digest, sha256_file
from ..runtime.keys import generate_keys
from ..runtime.preprocess import DEFAULT_IMAGE_CONFIG
from .build import CONFIG_SUMMARY, export_graphs
from .cache import GraphCache
from .graphset import Graphs, graph_file
from .quantize import quantize_int8


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def write_preprocessing(model, spec, folder: Path) -> Preprocessing:
    """tokenizer.json (text) or preprocessor_config.json (images) for the board, when the source has one;
    for text models also the pooling of sentence embeddings (prism_onnx/pooling.py: sentence-transformers'
    modules when the source folder has them, else mean), the chat template and the special tokens' strings."""
    named = bool(getattr(model, "name_or_path", ""))
    src = Path(models.resolve_source(getattr(model, "name_or_path", "") or "."))
    if spec.input_kind == "image":
        cfg_path = src / "preprocessor_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {
            **DEFAULT_IMAGE_CONFIG, "size": {"height": spec.image_size, "width": spec.image_size}}
        (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
        return Preprocessing("image", config="preprocessor_config.json")
    pre = Preprocessing("text")
    if src.is_dir() and any((src / f).is_file() for f in TOKENIZER_FILES):
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(src))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):  # an incomplete tokenizer: none
            tok = None
        if tok is not None and getattr(tok, "is_fast", False):
            tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            template = chat_template_of(tok)
            if template:
                (folder / CHAT_TEMPLATE).write_text(template)
            special = {k: v for k in SPECIAL_TOKENS if isinstance(v := getattr(tok, k, None), str)}
            pre = Preprocessing("text", tokenizer="tokenizer.json", pad_id=int(pad),
                                chat_template=CHAT_TEMPLATE if template else None, special_tokens=special)
    return replace(pre, pooling=pooling_of_folder(src) if named and src.is_dir() else dict(POOLING_DEFAULT))


CHAT_TEMPLATE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def chat_template_of(tok) -> str | None:
    """The tokenizer's chat template (tokenizer_config.json's chat_template or chat_template.jinja, as
    transformers loaded it): the one named "default" when it holds several; None when it has none."""
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    elif isinstance(template, list):  # the older on-disk form: [{"name", "template"}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template.strip() else None


def place(src: Path, dst: Path, link: bool) -> None:
    """Hard-link (link=True; a copy on another filesystem) or copy src to dst."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: copy
    shutil.copyfile(src, dst)


def _digest(graphs: Graphs, name: str, placed: Path) -> str:
    """sha256 of a placed file: the known one when `placed` is a hard link of the graphs' file, else read."""
    known = graphs.digests.get(name)
    if known and os.path.samefile(placed, graphs.folder / name):
        return known
    return sha256_file(placed)


def write_bundles(graphs: Graphs, out: str | Path, settings: ExportSettings, *, overwrite: bool = False,
                  link: bool = False, extra: dict[str, Path] | None = None) -> Path:
    """Lay out DIR/manifest.json and DIR/device-K/ from exported graphs. Atomic: a failed write leaves no
    half bundle, and an existing non-empty DIR is only replaced with overwrite=True.

    Each distinct file is stored once: device-0's copy, hard-linked by the other devices (copied where the
    filesystem has no hard links). link=True also hard-links device-0's files to the graphs' folder instead
    of copying them (local sweeps and benchmarks over one traced set; an export then shares its files with
    that folder). `extra`: {name: folder} copied into DIR/name (a calibrated export keeps its model folder
    there); not part of any device bundle.

    The export id is the digest of the content (runtime/bundle.py content_digest); the CurveZMQ keys of
    every device and of one client are generated too (runtime/keys.py), outside every file table.
    """
    out = Path(out)
    # quantization, opset and exchange kind describe the graph files themselves: they come from the graphs
    settings = replace(settings.for_model(graphs.spec), quantize=graphs.quantize, opset=graphs.opset,
                       block_size=graphs.block_size, exchange=graphs.spec.exchange)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BundleError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    common = Manifest(
        export_id="", model=graphs.spec, settings=settings, program=graphs.program, graphs=dict(graphs.files),
        preprocessing=graphs.preprocessing, files={}, source=graphs.source,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), package_version=__version__,
        config_summary=graphs.config_summary, calibration=graphs.calibration)
    payload = graphs.graph_payload() + graphs.preprocessing.files()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))  # same filesystem as out
    try:
        files = {}  # every device holds the same files: hash each once
        for k in range(settings.devices):
            dev = staging / f"device-{k}"
            dev.mkdir()
            for name in payload:
                if k == 0:
                    place(graphs.folder / name, dev / name, link)
                    files[name] = _digest(graphs, name, dev / name)
                else:
                    place(staging / "device-0" / name, dev / name, True)
        raw = json.loads(json.dumps(common.to_dict()))  # exactly what the manifests hold, for the digest
        common = replace(common, export_id=content_digest(raw, files))
        all_files = {}
        for k in range(settings.devices):
            dev = staging / f"device-{k}"
            write_manifest(dev / MANIFEST, replace(common, rank=k, files=files))
            all_files.update({f"device-{k}/{n}": d for n, d in files.items()})
            all_files[f"device-{k}/{MANIFEST}"] = sha256_file(dev / MANIFEST)
        write_manifest(staging / MANIFEST, replace(common, files=all_files))
        for name, folder in (extra or {}).items():
            shutil.copytree(folder, staging / name)
        generate_keys(staging, settings.devices)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_manifest(path: Path, manifest: Manifest) -> None:
    path.write_text(json.dumps(manifest.to_dict(), indent=2))


def disk_bytes(folder: str | Path) -> int:
    """Bytes of the files under `folder`, a file hard-linked several times counted once (as `du` does)."""
    seen = {}
    for f in Path(folder).rglob("*"):
        if f.is_file():
            st = f.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def export(source, out: str | Path, settings: ExportSettings, *, overwrite: bool = False, progress: bool = False,
           cache: GraphCache | None | str = "default", made: dict | None = None) -> Path:
    """The whole `prism export`: load, trace (or take the graphs from the graph cache), quantize, lay out
    bundles. `cache`: a GraphCache, None (no cache) or "default" (GraphCache.default(): $PRISM_GRAPH_CACHE);
    `made`, when given, is filled with how the graphs came to be (Graphs.made: traced, substituted, cached)."""
    model = models.load(source)
    pm = prism_model(model, None if settings.exchange == "auto" else settings.exchange)  # fail before minutes
    settings.for_model(pm.spec)                                                          # of tracing
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BundleError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    cache = GraphCache.default() if cache == "default" else cache
    with tempfile.TemporaryDirectory(prefix="prism-graphs-") as tmp:
        graphs = export_graphs(model, Path(tmp), opset=settings.opset, quantize=settings.quantize,
                               block_size=settings.block_size, exchange=settings.exchange, progress=progress,
                               cache=cache)
        if isinstance(source, (str, os.PathLike)):
            graphs.source = models.source_name(source)
        if made is not None:
            made.update(graphs.made)
        # hard links to the graphs, which are the cache's own files when it is on: one copy on disk for every
        # export of the model (an in-place change shows in the cache's check and in the sha256 tables)
        return write_bundles(graphs, out, settings, overwrite=overwrite, link=True)


__all__ = ["CONFIG_SUMMARY", "ExportSettings", "GraphCache", "Graphs", "TOKENIZER_FILES", "disk_bytes", "export",
           "export_graphs", "graph_file", "quantize_int8", "write_bundles", "write_preprocessing"]
