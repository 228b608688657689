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
from dataclasses import replace
from pathlib import Path

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from ..errors import FrameError, InputError, PeerError, PrismError, Timeout
from .bundle import Export
from .keys import CLIENT, ClientKeys
from .preprocess import load_pixel_file
from .protocol import ArrayRules, Kind
from .schema import GenerateOptions, Reply, Request, Status, Tokens, decode_record, encode_record

REPLY_RULES = ArrayRules(1 << 36, max_arrays=16)  # what a client accepts back from an authenticated server


class ServerLost(PeerError):
    """The serving runner closed the connection, stopped answering, or never answered: another server may."""

    code = "server_lost"


def server_address(item: str) -> str:
    """'HOST:PORT' (or 'tcp://HOST:PORT') -> 'tcp://HOST:PORT'; anything else is refused in one line."""
    text = item.strip().removeprefix("tcp://")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise InputError(f"--server '{item}': expected HOST:PORT, e.g. {text or 'localhost'}:5600 (the port a "
                         f"runner serves with --serve)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--server '{item}': the port '{port}' is not a number in 1..65535")
    return f"tcp://{host}:{int(port)}"


class Client:
    """Talks to a serving runner: `status()`, `infer(...)`, `generate(...)`.

    address: "HOST:PORT", or several, comma-separated ("H:P,H:P,...") or as a list: any runner started with --serve
    coordinates the requests it receives. The client uses one server until it is lost (the connection
    closes, or it answers nothing for `dead_after` seconds), then the next one in the list, and resends the
    request in flight: inference is idempotent. A streaming generation that already received tokens is not
    resent (its tokens were shown); the call fails instead. `last_server` and `last_failovers` tell where the
    last request was answered and which servers failed it first.

    keys: the client folder `prism keys` wrote (EXPORT_DIR/client) or ClientKeys; None talks plain text
    (to a runner started with --insecure). Each server is authenticated by its public key: the one of
    `server_rank` (one rank, or one per address), or, when that is not given, whichever device's key the
    server answers to. While a request runs, the client sends STATUS pings; a coordinator that answers
    nothing for `dead_after` seconds (stopped, killed, unreachable) fails the call then, not at `timeout`.
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
        for r in ranks:
            if self.keys is not None and r is not None and r not in self.keys.servers:
                raise PrismError(f"the client keys hold no public key of device {r}")
        self.ranks = dict(zip(self.addresses, ranks))  # address -> the device rank whose key it answers to
        self.index = 0  # the server in use
        self.last_server, self.last_failovers, self.last_reply = None, [], {}
        self.ctx = zmq.Context.instance()
        self.sock = self.monitor = None
        self._answered = False
        self._calls = itertools.count(1)

    @property
    def address(self) -> str:
        return self.addresses[self.index]

    @property
    def server_rank(self) -> int | None:
        return self.ranks[self.address]

    @server_rank.setter
    def server_rank(self, rank: int | None) -> None:
        self.ranks[self.address] = rank

    def _socket(self, server_rank: int | None) -> tuple[zmq.Socket, zmq.Socket]:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        if self.keys is not None:
            s.curve_secretkey, s.curve_publickey = self.keys.secret, self.keys.public
            s.curve_serverkey = self.keys.servers[server_rank]
        m = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED |
                                 zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_SUCCEEDED |
                                 zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED)
        try:
            s.connect(self.address)
            self._await_connection(m)
        except zmq.ZMQError as e:
            _close(s, m)
            raise ServerLost(f"cannot connect to {self.address.removeprefix('tcp://')}: {e}") from None
        except ServerLost:
            _close(s, m)
            raise
        return s, m

    def _await_connection(self, monitor: zmq.Socket) -> None:
        """Wait for the socket's TCP connection (its monitor's CONNECTED event), at most `dead_after`
        seconds: a refused connection (CONNECT_RETRIED first: nothing listens on that port) or none at all
        raises ServerLost, instead of ZeroMQ retrying silently until the request's timeout."""
        host_port = self.address.removeprefix("tcp://")
        deadline = time.monotonic() + self.dead_after
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(max(1, int(1000 * left))):
                break
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                return
            if event == zmq.EVENT_CONNECT_RETRIED:
                host = host_port.rpartition(":")[0].strip("[]")
                try:
                    socket.getaddrinfo(host, None)
                except socket.gaierror as e:
                    raise ServerLost(f"cannot resolve the host '{host}' of {host_port}: {e.strerror}") from None
                raise ServerLost(f"connection refused by {host_port}: nothing listens there (is a runner "
                                 f"serving clients with --serve {host_port.rpartition(':')[2]}?)")
        raise ServerLost(f"no TCP connection to {host_port} within {self.dead_after:g} s (host down or "
                         f"unreachable, or a firewall drops the connection)")

    def _connect(self):
        if self.sock is not None:
            return
        if self.keys is None or self.server_rank is not None or len(self.keys.servers) == 1:
            rank = self.server_rank if self.server_rank is not None else \
                (next(iter(self.keys.servers)) if self.keys else None)
            self.sock, self.monitor = self._socket(rank)
            return
        # which device serves? ask each key at once; the one whose handshake succeeds answers
        tries = {}
        try:
            for r in self.keys.servers:
                tries[r] = self._socket(r)
        except ServerLost:
            for s, m in tries.values():
                _close(s, m)
            raise
        poller = zmq.Poller()
        for s, _ in tries.values():
            s.send_multipart(encode_record(Status(call=0)))
            poller.register(s, zmq.POLLIN)
        ready = dict(poller.poll(int(1000 * self.dead_after)))
        for r, (s, m) in tries.items():
            if self.sock is None and s in ready:
                s.recv_multipart()
                self.sock, self.monitor, self.server_rank = s, m, r
            else:
                _close(s, m)
        if self.sock is None:
            raise ServerLost(f"no answer from {self.address} within {self.dead_after:g} s with any of the "
                             f"{len(tries)} device keys (is a runner serving there, and does it hold this client's key?)")

    def _reset(self):
        if self.sock is not None:
            _close(self.sock, self.monitor)
        self.sock = self.monitor = None
        self._answered = False

    def _call(self, message: Request | Status, timeout: float | None = None, watch: bool = True,
              on_tokens=None) -> Reply:
        """Send one message and wait for its Reply; Tokens of the same call go to on_tokens(tokens)."""
        self._connect()
        timeout = timeout or self.timeout
        call = next(self._calls)
        self.sock.send_multipart(encode_record(replace(message, call=call)))
        t0 = heard = time.monotonic()
        next_ping, poller = t0 + self.ping_every, zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            now = time.monotonic()
            if now - t0 >= timeout:
                self._reset()
                raise Timeout(f"no reply from {self.address} within {timeout:g} s")
            if watch and now - heard >= self.dead_after:
                self._reset()
                raise ServerLost(f"the coordinator at {self.address} stopped responding: no answer for "
                                 f"{self.dead_after:g} s")
            if watch and now >= next_ping:
                self.sock.send_multipart(encode_record(Status(call=0)))
                next_ping = now + self.ping_every
            wait = min([t0 + timeout] + ([next_ping, heard + self.dead_after] if watch else [])) - now
            events = dict(poller.poll(max(1, int(1000 * wait))))
            if self.monitor in events:
                ev = recv_monitor_message(self.monitor)
                if ev["event"] in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                    self._reset()
                    raise PeerError(f"{self.address} refused this client's key (CURVE handshake failed): is it "
                                    f"in the serving device's keys/clients?")
                if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # the server holds our key: a later close
                    self._answered = True                           # is the server going away
                if ev["event"] == zmq.EVENT_DISCONNECTED:
                    answered, _ = self._answered, self._reset()
                    if not answered and self.keys is not None:
                        raise PeerError(f"{self.address} closed the connection before any answer: the CURVE "
                                        f"handshake failed (not device {self.server_rank}'s key, or another "
                                        f"export's keys)")
                    raise ServerLost(f"{self.address} closed the connection (the coordinator stopped, or the "
                                     f"message was over its size limit)")
            if self.sock in events:
                rec = decode_record(self.sock.recv_multipart(), None, REPLY_RULES, kinds=(Kind.REPLY, Kind.TOKENS))
                heard, self._answered = time.monotonic(), True
                if rec.call == call:
                    if isinstance(rec, Tokens):
                        if on_tokens is not None:
                            on_tokens(rec)
                        continue
                    return rec

    def status(self, timeout: float = 2.0) -> dict:
        """The STATUS of the server in use (no failover)."""
        return self._call(Status(), timeout=timeout, watch=False).meta()

    def _request(self, request: Request, on_tokens=None) -> Reply:
        """One REQUEST, failing over to the next server (and resending) while servers are lost; a full
        round of lost servers, or the client timeout, ends it. A reply with an error raises it, as the class
        the cluster raised (errors.ErrorInfo.exception: InputError, TooLong, Busy, DevicesUnavailable...)."""
        t0, lost, streamed = time.monotonic(), [], []

        def tokens(tok):
            streamed.append(1)
            on_tokens(tok)

        while True:
            left = self.timeout - (time.monotonic() - t0)
            try:
                if left <= 0:
                    raise Timeout(f"no reply within {self.timeout:g} s")
                reply = self._call(request, timeout=left, on_tokens=tokens if on_tokens else None)
                self.last_server, self.last_failovers, self.last_reply = self.address, lost, reply.meta()
                if reply.error is not None:
                    raise reply.error.info().exception()
                return reply
            except ServerLost as e:
                lost.append(str(e))
                self._reset()
                if streamed:
                    raise ServerLost(f"{e}; the request had streamed {len(streamed)} tokens, so it is not resent")
                if len(self.addresses) == 1 or len(lost) % len(self.addresses) == 0:
                    if len(self.addresses) == 1:
                        raise
                    raise ServerLost(f"every server failed the request: {'; '.join(lost)}") from None
                self.index = (self.index + 1) % len(self.addresses)

    def infer(self, *, texts=None, images=None, input_ids=None, attention_mask=None, pixel_values=None,
              outputs=None):
        """-> (outputs {name: array}, stats). `outputs`: names to return (default all). A failure raises the
        error the cluster raised (InputError, TooLong, Busy, DevicesUnavailable, Timeout, ...: errors.py)."""
        request = self._inputs(texts, images, input_ids, attention_mask, pixel_values)
        if outputs:
            request = replace(request, outputs=tuple(outputs))
        reply = self._request(request)
        return {k: np.array(v) for k, v in reply.arrays.items()}, reply.stats

    def generate(self, *, texts=None, input_ids=None, attention_mask=None, config=None, on_tokens=None):
        """Distributed prefill, then decoding on the tail device. `config`: a generate.GenerationConfig
        (default: 16 greedy tokens, stop at the model's EOS). on_tokens(step, ids [B], texts or None) is
        called as tokens arrive (streaming). -> (generated ids: a list per row, reply: stats, texts,
        generation stats, and client_time_to_first_token_ms when streaming)."""
        options = GenerateOptions.of(config, given_stops=bool(config.stop_token_ids)) if config is not None \
            else GenerateOptions()  # no stop ids given: the model's EOS
        request = replace(self._inputs(texts, None, input_ids, attention_mask, None), generate=options,
                          stream=on_tokens is not None)
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
        self._reset()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc):
        self.close()


def _close(sock: zmq.Socket, monitor: zmq.Socket | None) -> None:
    """Close a DEALER and its monitor. The monitor is disabled first: closing a monitored socket leaves
    libzmq's side of the monitor alive (it keeps its inproc address and counts against the context's
    1,023 sockets), so a long-lived process that connects often ends with "Too many open files"."""
    if monitor is not None:
        sock.disable_monitor()
        monitor.close(linger=0)
    sock.close(linger=0)


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
    serve_args: more arguments for the serving runner only, e.g. ["--http", "8000"] (prism_onnx/serve).
    serve_all: every rank serves clients (each on a port of its own, `servers`), not only rank 0; with it,
             `new_client(failover=True)` talks to all of them in rank order (Client failover).
    rank_args: more arguments for some ranks only, e.g. {1: ["--emulate-slowdown", "2"]}.
    python:  the Python that runs some ranks (default: this one), e.g. {1: "/venv/bin/python"} with
             prefix(1) = ["chroot", ROOT]: rank 1 on another board's install (tests/test_arm64.py).
    """

    def __init__(self, export_dir: str | Path, *, threads: int = 1, timeout: float = 10.0,
                 hosts: list[str] | None = None, prefix=None, serve_host: str = "127.0.0.1",
                 log_dir: str | Path | None = None, ready_timeout: float = 90.0, extra_env: dict | None = None,
                 secure: bool = True, extra_args: list[str] | None = None, serve_args: list[str] | None = None,
                 serve_all: bool = False, rank_args: dict[int, list[str]] | None = None,
                 python: dict[int, str] | None = None):
        self.export = Export.load(export_dir)  # verify everything before starting anything
        self.root = Path(export_dir)
        self.secure, self.extra_args, self.serve_all = secure, list(extra_args or []), serve_all
        self.serve_args = list(serve_args or [])
        self.rank_args = {int(k): list(v) for k, v in (rank_args or {}).items()}
        self.python = {int(k): str(v) for k, v in (python or {}).items()}
        self.client_keys = ClientKeys.load(self.root / CLIENT) if secure else None
        P = len(self.export.devices)
        self.hosts = hosts or ["127.0.0.1"] * P
        ports = free_ports(2 * P)
        self.ports, self.serve_ports = ports[:P], ports[P:]
        self.serve_port = self.serve_ports[0]
        serve_hosts = self.hosts if hosts else [serve_host] * P
        self.serve_addresses = [f"{h}:{p}" for h, p in zip(serve_hosts, self.serve_ports)]
        self.serve_address = self.serve_addresses[0]
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

    @property
    def servers(self) -> str:
        """Every serving runner's HOST:PORT in rank order (for `prism infer --server`)."""
        return ",".join(self.serve_addresses if self.serve_all else self.serve_addresses[:1])

    def command(self, k: int) -> list[str]:
        cmd = [self.python.get(k, sys.executable), "-m", "prism_onnx.cli", "run", str(self.root / f"device-{k}"),
               "--rank", str(k), "--peers", self.peers, "--threads", str(self.threads), "--timeout", str(self.timeout)]
        if k == 0 or self.serve_all:
            cmd += ["--serve", str(self.serve_ports[k])]
        if k == 0:
            cmd += self.serve_args
        if not self.secure:
            cmd += ["--insecure"]
        return [*self.prefix(k), *cmd, *self.extra_args, *self.rank_args.get(k, [])]

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

    def new_client(self, failover: bool = False, **kw) -> Client:
        """A client of this cluster's coordinator (rank 0), with the export's client keys when secure; with
        `failover` (and serve_all), of every serving runner in rank order."""
        if failover:
            ranks = list(range(len(self.serve_addresses))) if self.serve_all else [0]
            return Client(self.servers, **{"timeout": max(60.0, self.timeout * 4), "keys": self.client_keys,
                                           "server_rank": ranks, **kw})
        return Client(self.serve_address, **{"timeout": max(60.0, self.timeout * 4), "keys": self.client_keys,
                                             "server_rank": 0, **kw})

    def kill(self, k: int) -> None:
        """SIGKILL runner k (a crash: no goodbye to anyone); `start_device(k)` restarts it."""
        self.stop_device(k, signal.SIGKILL)

    def times_up(self, k: int) -> int:
        """How many times runner k has logged that it is up (its loop runs): 1 after start, 2 after a restart."""
        try:
            return self.logs[k].read_text(errors="replace").count(f"device {k}/{len(self.procs)} up on port")
        except (OSError, IndexError):
            return 0

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
