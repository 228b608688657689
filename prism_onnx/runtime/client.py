"""Clients of a running cluster: `Client` (prism infer) and `LocalCluster` (prism launch: P runners on
this machine, optionally each inside a network namespace)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from ..errors import FrameError, PeerError, PrismError
from .bundle import Export
from .protocol import Kind, decode, encode
from .preprocess import load_pixel_file


class Client:
    """Talks to the serving device: `status()` and `infer(...)`."""

    def __init__(self, address: str, timeout: float = 60.0):
        self.address = address if address.startswith("tcp://") else f"tcp://{address}"
        self.timeout = timeout
        self.ctx = zmq.Context.instance()
        self.sock = None
        self._connect()

    def _connect(self):
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.address)

    def _call(self, kind: Kind, meta: dict, arrays: dict | None = None, timeout: float | None = None):
        self.sock.send_multipart(encode(kind, meta, arrays))
        if not self.sock.poll(int(1000 * (timeout or self.timeout))):
            self._connect()  # drop the late reply, if any, with the old socket
            raise PeerError(f"no reply from {self.address} within {timeout or self.timeout:g} s")
        _, meta, arrays = decode(self.sock.recv_multipart(), 1 << 40)
        return meta, arrays

    def status(self, timeout: float = 2.0) -> dict:
        return self._call(Kind.STATUS, {}, timeout=timeout)[0]

    def infer(self, *, texts=None, images=None, input_ids=None, attention_mask=None, pixel_values=None,
              outputs=None):
        """-> (outputs {name: array}, stats). `outputs`: names to return (default all). Raises PeerError
        with the server's message on failure."""
        meta, arrays = ({"outputs": list(outputs)} if outputs else {}), {}
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
        meta, outputs = self._call(Kind.REQUEST, meta, arrays)
        if not meta.get("ok"):
            raise PeerError(f"request failed: {meta.get('error')}")
        return {k: np.array(v) for k, v in outputs.items()}, meta["stats"]

    def close(self):
        self.sock.close(linger=0)


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
    """

    def __init__(self, export_dir: str | Path, *, threads: int = 1, timeout: float = 10.0,
                 hosts: list[str] | None = None, prefix=None, serve_host: str = "127.0.0.1",
                 log_dir: str | Path | None = None, ready_timeout: float = 90.0, extra_env: dict | None = None):
        self.export = Export.load(export_dir)  # verify everything before starting anything
        self.root = Path(export_dir)
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
        return [*self.prefix(k), *cmd]

    def start_device(self, k: int) -> subprocess.Popen:
        import tempfile

        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="prism-launch-"))
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
            self.client = Client(self.serve_address, timeout=max(60.0, self.timeout * 4))
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

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
