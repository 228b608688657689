"""MiniLM long-text calibration (issue 14): embedding cosine against the full model on 32 WikiText-2 test
paragraphs of 256-512 tokens, at P devices and CR=128, before and after `calibrate_model` on WikiText-2
valid paragraphs (disjoint), with the parameter groups given. Numbers in docs/RESULTS.md section 10.

    python benchmarks/calibration_longtext.py remote 0.003 150 on 4     # groups, lr, steps, count bias, P
"""

import copy
import sys
import time

import numpy as np
import torch
from transformers import AutoTokenizer

from prism_onnx import models
from prism_onnx.calibration.distill import Batch
from prism_onnx.calibration.train import TrainSettings, calibrate_model
from prism_onnx.data import wikitext
from prism_onnx.evaluate.probe import MINILM, mean_pool
from prism_onnx.inputs import prepare
from prism_onnx.manifest import PrismSettings
from prism_onnx.reference import prism_model, simulate

torch.set_num_threads(1)
groups = tuple(sys.argv[1].split(","))
lr, steps, cb = float(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "on"
P = int(sys.argv[5]) if len(sys.argv) > 5 else 4
tok = AutoTokenizer.from_pretrained(models.resolve_source(MINILM))


def paragraphs(split, k, lo=256, hi=512):
    out = []
    for line in wikitext(split).splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        if lo <= len(tok(line)["input_ids"]) <= hi:
            out.append(line)
        if len(out) == k:
            break
    return out


test, calib = paragraphs("test", 32), paragraphs("valid", 400, 64, 100000)
model = models.load(MINILM)
teacher = copy.deepcopy(model)


def cosine() -> float:
    cs = []
    for t in test:
        enc = tok([t], return_tensors="np", truncation=True)
        with torch.no_grad():
            a = simulate(model, dict(enc), devices=P, compression_ratio=128, count_bias=cb).last_hidden_state.numpy()
            b = teacher(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
        m = enc["attention_mask"]
        cs.append(float((mean_pool(a, m) * mean_pool(b, m)).sum()))
    return float(np.mean(cs))


spec = prism_model(model).spec
batches = [Batch(*prepare(spec, dict(tok([t], return_tensors="np", truncation=True, max_length=512)))) for t in calib]
print("calibration paragraphs", len(calib), "cosine before", round(cosine(), 4), flush=True)
t0 = time.time()
_, report = calibrate_model(model, PrismSettings(devices=P, compression_ratio=128, count_bias=cb), batches[:-20],
                            batches[-20:], TrainSettings(steps=steps, params=groups, lr=lr), teacher=teacher)
print(report.to_dict())
print("cosine after", round(cosine(), 4), "seconds", round(time.time() - t0, 1))
