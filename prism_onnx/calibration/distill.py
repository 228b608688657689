"""The objective of calibration: the unpartitioned model (teacher) against the PRISM reference (student).

    teacher   the model with its original weights, run as one device (P=1, CR=1: exact, equal to the
              transformers forward to float rounding, tested), no gradients
    student   the model being calibrated, run by `reference.run_devices` over P devices with the export's
              settings: the same declared program and step modules the exporter traces, so gradients flow
              through the device loop and the float32 exchange (float16/int8 wires: straight-through)

Shapes: a batch holds B inputs of N tokens each (equal lengths, no padding: see data.py); D hidden size.
    last hidden   [B, N, D]   the last layer's output (before any final norm and head), gathered over devices
    outputs       {name: [B, N, ...] token outputs | [B, ...] pooled outputs}, as the program declares them

Loss (0 when the student equals the teacher):
    hidden term   mean over real tokens of |z(s) - z(t)|^2 / D, z = the token vector standardised (zero mean,
                  unit variance): 2 (1 - correlation) per token. Scale-free, so the few tokens and channels
                  with very large activations (first tokens of decoders) do not drown the rest.
    head term     per output: `logits` -> KL(teacher || student) of the softmax per row (token or pooled);
                  any other output -> the standardised squared error above; mean over the outputs
    total         hidden term + head term
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..manifest import PrismSettings
from ..models import PrismModel
from ..plan import Plan, plan_for
from ..program import Program, build_program
from ..reference import run_devices

EXACT = PrismSettings(devices=1, compression_ratio=1)  # the teacher's plan: one device, no compression


@dataclass
class Batch:
    """B inputs of N real tokens each: token-level inputs (inputs.prepare) and their [B, N] attention mask."""

    token_inputs: dict[str, np.ndarray]
    mask: np.ndarray

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])


class LastHidden:
    """on_step hooks that keep every device's output of the last layer step: hidden [B, n_p, D] each."""

    def __init__(self, program: Program, devices: int):
        self.graph = [s.graph for s in program.steps if s.graph.startswith("layer_")][-1]
        self.parts: dict[int, torch.Tensor] = {}
        self.hooks = {p: self._hook(p) for p in range(devices)}

    def _hook(self, rank: int):
        def on_step(step, feeds, results):
            if step.graph == self.graph:
                self.parts[rank] = results[0]
        return on_step

    def gathered(self) -> torch.Tensor:
        return torch.cat([self.parts[p] for p in sorted(self.parts)], dim=1)  # [B, N, D]


def forward(pm: PrismModel, batch: Batch, plan: Plan, program: Program, wire_dtype: str = "float32"
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(last hidden [B, N, D], outputs) of `pm` run by the reference over `plan`'s devices."""
    last = LastHidden(program, plan.devices)
    outputs = run_devices(pm, batch.token_inputs, plan, wire_dtype=wire_dtype, program=program, hooks=last.hooks)
    return last.gathered(), outputs


def standardised_error(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over rows of |z(s) - z(t)|^2 / W for rows [..., W], z = zero mean, unit variance per row (float64)."""
    def z(x):
        x = x.double()
        x = x - x.mean(-1, keepdim=True)
        return x / x.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
    return (z(s) - z(t)).pow(2).mean(-1).mean()


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) || softmax(student)) for logits [..., V], in float64: in float32
    the rounding of log_softmax alone leaves ~1e-8 where the student equals the teacher (see train.EXACT_LOSS)."""
    s = F.log_softmax(student_logits.flatten(0, -2).double(), dim=-1)
    t = F.log_softmax(teacher_logits.flatten(0, -2).double(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@dataclass
class LossParts:
    hidden: torch.Tensor
    head: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.hidden + self.head


class Distiller:
    """Teacher and student for one deployment (PrismSettings); `loss(batch)` is differentiable in the
    student's parameters."""

    def __init__(self, teacher: PrismModel, student: PrismModel, settings: PrismSettings):
        if teacher.spec != student.spec:
            raise ValueError("teacher and student must be the same model")
        self.teacher, self.student, self.settings = teacher, student, settings.prism()
        self.program = build_program(student.spec)

    def teacher_outputs(self, batch: Batch):
        with torch.no_grad():
            return forward(self.teacher, batch, plan_for(self.teacher.spec, batch.mask, EXACT), self.program)

    def loss(self, batch: Batch, teacher=None) -> LossParts:
        """The distillation loss of one batch (see the module docstring); `teacher`: its cached outputs."""
        t_hidden, t_out = teacher if teacher is not None else self.teacher_outputs(batch)
        plan = plan_for(self.student.spec, batch.mask, self.settings)
        s_hidden, s_out = forward(self.student, batch, plan, self.program, self.settings.wire_dtype)
        hidden = standardised_error(s_hidden, t_hidden)
        heads = [self.output_loss(k, s_out[k], t_out[k]) for k in t_out]
        return LossParts(hidden, torch.stack(heads).mean() if heads else hidden.new_zeros(()))

    def output_loss(self, name: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if name == "logits":
            return kl_rows(s, t)
        if name in self.student.spec.token_outputs:  # per token, and the mean over the sequence
            return standardised_error(s, t) + standardised_error(s.mean(1), t.mean(1))
        return standardised_error(s, t)

    @torch.no_grad()
    def mean_loss(self, batches: list[Batch]) -> float:
        """The loss averaged over inputs (each batch weighted by its size), without gradients."""
        total = sum(float(self.loss(b).total) * b.size for b in batches)
        return total / max(1, sum(b.size for b in batches))
