"""How much does the WikiText GPT-2 task model use context from other partitions? The bound PRISM sits between.

On the same test windows that `prism evaluate --task wikitext` scores, perplexity of the full model (every
token sees its whole window) against "no exchange at all": the window cut into P contiguous partitions and
each run alone (global position ids kept), so a token sees only its own partition. PRISM's perplexity
lies between the two when the model uses cross-partition context; when the two are close, the task cannot
tell a good compression from a bad one.

    python benchmarks/lm_context.py --devices 2,4,8 --json out/results/lm_context.json
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import torch

from prism_onnx import models
from prism_onnx.evaluate.evaluate import WikiTextLM
from prism_onnx.plan import split_tokens
from prism_onnx.runtime.preprocess import TextPreprocessor


@torch.no_grad()
def nll(model, windows: torch.Tensor, devices: int) -> float:
    """Perplexity over windows [n, T] when each of `devices` partitions runs alone."""
    n, T = windows.shape
    logits = torch.cat([model(input_ids=windows[:, s:e], position_ids=torch.arange(s, e)[None].expand(n, -1)).logits
                        for s, e in split_tokens(T, devices)], dim=1)  # [n, T, V]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="mean")
    return math.exp(float(ce))


@click.command()
@click.option("--devices", default="2,4,8", show_default=True)
@click.option("--windows", default=64, show_default=True, help="Test windows (as prism evaluate --task wikitext).")
@click.option("--window", default=256, show_default=True)
@click.option("--task", type=click.Choice(sorted(WikiTextLM.MODELS)), default="wikitext", show_default=True,
              help="Which task model (wikitext: the GPT-2; wikitext-llama: the Llama).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(devices, windows, window, task, json_path):
    task = WikiTextLM(samples=windows, length=window, task=task)  # the windows `prism evaluate` scores
    folder = Path(task.model_source())
    model = models.load(str(folder))
    req = SimpleNamespace(text=TextPreprocessor(folder / "tokenizer.json", window))
    w = torch.from_numpy(np.concatenate([inputs["input_ids"] for inputs, _ in task.batches(req)]))  # [n, window]
    n = len(w)
    rows = {"full": nll(model, w, 1)}
    for P in map(int, devices.split(",")):
        rows[f"P={P} no exchange"] = nll(model, w, P)
    for k, v in rows.items():
        click.echo(f"{k:>16}: perplexity {v:.3f}")
    if json_path:
        Path(json_path).write_text(json.dumps({"windows": n, "window": window, "perplexity": rows}, indent=2))


if __name__ == "__main__":
    main()
