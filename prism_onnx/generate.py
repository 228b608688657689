"""Generation: a distributed prefill, then decoding on the tail device from its compressed prefix cache.

After the prefill, the device that holds the last partition (the tail) has for every layer i:
    its own keys and values [B, Hkv, n, dh], as the program carried them into layer i, and
    the key/value rows it received at exchange point i [B, R, W]: the earlier devices' Segment Means of
    their keys and values (W = 2 * Hkv * dh), with their count bias.
Earlier tokens never see later ones (partition-aware causal mask), so this cache is final. The tail
decodes by running the very graphs of the prefill with the cache in the place of the received rows:
the new tokens are the "own" block (causal among themselves), the cache is the remote block (bias 0 for
exact rows, log(count) for means, MASKED for padding), so a decoded token costs no network traffic and
attends exactly as PRISM defines (PRISM.md, "Generation"). At CR=1 it is exact: greedy decoding equals the
unpartitioned model's, token for token.

After the "hidden" exchange (GPT-2 exported with defaults) the received rows are Segment Means of each
layer's attention input, and the layer graphs project remote rows to keys and values themselves; the
cache then holds attention-input rows [B, C, D]: the received means, and the tail's own tokens' rows,
which its prefill computes by running its graphs with an identity averager (one "segment" per token; what
it really sends, averager @ rows, is computed from them: nothing, for the tail of a causal plan). Every
decoding step passes the cache through the same graphs, which project it to keys and values: the same
attention as the "kv" exchange (the projections are affine, so the keys of a mean are the mean of the
keys), at the cost of projecting C rows per layer and token instead of one. `--exchange kv` decodes faster.

Torch-free (numpy): the runtime's onnxruntime engine and the PyTorch reference both decode through here.

Shapes: B batch rows, t new tokens per step, C cache rows, W = 2 * Hkv * dh values per row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import InputError, too_long
from .program import DeviceRun, Program, split_ref


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate. temperature 0 is greedy (the default); above 0 it samples, after top_k (0: all
    tokens) and top_p (1: all) filtering, from a generator seeded with `seed` (reproducible)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (self.seed is None or 0 <= self.seed < 2**63, "seed must be a non-negative integer")]
        for ok, message in checks:
            if not ok:
                raise InputError(f"{message}, got {self!r}")

    def to_dict(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "seed": self.seed, "stop_token_ids": list(self.stop_token_ids),
                "repetition_penalty": self.repetition_penalty}

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        try:
            return cls(max_new_tokens=int(d.get("max_new_tokens", 16)), temperature=float(d.get("temperature", 0.0)),
                       top_k=int(d.get("top_k", 0)), top_p=float(d.get("top_p", 1.0)),
                       seed=None if d.get("seed") is None else int(d["seed"]),
                       stop_token_ids=tuple(int(t) for t in d.get("stop_token_ids") or ()),
                       repetition_penalty=float(d.get("repetition_penalty", 1.0)))
        except (TypeError, ValueError) as e:
            raise InputError(f"bad generation options: {e}") from None


# ------------------------------------------------------------------------------------------------ sampling
class Sampler:
    """Chooses the next token of every row from the last position's logits [B, V]."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        """logits [B, V]; history [B, T] the ids so far (prompt and generated; -1 = padding) -> ids [B]."""
        c = self.config
        x = logits.astype(np.float64)
        if c.repetition_penalty != 1.0:  # transformers' rule: shrink the logit of every token seen so far
            for b in range(x.shape[0]):
                seen = np.unique(history[b][history[b] >= 0])
                x[b, seen] = np.where(x[b, seen] > 0, x[b, seen] / c.repetition_penalty,
                                      x[b, seen] * c.repetition_penalty)
        if c.temperature == 0:
            return x.argmax(-1)
        x = x / c.temperature
        if c.top_k and c.top_k < x.shape[-1]:
            kth = np.partition(x, -c.top_k, axis=-1)[:, -c.top_k][:, None]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if c.top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
            order = np.argsort(-p, axis=-1, kind="stable")
            sorted_p = np.take_along_axis(p, order, -1)
            drop_sorted = np.cumsum(sorted_p, -1) - sorted_p >= c.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, -1)
            p = np.where(drop, 0.0, p)
            p /= p.sum(-1, keepdims=True)
        u = self.rng.random((p.shape[0], 1))
        return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


# -------------------------------------------------------------------------------------------------- cache
def kv_rows_numpy(k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """k, v [B, Hkv, t, dh] -> rows [B, t, 2*Hkv*dh]: [k heads | v heads], the layout of prism.kv_rows."""
    B, H, t, dh = k.shape
    return np.concatenate([k.transpose(0, 2, 1, 3).reshape(B, t, H * dh),
                           v.transpose(0, 2, 1, 3).reshape(B, t, H * dh)], axis=-1)


class KVCache:
    """The tail device's cache: per exchange point (layer) rows [B, C, W], and one bias [B, C] shared by
    all layers. Stored in buffers with room for `capacity` rows, so appending a token copies one row."""

    def __init__(self, rows: list[np.ndarray], bias: np.ndarray, capacity: int):
        B, C = bias.shape
        self.length, self.capacity = C, max(capacity, C)
        self._rows = []
        for r in rows:
            buf = np.empty((B, self.capacity, r.shape[-1]), np.float32)
            buf[:, :C] = r
            self._rows.append(buf)
        self._bias = np.empty((B, self.capacity), np.float32)
        self._bias[:, :C] = bias

    @staticmethod
    def nbytes_for(batch: int, rows: int, widths: list[int]) -> int:
        return 4 * batch * rows * (sum(widths) + 1)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._rows) + self._bias.nbytes

    def rows(self, point: int) -> np.ndarray:
        return self._rows[point][:, :self.length]

    @property
    def bias(self) -> np.ndarray:
        return self._bias[:, :self.length]

    def append_rows(self, point: int, rows: np.ndarray) -> None:
        """Stage the rows of the new tokens at `point`; they become visible with `commit`."""
        t = rows.shape[1]
        if self.length + t > self.capacity:
            raise InputError(f"key/value cache full: {self.capacity} rows")
        self._rows[point][:, self.length:self.length + t] = rows

    def commit(self, bias: np.ndarray) -> None:
        """The new tokens' rows are in every layer: extend the cache (bias [B, t])."""
        t = bias.shape[1]
        self._bias[:, self.length:self.length + t] = bias
        self.length += t


class CacheCollector:
    """An on_step hook for the tail device's prefill: keeps, per layer step, the own rows it ran with (keys
    and values; after the hidden exchange, the attention inputs its `wrap`ped exchange caught) and the rows
    it received, and the final hidden states. `cache()` then builds the KVCache."""

    def __init__(self, program: Program):
        check_generates(program)
        self.program = program
        self.rows: dict[int, np.ndarray] = {}
        self.own: dict[int, np.ndarray] = {}  # hidden exchange: point -> the tail's own attention-input rows
        self.local_bias = self.remote_bias = None
        self.hidden = None

    def wrap(self, plan, rank: int, exchange):
        """The plan and exchange endpoint the tail device runs its prefill with: as given for the kv exchange;
        after the hidden exchange, an identity averager (its graphs then output every own token's attention
        input) and an endpoint that keeps those rows and sends what the real averager makes of them."""
        if self.program.exchange == "kv":
            return plan, exchange
        return _IdentityAverager(plan, rank), _OwnRows(exchange, plan, rank, self.own)

    def __call__(self, step, feeds: dict, results: list) -> None:
        recv = [(n, split_ref(r)[1]) for n, r in step.inputs.items() if split_ref(r)[0] == "recv"]
        if recv:
            name, point = recv[0]
            index = self.program.point_index(point)
            if self.program.exchange == "kv":
                own = kv_rows_numpy(np.asarray(feeds[_input(step, "value:k")]),
                                    np.asarray(feeds[_input(step, "value:v")]))
            else:
                own = self.own.pop(index)
            self.rows[index] = np.concatenate([own, np.asarray(feeds[name])], axis=1)
            self.local_bias = np.asarray(feeds[_input(step, "plan:local_bias")])
            self.remote_bias = np.asarray(feeds[_input(step, "plan:remote_bias")])
        for (name, ref), value in zip(step.outputs.items(), results):
            if ref == "value:hidden":
                self.hidden = np.asarray(value)

    def cache(self, extra: int) -> KVCache:
        rows = [self.rows[i] for i in range(len(self.program.points))]
        return KVCache(rows, np.concatenate([self.local_bias, self.remote_bias], axis=1), rows[0].shape[1] + extra)


def _input(step, ref: str) -> str:
    return next(n for n, r in step.inputs.items() if r == ref)


def _identity(batch: int, n: int) -> np.ndarray:
    return np.broadcast_to(np.eye(n, dtype=np.float32), (batch, n, n)).copy()


class _IdentityAverager:
    """A plan whose averager for device `rank` is the identity (one row per own token); otherwise the plan."""

    def __init__(self, plan, rank: int):
        self._plan, self._rank = plan, rank

    def averager(self, p):
        a = self._plan.averager(p)
        return _identity(a.shape[0], a.shape[2]) if p == self._rank else a

    def __getattr__(self, name):
        return getattr(self._plan, name)


class _OwnRows:
    """The tail's exchange endpoint during a hidden-exchange prefill: the rows its graphs send (under the
    identity averager: every own token's attention input) are kept for the cache, and what the real plan's
    averager makes of them is sent on."""

    def __init__(self, exchange, plan, rank: int, own: dict):
        self._exchange, self._plan, self._rank, self._own = exchange, plan, rank, own

    def send(self, request, point, rows, plan):
        rows = np.asarray(rows, np.float32)
        self._own[point] = rows
        self._exchange.send(request, point, np.matmul(self._plan.averager(self._rank), rows), self._plan)

    def gather(self, request, point, plan):
        return self._exchange.gather(request, point, self._plan)

    def __getattr__(self, name):
        return getattr(self._exchange, name)


@dataclass
class DecodePlan:
    """Stands in for the Plan while decoding `t` new tokens on the tail device (see DeviceRun)."""

    positions: np.ndarray  # [B, t]
    cache: KVCache
    hidden: bool = False  # the hidden exchange: the new tokens' attention inputs come out as "sent" rows

    def position_ids(self, p):
        return self.positions

    def averager(self, p):  # nothing is sent while decoding (hidden: the rows the cache needs, kept here)
        B, t = self.positions.shape
        return _identity(B, t) if self.hidden else np.zeros((B, 0, t), np.float32)

    def local_bias(self, p):
        return np.zeros(self.positions.shape, np.float32)

    def remote_bias(self, p):
        return self.cache.bias

    def span(self, p):
        return (1, 1)  # never the device of token 0: no pooled head


class CacheExchange:
    """The exchange while decoding: the cache stands in for the received rows; the new tokens' own keys and
    values at each point are staged into it after the layer ran (DeviceRun on_step)."""

    def __init__(self, program: Program, cache: KVCache, rank: int):
        self.program, self.cache, self.rank = program, cache, rank

    def send(self, request, point, rows, plan):
        if self.program.exchange == "kv":
            assert rows.shape[1] == 0, "nothing is sent while decoding"
        else:  # the new tokens' attention inputs at this point (DecodePlan's identity averager)
            self.cache.append_rows(point, np.asarray(rows, np.float32))

    def gather(self, request, point, plan):
        return self.cache.rows(point)

    def __call__(self, step, feeds, results):  # on_step
        if self.program.exchange != "kv":
            return
        for ref in step.inputs.values():
            kind, name = split_ref(ref)
            if kind == "recv":
                k, v = feeds[_input(step, "value:k")], feeds[_input(step, "value:v")]
                self.cache.append_rows(self.program.point_index(name), kv_rows_numpy(np.asarray(k), np.asarray(v)))


# -------------------------------------------------------------------------------------------------- decode
@dataclass
class GenerationStats:
    prompt_tokens: int
    generated: int = 0
    time_to_first_token_ms: float | None = None
    decode_seconds: float = 0.0
    cache_bytes: int = 0

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = self.generated - 1  # the first token comes from the prefill's logits
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated,
                "time_to_first_token_ms": self.time_to_first_token_ms,
                "decode_tokens_per_s": self.decode_tokens_per_s, "cache_bytes": self.cache_bytes}


@dataclass
class Generation:
    """The generated ids per row (stop token included, as transformers returns it), and the stats."""

    ids: list[list[int]]
    stats: GenerationStats
    finish_reasons: list[str] = field(default_factory=list)  # "stop" | "length"


def check_prompt(attention_mask: np.ndarray, config: GenerationConfig, max_positions: int) -> None:
    """A generation request fits: every row ends with a real token (left padding), and the longest row plus
    the new tokens stays within the model's positions."""
    if not np.all(attention_mask[:, -1]):
        raise InputError("generation needs every row to end with a real token: pad on the left")
    longest = int(attention_mask.sum(1).max())
    if longest + config.max_new_tokens > max_positions:
        raise too_long(f"a prompt of {longest} tokens and {config.max_new_tokens} new ones exceed the model's "
                       f"{max_positions} positions: ask for at most {max(max_positions - longest, 0)} new tokens")


def decode_from_cache(program: Program, backend, collector: CacheCollector, prompt_ids: np.ndarray,
           attention_mask: np.ndarray, config: GenerationConfig, rank: int, t0: float,
           max_cache_bytes: int | None = None,
           on_tokens: Callable[[int, np.ndarray], None] | None = None) -> Generation:
    """Decode on the tail device after its prefill (collector filled). prompt_ids/attention_mask [B, N] of
    the whole request (the tail needs only the row lengths and, for repetition_penalty, the ids).
    on_tokens(step, ids [B]) is called as every token is chosen (streaming; -1 for finished rows)."""
    B, N = attention_mask.shape
    widths = [p.width for p in program.points]
    need = KVCache.nbytes_for(B, collector.rows[0].shape[1] + config.max_new_tokens, widths)
    if max_cache_bytes is not None and need > max_cache_bytes:
        raise too_long(f"this request needs a key/value cache of {need / 2**20:.1f} MiB, beyond the runner's limit "
                         f"of {max_cache_bytes / 2**20:.1f} MiB (--max-cache-mb); ask for fewer tokens or rows")
    cache = collector.cache(config.max_new_tokens)
    stats = GenerationStats(prompt_tokens=int(attention_mask.sum()), cache_bytes=cache.nbytes)
    sampler = Sampler(config)
    history = np.where(attention_mask > 0, prompt_ids, -1)
    next_pos = attention_mask.sum(1, keepdims=True).astype(np.int64)  # [B, 1]
    head = next(s for s in program.steps if s.graph == "token_head")
    logits = np.asarray(backend.run(head.graph, {"hidden": collector.hidden[:, -1:]})[0])[:, -1]  # [B, V]
    done = np.zeros(B, bool)
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    stop = np.array(config.stop_token_ids, np.int64)
    for step_no in range(config.max_new_tokens):
        ids = sampler(logits, history)  # [B]
        if step_no == 0:
            stats.time_to_first_token_ms = 1e3 * (time.perf_counter() - t0)
            t_decode = time.perf_counter()
        for b in np.flatnonzero(~done):
            out[b].append(int(ids[b]))
        if on_tokens is not None:
            on_tokens(step_no, np.where(done, -1, ids))
        hit = np.isin(ids, stop) & ~done
        for b in np.flatnonzero(hit):
            reasons[b] = "stop"
        done |= hit
        stats.generated = step_no + 1
        if done.all() or step_no + 1 == config.max_new_tokens:
            break
        history = np.concatenate([history, np.where(done, -1, ids)[:, None]], axis=1)
        logits = _decode_step(program, backend, cache, ids[:, None], next_pos, rank)[:, -1]
        next_pos = next_pos + 1
    if stats.generated > 1:
        stats.decode_seconds = time.perf_counter() - t_decode
    return Generation(out, stats, reasons)


def continuation_logits(program: Program, backend, collector: CacheCollector, ids: np.ndarray,
                        attention_mask: np.ndarray, rank: int) -> np.ndarray:
    """Teacher forcing after a prefill: the logits [B, 1 + t, V] that predict each of ids [B, t] and the
    token after them, from the tail device's compressed prefix cache (the first row of logits is the
    prefill's last position). All t tokens go through the graphs in one pass, causal among themselves."""
    head = next(s for s in program.steps if s.graph == "token_head")
    first = np.asarray(backend.run(head.graph, {"hidden": collector.hidden[:, -1:]})[0])  # [B, 1, V]
    cache = collector.cache(ids.shape[1])
    positions = attention_mask.sum(1, keepdims=True) + np.arange(ids.shape[1])[None, :]  # [B, t]
    return np.concatenate([first, _decode_step(program, backend, cache, ids, positions, rank)], axis=1)


def _decode_step(program: Program, backend, cache: KVCache, ids: np.ndarray, positions: np.ndarray,
                 rank: int) -> np.ndarray:
    """One pass of the program over new tokens ids [B, t] at positions [B, t] -> logits [B, t, V]."""
    exchange = CacheExchange(program, cache, rank)
    plan = DecodePlan(positions, cache, hidden=program.exchange != "kv")
    run = DeviceRun(program, backend, plan, rank, {"input_ids": ids.astype(np.int64)},
                    exchange, outputs=set(program.token_outputs), on_step=exchange)
    for step in program.steps:
        run.step(step)
    cache.commit(np.zeros(ids.shape, np.float32))
    return np.asarray(run.outputs[program.token_outputs[0]])


def stop_ids(config_summary: dict, given=None) -> tuple[int, ...]:
    """The stop token ids of a request: as given, else the model's EOS token id(s) from its config."""
    if given is not None:
        return tuple(int(t) for t in given)
    eos = config_summary.get("eos_token_id")
    return tuple(int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))


def generates(program: Program) -> bool:
    """Whether an export can generate: its model has a language-model head (token logits), whatever it
    exchanges (hidden or kv)."""
    return "logits" in program.token_outputs


def check_generates(program: Program) -> None:
    if not generates(program):
        raise InputError(cannot_generate(program.token_outputs + program.pooled_outputs))


def cannot_generate(outputs, architecture: str | None = None) -> str:
    """Why an export cannot generate, in one line (the runner's, the CLI's and the HTTP API's message)."""
    model = f" ({architecture})" if architecture else ""
    return (f"this export cannot generate: its model{model} has no language-model head (it returns "
            f"{', '.join(outputs)}, not token logits); export a model with one, e.g. GPT2LMHeadModel or "
            f"LlamaForCausalLM")
