"""What `prism export` can check before it imports torch and loads the model (15 s or more on a small
board or a busy machine): the options against each other, the output folder, and a local model folder's
config.json read as JSON. Torch-free and transformers-free; the full checks run again after loading
(models.load_config, ExportSettings.for_model), so anything this misses is still refused, only later.

    out            a non-empty folder without --overwrite: refused (OptionProblem on --out)
    max_seq_len    below the devices, or above every position count the config names: refused
                   (OptionProblem on --max-seq-len)
    source         a folder without config.json (and no .gguf file), a path that does not exist, a model type
                   with no family file in prism_onnx/models/: ModelLoadError, as load_config would say
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError, PrismError

FAMILIES = Path(__file__).parent / "models"
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


class OptionProblem(PrismError):
    """An option value that cannot work (the CLI reports it as a misused option, exit 2); `option` names it."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def check_export(source, out, settings, overwrite: bool = False) -> None:
    """The export's options and source, as far as they can be checked without loading the model."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OptionProblem("--out", f"{out} exists and is not empty; choose another --out or pass --overwrite")
    if settings.max_seq_len is not None and settings.max_seq_len < settings.devices:
        raise OptionProblem("--max-seq-len", f"{settings.max_seq_len} is fewer tokens than the {settings.devices} "
                                             f"devices (every device needs one)")
    config = _local_config(source)
    if config is None:
        return
    model_type = str(config.get("model_type", ""))
    name = model_type.replace("-", "_")
    if not name.isidentifier() or not (FAMILIES / f"{name}.py").is_file() or name in ("base", "sources"):
        supported = sorted(p.stem for p in FAMILIES.glob("*.py") if p.stem not in ("__init__", "base", "sources"))
        raise ModelLoadError(f"unsupported model type '{model_type}'; supported: {', '.join(supported)}")
    positions = [int(config[k]) for k in POSITION_KEYS if isinstance(config.get(k), int)]
    if settings.max_seq_len is not None and positions and settings.max_seq_len > max(positions):
        raise OptionProblem("--max-seq-len", f"{settings.max_seq_len} is more tokens than the model's positions "
                                             f"({max(positions)} in its config.json)")


def _local_config(source) -> dict | None:
    """config.json of a local model folder; None for a hub id, a GGUF file or GGUF folder (checked later)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() or path.suffix.lower() == ".gguf":
        return None  # a GGUF file (or not: models.load says which)
    if path.is_dir():
        if (path / "config.json").is_file():
            try:
                config = json.loads((path / "config.json").read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                return None  # load_config names the problem
            return config if isinstance(config, dict) else None
        if any(p.suffix.lower() == ".gguf" for p in path.iterdir()):
            return None
        raise ModelLoadError(f"'{source}' is a folder without a config.json: not a transformers model folder")
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelLoadError(f"'{source}' is not a model folder (no such folder) nor a Hugging Face hub id")
    return None  # a hub id
