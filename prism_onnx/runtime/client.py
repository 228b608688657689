"""Clients of a running cluster: `Client` (prism infer) and `LocalCluster` (prism launch: P runners on
this machine, optionally each inside a network namespace)."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..errors import FrameError, PeerError, PrismError
from .bundle import Export
from .keys import CLIENT, ClientKeys
from .preprocess import load_pixel_file
from .protocol import ArrayRules, Kind, decode, encode

REPLY_RULES = ArrayRules(1 << 36, max_arrays=16)  # what a client accepts back from an authenticated server


class Client:
    """Talks to the serving device: `status()` and `infer(...)`.

    keys: the client folder `prism keys` wrote (EXPORT_DIR/client) or ClientKeys; None talks plain text
    (to a runner started with --insecure). The coordinator is authenticated by its public key: the one of
    `server_rank`, or, when that is not given, whichever device's key the server at `address` answers to.
    While a request runs, the client sends STATUS pings; a coordinator that answers nothing for
    `dead_after` seconds (stopped, killed, unreachable) fails the call then, not at `timeout`.
    """

    def __init__(self, address: str, timeout: float = 60.0, keys=None, server_rank: int | None = None,
                 dead_after: float = 2.0, ping_every: float = 0.5):
        self.address = address if address.startswith("tcp://") else f"tcp://{address}"
        self.timeout, self.dead_after, self.ping_every = timeout, dead_after, ping_every
        self.keys = ClientKeys.load(keys) if isinstance(keys, (str, os.PathLike)) else keys
        if self.keys is not None and server_rank is not None and server_rank not in self.keys.servers:
            raise PrismError(f"the client keys hold no public key of device {server_rank}")
        self.server_rank = server_rank
        self.ctx = zmq.Context.instance()
        self.sock = self.monitor = None
        self._answered = False
        self._calls = itertools.count(1)

    def _socket(self, server_rank: int | None) -> tuple[zmq.Socket, zmq.Socket]:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        if self.keys is not None:
            s.curve_secretkey, s.curve_publickey = self.keys.secret, self.keys.public
            s.curve_serverkey = self.keys.servers[server_rank]
        m = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED |
                                 zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        s.connect(self.address)
        return s, m

    def _connect(self):
        if self.sock is not None:
            return
        if self.keys is None or self.server_rank is not None or len(self.keys.servers) == 1:
            rank = self.server_rank if self.server_rank is not None else \
                (next(iter(self.keys.servers)) if self.keys else None)
            self.sock, self.monitor = self._socket(rank)
            return
        # which device serves? ask each key at once; the one whose handshake succeeds answers
        tries = {r: self._socket(r) for r in self.keys.servers}
        poller = zmq.Poller()
        for s, _ in tries.values():
            s.send_multipart(encode(Kind.STATUS, {"call": 0}))
            poller.register(s, zmq.POLLIN)
        ready = dict(poller.poll(int(1000 * self.dead_after)))
        for r, (s, m) in tries.items():
            if self.sock is None and s in ready:
                s.recv_multipart()
                self.sock, self.monitor, self.server_rank = s, m, r
            else:
                m.close(linger=0)
                s.close(linger=0)
        if self.sock is None:
            raise PeerError(f"no answer from {self.address} within {self.dead_after:g} s with any of the "
                            f"{len(tries)} device keys (is a runner serving there, and does it hold this client's key?)")

    def _reset(self):
        for s in (self.monitor, self.sock):
            if s is not None:
                s.close(linger=0)
        self.sock = self.monitor = None
        self._answered = False

    def _call(self, kind: Kind, meta: dict, arrays: dict | None = None, timeout: float | None = None,
              watch: bool = True, on_tokens=None):
        """Send one message and wait for its REPLY; TOKENS of the same call go to on_tokens(meta, arrays)."""
        self._connect()
        timeout = timeout or self.timeout
        call = next(self._calls)
        self.sock.send_multipart(encode(kind, {**meta, "call": call}, arrays))
        t0 = heard = time.monotonic()
        next_ping, poller = t0 + self.ping_every, zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            now = time.monotonic()
            if now - t0 >= timeout:
                self._reset()
                raise PeerError(f"no reply from {self.address} within {timeout:g} s")
            if watch and now - heard >= self.dead_after:
                self._reset()
                raise PeerError(f"the coordinator at {self.address} stopped responding: no answer for "
                                f"{self.dead_after:g} s")
            if watch and now >= next_ping:
                self.sock.send_multipart(encode(Kind.STATUS, {"call": 0}))
                next_ping = now + self.ping_every
            wait = min([t0 + timeout] + ([next_ping, heard + self.dead_after] if watch else [])) - now
            events = dict(poller.poll(max(1, int(1000 * wait))))
            if self.monitor in events:
                ev = recv_monitor_message(self.monitor)
                if ev["event"] in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                    self._reset()
                    raise PeerError(f"{self.address} refused this client's key (CURVE handshake failed): is it "
                                    f"in the serving device's keys/clients?")
                if ev["event"] == zmq.EVENT_DISCONNECTED:
                    answered, _ = self._answered, self._reset()
                    if not answered and self.keys is not None:
                        raise PeerError(f"{self.address} closed the connection before any answer: the CURVE "
                                        f"handshake failed (not device {self.server_rank}'s key, or another "
                                        f"export's keys)")
                    raise PeerError(f"{self.address} closed the connection (the coordinator stopped, or the "
                                    f"message was over its size limit)")
            if self.sock in events:
                rkind, rmeta, rarrays = decode(self.sock.recv_multipart(), REPLY_RULES)
                heard, self._answered = time.monotonic(), True
                if rmeta.get("call") == call:
                    if rkind == Kind.TOKENS:
                        if on_tokens is not None:
                            on_tokens(rmeta, rarrays)
                        continue
                    return rmeta, rarrays

    def status(self, timeout: float = 2.0) -> dict:
        return self._call(Kind.STATUS, {}, timeout=timeout, watch=False)[0]

    def infer(self, *, texts=None, images=None, input_ids=None, attention_mask=None, pixel_values=None,
              outputs=None):
        """-> (outputs {name: array}, stats). `outputs`: names to return (default all). Raises PeerError
        with the server's message on failure."""
        meta, arrays = self._inputs(texts, images, input_ids, attention_mask, pixel_values)
        if outputs:
            meta["outputs"] = list(outputs)
        meta, outputs = self._call(Kind.REQUEST, meta, arrays)
        if not meta.get("ok"):
            raise PeerError(f"request failed: {meta.get('error')}")
        return {k: np.array(v) for k, v in outputs.items()}, meta["stats"]

    def generate(self, *, texts=None, input_ids=None, attention_mask=None, config=None, on_tokens=None):
        """Distributed prefill, then decoding on the tail device. `config`: a generate.GenerationConfig
        (default: 16 greedy tokens, stop at the model's EOS). on_tokens(step, ids [B], texts or None) is
        called as tokens arrive (streaming). -> (generated ids: a list per row, reply: stats, texts,
        generation stats, and client_time_to_first_token_ms when streaming)."""
        meta, arrays = self._inputs(texts, None, input_ids, attention_mask, None)
        options = (config.to_dict() if config is not None else {})
        if config is not None and not config.stop_token_ids:
            options.pop("stop_token_ids")  # none given: the model's EOS
        meta.update(generate=options, stream=on_tokens is not None)
        t0, first = time.monotonic(), []

        def tokens(tmeta, tarrays):
            if not first:
                first.append(time.monotonic())
            on_tokens(int(tmeta.get("step", 0)), np.array(tarrays["ids"]), tmeta.get("texts"))

        reply, outputs = self._call(Kind.REQUEST, meta, arrays, on_tokens=tokens if on_tokens else None)
        if not reply.get("ok"):
            raise PeerError(f"request failed: {reply.get('error')}")
        ids = [[int(t) for t in row if t >= 0] for row in np.array(outputs["generated_ids"]).tolist()]
        if first:
            reply["generation"]["client_time_to_first_token_ms"] = round(1e3 * (first[0] - t0), 3)
        return ids, reply

    @staticmethod
    def _inputs(texts, images, input_ids, attention_mask, pixel_values) -> tuple[dict, dict]:
        meta, arrays = {}, {}
        if texts:
            meta["texts"] = list(texts)
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
            raise PrismError("nothing to send: give texts, images, pixel_values or input_ids")
        return meta, arrays

    def close(self):
        self._reset()


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalCluster:
    """Start one `prism run` process per device bundle, wait until the cluster is ready, stop them all on
    exit (also on error and Ctrl-C).

    hosts:   address of each rank (default 127.0.0.1); `prefix(k)` wraps rank k's command, e.g.
             ["ip", "netns", "exec", "ns1"] to run it in a network namespace, or ["taskset", "-c", "1"].
    secure:  CurveZMQ with the export's own keys (device-K/keys for the runners, client/ for the client);
             False runs every runner with --insecure and talks plain text.
    """

    def __init__(self, export_dir: str | Path, *, threads: int = 1, timeout: float = 10.0,
                 hosts: list[str] | None = None, prefix=None, serve_host: str = "127.0.0.1",
                 log_dir: str | Path | None = None, ready_timeout: float = 90.0, extra_env: dict | None = None,
                 secure: bool = True, extra_args: list[str] | None = None):
        self.export = Export.load(export_dir)  # verify everything before starting anything
        self.root = Path(export_dir)
        self.secure, self.extra_args = secure, list(extra_args or [])
        self.client_keys = ClientKeys.load(self.root / CLIENT) if secure else None
        P = len(self.export.devices)
        self.hosts = hosts or ["127.0.0.1"] * P
        ports = free_ports(P + 1)
        self.ports, self.serve_port = ports[:P], ports[P]
        self.serve_address = f"{self.hosts[0] if hosts else serve_host}:{self.serve_port}"
        self.threads, self.timeout, self.ready_timeout = threads, timeout, ready_timeout
        self.prefix = prefix or (lambda k: [])
        self.log_dir = Path(log_dir) if log_dir else None
        self.extra_env = extra_env or {}
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.client: Client | None = None

    @property
    def peers(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in zip(self.hosts, self.ports))

    def command(self, k: int) -> list[str]:
        cmd = [sys.executable, "-m", "prism_onnx.cli", "run", str(self.root / f"device-{k}"), "--rank", str(k),
               "--peers", self.peers, "--threads", str(self.threads), "--timeout", str(self.timeout)]
        if k == 0:
            cmd += ["--serve", str(self.serve_port)]
        if not self.secure:
            cmd += ["--insecure"]
        return [*self.prefix(k), *cmd, *self.extra_args]

    def start_device(self, k: int) -> subprocess.Popen:
        import tempfile

        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="prism-launch-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        log = log_dir / f"device-{k}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        with open(log, "ab") as f:
            p = subprocess.Popen(self.command(k), stdout=f, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        if k < len(self.procs):
            self.procs[k] = p
        else:
            self.procs.append(p)
            self.logs.append(log)
        return p

    def __enter__(self) -> "LocalCluster":
        try:
            for k in range(len(self.export.devices)):
                self.start_device(k)
            self.client = self.new_client()
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def new_client(self, **kw) -> Client:
        """A client of this cluster's coordinator (rank 0), with the export's client keys when secure."""
        return Client(self.serve_address, **{"timeout": max(60.0, self.timeout * 4), "keys": self.client_keys,
                                             "server_rank": 0, **kw})

    def wait_ready(self, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while time.monotonic() < deadline:
            for k, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise PeerError(f"device {k} exited with code {p.returncode}:\n{self.log_tail(k)}")
            try:
                if self.client.status(timeout=1.0).get("ready"):
                    return
            except (PeerError, FrameError):
                pass
            time.sleep(0.2)
        raise PeerError(f"cluster not ready within {timeout or self.ready_timeout:g} s:\n" +
                        "\n".join(self.log_tail(k) for k in range(len(self.procs))))

    def log_tail(self, k: int, lines: int = 15) -> str:
        try:
            text = self.logs[k].read_text(errors="replace").splitlines()[-lines:]
        except (OSError, IndexError):
            text = []
        return f"--- device {k} log ---\n" + "\n".join(text)

    def stop_device(self, k: int, sig=signal.SIGTERM, wait: float = 5.0):
        p = self.procs[k]
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def close(self):
        if self.client is not None:
            self.client.close()
        for k in range(len(self.procs)):
            self.stop_device(k)

    def __exit__(self, *exc):
        self.close()
