"""A model's graph set: every step graph of its device program, traced (one layer per structure, the others
substituted: reuse.py), the embedding table stored once (tied.py), quantized (quantize.py), and kept in the
graph cache (cache.py) so that the next export of the same model traces nothing."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from ..manifest import DEFAULT_OPSET, GraphFile
from ..program import build_program
from ..reference import prism_model
from .cache import GraphCache, graph_key
from .graphs import graph_specs
from .graphset import Graphs, graph_file
from .quantize import HEADS, quantize_int4, quantize_int8
from .reuse import LayerGraphs
from .tied import Tables, externalize_tables, inline, point_head, settle

CONFIG_SUMMARY = (
    "model_type", "hidden_size", "dim", "num_hidden_layers", "n_layers", "num_attention_heads", "n_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "hidden_dim", "n_inner", "vocab_size",
    "max_position_embeddings", "n_positions", "image_size", "patch_size", "num_labels", "hidden_act",
    "activation_function", "activation", "rope_theta", "rope_scaling", "tie_word_embeddings", "bos_token_id",
    "eos_token_id", "pad_token_id", "type_vocab_size",
)
SHARED = ("embed", "token_head")  # written last: the embedding table they may share (tied.py)


def _bar(items, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="graph", disable=not progress)


def _save_set(folder: Path, held: dict[str, onnx.ModelProto], files: dict[str, GraphFile], tables: Tables) -> None:
    """Save embed and token_head (held back in `held`; embed's tables already in external data) once the head
    reads the tables it ties to; record their entries."""
    used = point_head(held["token_head"], tables) if "token_head" in held else set()
    settle(held["embed"], tables, used)
    for name, proto in held.items():
        path = folder / f"{name}.onnx"
        onnx.save_model(proto, str(path))
        files[name] = graph_file(path, proto)


def trace_set(pm, program, folder: Path, opset: int, progress: bool) -> tuple[dict[str, GraphFile], dict]:
    """Every float32 graph of pm's program into `folder`. -> ({graph: GraphFile}, {"traced", "substituted"})."""
    specs = graph_specs(pm, program)
    layers = LayerGraphs(specs, opset)
    files: dict[str, GraphFile] = {}
    held: dict[str, onnx.ModelProto] = {}
    tables = None
    for g in _bar(specs, "exporting graphs", progress):
        proto = layers.graph(g)
        if g.name in SHARED:
            held[g.name] = proto
            tables = externalize_tables(folder, proto) if g.name == "embed" else tables  # its memory freed now
            continue
        path = folder / f"{g.name}.onnx"
        onnx.save_model(proto, str(path))
        files[g.name] = graph_file(path, proto)
    _save_set(folder, held, files, tables)
    for name in SHARED:
        if name in files and files[name].data:
            onnx.checker.check_model(str(folder / files[name].file), full_check=True)
    return {s.graph: files[s.graph] for s in program.steps}, dict(layers.counts)


def quantize_set(src: Path, files: dict[str, GraphFile], dst: Path, quantize: str, block_size: int,
                 progress: bool) -> dict[str, GraphFile]:
    """The graphs of `src` with quantized weights, into `dst`."""
    out: dict[str, GraphFile] = {}
    held: dict[str, onnx.ModelProto] = {}
    tables = None
    for name, gf in _bar(files.items(), f"quantizing ({quantize})", progress):
        proto = inline(src / gf.file)
        path = dst / gf.file
        if quantize == "int8":
            quantize_int8(proto, path)
            proto = onnx.load(str(path))
        else:
            proto = quantize_int4(proto, block_size, head=name in HEADS)
        if name in SHARED:
            held[name] = proto
            tables = externalize_tables(dst, proto) if name == "embed" else tables
            continue
        onnx.save_model(proto, str(path))
        out[name] = graph_file(path, proto)
    _save_set(dst, held, out, tables)
    return {name: out[name] for name in files}


def _record(files: dict[str, GraphFile]) -> dict:
    return {"files": {k: g.to_dict() for k, g in files.items()}}


def _files(record: dict) -> dict[str, GraphFile]:
    return {k: GraphFile.from_dict(g) for k, g in record["files"].items()}


class _Cached:
    """make_set's view of the cache (or of none): fetch and store graph sets, and the files' sha256 known."""

    def __init__(self, cache: GraphCache | None, keys: dict[str, str]):
        self.cache, self.keys, self.digests = cache, keys, {}

    def fetch(self, quantize: str, folder: Path) -> dict[str, GraphFile] | None:
        record = self.cache.get(self.keys[quantize], folder) if self.cache is not None else None
        if not record:
            return None
        self.digests = dict(record["sha256"])
        return _files(record)

    def store(self, quantize: str, folder: Path, files: dict[str, GraphFile]) -> None:
        if self.cache is not None:
            names = list(dict.fromkeys(f for g in files.values() for f in g.files()))
            self.digests = self.cache.put(self.keys[quantize], folder, names, _record(files)) or {}


def make_set(pm, program, folder: Path, *, opset: int, quantize: str, block_size: int, cache: GraphCache | None,
             progress: bool) -> tuple[dict[str, GraphFile], dict, dict[str, str]]:
    """pm's graphs in `folder`, from the cache or made (and then cached).
    -> (files, how they were made, the sha256 of the files when the cache computed them)."""
    keys = {q: graph_key(pm, program, opset=opset, quantize=q, block_size=block_size if q == "int4" else None)
            for q in dict.fromkeys(("none", quantize))} if cache is not None else {}
    cached = _Cached(cache, keys)
    files = cached.fetch(quantize, folder)
    if files is not None:
        return files, {"cached": len(files)}, cached.digests
    if quantize == "none":
        files, made = trace_set(pm, program, folder, opset, progress)
        cached.store("none", folder, files)
        return files, made, cached.digests
    with tempfile.TemporaryDirectory(prefix=".fp32-", dir=folder) as tmp:
        tmp = Path(tmp)
        base = cached.fetch("none", tmp)
        made = {"cached": len(base)} if base is not None else None
        if base is None:
            base, made = trace_set(pm, program, tmp, opset, progress)
            cached.store("none", tmp, base)
        files = quantize_set(tmp, base, folder, quantize, block_size, progress)
    cached.store(quantize, folder, files)
    return files, made, cached.digests


def export_graphs(model, folder: Path, *, opset: int = DEFAULT_OPSET, quantize: str = "none", block_size: int = 32,
                  exchange: str | None = None, progress: bool = False, cache: GraphCache | None = None) -> Graphs:
    """Every step graph of `model`'s device program in `folder` (quantized as asked), plus the preprocessing
    files. `exchange`: hidden | kv | None or "auto" (the family's default); `cache`: a GraphCache to read
    and fill (None: none)."""
    import logging

    from .bundle import write_preprocessing

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its registry warns about torchvision ops
    pm = prism_model(model, None if exchange == "auto" else exchange)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    program = build_program(pm.spec)
    files, made, digests = make_set(pm, program, folder, opset=opset, quantize=quantize, block_size=block_size,
                                    cache=cache, progress=progress)
    cfg = model.config
    out = Graphs(folder, pm.spec, program, files, quantize=quantize, opset=opset, block_size=block_size,
                 source=str(getattr(model, "name_or_path", "")), made=made, digests=digests,
                 config_summary={k: getattr(cfg, k) for k in CONFIG_SUMMARY if getattr(cfg, k, None) is not None})
    out.preprocessing = write_preprocessing(model, pm.spec, folder)
    return out
