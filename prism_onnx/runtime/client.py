"""`Client` (prism infer, the HTTP gateway, your code): requests to a running cluster, with failover between
its serving runners and the cluster's errors raised as their own classes (InputError, Busy,
DevicesUnavailable, Timeout, ...). One connection per server: connection.py."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import InputError, PrismError, Timeout
from .connection import Connection, ServerLost
from .keys import ClientKeys
from .preprocess import load_pixel_file
from .schema import GenerateOptions, Reply, Request, Status

__all__ = ["Client", "ServerLost", "server_address"]


def server_address(item: str) -> str:
    """'HOST:PORT' (or 'tcp://HOST:PORT') -> 'tcp://HOST:PORT'; anything else is refused in one line."""
    text = item.strip().removeprefix("tcp://")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        bare = text.lstrip(":")
        example = f"localhost:{bare}" if bare.isdigit() else f"{text or 'localhost'}:5600"
        raise InputError(f"--server '{item}': expected HOST:PORT, e.g. {example} (the port a runner serves with "
                         f"--serve)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--server '{item}': the port '{port}' is not a number in 1..65535")
    return f"tcp://{host}:{int(port)}"


def _split(split) -> tuple[float, ...]:
    """A request's split: '1,0,1' (a reply's stats["split"]) or a sequence of weights."""
    from .split import parse_request_split

    if isinstance(split, str):
        return parse_request_split(split)
    return parse_request_split(",".join(repr(float(w)) for w in split))


class Client:
    """Talks to a serving runner: `status()`, `infer(...)`, `generate(...)`.

    address: "HOST:PORT", or several, comma-separated ("H:P,H:P,...") or as a list: any runner started with --serve
    coordinates the requests it receives. The client uses one server until it is lost (the connection
    closes, or it answers nothing for `dead_after` seconds), then the next one in the list, and resends the
    request in flight: inference is idempotent. A streaming generation that already received tokens is not
    resent (its tokens were shown); the call fails instead. `last_server` and `last_failovers` tell where the
    last request was answered and which servers failed it first.

    keys: the client folder `prism keys` wrote (EXPORT_DIR/client) or ClientKeys, or a device's keys/ folder
    (an operator: its STATUS shows every client's requests); None talks plain text (to a runner started with
    --insecure). Every server is authenticated by the cluster's client-port key, which every serving runner
    holds (`server_rank`, one rank or one per address, only names the device in messages). While a request
    runs, the client sends STATUS pings; a coordinator that answers nothing for `dead_after` seconds
    (stopped, killed, unreachable) fails the call then, not at `timeout`.
    Before its first message to a server, the client waits for the TCP connection (`_await_connection`,
    at most `dead_after` seconds): a port where nothing listens fails at once with "connection refused",
    a host that does not answer fails after `dead_after` seconds (ServerLost: the next server is tried).

    Example (the package exports it: `from prism_onnx import Client`):

        with Client(["10.0.0.10:5600", "10.0.0.11:5600"], keys="minilm-p2/client") as client:
            outputs, stats = client.infer(texts=["a gripping, funny film"])
    """

    def __init__(self, address: str, timeout: float = 60.0, keys=None, server_rank: int | list | None = None,
                 dead_after: float = 2.0, ping_every: float = 0.5):
        items = address if isinstance(address, (list, tuple)) else str(address).split(",")
        self.addresses = [server_address(a) for a in (str(x).strip() for x in items) if a]
        if not self.addresses:
            raise PrismError(f"--server: '{address}' names no HOST:PORT")
        ranks = server_rank if isinstance(server_rank, (list, tuple)) else [server_rank] * len(self.addresses)
        if len(ranks) != len(self.addresses):
            raise PrismError(f"{len(ranks)} server ranks for {len(self.addresses)} servers")
        self.timeout, self.dead_after, self.ping_every = timeout, dead_after, ping_every
        self.keys = ClientKeys.load(keys) if isinstance(keys, (str, os.PathLike)) else keys
        self.connections = [Connection(a, self.keys, r, dead_after, ping_every) for a, r in zip(self.addresses, ranks)]
        self.index = 0  # the server in use
        self.last_server, self.last_failovers, self.last_reply = None, [], {}

    @property
    def address(self) -> str:
        return self.addresses[self.index]

    @property
    def connection(self) -> Connection:
        return self.connections[self.index]

    @property
    def server_rank(self) -> int | None:
        return self.connection.server_rank

    def status(self, timeout: float = 2.0) -> dict:
        """The STATUS of the server in use (no failover)."""
        return self.connection.call(Status(), timeout=timeout, watch=False).meta()

    def _request(self, request: Request, on_tokens=None) -> Reply:
        """One REQUEST, failing over to the next server (and resending) while servers are lost; a full
        round of lost servers, or the client timeout, ends it. A reply with an error raises it, as the class
        the cluster raised (errors.ErrorInfo.exception: InputError, Busy, DevicesUnavailable...)."""
        t0, lost, streamed = time.monotonic(), [], []

        def tokens(tok):
            streamed.append(1)
            on_tokens(tok)

        while True:
            left = self.timeout - (time.monotonic() - t0)
            try:
                if left <= 0:
                    raise Timeout(f"no reply within {self.timeout:g} s")
                reply = self.connection.call(request, timeout=left, on_tokens=tokens if on_tokens else None)
                self.last_server, self.last_failovers, self.last_reply = self.address, lost, reply.meta()
                if reply.error is not None:
                    raise reply.error.info().exception()
                return reply
            except ServerLost as e:
                lost.append(str(e))
                self.connection.reset()
                if streamed:
                    raise ServerLost(f"{e}; the request had streamed {len(streamed)} tokens, so it is not resent")
                if len(self.addresses) == 1 or len(lost) % len(self.addresses) == 0:
                    if len(self.addresses) == 1:
                        raise
                    raise ServerLost(f"every server failed the request: {'; '.join(lost)}") from None
                self.index = (self.index + 1) % len(self.addresses)

    def infer(self, *, texts=None, images=None, input_ids=None, attention_mask=None, pixel_values=None,
              outputs=None, split=None):
        """-> (outputs {name: array}, stats). `outputs`: names to return (default all). `split`: this request's
        plan, one weight per device of the export (0: left out), e.g. a reply's `stats["split"]` to reproduce
        it (default: the cluster's split). A failure raises the error the cluster raised (InputError, Busy,
        DevicesUnavailable, Timeout, ...: errors.py)."""
        request = self._inputs(texts, images, input_ids, attention_mask, pixel_values)
        if outputs:
            request = replace(request, outputs=tuple(outputs))
        if split is not None:
            request = replace(request, split=_split(split))
        reply = self._request(request)
        return {k: np.array(v) for k, v in reply.arrays.items()}, reply.stats

    def generate(self, *, texts=None, input_ids=None, attention_mask=None, config=None, on_tokens=None,
                 split=None):
        """Distributed prefill, then decoding on the tail device. `config`: a generate.GenerationConfig
        (default: 16 greedy tokens, stop at the model's EOS). on_tokens(step, ids [B], texts or None) is
        called as tokens arrive (streaming; `texts`: each row's new text, decoded incrementally, "" while a
        character is incomplete). `split`: as for `infer`. -> (generated ids: a list per row, reply: stats,
        texts, generation stats, and client_time_to_first_token_ms when streaming)."""
        options = GenerateOptions.of(config, given_stops=bool(config.stop_token_ids)) if config is not None \
            else GenerateOptions()  # no stop ids given: the model's EOS
        request = replace(self._inputs(texts, None, input_ids, attention_mask, None), generate=options,
                          stream=on_tokens is not None, split=None if split is None else _split(split))
        t0, first = time.monotonic(), []

        def tokens(tok):
            if not first:
                first.append(time.monotonic())
            on_tokens(tok.step, np.array(tok.arrays["ids"]), list(tok.texts) if tok.texts is not None else None)

        reply = self._request(request, on_tokens=tokens if on_tokens else None)
        ids = [[int(t) for t in row if t >= 0] for row in np.array(reply.arrays["generated_ids"]).tolist()]
        meta = reply.meta()
        if first:
            meta["generation"]["client_time_to_first_token_ms"] = round(1e3 * (first[0] - t0), 3)
        return ids, meta

    @staticmethod
    def _inputs(texts, images, input_ids, attention_mask, pixel_values) -> Request:
        arrays = {}
        if texts:
            return Request(texts=tuple(texts))
        elif images:
            npy = [p for p in images if str(p).endswith(".npy")]
            if npy:
                arrays["pixel_values"] = np.concatenate([load_pixel_file(p) for p in npy]).astype(np.float32)
            else:
                for i, p in enumerate(images):
                    arrays[f"image_{i:04d}"] = np.frombuffer(Path(p).read_bytes(), np.uint8)
        elif pixel_values is not None:
            arrays["pixel_values"] = np.asarray(pixel_values, np.float32)
        elif input_ids is not None:
            arrays["input_ids"] = np.atleast_2d(np.asarray(input_ids, np.int64))
            if attention_mask is not None:
                arrays["attention_mask"] = np.atleast_2d(np.asarray(attention_mask, np.int64))
        else:
            raise InputError("nothing to send: give texts, images, pixel_values or input_ids")
        return Request(arrays=arrays)

    def close(self):
        for c in self.connections:
            c.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc):
        self.close()
