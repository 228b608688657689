"""`LocalCluster` (prism launch, and the tests): P `prism run` processes on this machine (optionally each
inside a network namespace or another board's root), started, watched until ready, stopped.

A process supervisor, not a client: it talks to the cluster through `runtime.client.Client`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import FrameError, PeerError
from .bundle import Export
from .client import Client
from .keys import CLIENT, ClientKeys


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

    def operator_status(self, timeout: float = 5.0) -> dict:
        """The serving runner's STATUS as an operator sees it (every client's requests, the counters, every
        device's health): asked with device 0's own keys (or plain text, --insecure)."""
        if getattr(self, "_operator", None) is None:
            keys = ClientKeys.load(self.root / "device-0" / "keys") if self.secure else None
            self._operator = Client(self.serve_address, timeout=max(60.0, self.timeout * 4), keys=keys)
        return self._operator.status(timeout=timeout)

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
        for c in (self.client, getattr(self, "_operator", None)):
            if c is not None:
                c.close()
        for k in range(len(self.procs)):
            self.stop_device(k)

    def __exit__(self, *exc):
        self.close()
