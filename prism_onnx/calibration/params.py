"""Which parameters calibration trains: named groups of a PrismModel's parameters.

    remote   new, per layer: a RemoteCalibration of the received mean rows (prism.py): per-head scale and
             offset of their log(count) bias, and a low-rank correction of the rows themselves. Identity as
             created; rows of one token are never touched, so calibration at CR=1 changes nothing. Saved
             beside the transformers weights (models.CALIBRATION_FILE) and traced into the layer graphs.
    norms    affine parameters (weight, and bias where there is one) of every LayerNorm / RMSNorm the device
             program runs: embeddings, blocks, final norm
    biases   biases of the blocks' linear layers (attention projections, MLP)

Of norms and biases only the transformers model's own tensors are selected (PrismModel shares them), so
`save_pretrained` keeps everything that was trained. The one exception in the families, GPT-2's query, key
and value split out of the packed `c_attn` as copies, is left out (its norms and other biases are trained).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import InputError
from ..models import PrismModel


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _remote(pm: PrismModel, rank: int, seed: int):
    cal = pm.calibration if pm.calibration is not None else pm.add_calibration(rank, seed)
    return ((f"calibration.{k}", p) for k, p in cal.named_parameters())


def _norms(pm: PrismModel, rank: int, seed: int):
    for name, m in pm.named_modules():
        if _is_norm(m):
            yield from ((f"{name}.{k}", p) for k, p in m.named_parameters(recurse=False))


def _biases(pm: PrismModel, rank: int, seed: int):
    for name, m in pm.blocks.named_modules():
        if _is_linear(m) and getattr(m, "bias", None) is not None:
            yield f"blocks.{name}.bias", m.bias


GROUPS: dict[str, Callable] = {"remote": _remote, "norms": _norms, "biases": _biases}
DEFAULT = ("remote", "norms")
RANK = 8  # of the remote rows' low-rank correction


def check_groups(groups) -> None:
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise InputError(f"unknown parameter group(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(GROUPS)}")


def select(pm: PrismModel, model: nn.Module, groups, rank: int = RANK, seed: int = 0) -> dict[str, nn.Parameter]:
    """{name: parameter} of the groups, each tensor once (see the module docstring). `model` is the
    transformers model `pm` was converted from."""
    check_groups(groups)
    own = {id(p) for p in model.parameters()}
    new = set() if pm.calibration is None else {id(p) for p in pm.calibration.parameters()}
    out: dict[str, nn.Parameter] = {}
    for g in groups:
        for name, p in GROUPS[g](pm, rank, seed):
            if g == "remote":
                new.add(id(p))
            if (id(p) in own or id(p) in new) and not any(p is q for q in out.values()):
                out[name] = p
    if not out:
        raise InputError(f"parameter groups {', '.join(groups)} select no parameters of this model")
    return out


def count(params: dict[str, nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in params.items()}


def max_change(params: dict[str, nn.Parameter], before: dict[str, torch.Tensor]) -> float:
    """Largest |change| of any trained value since `before` (0.0: calibration left the model as it was)."""
    return max((float((p.detach() - before[k]).abs().max()) for k, p in params.items() if p.numel()), default=0.0)
