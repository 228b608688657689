"""Emulated edge network for tests and benchmarks: one network namespace per device, joined by a bridge,
every link rate-limited with `tc qdisc ... tbf` in both directions. Needs root and iproute2.

    with Testbed(3, rate="100mbit") as net:
        LocalCluster(export, hosts=net.addresses, prefix=net.prefix, serve_host=net.addresses[0])

The machine itself (the client) reaches every host through the bridge at <subnet>.254.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def tbf_args(rate: str) -> list[str]:
    """tc arguments for a token bucket at `rate` (e.g. 100mbit): burst of ~10 ms of traffic, >= 32 KB."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, f in units.items():
        if rate.endswith(u):
            bps = float(rate[: -len(u)]) * f
            break
    else:
        raise ValueError(f"rate must end in kbit, mbit or gbit, got {rate}")
    burst = max(int(bps / 8 / 100), 32 * 1024)
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]


class Testbed:
    def __init__(self, hosts: int, rate: str | None = "100mbit", subnet: str = "10.77.0"):
        self.n, self.rate, self.subnet = hosts, rate, subnet
        tag = uuid.uuid4().hex[:4]
        self.bridge = f"prbr{tag}"
        self.ns = [f"prism-{tag}-h{k}" for k in range(hosts)]
        self.veth = [(f"prv{tag}{k}", f"pre{tag}{k}") for k in range(hosts)]  # (bridge side, host side)
        self.addresses = [f"{subnet}.{k + 1}" for k in range(hosts)]

    @staticmethod
    def available() -> tuple[bool, str]:
        """(usable, why not)."""
        if os.geteuid() != 0:
            return False, "needs root for ip netns"
        if shutil.which("ip") is None or shutil.which("tc") is None:
            return False, "iproute2 (ip, tc) is not installed"
        probe = f"prism-probe-{uuid.uuid4().hex[:6]}"
        r = _ip("ip", "netns", "add", probe, check=False)
        if r.returncode != 0:
            return False, f"ip netns add failed: {r.stderr.strip()}"
        _ip("ip", "netns", "del", probe, check=False)
        return True, ""

    def prefix(self, k: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[k]]

    def __enter__(self) -> "Testbed":
        try:
            _ip("ip", "link", "add", self.bridge, "type", "bridge")
            _ip("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
            _ip("ip", "link", "set", self.bridge, "up")
            for ns, (outer, inner), addr in zip(self.ns, self.veth, self.addresses):
                _ip("ip", "netns", "add", ns)
                _ip("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("ip", "link", "set", inner, "netns", ns)
                _ip("ip", "link", "set", outer, "master", self.bridge)
                _ip("ip", "link", "set", outer, "up")
                _ip("ip", "link", "set", "lo", "up", ns=ns)
                _ip("ip", "addr", "add", f"{addr}/24", "dev", inner, ns=ns)
                _ip("ip", "link", "set", inner, "up", ns=ns)
                if self.rate:
                    _ip("tc", "qdisc", "add", "dev", outer, "root", *tbf_args(self.rate))  # into the host
                    _ip("tc", "qdisc", "add", "dev", inner, "root", *tbf_args(self.rate), ns=ns)  # out of it
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        for ns in self.ns:
            _ip("ip", "netns", "del", ns, check=False)
        for outer, _ in self.veth:
            _ip("ip", "link", "del", outer, check=False)
        _ip("ip", "link", "del", self.bridge, check=False)

    def __exit__(self, *exc):
        self.close()
