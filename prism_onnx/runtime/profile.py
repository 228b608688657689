"""`prism profile BUNDLE`: how fast this board computes, as a weight for `--split`.

The device's own program (every graph it runs, with no received rows: nothing comes over the network) is run
on random tokens at a few sequence lengths N, on `threads` onnxruntime threads, and timed (the median of
`repeats` runs). The speed at the longest N, in tokens per second, is the board's weight: run it on every
board and give the numbers to `prism run --split w0,w1,...` (or let `--split auto` measure them while it
serves). onnxruntime + numpy only, like `prism run`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from ..inputs import prepare
from ..program import own_slice, run_device
from .bundle import DeviceBundle
from .device import Engine
from .exchange import LocalHub


def profile(bundle_dir: str | Path, lengths=(64, 128, 256), repeats: int = 3, threads: int = 1,
            echo=lambda *_: None) -> dict:
    bundle = DeviceBundle.load(bundle_dir)
    m, rank = bundle.manifest, bundle.rank
    engine = Engine(bundle, threads)
    spec = m.model
    hub = LocalHub(m.settings.devices, **engine.exchange_kwargs())
    rng = np.random.default_rng(0)
    if spec.input_kind == "image":
        lengths = [None]
    else:
        lengths = sorted({min(int(n), m.settings.max_seq_len) for n in lengths})
    points, request = [], 0
    for n in lengths:
        if n is None:
            S, C = spec.image_size, spec.num_channels
            raw = {"pixel_values": rng.standard_normal((1, C, S, S)).astype(np.float32)}
        else:
            raw = {"input_ids": rng.integers(1, spec.vocab_size, (1, n))}
        token_inputs, mask = prepare(spec, raw)
        plan = m.plan(mask, None, [rank])  # this device alone: no rows are received
        own = own_slice(token_inputs, plan, rank)
        times = []
        for _ in range(repeats + 1):  # the first run warms the sessions up
            request += 1
            res = run_device(m.program, engine, plan, rank, own, hub.endpoints[rank], request)
            times.append(res.compute_s)
        t = statistics.median(times[1:])
        tokens = plan.n_tokens
        points.append({"tokens": tokens, "compute_ms": round(1e3 * t, 3), "tokens_per_s": round(tokens / t, 1),
                       "per_token_layer_us": round(1e6 * t / tokens / spec.num_layers, 2)})
        echo(f"device {rank}: {tokens} tokens in {1e3 * t:.1f} ms ({tokens / t:.0f} tokens/s)")
    return {"bundle": str(bundle_dir), "rank": rank, "threads": threads, "points": points,
            "weight": points[-1]["tokens_per_s"]}
