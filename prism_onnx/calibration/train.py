"""The calibration loop: gradient descent on the distillation loss (distill.py) over the trained parameter
groups (params.py), with a step count and a time budget.

Optimiser: Adam, learning rate warmed up linearly over the first 5% of training, then cosine-decayed to 0;
training progress is counted in steps, or in seconds of the time budget when that runs out first (so a
budget-limited run still ends at a small learning rate). No weight decay (it would pull norm weights
towards 0, not towards the model's own values).

A step whose loss is below EXACT_LOSS updates nothing: the student already equals the teacher up to float
rounding (at CR=1, or on inputs so short that no device averages two tokens), and Adam would turn that
rounding noise (gradients ~1e-9) into full-size steps, since it normalises gradient magnitudes. Float32
rounding gives losses of ~1e-13 there; the smallest real compression loss seen is ~1e-5 (GPT-2, P=8, CR=128).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..manifest import PrismSettings
from ..models import PrismModel
from ..reference import prism_model
from . import params as P
from .distill import Batch, Distiller

EXACT_LOSS = 1e-9
# Training runs with one torch thread by default. On this project's shared 2-core build machine, two threads
# made every step 13-20x slower than one (the backward pass's workers spin while the other core is busy):
# the digits ViT took 13-20 s per step with two threads and 1 s with one; 40 steps of a tiny BERT 42 s
# against 0.9 s. `--threads 2` is there for an idle machine.


@dataclass(frozen=True)
class TrainSettings:
    """How calibration trains (recorded in the calibrated export's manifest)."""

    steps: int = 300
    time_budget: float | None = None  # seconds; stops early when reached (checked after every step)
    params: tuple[str, ...] = P.DEFAULT
    rank: int = P.RANK  # of the remote rows' correction (params group "remote")
    lr: float = 3e-3
    batch_size: int = 8
    held_out: float = 0.1  # fraction of the inputs kept out of training, to report the loss on
    seed: int = 0
    threads: int = 1  # torch intra-op threads while training (see THREADS)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"] = list(self.params)
        return d


@dataclass
class TrainReport:
    steps: int  # optimiser steps taken
    exact_steps: int  # steps skipped because the loss was already at float rounding (see EXACT_LOSS)
    seconds: float
    trained_parameters: int
    held_out_inputs: int
    loss_before: float | None  # held-out distillation loss (None without held-out inputs)
    loss_after: float | None
    train_loss: list[float] = field(default_factory=list)  # per step
    max_change: float = 0.0  # largest |change| of a trained value

    def to_dict(self, with_curve: bool = False) -> dict:
        d = asdict(self)
        if not with_curve:
            d.pop("train_loss")
        return d


def schedule(progress: float) -> float:
    """Learning-rate factor at `progress` (0 at the start, 1 at the end of training): linear warmup over the
    first 5%, then cosine decay to 0."""
    if progress < WARMUP:
        return max(progress, 0.1 * WARMUP) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - WARMUP) / (1 - WARMUP))))


WARMUP = 0.05


def calibrate_model(model, settings: PrismSettings, train: list[Batch], held_out: list[Batch],
                    cfg: TrainSettings = TrainSettings(), *, exchange: str | None = None, teacher=None,
                    progress: bool = False) -> tuple[PrismModel, TrainReport]:
    """Calibrate the transformers `model` in place for `settings` (P, CR, split, switches, wire) on the
    unlabeled `train` batches; `teacher` (default: a frozen copy of `model` as given) is the unpartitioned
    model it learns to match. Returns the calibrated PrismModel (the model's weights, plus its layers'
    RemoteCalibration when the "remote" group is trained) and what happened, with the held-out loss before
    and after."""
    from tqdm.auto import tqdm

    if not train:
        raise ValueError("calibration needs at least one training batch")
    teacher = teacher if teacher is not None else copy.deepcopy(model)
    teacher.eval().requires_grad_(False)
    model.eval()
    student = prism_model(model, exchange)
    distiller = Distiller(prism_model(teacher, student.spec.exchange), student, settings)
    trained = P.select(student, model, cfg.params, cfg.rank, cfg.seed)
    before = P.snapshot(trained)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    if student.calibration is not None:
        student.calibration.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(True)
    report = TrainReport(0, 0, 0.0, P.count(trained), sum(b.size for b in held_out), None, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        report.loss_before = distiller.mean_loss(held_out) if held_out else None
        opt = torch.optim.Adam(trained.values(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        order: list[int] = []
        t0 = time.perf_counter()

        def done_fraction(step: int) -> float:  # by steps, or by the time budget when that comes first
            by_time = (time.perf_counter() - t0) / cfg.time_budget if cfg.time_budget else 0.0
            return max(step / cfg.steps, by_time)

        bar = tqdm(total=cfg.steps, desc="calibrating", unit="step", disable=not progress)
        for step in range(cfg.steps):
            if not order:
                order = torch.randperm(len(train), generator=gen).tolist()
            loss = distiller.loss(train[order.pop()]).total
            value = loss.item()
            report.train_loss.append(value)
            if value < EXACT_LOSS:
                report.exact_steps += 1
            else:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * schedule(done_fraction(step))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            report.steps = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}")
            if cfg.time_budget is not None and time.perf_counter() - t0 >= cfg.time_budget:
                break
        bar.close()
        report.seconds = round(time.perf_counter() - t0, 2)
        report.loss_after = distiller.mean_loss(held_out) if held_out else None
    finally:
        torch.set_num_threads(threads)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.eval()
    report.max_change = P.max_change(trained, before)
    return student, report
