"""The HTTP server's side of a deployment: what an endpoint asks of the cluster, through the public client.

The gateway holds no model and runs no graph. It tokenizes (the bundle's tokenizer.json), checks lengths
against the export's limits, and sends token ids to the serving runner over its ordinary client port
(`runtime.client.Client`: `infer`, `generate`, `status`), on this machine, with the credentials the
runner gave it (keys.with_local_client). It pools sentence embeddings from the returned
last_hidden_state (prism_onnx/pooling.py) and feeds generated tokens to per-row TextStreams.

Client sockets are not thread-safe: each thread of the gateway's pool (`concurrency` threads, the number
of requests the HTTP server hands the cluster at once) has its own Client, so requests run side by side
and the coordinator queues them as it queues any client's.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import PrismError
from ..generate import GenerationConfig, cannot_generate, stop_ids
from ..pooling import check_pooling, pool
from ..runtime.bundle import DeviceBundle
from ..runtime.client import Client
from .errors import ApiError, bad_request, from_cluster, too_long
from .metrics import Metrics
from .params import Inputs, Sampling
from .text import ChatTemplate, Tokenizer

log = logging.getLogger("prism.http")
EMBEDDINGS = "last_hidden_state"


def model_name(bundle: DeviceBundle) -> str:
    """The name a deployment answers to by default: the hub id it was exported from, or the folder's name."""
    source = bundle.manifest.source
    if source.startswith("/"):  # a folder of the exporting machine (export records it resolved)
        return Path(source).name
    return source or bundle.manifest.model.model_type


class Gateway:
    def __init__(self, bundle: DeviceBundle, address: str, keys=None, server_rank: int | None = None, *,
                 name: str | None = None, concurrency: int = 8, timeout: float = 600.0):
        self.bundle, self.manifest, self.limits = bundle, bundle.manifest, bundle.limits
        self.address, self.keys, self.server_rank, self.timeout = address, keys, server_rank, timeout
        self.name = name or model_name(bundle)
        pre = self.manifest.preprocessing
        self.tokenizer = Tokenizer(bundle.root / pre.tokenizer) if pre.tokenizer else None
        self.chat = ChatTemplate((bundle.root / pre.chat_template).read_text(), pre.special_tokens) \
            if pre.chat_template and self.tokenizer else None
        self.pooling = check_pooling(pre.pooling)
        self.embeds = self.limits.input_kind == "text" and EMBEDDINGS in self.limits.outputs
        self.generates = self.limits.generates
        self.eos = stop_ids(self.manifest.config_summary)
        self.dimensions = self.manifest.model.hidden_size * len(self.pooling["modes"])
        self.metrics = Metrics(self.manifest.devices)
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="prism-http")
        self.probes = ThreadPoolExecutor(1, thread_name_prefix="prism-http-status")  # /health never waits for
        # the requests in `pool`
        self._local, self._clients, self._lock = threading.local(), [], threading.Lock()
        if self.pooling.get("skipped_modules"):
            log.warning("embeddings: the model folder's sentence-transformers modules %s cannot run on a board and "
                        "are not applied (pooling %s%s only)", self.pooling["skipped_modules"],
                        "+".join(self.pooling["modes"]), ", normalized" if self.pooling["normalize"] else "")

    # ------------------------------------------------------------------------------------------ clients
    def client(self) -> Client:
        """This thread's client of the serving runner."""
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = Client(self.address, timeout=self.timeout, keys=self.keys,
                                            server_rank=self.server_rank)
            with self._lock:
                self._clients.append(c)
        return c

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.probes.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for c in self._clients:
                c.close()

    def status(self) -> dict | None:
        """The coordinator's STATUS, or None when it does not answer (run it in `probes`)."""
        try:
            return self.client().status(timeout=2.0)
        except PrismError:
            return None

    def capabilities(self) -> list[str]:
        return [c for c, ok in (("embeddings", self.embeds), ("completions", self.generates),
                                ("chat", self.generates and self.chat is not None)) if ok]

    # --------------------------------------------------------------------------------------------- text
    def token_rows(self, inputs: Inputs, param: str, *, special: bool = True, truncate: bool = False,
                   left: bool = False) -> list[list[int]]:
        """Texts (tokenized here) or token ids -> rows of ids, each checked: not empty (400), ids in the
        vocabulary (400), at most --max-seq-len tokens (413; cut to it with `truncate`)."""
        L = self.limits
        if inputs.texts is not None:
            if self.tokenizer is None:
                raise bad_request("this deployment has no tokenizer (none was exported with the model): send token "
                                  "ids instead of text", param=param)
            for i, t in enumerate(inputs.texts):
                if len(t) > L.max_text_chars * (8 if truncate else 1):
                    raise too_long(f"{param}[{i}] has {len(t):,} characters; this deployment reads at most "
                                   f"{L.max_seq_len} tokens (about {L.max_text_chars:,} characters)", param=param)
            rows = self.tokenizer.encode_truncated(inputs.texts, L.max_seq_len, left) if truncate else \
                self.tokenizer.encode(inputs.texts, special)
        else:
            rows = [list(r) for r in inputs.ids]
            for i, r in enumerate(rows):
                if min(r) < 0 or max(r) >= L.vocab_size:
                    raise bad_request(f"{param}[{i}] holds token ids outside this model's vocabulary [0, "
                                      f"{L.vocab_size})", param=param)
            if truncate:
                rows = [r[-L.max_seq_len:] if left else r[:L.max_seq_len] for r in rows]
        for i, r in enumerate(rows):
            if not r:
                raise bad_request(f"{param}[{i}] is empty: it has no tokens", param=param)
            if len(r) > L.max_seq_len:
                raise too_long(f"{param}[{i}] has {len(r)} tokens; this deployment takes at most {L.max_seq_len} "
                               f"(--max-seq-len of the export)", param=param)
        return rows

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    # ------------------------------------------------------------------------------------- embeddings
    def embed(self, rows: list[list[int]], normalize: bool | None = None) -> np.ndarray:
        """Rows of token ids -> sentence embeddings [n, D], pooled as the bundle says (normalize: override
        the bundle's Normalize). Rows are sorted by length and sent in batches of at most --max-batch, so
        that a batch pads little; at CR > 1 a batch holds rows of one length only: the plan cuts a batch's
        padded length, so a text padded beside a longer one would get other segments, and another embedding,
        than alone (each text's embedding must not depend on what else the request holds)."""
        if not self.embeds:
            raise bad_request(f"this deployment's model ({self.manifest.model.architecture}) returns no token "
                              f"embeddings ({EMBEDDINGS}); embeddings need an encoder exported as *Model")
        record = self.pooling if normalize is None else {**self.pooling, "normalize": normalize}
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = np.zeros((len(rows), self.dimensions), np.float32)
        for chunk in self._chunks(order, rows):
            n = max(len(rows[i]) for i in chunk)
            ids = np.full((len(chunk), n), self.manifest.preprocessing.pad_id, np.int64)
            mask = np.zeros((len(chunk), n), np.int64)
            for j, i in enumerate(chunk):
                ids[j, :len(rows[i])], mask[j, :len(rows[i])] = rows[i], 1
            outputs, stats = self._cluster(lambda: self.client().infer(input_ids=ids, attention_mask=mask,
                                                                          outputs=[EMBEDDINGS]))
            self.metrics.cluster_stats(stats)
            out[chunk] = pool(outputs[EMBEDDINGS], mask, record)
        self.metrics.embedded.inc(len(rows))
        return out

    def _chunks(self, order: list[int], rows: list[list[int]]) -> list[list[int]]:
        """The batches of embed(): `order` cut every --max-batch rows, and at CR > 1 also where the length
        changes."""
        B, exact = self.limits.max_batch, self.manifest.settings.compression_ratio > 1
        chunks: list[list[int]] = []
        for i in order:
            if not chunks or len(chunks[-1]) == B or (exact and len(rows[chunks[-1][0]]) != len(rows[i])):
                chunks.append([])
            chunks[-1].append(i)
        return chunks

    # ------------------------------------------------------------------------------------- generation
    def chat_rows(self, messages: list[dict], add_generation_prompt: bool) -> list[list[int]]:
        self.check_generates()
        if self.chat is None:
            raise bad_request("this deployment's tokenizer has no chat template (tokenizer_config.json's "
                              "chat_template at export): use /v1/completions", param="messages")
        text = self.chat.render(messages, add_generation_prompt)
        return self.token_rows(Inputs(texts=[text]), "messages", special=False)

    def check_generates(self) -> None:
        if not self.generates:
            raise bad_request(cannot_generate(self.limits.outputs, self.manifest.model.architecture))

    def config(self, s: Sampling, rows: list[list[int]], default_max: int | None) -> GenerationConfig:
        """OpenAI-style sampling -> prism's GenerationConfig, checked against the model's positions
        (default_max None: as many tokens as the positions leave). Stop token ids: the request's and the
        model's EOS."""
        self.check_generates()
        positions = self.limits.max_positions
        longest = max(len(r) for r in rows)
        room = positions - longest
        if room < 1:
            raise too_long(f"the prompt has {longest} tokens: no room to generate within the model's {positions} "
                           f"positions")
        wanted = s.max_tokens if s.max_tokens is not None else min(room, default_max or room)
        if wanted > room:
            raise bad_request(f"this model's context is {positions} tokens; the prompt holds {longest}, so at most "
                              f"{room} new tokens fit, but {wanted} were asked for", param="max_tokens",
                              code="context_length_exceeded")
        V = self.limits.vocab_size
        if any(t >= V for t in s.stop_token_ids or ()):
            raise bad_request(f"stop_token_ids must be below the vocabulary size {V}", param="stop_token_ids")
        # the model's EOS ends a row too (an id outside the vocabulary, as in some test models, never comes)
        stops = tuple(dict.fromkeys((s.stop_token_ids or ()) + tuple(t for t in self.eos if t < V)))
        return GenerationConfig(max_new_tokens=wanted, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                seed=s.seed, stop_token_ids=stops, repetition_penalty=s.repetition_penalty)

    def generate(self, rows: list[list[int]], config: GenerationConfig, on_tokens) -> dict:
        """Left-padded prompt rows -> the coordinator's reply (generation stats); tokens go to
        on_tokens(step, ids [B], texts) as they come (-1: the row has ended)."""
        n = max(len(r) for r in rows)
        ids = np.full((len(rows), n), self.manifest.preprocessing.pad_id, np.int64)
        mask = np.zeros((len(rows), n), np.int64)
        for b, r in enumerate(rows):
            ids[b, n - len(r):], mask[b, n - len(r):] = r, 1
        _, reply = self._cluster(lambda: self.client().generate(input_ids=ids, attention_mask=mask, config=config,
                                                                 on_tokens=on_tokens))
        self.metrics.cluster_stats(reply.get("stats", {}))
        return reply

    @staticmethod
    def _cluster(call):
        try:
            return call()
        except ApiError:
            raise
        except PrismError as e:
            raise from_cluster(e, param="max_tokens") from None
