"""The in-process executor: all P device bundles in one process (one thread each), rows passed in memory
through the same wire encoding the network uses. onnxruntime + numpy only."""

from __future__ import annotations

import copy
import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import PlanError
from ..program import DeviceResult, RequestStats, gather_outputs, own_slice, run_device
from .bundle import Export
from .device import Engine, Requests, wanted_outputs, exchange_kwargs
from .exchange import LocalHub


@dataclass
class Result:
    outputs: dict[str, np.ndarray]
    devices: list[DeviceResult]
    stats: RequestStats


class Executor:
    """Load an export folder (every sha256 verified) and run requests through all its devices. Devices whose
    graph files are the same (every export's are) share one set of onnxruntime sessions."""

    def __init__(self, export_dir: str | Path | Export, threads: int = 1, timeout: float = 60.0,
                 memory_arena: bool = False):
        """memory_arena: onnxruntime's CPU memory arena (Engine)."""
        self.export = export_dir if isinstance(export_dir, Export) else Export.load(export_dir)
        self.manifest = self.export.manifest
        self.spec = self.manifest.model
        self.program = self.manifest.program
        self.timeout = timeout
        self.engines = []
        for b in self.export.devices:
            first = self.engines[0] if self.engines else None
            same = first is not None and all(b.manifest.files.get(g.file) == first.bundle.manifest.files.get(g.file)
                                              for g in b.manifest.graphs.values())
            self.engines.append(Engine(b, threads, memory_arena=memory_arena,
                                       sessions=first.sessions if same else None))
        self.requests = Requests(self.export.devices[0])
        self.hub = LocalHub(len(self.engines), **exchange_kwargs(self.manifest, timeout))
        self._ids = itertools.count(1)
        self._pool = ThreadPoolExecutor(len(self.engines), thread_name_prefix="prism-device")

    def with_settings(self, **changes) -> "Executor":
        """This executor under other plan-and-wire settings (PrismSettings fields: devices up to the export's,
        compression_ratio, window, far, count_bias, keep_sinks, wire_dtype, split_weights), sharing its
        onnxruntime sessions and threads: a sweep over settings loads the graphs once. The outputs are those
        of an export with these settings (the graphs do not depend on them)."""
        settings = replace(self.manifest.settings, **changes)
        if settings.devices > len(self.engines):
            raise PlanError(f"this executor has {len(self.engines)} devices, the settings ask for {settings.devices}")
        other = copy.copy(self)
        other.manifest = replace(self.manifest, settings=settings)
        other.requests = Requests(self.export.devices[0], other.manifest)
        other.hub = LocalHub(len(self.engines), **exchange_kwargs(other.manifest, self.timeout))
        return other

    def run(self, inputs: dict, outputs=None, split_weights=None, on_step: dict | None = None, ranks=None) -> Result:
        """inputs: transformers-style (input_ids/attention_mask/token_type_ids or pixel_values);
        outputs: the output names to compute and return (default: all); split_weights: this request's
        split, one weight per device of the plan (default: the export's); ranks: the devices that compute it
        (default all; e.g. the ranks a runner's reply reports after a device was lost: the plan in force);
        on_step: {rank: hook(step, feeds, results)} (see program.DeviceRun)."""
        token_inputs, plan = self.requests.prepare(inputs, split_weights, ranks)
        want = wanted_outputs(self.spec, outputs)
        request = next(self._ids)
        hooks = on_step or {}
        futures = [self._pool.submit(run_device, self.program, self.engines[p], plan, p,
                                     own_slice(token_inputs, plan, p), self.hub.endpoints[p], request, want,
                                     hooks.get(p)) for p in plan.ranks]
        results = [f.result() for f in futures]
        return Result(gather_outputs(self.program, results), results, RequestStats.of(results, plan))

    def generate(self, inputs: dict, config=None, on_tokens=None, split_weights=None, ranks=None):
        """Distributed prefill over all devices, then decoding on the tail device (generate.py).
        -> (Generation, RequestStats of the prefill). `config`: a GenerationConfig (default: 16 greedy
        tokens, stop at the model's EOS); on_tokens(step, ids [B]) streams the tokens as they come."""
        import time

        from ..generate import GenerationConfig, check_prompt, decode_from_cache, stop_ids

        config = config or GenerationConfig(stop_token_ids=stop_ids(self.manifest.config_summary))
        t0 = time.perf_counter()
        token_inputs, plan = self.requests.prepare(inputs, split_weights, ranks)
        check_prompt(plan.attention_mask, config, self.spec.max_positions)
        collector, stats = self.prefill(token_inputs, plan)
        tail = plan.tail
        gen = decode_from_cache(self.program, self.engines[tail], collector, token_inputs["input_ids"],
                                plan.attention_mask, config, tail, t0, on_tokens=on_tokens)
        return gen, stats

    def prefill(self, token_inputs: dict, plan):
        """The distributed prefill of a generation request: every device runs the program without heads;
        -> (the tail device's CacheCollector, RequestStats)."""
        from ..generate import CacheCollector, check_generates

        check_generates(self.program)
        tail = plan.tail
        collector = CacheCollector(self.program)
        request = next(self._ids)
        tail_plan, tail_exchange = collector.wrap(plan, tail, self.hub.endpoints[tail])
        futures = [self._pool.submit(run_device, self.program, self.engines[p], tail_plan if p == tail else plan, p,
                                     own_slice(token_inputs, plan, p),
                                     tail_exchange if p == tail else self.hub.endpoints[p], request, set(),
                                     collector if p == tail else None) for p in plan.ranks]
        results = [f.result() for f in futures]
        return collector, RequestStats.of(results, plan)

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        return self.run(inputs).outputs

    def close(self):
        self._pool.shutdown(wait=False)
