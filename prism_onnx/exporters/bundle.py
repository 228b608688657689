"""`prism export`: a transformers model -> DIR/manifest.json + DIR/device-K/ bundles (one per device)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from .. import __version__, models
from ..errors import BundleError, PrismError
from ..reference import prism_model
from ..runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, content_digest, read_manifest, sha256_file
from ..runtime.keys import generate_keys
from ..runtime.preprocess import DEFAULT_IMAGE_CONFIG
from ..runtime.wire import check_wire_dtype
from .graphs import DEFAULT_OPSET, export_graph, graph_specs

QUANTIZE = ("none", "int8")


@dataclass(frozen=True)
class ExportSettings:
    """Everything about a deployment that is fixed at export time (recorded in every manifest)."""

    devices: int
    compression_ratio: int
    max_seq_len: int | None = None  # default: the model's positions
    max_batch: int = 64  # frames declaring more rows than this bundle allows are refused
    wire_dtype: str = "float32"
    quantize: str = "none"
    opset: int = DEFAULT_OPSET
    count_bias: bool = True
    keep_sinks: bool = True
    split_weights: list[float] | None = None

    def check(self, spec) -> "ExportSettings":
        if self.devices < 1:
            raise PrismError(f"devices must be >= 1, got {self.devices}")
        if self.compression_ratio < 1:
            raise PrismError(f"compression ratio must be >= 1, got {self.compression_ratio}")
        check_wire_dtype(self.wire_dtype)
        if self.quantize not in QUANTIZE:
            raise PrismError(f"unknown quantization '{self.quantize}'; choose one of {', '.join(QUANTIZE)}")
        if self.split_weights is not None and len(self.split_weights) != self.devices:
            raise PrismError(f"--split has {len(self.split_weights)} weights for {self.devices} devices")
        max_len = self.max_seq_len or spec.max_positions
        if max_len > spec.max_positions or max_len < self.devices:
            raise PrismError(f"max sequence length {max_len} must be between the devices ({self.devices}) and the "
                             f"model's positions ({spec.max_positions})")
        if spec.input_kind == "image" and self.max_seq_len not in (None, spec.max_positions):
            raise PrismError(f"an image model has a fixed length of {spec.max_positions} tokens")
        return ExportSettings(**{**asdict(self), "max_seq_len": max_len})


@dataclass
class Graphs:
    """A folder of exported graphs (+ preprocessing files), shared by all devices of one or more exports."""

    folder: Path
    spec: models.ModelSpec
    files: dict[str, str] = field(default_factory=dict)  # graph name -> file name
    io: dict[str, dict] = field(default_factory=dict)  # graph name -> {"inputs": [...], "outputs": [...]}
    preprocessing: dict = field(default_factory=dict)
    quantize: str = "none"
    opset: int = DEFAULT_OPSET
    source: str = ""
    config_summary: dict = field(default_factory=dict)

    @classmethod
    def from_export(cls, export_dir: str | Path) -> "Graphs":
        """The graphs of an existing export (device-0's copy), to lay out bundles with other settings:
        the graphs do not depend on P, CR, the split or the wire precision."""
        root = Path(export_dir)
        m = read_manifest(root / MANIFEST)
        spec = models.ModelSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["model"].items()})
        return cls(root / "device-0", spec, dict(m["graphs"]), m["io"], m["preprocessing"], m["quantize"], m["opset"],
                   m["source"], m["config_summary"])


def settings_of(manifest: dict, **overrides) -> "ExportSettings":
    """The ExportSettings an export was made with, with some replaced."""
    s = dict(devices=manifest["devices"], compression_ratio=manifest["compression_ratio"],
             max_seq_len=manifest["max_seq_len"], max_batch=manifest["max_batch"], wire_dtype=manifest["wire_dtype"],
             quantize=manifest["quantize"], opset=manifest["opset"], count_bias=manifest["count_bias"],
             keep_sinks=manifest["keep_sinks"], split_weights=manifest["split"]["weights"])
    return ExportSettings(**{**s, **overrides})


def _value_info(v) -> dict:
    t = v.type.tensor_type
    return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}


def graph_io(model: onnx.ModelProto) -> dict:
    return {"inputs": [_value_info(v) for v in model.graph.input],
            "outputs": [_value_info(v) for v in model.graph.output]}


def quantize_int8(src: Path, dst: Path, per_channel: bool = True) -> None:
    """Dynamic int8 weight quantization with onnxruntime.quantization (MatMul/Gemm/Gather weights).

    Per-channel scales: on MiniLM, per-tensor scales gave a mean token cosine of 0.957 against fp32,
    per-channel 0.993 (measured by benchmarks/quantization.py).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)


def export_graphs(model, folder: Path, *, opset: int = DEFAULT_OPSET, quantize: str = "none",
                  progress: bool = False) -> Graphs:
    """Trace every step graph of `model` into `folder` (and quantize it), plus preprocessing files."""
    import logging

    from tqdm.auto import tqdm

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its registry warns about torchvision ops
    pm = prism_model(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = Graphs(folder, pm.spec, quantize=quantize, opset=opset, source=str(getattr(model, "name_or_path", "")))
    cfg = model.config
    out.config_summary = {k: getattr(cfg, k) for k in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "n_inner",
        "vocab_size", "max_position_embeddings", "n_positions", "image_size", "patch_size", "num_labels",
        "hidden_act", "activation_function") if hasattr(cfg, k) and getattr(cfg, k) is not None}
    specs = graph_specs(pm)
    for g in tqdm(specs, desc="exporting graphs", unit="graph", disable=not progress):
        path = folder / f"{g.name}.onnx"
        proto = export_graph(g, path, opset)
        if quantize == "int8":
            tmp = folder / f"{g.name}.fp32.onnx"
            os.replace(path, tmp)
            quantize_int8(tmp, path)
            tmp.unlink()
            proto = onnx.load(str(path), load_external_data=False)
        out.files[g.name] = path.name
        out.io[g.name] = graph_io(proto)
    out.preprocessing = write_preprocessing(model, pm.spec, folder)
    return out


def write_preprocessing(model, spec, folder: Path) -> dict:
    """tokenizer.json (text) or preprocessor_config.json (images) for the board; {} files when none."""
    src = Path(models.resolve_source(getattr(model, "name_or_path", "") or "."))
    if spec.input_kind == "image":
        cfg_path = src / "preprocessor_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {
            **DEFAULT_IMAGE_CONFIG, "size": {"height": spec.image_size, "width": spec.image_size}}
        (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
        return {"kind": "image", "config": "preprocessor_config.json"}
    pre = {"kind": "text", "tokenizer": None, "pad_id": 0}
    if src.is_dir():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(src))
        except (OSError, ValueError, TypeError, KeyError):
            tok = None
        if tok is not None and getattr(tok, "is_fast", False):
            tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            pre.update(tokenizer="tokenizer.json", pad_id=int(pad))
    return pre


def place(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: copy
    shutil.copyfile(src, dst)


def write_bundles(graphs: Graphs, out: str | Path, settings: ExportSettings, *, overwrite: bool = False,
                  link: bool = False) -> Path:
    """Lay out DIR/manifest.json and DIR/device-K/ from exported graphs. Atomic: a failed write leaves no
    half bundle, and an existing non-empty DIR is only replaced with overwrite=True.

    link=True hard-links the graph files instead of copying them (local sweeps and benchmarks: P copies
    of a BERT-base graph set is GBs); bundles meant for boards are copies.

    The export id is the digest of the content (runtime/bundle.py content_digest); the CurveZMQ keys of
    every device and of one client are generated too (runtime/keys.py), outside every file table.
    """
    out = Path(out)
    settings = settings.check(graphs.spec)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BundleError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    common = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "source": graphs.source,
        "model": graphs.spec.to_dict(), "config_summary": graphs.config_summary,
        "devices": settings.devices, "compression_ratio": settings.compression_ratio,
        "split": {"policy": "weighted" if settings.split_weights else "even", "weights": settings.split_weights},
        "count_bias": settings.count_bias, "keep_sinks": settings.keep_sinks, "wire_dtype": settings.wire_dtype,
        "quantize": graphs.quantize, "opset": graphs.opset, "max_seq_len": settings.max_seq_len,
        "max_batch": settings.max_batch, "graphs": dict(graphs.files), "io": graphs.io,
        "exchange_points": [
            {"name": f"attn_in.{i}", "layer": i, "producer": "embed" if i == 0 else f"layer_{i - 1}",
             "consumer": f"layer_{i}"} for i in range(graphs.spec.num_layers)],
        "preprocessing": graphs.preprocessing,
    }
    common = json.loads(json.dumps(common))  # exactly what the manifests hold (lists, not tuples), for the digest
    payload = list(graphs.files.values()) + [v for k, v in graphs.preprocessing.items()
                                             if k in ("tokenizer", "config") and v]
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
        common = {**common, "export_id": content_digest(common, files)}
        all_files = {}
        for k in range(settings.devices):
            dev = staging / f"device-{k}"
            (dev / MANIFEST).write_text(json.dumps({**common, "rank": k, "files": files}, indent=2))
            all_files.update({f"device-{k}/{n}": d for n, d in files.items()})
            all_files[f"device-{k}/{MANIFEST}"] = sha256_file(dev / MANIFEST)
        (staging / MANIFEST).write_text(json.dumps({**common, "files": all_files}, indent=2))
        generate_keys(staging, settings.devices)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def export(source, out: str | Path, settings: ExportSettings, *, overwrite: bool = False,
           progress: bool = False) -> Path:
    """The whole `prism export`: load, trace, quantize, lay out bundles."""
    model = models.load(source)
    settings.check(prism_model(model).spec)  # fail before minutes of tracing
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BundleError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    with tempfile.TemporaryDirectory(prefix="prism-graphs-") as tmp:
        graphs = export_graphs(model, Path(tmp), opset=settings.opset, quantize=settings.quantize, progress=progress)
        if isinstance(source, (str, os.PathLike)):
            graphs.source = str(Path(source).resolve()) if Path(source).is_dir() else str(source)
        return write_bundles(graphs, out, settings, overwrite=overwrite)
