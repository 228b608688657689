"""Typed, torch-free descriptions of a model, a deployment's settings and a bundle's manifest.

    ModelSpec        the facts about a model that the plan, the exporter and the runtime need
    PrismSettings    what decides the partition plan and the wire: P, CR, split, switches, wire precision;
                     `baseline()` is uncompressed position-wise partitioning (Voltage): CR=1, no sinks, float32
    ExportSettings   PrismSettings + what is fixed at export: limits, weight quantization, opset
    Manifest         what `manifest.json` holds (export and device bundles), read with checked types

Every module reads a manifest through `Manifest` attributes, never by string keys: `Manifest.from_dict` is
the one place that knows the JSON layout, and it refuses a manifest that does not fit, naming the file.
The CLI builds its options from the dataclass fields' metadata (help text, choices), so an option and the
setting it fills cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from .errors import BundleError, PlanError
from .plan import FAR_CONTEXT
from .program import Program

FORMAT = "prism-onnx-bundle"
FORMAT_VERSION = 2
WIRE_DTYPES = ("float32", "float16", "int8")
QUANTIZE = ("none", "int8", "int4")
EXCHANGES = ("hidden", "kv")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits and GatherBlockQuantized: powers of two >= 16
DEFAULT_OPSET = 20


def _tuple(v) -> tuple:
    return tuple(v) if v is not None else ()


@dataclass(frozen=True)
class ModelSpec:
    """What a model family's `convert` reports about a model (JSON-serialisable, torch-free).

    exchange: "hidden" = devices send Segment Means of the next layer's attention input ([B, S, D]);
              "kv" = they send Segment Means of their rotated keys and values ([B, S, 2 * kv_heads * head_dim]),
              for rotary models (PRISM.md, "Rotary models").
    """

    model_type: str  # config.model_type, e.g. bert, llama
    architecture: str  # the transformers class, e.g. BertForSequenceClassification
    hidden_size: int
    num_heads: int
    num_layers: int
    max_positions: int  # tokens the position embeddings allow (ViT: 1 + patches, fixed)
    causal: bool  # decoder: partition-aware causal mask
    sinks: tuple[str, ...]  # sink tokens of this family ("first", "last"), sent as own segments when kept
    input_kind: str  # "text" | "image"
    embed_inputs: tuple[str, ...]  # token-level inputs of the embed graph, before position_ids
    token_outputs: tuple[str, ...]  # per-token outputs (gathered along the sequence)
    pooled_outputs: tuple[str, ...]  # outputs read from token 0 on device 0
    exchange: str = "hidden"
    defaults: dict = field(default_factory=dict)  # the family's measured PRISM defaults (window, count_bias, ...)
    kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = num_heads
    head_dim: int = 0  # 0 = hidden_size // num_heads
    vocab_size: int = 0
    image_size: int = 0
    patch_size: int = 0
    num_channels: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("sinks", "embed_inputs", "token_outputs", "pooled_outputs"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        if not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.num_heads)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {self.exchange!r}")

    @property
    def row_width(self) -> int:
        """Values per row on the wire: D for hidden exchange, 2 * kv_heads * head_dim for kv exchange."""
        return self.hidden_size if self.exchange == "hidden" else 2 * self.kv_heads * self.head_dim

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.token_outputs + self.pooled_outputs

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


FALLBACK_DEFAULTS = {"count_bias": True, "keep_sinks": True, "window": 0}  # the paper's PRISM
# a manifest written before the halo window existed ran without one, whatever its family's default is now
BEFORE_WINDOW = {"window": 0, "far": "means"}


def option(help: str, **more) -> dict:
    """Field metadata the CLI turns into an option."""
    return {"help": help, **more}


@dataclass(frozen=True)
class PrismSettings:
    """What decides a request's partition plan and what travels on the wire."""

    devices: int = field(metadata=option("Number of devices P.", flag="--devices", short="-P", min=1))
    compression_ratio: int = field(metadata=option("Segment length CR: one mean row per CR tokens.",
                                                 flag="--compression-ratio", short="--cr", min=1))
    split_weights: tuple[float, ...] | None = field(default=None, metadata=option(
        "Uneven split: one positive weight per device, e.g. 2,1,1 (default: even).", flag="--split"))
    count_bias: bool | None = field(default=None, metadata=option(
        "Add log(count) to the attention score of a mean row (default: the model family's measured choice)."))
    keep_sinks: bool | None = field(default=None, metadata=option(
        "Send sink tokens ([CLS], [SEP], the first token) as segments of their own (default: the model "
        "family's measured choice)."))
    wire_dtype: str = field(default="float32", metadata=option(
        "Precision of the means on the wire (int8: one scale per row).", choices=WIRE_DTYPES))
    window: int | None = field(default=None, metadata=option(
        "Halo window W: each device also receives the W tokens before its span (decoders; encoders: and after "
        "it) at full resolution, one row per token (0: the paper's PRISM; default: the model family's "
        "measured choice).", min=0))
    far: str = field(default="means", metadata=option(
        "What a device receives of the remote tokens outside its window: their segment means, or none "
        "(window and sinks only).", choices=FAR_CONTEXT))

    def __post_init__(self):
        if self.split_weights is not None:
            object.__setattr__(self, "split_weights", tuple(float(w) for w in self.split_weights))
        if not isinstance(self.devices, int) or self.devices < 1:
            raise PlanError(f"devices must be an integer >= 1, got {self.devices!r}")
        if not isinstance(self.compression_ratio, int) or self.compression_ratio < 1:
            raise PlanError(f"compression ratio must be an integer >= 1, got {self.compression_ratio!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise PlanError(f"unknown wire dtype '{self.wire_dtype}'; choose one of {', '.join(WIRE_DTYPES)}")
        if self.window is not None and (not isinstance(self.window, int) or isinstance(self.window, bool)
                                        or self.window < 0):
            raise PlanError(f"window must be an integer >= 0, got {self.window!r}")
        if self.far not in FAR_CONTEXT:
            raise PlanError(f"far context '{self.far}': choose one of {', '.join(FAR_CONTEXT)}")
        w = self.split_weights
        if w is not None:
            if len(w) != self.devices:
                raise PlanError(f"--split has {len(w)} weights for {self.devices} devices")
            if not all(math.isfinite(x) and x > 0 for x in w):
                raise PlanError(f"--split weights must be positive numbers, got {','.join(f'{x:g}' for x in w)}")

    def resolved(self, spec: "ModelSpec") -> "PrismSettings":
        """These settings with the ones left to the model family (None) filled from its measured defaults
        (ModelSpec.defaults: the family file's DEFAULTS), else the paper's: count bias on, sinks kept, no
        window."""
        d = {**FALLBACK_DEFAULTS, **(getattr(spec, "defaults", None) or {})}
        return replace(self, **{k: d[k] for k in FALLBACK_DEFAULTS if getattr(self, k) is None})

    def baseline(self) -> "PrismSettings":
        """Uncompressed position-wise partitioning (Voltage) on the same devices and split: CR=1, no sink
        rows, no window, float32 on the wire. The reference that traffic and compute reductions are measured
        against."""
        return replace(self, compression_ratio=1, keep_sinks=False, wire_dtype="float32", window=0, far="means")

    def prism(self) -> "PrismSettings":
        """Only the plan-and-wire part (drops export-time fields of subclasses)."""
        return PrismSettings(**{f.name: getattr(self, f.name) for f in fields(PrismSettings)})


@dataclass(frozen=True)
class ExportSettings(PrismSettings):
    """PrismSettings plus what is fixed when the graphs are written (recorded in every manifest)."""

    max_seq_len: int | None = field(default=None, metadata=option(
        "Longest sequence the bundles accept (default: the model's positions).", min=1))
    max_batch: int = field(default=64, metadata=option(
        "Largest batch a request (and a means frame) may carry; runners refuse more.", min=1))
    quantize: str = field(default="none", metadata=option(
        "Weights: int8 (dynamic int8, per channel) or int4 (4-bit blocks: MatMulNBits, GatherBlockQuantized for "
        "the embedding; onnxruntime.quantization).", choices=QUANTIZE))
    block_size: int = field(default=32, metadata=option(
        "int4: weights per quantization block, each with its own scale (16, 32, 64, 128 or 256; smaller is more "
        "accurate and larger).", min=16))
    opset: int = field(default=DEFAULT_OPSET, metadata=option("ONNX opset of the exported graphs.", min=18))
    exchange: str = field(default="auto", metadata=option(
        "What devices exchange: hidden (Segment Means of the attention input, the paper) or kv (of the rotated "
        "keys and values; generation decodes faster with it). auto: the family's default.",
        choices=("auto",) + EXCHANGES))

    def __post_init__(self):
        super().__post_init__()
        if self.quantize not in QUANTIZE:
            raise PlanError(f"unknown quantization '{self.quantize}'; choose one of {', '.join(QUANTIZE)}")
        if self.exchange not in ("auto",) + EXCHANGES:
            raise PlanError(f"unknown exchange '{self.exchange}'; choose one of auto, {', '.join(EXCHANGES)}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise PlanError(f"max batch must be an integer >= 1, got {self.max_batch!r}")
        if self.block_size not in BLOCK_SIZES:
            raise PlanError(f"block size {self.block_size!r}: choose one of {', '.join(map(str, BLOCK_SIZES))}")

    def for_model(self, spec: ModelSpec) -> "ExportSettings":
        """These settings checked against a model, with max_seq_len resolved."""
        max_len = self.max_seq_len or spec.max_positions
        if max_len > spec.max_positions or max_len < self.devices:
            raise PlanError(f"max sequence length {max_len} must be between the devices ({self.devices}) and the "
                            f"model's positions ({spec.max_positions})")
        if spec.input_kind == "image" and self.max_seq_len not in (None, spec.max_positions):
            raise PlanError(f"an image model has a fixed length of {spec.max_positions} tokens")
        return replace(self, max_seq_len=max_len).resolved(spec)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["split_weights"] = list(self.split_weights) if self.split_weights else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExportSettings":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        return cls(**d)


def setting_fields(cls) -> list:
    """The dataclass fields of a settings class, in order (for building CLI options)."""
    return [f for f in fields(cls) if f.metadata]


def field_default(f) -> Any:
    return None if f.default is MISSING else f.default


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple  # ints and symbolic names

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphFile:
    """One ONNX file of a bundle and its inputs and outputs.

    data     the ONNX external-data files the graph's initializers live in, besides the graph file (e.g. the
             tied embedding table, `embed.onnx.data`, read by both `embed` and `token_head`); every one is in
             the bundle's sha256 table like any file
    domains  the operator domains beyond the ONNX standard that the graph uses (`com.microsoft` for int4
             weights: MatMulNBits, GatherBlockQuantized); empty for standard ONNX
    """

    file: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    data: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = {"file": self.file, "inputs": [t.to_dict() for t in self.inputs],
             "outputs": [t.to_dict() for t in self.outputs]}
        if self.data:
            d["data"] = list(self.data)
        if self.domains:
            d["domains"] = list(self.domains)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GraphFile":
        tensors = lambda key: tuple(TensorInfo(str(t["name"]), str(t["dtype"]), tuple(t["shape"]))  # noqa: E731
                                    for t in d[key])
        return cls(str(d["file"]), tensors("inputs"), tensors("outputs"), tuple(str(f) for f in d.get("data", ())),
                   tuple(str(x) for x in d.get("domains", ())))

    def files(self) -> list[str]:
        """The graph file and its external-data files."""
        return [self.file, *self.data]


@dataclass(frozen=True)
class Preprocessing:
    """How a board turns raw inputs into model inputs (a tokenizer.json, or an image config) and what it
    needs to serve them over HTTP (prism_onnx/serve):

    pooling        how a sentence embedding is pooled from last_hidden_state (prism_onnx/pooling.py):
                   {"modes": ["mean"], "normalize": bool, "source": ...}, read at export from the model
                   folder's sentence-transformers modules (1_Pooling/config.json, Normalize); None for image
                   models and for exports that predate the field (then: mean pooling, not normalized)
    chat_template  a Jinja file (chat_template.jinja) from the tokenizer's chat_template, when it has one
    special_tokens the tokenizer's bos/eos/unk/pad token strings, which chat templates refer to
    """

    kind: str  # "text" | "image"
    tokenizer: str | None = None  # file in the bundle (text)
    pad_id: int = 0
    config: str | None = None  # preprocessor_config.json (image)
    pooling: dict | None = None
    chat_template: str | None = None  # file in the bundle
    special_tokens: dict = field(default_factory=dict)

    def files(self) -> list[str]:
        return [f for f in (self.tokenizer, self.config, self.chat_template) if f]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Manifest:
    """manifest.json of an export folder (rank None) or of one device bundle (rank K)."""

    export_id: str
    model: ModelSpec
    settings: ExportSettings
    program: Program
    graphs: dict[str, GraphFile]
    preprocessing: Preprocessing
    files: dict[str, str]  # relative path -> sha256
    source: str = ""
    created: str = ""
    package_version: str = ""
    config_summary: dict = field(default_factory=dict)
    rank: int | None = None
    calibration: dict | None = None  # `prism calibrate`: base model, data sha256, steps, trained parameters

    def __post_init__(self):  # a manifest's settings are always complete: the family's defaults filled in
        object.__setattr__(self, "settings", self.settings.resolved(self.model))

    @property
    def devices(self) -> int:
        return self.settings.devices

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "format_version": FORMAT_VERSION, "export_id": self.export_id,
             "package_version": self.package_version, "created": self.created, "source": self.source,
             "model": self.model.to_dict(), "config_summary": self.config_summary,
             "settings": self.settings.to_dict(), "program": self.program.to_dict(),
             "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
             "preprocessing": self.preprocessing.to_dict()}
        if self.calibration is not None:
            d["calibration"] = dict(self.calibration)
        if self.rank is not None:
            d["rank"] = self.rank
        d["files"] = dict(self.files)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest.json") -> "Manifest":
        """Parse and check a manifest's JSON object; any problem is a BundleError naming `where`."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BundleError(f"{where}: not a {FORMAT} manifest")
        if d.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{where}: bundle format version {d.get('format_version')}, this prism reads "
                              f"{FORMAT_VERSION}; re-export it")
        try:
            rank = d.get("rank")
            calibration = d.get("calibration")
            if calibration is not None and not isinstance(calibration, dict):
                raise TypeError(f"calibration must be an object, got {type(calibration).__name__}")
            m = cls(
                export_id=str(d["export_id"]), model=ModelSpec.from_dict(d["model"]),
                settings=ExportSettings.from_dict({**BEFORE_WINDOW, **d["settings"]}),
                program=Program.from_dict(d["program"]),
                graphs={str(k): GraphFile.from_dict(g) for k, g in d["graphs"].items()},
                preprocessing=Preprocessing(**d["preprocessing"]),
                files={str(k): str(v) for k, v in d["files"].items()},
                source=str(d.get("source", "")), created=str(d.get("created", "")),
                package_version=str(d.get("package_version", "")), config_summary=dict(d.get("config_summary", {})),
                rank=None if rank is None else int(rank), calibration=calibration,
            )
        except (KeyError, TypeError, ValueError, AttributeError, PlanError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        missing = sorted(set(m.program.graphs()) - set(m.graphs))
        if missing:
            raise BundleError(f"{where}: the device program runs graphs {missing} that the manifest does not list")
        if m.rank is not None and not 0 <= m.rank < m.devices:
            raise BundleError(f"{where}: rank {m.rank} outside 0..{m.devices - 1}")
        return m

    def plan(self, attention_mask, split_weights=None, ranks=None):
        """The partition plan of a request under these settings (every device computes the same one):
        over the devices `ranks` (default all), with `split_weights` per plan position (default the
        export's weights of those devices)."""
        from .plan import plan_for

        return plan_for(self.model, attention_mask, self.settings, split_weights, ranks)
