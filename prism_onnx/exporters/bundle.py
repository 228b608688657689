"""`prism export`: a transformers model -> DIR/manifest.json + DIR/device-K/ bundles (one per device)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from .. import __version__, models
from ..errors import BundleError
from ..manifest import DEFAULT_OPSET, ExportSettings, GraphFile, Manifest, ModelSpec, Preprocessing, TensorInfo
from ..pooling import DEFAULT as POOLING_DEFAULT, pooling_of_folder
from ..program import Program, build_program
from ..reference import prism_model
from ..runtime.bundle import MANIFEST, content_digest, read_manifest, sha256_file
from ..runtime.keys import generate_keys
from ..runtime.preprocess import DEFAULT_IMAGE_CONFIG
from .graphs import export_graph, graph_specs

CONFIG_SUMMARY = (
    "model_type", "hidden_size", "dim", "num_hidden_layers", "n_layers", "num_attention_heads", "n_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "hidden_dim", "n_inner", "vocab_size",
    "max_position_embeddings", "n_positions", "image_size", "patch_size", "num_labels", "hidden_act",
    "activation_function", "activation", "rope_theta", "rope_scaling", "tie_word_embeddings", "bos_token_id",
    "eos_token_id", "pad_token_id", "type_vocab_size",
)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


@dataclass
class Graphs:
    """A folder of exported graphs (+ preprocessing files), shared by all devices of one or more exports."""

    folder: Path
    spec: ModelSpec
    program: Program
    files: dict[str, GraphFile] = field(default_factory=dict)  # graph name -> file and its inputs/outputs
    preprocessing: Preprocessing = field(default_factory=lambda: Preprocessing("text"))
    quantize: str = "none"
    opset: int = DEFAULT_OPSET
    source: str = ""
    config_summary: dict = field(default_factory=dict)
    calibration: dict | None = None  # what `prism calibrate` did to the model these graphs come from

    def path(self, name: str) -> Path:
        """The file of graph `name`."""
        return self.folder / self.files[name].file

    @classmethod
    def from_export(cls, export_dir: str | Path) -> "Graphs":
        """The graphs of an existing export (device-0's copy), to lay out bundles with other settings:
        the graphs do not depend on P, CR, the split or the wire precision."""
        root = Path(export_dir)
        m = read_manifest(root / MANIFEST)
        return cls(root / "device-0", m.model, m.program, dict(m.graphs), m.preprocessing, m.settings.quantize,
                   m.settings.opset, m.source, m.config_summary, m.calibration)


def _tensor_info(v) -> TensorInfo:
    t = v.type.tensor_type
    return TensorInfo(v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                      tuple(d.dim_param or d.dim_value for d in t.shape.dim))


def graph_file(path: Path, model: onnx.ModelProto) -> GraphFile:
    return GraphFile(path.name, tuple(_tensor_info(v) for v in model.graph.input),
                     tuple(_tensor_info(v) for v in model.graph.output))


def quantize_int8(src: Path, dst: Path, per_channel: bool = True) -> None:
    """Dynamic int8 weight quantization with onnxruntime.quantization (MatMul/Gemm/Gather weights).

    Per-channel scales: on MiniLM, per-tensor scales gave a mean token cosine of 0.957 against fp32,
    per-channel 0.993 (measured by benchmarks/quantization.py).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)


def export_graphs(model, folder: Path, *, opset: int = DEFAULT_OPSET, quantize: str = "none",
                  exchange: str | None = None, progress: bool = False) -> Graphs:
    """Trace every step graph of `model`'s device program into `folder` (and quantize it), plus the
    preprocessing files. `exchange`: hidden | kv | None or "auto" (the family's default)."""
    import logging

    from tqdm.auto import tqdm

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its registry warns about torchvision ops
    pm = prism_model(model, None if exchange == "auto" else exchange)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    program = build_program(pm.spec)
    out = Graphs(folder, pm.spec, program, quantize=quantize, opset=opset,
                 source=str(getattr(model, "name_or_path", "")))
    cfg = model.config
    out.config_summary = {k: getattr(cfg, k) for k in CONFIG_SUMMARY if getattr(cfg, k, None) is not None}
    for g in tqdm(graph_specs(pm, program), desc="exporting graphs", unit="graph", disable=not progress):
        path = folder / f"{g.name}.onnx"
        proto = export_graph(g, path, opset)
        if quantize == "int8":
            tmp = folder / f"{g.name}.fp32.onnx"
            os.replace(path, tmp)
            quantize_int8(tmp, path)
            tmp.unlink()
            proto = onnx.load(str(path), load_external_data=False)
        out.files[g.name] = graph_file(path, proto)
    out.preprocessing = write_preprocessing(model, pm.spec, folder)
    return out


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
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: copy
    shutil.copyfile(src, dst)


def write_bundles(graphs: Graphs, out: str | Path, settings: ExportSettings, *, overwrite: bool = False,
                  link: bool = False, extra: dict[str, Path] | None = None) -> Path:
    """Lay out DIR/manifest.json and DIR/device-K/ from exported graphs. Atomic: a failed write leaves no
    half bundle, and an existing non-empty DIR is only replaced with overwrite=True.

    link=True hard-links the graph files instead of copying them (local sweeps and benchmarks: P copies
    of a BERT-base graph set is GBs); bundles meant for boards are copies. `extra`: {name: folder} copied
    into DIR/name (a calibrated export keeps its model folder there); not part of any device bundle.

    The export id is the digest of the content (runtime/bundle.py content_digest); the CurveZMQ keys of
    every device and of one client are generated too (runtime/keys.py), outside every file table.
    """
    out = Path(out)
    # quantization, opset and exchange kind describe the graph files themselves: they come from the graphs
    settings = replace(settings.for_model(graphs.spec), quantize=graphs.quantize, opset=graphs.opset,
                       exchange=graphs.spec.exchange)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BundleError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    common = Manifest(
        export_id="", model=graphs.spec, settings=settings, program=graphs.program, graphs=dict(graphs.files),
        preprocessing=graphs.preprocessing, files={}, source=graphs.source,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), package_version=__version__,
        config_summary=graphs.config_summary, calibration=graphs.calibration)
    payload = [g.file for g in graphs.files.values()] + graphs.preprocessing.files()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))  # same filesystem as out
    try:
        files = {}  # every device holds the same files: hash each once
        for k in range(settings.devices):
            dev = staging / f"device-{k}"
            dev.mkdir()
            for name in payload:
                place(graphs.folder / name, dev / name, link)
                if name not in files:
                    files[name] = sha256_file(dev / name)
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


def export(source, out: str | Path, settings: ExportSettings, *, overwrite: bool = False,
           progress: bool = False) -> Path:
    """The whole `prism export`: load, trace, quantize, lay out bundles."""
    model = models.load(source)
    pm = prism_model(model, None if settings.exchange == "auto" else settings.exchange)  # fail before minutes
    settings.for_model(pm.spec)                                                          # of tracing
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BundleError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    with tempfile.TemporaryDirectory(prefix="prism-graphs-") as tmp:
        graphs = export_graphs(model, Path(tmp), opset=settings.opset, quantize=settings.quantize,
                               exchange=settings.exchange, progress=progress)
        if isinstance(source, (str, os.PathLike)):
            graphs.source = models.source_name(source)
        return write_bundles(graphs, out, settings, overwrite=overwrite)
