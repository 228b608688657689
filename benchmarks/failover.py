"""Failover numbers for the closing note of issue 9: requests lost per 1,000 with kills, recovery times, and
the latency the rerun request pays.

Starts the export's runners on loopback (CurveZMQ, every rank serving), sends a closed-loop stream of
requests from one failover client (SST-2 dev sentences, in order), and while it runs kills and restarts
runners on a schedule (SIGKILL, as a crash; a restart loads the bundle again). Kills land wherever the
stream is, usually in the middle of a request. For each kill it reports
    kill_to_reply_s     the kill -> the first reply whose plan does not hold the lost rank
    rerun_added_ms      that request's latency minus the stream's median latency (its rerun or failover)
and for each restart
    restart_to_plan_s   the restart command -> the first reply whose plan holds the rank again (this
                        includes the runner's own start: Python, onnxruntime sessions, its first HELLO)
    up_to_plan_s        the runner's "up" log line -> that reply (the rejoin itself)

    python benchmarks/failover.py EXPORT_DIR --requests 1000 --kill 2@3 --restart 2@8 --kill 0@13 --restart 0@18
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import click

from prism_onnx.data import sst2
from prism_onnx.runtime.cluster import LocalCluster

def sentences(k: int) -> list[str]:
    """k SST-2 dev sentences, in order, repeating the set when k is larger."""
    texts, _ = sst2("dev")
    return [texts[i % len(texts)] for i in range(k)]


def fault(spec: str) -> tuple[int, float]:
    rank, _, when = spec.partition("@")
    return int(rank), float(when)


@click.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--requests", "n", type=int, default=1000, show_default=True)
@click.option("--kill", "kills", multiple=True, help="RANK@SECONDS after the stream starts.")
@click.option("--restart", "restarts", multiple=True, help="RANK@SECONDS after the stream starts.")
@click.option("--heartbeat-timeout", type=float, default=1.0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
def main(export_dir, n, kills, restarts, heartbeat_timeout, json_path):
    texts = sentences(n)
    events: list[tuple[str, int, float]] = []  # (what, rank, monotonic time)
    records = []
    with LocalCluster(export_dir, serve_all=True, extra_args=["--heartbeat-timeout", str(heartbeat_timeout)]) as cl:
        client = cl.new_client(failover=True)
        ups = {}

        def act(what, k):
            if what == "kill":
                cl.kill(k)
            else:
                ups[k] = cl.times_up(k)
                cl.start_device(k)
            events.append((what, k, time.monotonic()))

        timers = [threading.Timer(t, act, ("kill", k)) for k, t in map(fault, kills)] + \
                 [threading.Timer(t, act, ("restart", k)) for k, t in map(fault, restarts)]
        t_start = time.monotonic()
        for timer in timers:
            timer.start()
        up_times = {}
        for i, text in enumerate(texts):
            t0 = time.monotonic()
            try:
                client.infer(texts=[text])
                reply = client.last_reply
                ok, err, ranks = True, None, reply["stats"]["ranks"]
            except Exception as e:  # noqa: BLE001 - a lost request is what we count
                ok, err, ranks = False, str(e), None
            t1 = time.monotonic()
            records.append({"index": i, "ok": ok, "error": err, "t_sent": t0 - t_start, "t": t1 - t_start,
                            "latency_ms": 1e3 * (t1 - t0), "devices": ranks})
            for k, before in ups.items():  # the runner's own "up" line, noticed between requests
                if k not in up_times and cl.times_up(k) > before:
                    up_times[k] = t1 - t_start
        for timer in timers:
            timer.cancel()
        client.close()

    ok = [r for r in records if r["ok"]]
    median = sorted(r["latency_ms"] for r in ok)[len(ok) // 2] if ok else None
    report = {"export": str(export_dir), "requests": n, "failed": n - len(ok),
              "lost_per_1000": round(1000 * (n - len(ok)) / n, 2), "median_latency_ms": round(median, 2),
              "max_latency_ms": round(max(r["latency_ms"] for r in ok), 2), "events": []}
    for what, k, t in events:
        t -= t_start
        later = [r for r in ok if r["t_sent"] >= t or (what == "kill" and r["t"] >= t)]
        if what == "kill":
            first = next((r for r in later if k not in r["devices"]), None)
            ev = {"kill": k, "at_s": round(t, 3),
                  "kill_to_reply_s": round(first["t"] - t, 3) if first else None,
                  "rerun_added_ms": round(first["latency_ms"] - median, 2) if first else None}
        else:
            first = next((r for r in later if k in r["devices"]), None)
            ev = {"restart": k, "at_s": round(t, 3),
                  "restart_to_plan_s": round(first["t"] - t, 3) if first else None,
                  "up_to_plan_s": round(first["t"] - up_times[k], 3) if first and k in up_times else None}
        report["events"].append(ev)
    text = json.dumps(report, indent=2)
    click.echo(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
    for r in records:
        if not r["ok"]:
            click.echo(f"failed #{r['index']}: {r['error']}", err=True)


if __name__ == "__main__":
    main()
