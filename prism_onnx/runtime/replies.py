"""What a coordinator answers: the devices' RESULTs of one attempt gathered into one client Reply.

    outputs     token outputs concatenated along the sequence in rank order, pooled ones from rank 0
                (program.gather_outputs); for generation the tail device's generated ids, with their texts
    stats       the plan in force (its devices, spans and split weights, and `split`: the `prism infer --split`
                value that reproduces it), bytes per device and exchange point
                (the devices' own counters), onnxruntime time, latency (program.RequestStats)
    batched     a request that rode on another's attempt (batching.py) gets its own rows, and of token outputs
                its own tokens
    sentence_embedding  for an export of a sentence-transformers folder, the sentence embedding of every row
                (last_hidden_state pooled as the folder says, pooling.py): the vector /v1/embeddings returns
Torch-free, no sockets: the coordinator calls it with the results it holds.
"""

from __future__ import annotations

import numpy as np

from ..detokenize import TextStream
from ..errors import ErrorInfo
from ..pooling import check_pooling, pool
from ..program import DeviceResult, RequestStats, gather_outputs
from .exchange import Traffic
from .schema import GENERATED, Reply, Result, WireError
from .split import split_arg

EMBEDDINGS, SENTENCE_EMBEDDING = "last_hidden_state", "sentence_embedding"


def error_reply(call: int | None, info: ErrorInfo) -> Reply:
    return Reply(call=call, error=WireError.of(info))


class Replies:
    """Builds the replies of one export's coordinator (its program, the tokenizer for generated texts)."""

    def __init__(self, bundle):
        self.bundle, self.program, self.limits = bundle, bundle.manifest.program, bundle.limits
        self._tokenizer = None
        pre = bundle.manifest.preprocessing
        if pre.tokenizer:
            from .preprocess import TextPreprocessor

            self._tokenizer = TextPreprocessor(bundle.root / pre.tokenizer, self.limits.max_seq_len, pre.pad_id)
        self.pooling = check_pooling(pre.pooling) if (pre.pooling or {}).get("source") == "sentence-transformers" \
            else None

    def assemble(self, p, now: float) -> tuple[dict, dict]:
        """The devices' results of p's attempt -> (the reply's fields, its arrays). Raises ValueError or
        KeyError when the devices' outputs do not fit together."""
        results = [DeviceResult(r.rank, r.arrays, dict(r.timings or {}), self._traffic(r))
                   for r in p.results.values()]
        stats = RequestStats.of(results, latency_ms=1e3 * (now - p.t0))
        stats.spans = [list(p.results[r].span) for r in stats.ranks]
        stats.split_weights = list(p.attempt.split_weights) if p.attempt.split_weights else None
        split = split_arg(stats.ranks, stats.split_weights, self.limits.devices)
        fields = {"stats": {**stats.to_dict(), "split": split}, "attempts": p.attempts, "reruns": tuple(p.reruns)}
        tail: Result = p.results[p.attempt.tail]
        if tail.generation is not None:
            ids = tail.arrays[GENERATED]
            g = tail.generation
            generation = {"prompt_tokens": g.prompt_tokens, "generated_tokens": g.generated_tokens,
                          "time_to_first_token_ms": g.time_to_first_token_ms,
                          "decode_tokens_per_s": g.decode_tokens_per_s, "cache_bytes": g.cache_bytes,
                          "finish_reasons": list(g.finish_reasons), "texts": self.texts(ids)}
            if p.first_token is not None:
                generation["time_to_first_token_ms_at_coordinator"] = round(1e3 * (p.first_token - p.t0), 3)
            return {**fields, "generation": generation}, {GENERATED: ids}
        return fields, gather_outputs(self.program, results)

    def _traffic(self, r: Result) -> Traffic:
        t = r.traffic
        return Traffic(self.limits.layers, list(t.sent), list(t.received), t.rejected_frames) if t is not None \
            else Traffic(self.limits.layers)

    def answers(self, p, fields: dict, outputs: dict) -> list[tuple[bytes, Reply]]:
        """(client, Reply) of every request the attempt answered: p's, and those that rode on it (batched:
        each its own rows)."""
        out = []
        for q in [p, *p.riders]:
            if q.rows is None:
                out.append((q.client, Reply(call=q.req.call, **fields, arrays=self.embedded(q.req, outputs))))
            else:
                batched = {"requests": 1 + len(p.riders), "rows": list(q.rows[:2])}
                out.append((q.client, Reply(call=q.req.call, **fields, batched=batched,
                                            arrays=self.embedded(q.req, self.rows(outputs, *q.rows)))))
        return out

    def embedded(self, req, outputs: dict) -> dict:
        """A request's outputs, with its `sentence_embedding` first when the export comes from a
        sentence-transformers folder and the request asked for every output: pooled from last_hidden_state
        over the request's own attention mask (its texts tokenized again, as the worker did)."""
        hidden = outputs.get(EMBEDDINGS)
        if self.pooling is None or hidden is None or req.outputs is not None:
            return outputs
        if req.texts is not None:
            mask = self._tokenizer(list(req.texts))["attention_mask"]
        else:
            ids = req.arrays["input_ids"]
            mask = req.arrays.get("attention_mask", np.ones(ids.shape, np.int64))
        mask = np.atleast_2d(mask)[:, :hidden.shape[1]]
        return {SENTENCE_EMBEDDING: pool(hidden, mask, self.pooling), **outputs}

    def rows(self, outputs: dict, start: int, end: int, tokens: int) -> dict:
        """A batched request's own outputs: its rows, and of token outputs [B, N, ...] its own first `tokens`
        positions (a request padded on the right to the batch's length: `prism run --batch-pad`)."""
        per_token = set(self.program.token_outputs)
        return {k: v[start:end, :tokens] if k in per_token else v[start:end] for k, v in outputs.items()}

    def new_text(self, p, ids) -> tuple[str, ...] | None:
        """A streaming request's new tokens ids [B] (-1: the row ended) -> each row's new text, decoded
        incrementally (detokenize.TextStream: whole words and characters, "" while one is incomplete); None
        without a tokenizer."""
        if self._tokenizer is None:
            return None
        if p.streams is None:
            p.streams = [TextStream(self._tokenizer.decode) for _ in range(len(ids))]
        return tuple(st.add(t) if t >= 0 else "" for st, t in zip(p.streams, ids.tolist()))

    def texts(self, ids) -> list[str] | None:
        """Generated ids [B, T] (-1 after a row ended) as text, with the bundle's tokenizer (None: none)."""
        if self._tokenizer is None:
            return None
        return [self._tokenizer.decode([t for t in row if t >= 0]) for row in ids.tolist()]
