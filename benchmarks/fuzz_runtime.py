"""Fuzz a live cluster's ports and count crashes: the closing numbers of issue 8.

Starts the export's runners on loopback (CurveZMQ on), sends N hostile messages (tests/fuzz_messages.py:
every crasher class found on main, random bytes, mutated valid messages) to the coordinator's client port
and to both devices' peer ports, each with valid keys (an authenticated but hostile client and peer),
then checks that both runners are alive, counts their internal errors, reads their RSS and peak RSS, and
sends a legitimate request. A crash is a dead runner or an exception that escaped a message's checks.

    python benchmarks/fuzz_runtime.py EXPORT_DIR --messages 10000     # a P=2 text export
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import fuzz_messages  # noqa: E402

from prism_onnx.runtime.bundle import Export  # noqa: E402
from prism_onnx.runtime.cluster import LocalCluster  # noqa: E402
from prism_onnx.runtime.keys import RunnerKeys  # noqa: E402
from prism_onnx.runtime.protocol import Kind, decode, encode  # noqa: E402


def proc_kb(pid: int, field: str) -> int:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith(field))


def dealer(address, public, secret, server):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server
    s.connect(f"tcp://{address}")
    return s


def send_all(sock, msgs, probe, is_probe, batch=250):
    for i in range(0, len(msgs), batch):
        for parts in msgs[i:i + batch]:
            sock.send_multipart(parts)
        sock.send_multipart(probe)
        while True:
            if not sock.poll(120_000):
                raise SystemExit("a runner stopped answering")
            if is_probe(sock.recv_multipart()):
                break


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--messages", "n", default=10_000, show_default=True, help="Messages per port.")
@click.option("--seed", default=0, show_default=True)
def main(export_dir, n, seed):
    export = Export.load(export_dir)
    limits, P = export.devices[0].limits, len(export.devices)
    if P != 2 or limits.input_kind != "text":
        raise SystemExit("give a text export for 2 devices")
    root = Path(export_dir)
    with LocalCluster(root) as cluster:
        inputs = {"input_ids": [[101, 2000, 2001, 102]]}
        cluster.client.infer(**inputs)
        pids = [p.pid for p in cluster.procs]
        rss0 = [proc_kb(p, "VmRSS") for p in pids]
        status = cluster.operator_status()  # every device's health: an operator's view (a client sees its own)
        tag = int(status["export_id"][:8], 16)
        t0 = time.monotonic()
        c = cluster.client_keys
        s = dealer(cluster.serve_address, c.public, c.secret, c.server)
        target = fuzz_messages.Target(limits.hidden, limits.layers, limits.wire_dtype, tag, 0, 0, 2, limits.vocab_size,
                                      status["export_id"])
        send_all(s, list(fuzz_messages.messages(n, "client", target, seed)), encode(Kind.STATUS, {"call": 4242}),
                 lambda parts: decode(parts, 1 << 30)[1].get("call") == 4242)
        s.close(linger=0)
        for src, dst in ((0, 1), (1, 0)):
            k = RunnerKeys.load(root / f"device-{src}" / "keys", src, 2)
            s = dealer(f"127.0.0.1:{cluster.ports[dst]}", k.public, k.secret, k.peers[dst])
            target.src, target.dst = src, dst
            probe = encode(Kind.HELLO, {"rank": src, "nonce": "probe", "export_id": "feedfacefeed" * 4, "t": 0.0})
            send_all(s, list(fuzz_messages.messages(n, "peer", target, seed + 1 + src)), probe,
                     lambda parts: b"feedfacefeed" in parts[1])
            s.close(linger=0)
        elapsed = time.monotonic() - t0
        alive = [p.poll() is None for p in cluster.procs]
        ok = True
        try:
            cluster.client.infer(**inputs)
        except Exception as e:  # noqa: BLE001
            ok = str(e)
        status = cluster.operator_status()  # every device's health: an operator's view (a client sees its own)
        report = {
            "messages": {"client_port": n, "peer_ports": 2 * n, "total": 3 * n}, "seconds": round(elapsed, 1),
            "runners_alive": alive, "internal_errors": {k: h["internal_errors"] for k, h in status["health"].items()},
            "crashes": alive.count(False) + sum(h["internal_errors"] for h in status["health"].values()),
            "rejected": {k: h["rejected"] for k, h in status["health"].items()},
            "rss_kb_before": rss0, "rss_kb_after": [proc_kb(p, "VmRSS") for p in pids],
            "peak_rss_kb": [proc_kb(p, "VmHWM") for p in pids], "legitimate_request_after": ok,
        }
        report["crashes_per_10000"] = round(report["crashes"] * 10_000 / (3 * n), 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
