"""One device's onnxruntime sessions (`Engine`, the program's onnxruntime backend) and the turning of
request inputs into token-level arrays and a plan (`Requests`).

The device program itself (which graph runs when, what feeds what) is declared in the manifest and run
by `prism_onnx.program.run_device`, here with the Engine as backend: the in-process executor (P threads,
in-memory exchange) and `prism run` on a board (one process, ZeroMQ exchange) run the same data path.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from ..errors import BundleError, InputError, too_long
from ..inputs import prepare
from ..plan import Plan, max_rows
from ..program import DeviceResult, gather_outputs, own_slice, run_device
from .bundle import DeviceBundle
from .preprocess import ImagePreprocessor, TextPreprocessor, load_pixel_file

__all__ = ["DeviceResult", "Engine", "Requests", "wanted_outputs", "export_tag", "gather_outputs", "own_slice",
           "run_device"]


def export_tag(export_id: str) -> int:
    """32-bit tag of an export id, carried in every frame."""
    return int(export_id[:8], 16)


GRAPH_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                      "all": "ORT_ENABLE_ALL"}


def check_providers(names) -> list[str]:
    """onnxruntime execution providers by name, in order of preference; CPU is always the last resort. A
    name the installed onnxruntime does not have is refused with the list of those it has."""
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names or []) if n.strip()]
    full = ([n if n.endswith("ExecutionProvider") else f"{n}ExecutionProvider" for n in names]
            or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    missing = [n for n in full if n not in available]
    if missing:
        raise InputError(f"onnxruntime execution provider(s) {', '.join(missing)} not available here; this "
                         f"onnxruntime has {', '.join(available)}")
    return full + ([] if "CPUExecutionProvider" in full else ["CPUExecutionProvider"])


class Engine:
    """The onnxruntime sessions of one device bundle: the program's backend on a board.

    threads: intra-op threads (one per board core); providers: execution providers in order of preference
    (CPU, CUDA, TensorRT, CoreML, XNNPACK... as the installed onnxruntime has them); optimization: the graph
    optimization level (disable, basic, extended, all); slowdown: emulate a board this many times slower
    (after each call, sleep for slowdown - 1 times the call's duration; for tests and benchmarks of mixed
    fleets on one machine); memory_arena: onnxruntime's CPU memory arena, off by default: every session (one
    per graph) keeps its arena at the peak of its largest request, which held a SmolLM2 runner at 2.4 GB
    after one 512-token prompt against 1.0 GB without it, at the same speed (docs/RESULTS.md, section 12)."""

    def __init__(self, bundle: DeviceBundle, threads: int = 1, providers=None, optimization: str = "all",
                 slowdown: float = 1.0, memory_arena: bool = False, sessions: dict | None = None):
        """`sessions`: another Engine's sessions of the very same graph files (same sha256), shared instead
        of loaded again (the in-process executor's devices: onnxruntime sessions are safe to run from
        several threads at once, and every device bundle holds the same graphs)."""
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.spec = bundle.spec
        self.program = self.manifest.program
        self.providers = check_providers(providers)
        if optimization not in GRAPH_OPTIMIZATION:
            raise InputError(f"graph optimization '{optimization}': choose one of {', '.join(GRAPH_OPTIMIZATION)}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = bool(memory_arena)
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[optimization])
        self.sessions = sessions or {name: self._session(name, opts) for name in self.program.graphs()}
        self.recorder: list | None = None  # set to a list to record every (graph, feeds) run (benchmarks)
        self.slowdown = float(slowdown)

    def _session(self, name: str, opts) -> ort.InferenceSession:
        """Graph `name`'s session; a graph using contrib operators (int4 weights) that this onnxruntime build
        lacks is refused naming them (a minimal build for a board may leave out com.microsoft)."""
        try:
            return ort.InferenceSession(str(self.bundle.graph(name)), opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own pybind exception types
            domains = self.manifest.graphs[name].domains
            if not domains:
                raise
            raise BundleError(f"{self.bundle.root.name}/{self.manifest.graphs[name].file}: onnxruntime "
                              f"{ort.__version__} cannot load it ({str(e).splitlines()[0][:200]}); it uses "
                              f"{', '.join(domains)} operators (--quantize {self.manifest.settings.quantize}): install "
                              f"an onnxruntime build with the contrib operators") from None

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        if self.recorder is not None:
            self.recorder.append((graph, feeds))
        if self.slowdown == 1.0:
            return self.sessions[graph].run(None, feeds)
        t0 = time.perf_counter()
        out = self.sessions[graph].run(None, feeds)
        time.sleep((self.slowdown - 1.0) * (time.perf_counter() - t0))
        return out

    def exchange_kwargs(self, timeout: float = 30.0) -> dict:
        """Settings an Exchange endpoint for this bundle needs."""
        return exchange_kwargs(self.manifest, timeout)


def exchange_kwargs(m, timeout: float = 30.0) -> dict:
    """Settings an Exchange endpoint for an export (its Manifest) needs."""
    s = m.settings
    return dict(wire_dtype=s.wire_dtype, width=m.model.row_width, points=[p.name for p in m.program.points],
                export_tag=export_tag(m.export_id),
                max_rows=max_rows(s.max_seq_len, s.compression_ratio, s.window, s.devices),
                max_batch=s.max_batch, timeout=timeout)


def wanted_outputs(spec, outputs) -> set[str] | None:
    """Validate a request's choice of outputs (None = all)."""
    if outputs is None:
        return None
    known = set(spec.outputs)
    unknown = set(outputs) - known
    if unknown or not outputs:
        raise InputError(f"unknown outputs {sorted(unknown)}; this model returns {sorted(known)}")
    return set(outputs)


class Requests:
    """Turns request inputs (texts, images, pixel arrays, ids) into token-level arrays + the plan, using
    only what the bundle carries (tokenizer.json / preprocessor_config.json)."""

    def __init__(self, bundle: DeviceBundle, manifest=None):
        """`manifest`: the bundle's manifest with other plan settings (Executor.with_settings); default its own."""
        self.bundle = bundle
        self.manifest = manifest or bundle.manifest
        self.spec = bundle.spec
        pre = self.manifest.preprocessing
        self.text = None
        self.image = None
        if pre.kind == "text" and pre.tokenizer:
            self.text = TextPreprocessor(bundle.root / pre.tokenizer, self.manifest.settings.max_seq_len, pre.pad_id)
        if pre.kind == "image":
            self.image = ImagePreprocessor.from_file(bundle.root / pre.config, self.spec.image_size)

    def model_inputs(self, *, texts=None, images=None, input_ids=None, attention_mask=None, pixel_values=None,
                     left_pad: bool = False):
        """The transformers-style inputs for one request (texts padded on the left with `left_pad`: for
        generation)."""
        if texts:
            if self.text is None:
                raise InputError("this bundle has no tokenizer (" + ("an image model" if self.image else
                                 "none was exported") + "); send input ids" + ("" if self.image else " instead"))
            return self.text(list(texts), left=left_pad)
        if images:
            if self.spec.input_kind != "image":
                raise InputError(f"{self.spec.model_type} takes text, not images")
            arrays = [load_pixel_file(p) for p in images if str(p).endswith(".npy")]
            if arrays:
                if len(arrays) != len(images):
                    raise InputError("give either image files or .npy pixel arrays, not both")
                return {"pixel_values": np.concatenate(arrays)}
            return self.image(list(images))
        if pixel_values is not None:
            return {"pixel_values": np.asarray(pixel_values, np.float32)}
        if input_ids is not None:
            out = {"input_ids": np.asarray(input_ids, np.int64)}
            if attention_mask is not None:
                out["attention_mask"] = np.asarray(attention_mask, np.int64)
            return out
        raise InputError("a request needs texts, images, pixel_values or input_ids")

    def prepare(self, inputs: dict, split_weights=None, ranks=None) -> tuple[dict[str, np.ndarray], Plan]:
        """-> (token-level arrays [B, N, ...], the plan over the devices `ranks`, default all)."""
        token_inputs, mask = prepare(self.spec, inputs)
        B, N = mask.shape
        s = self.manifest.settings
        if N > s.max_seq_len:
            raise too_long(f"sequence of {N} tokens is longer than this export's --max-seq-len {s.max_seq_len}")
        if B > s.max_batch:
            raise too_long(f"batch of {B} is larger than this export's limit {s.max_batch}")
        return token_inputs, self.manifest.plan(mask, split_weights, ranks)
