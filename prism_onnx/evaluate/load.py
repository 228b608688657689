"""`prism bench --clients K` and `--slow-device RANK:FRACTION`: throughput under concurrent clients, and
latency when one board is slower than the others.

    throughput   K closed-loop clients (each sends its next request when the last one is answered), each a
                 process with a Client of its own, against one deployment; requests per second from the
                 moment all are connected to the last reply, and each request's latency
    slow device  one runner is given a fraction of a core: a cgroup (v1) CPU quota where the machine has
                 one (root), else `prism run --emulate-slowdown 1/FRACTION`; the same request is timed with
                 an even split, the adaptive split (after it has settled) and the ideal split (static weights
                 proportional to each device's speed)

Every runner is pinned to its own core (taskset) like the latency runs of bench.py; there is no
network emulation here (loopback), so the numbers isolate compute, scheduling and the runtime's overhead.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..runtime.bundle import MANIFEST, read_manifest
from ..runtime.cluster import LocalCluster
from ..runtime.keys import CLIENT

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


def parse_slow_device(text: str, devices: int) -> tuple[int, float]:
    """'RANK:FRACTION' (e.g. 1:0.5: device 1 at half speed) -> (rank, fraction)."""
    rank, _, frac = text.partition(":")
    try:
        r, f = int(rank), float(frac)
    except ValueError:
        raise ValueError(f"--slow-device '{text}': expected RANK:FRACTION, e.g. 1:0.5") from None
    if not 0 <= r < devices or not 0 < f < 1:
        raise ValueError(f"--slow-device '{text}': RANK must be 0..{devices - 1} and FRACTION in (0, 1)")
    return r, f


@contextmanager
def slowed(fraction: float):
    """-> (extra runner arguments, command prefix) that run one runner at `fraction` of a core: a cgroup v1
    CPU quota when this process may make one (the runner joins it before it execs), else the runner's own
    emulation (`--emulate-slowdown`). The cgroup is removed afterwards."""
    group = CGROUP_CPU / f"prism-slow-{uuid.uuid4().hex[:6]}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(int(fraction * 100000)))
    except OSError:
        yield [f"--emulate-slowdown={1 / fraction:g}"], [], "emulated (--emulate-slowdown)"
        return
    try:
        join = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
        yield [], join, f"cgroup cpu quota {fraction:g} of a core"
    finally:
        for _ in range(50):  # the runners have exited (LocalCluster closed) before this runs
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def pinned(k: int, extra=()) -> list[str]:
    return [*extra, "taskset", "-c", str(k % (os.cpu_count() or 1))]


def _client(address: str, keys_dir: str | None, requests: list[dict], indices: list[int], barrier, out) -> None:
    """One closed-loop client, in a process of its own (so that clients do not share one interpreter's GIL):
    it connects, waits for every client to be ready, then sends its requests one after another."""
    from ..runtime.client import Client
    from ..runtime.keys import ClientKeys

    latencies, errors = [], []
    with Client(address, timeout=600.0, keys=ClientKeys.load(keys_dir) if keys_dir else None, server_rank=0) as c:
        barrier.wait()
        for i in indices:
            t0 = time.perf_counter()
            try:
                c.infer(**requests[i % len(requests)])
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append(1e3 * (time.perf_counter() - t0))
    out.put((latencies, errors))


def closed_loop(cluster: LocalCluster, requests: list[dict], clients: int, total: int) -> dict:
    """`clients` client processes share `total` requests (client k sends requests k, k + clients, ...;
    request i is requests[i % len]); the clock runs from the moment all are connected. -> throughput and
    latency percentiles."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients + 1), ctx.Queue()
    keys = str(cluster.root / CLIENT) if cluster.secure else None
    procs = [ctx.Process(target=_client, args=(cluster.serve_address, keys, requests, list(range(k, total, clients)),
                                               barrier, out)) for k in range(clients)]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    t0 = time.perf_counter()
    results = [out.get(timeout=3600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=30)
    lat = sorted(x for r in results for x in r[0])
    errors = [e for r in results for e in r[1]]
    return {"clients": clients, "requests": total, "errors": len(errors), "first_error": errors[0] if errors else None,
            "throughput_rps": round(len(lat) / wall, 2), "p50_ms": round(statistics.median(lat), 2),
            "p90_ms": round(lat[int(0.9 * (len(lat) - 1))], 2)}


def throughput(export: Path, requests: list[dict], clients: list[int], total: int, inflight: int = 1,
               batch_wait_ms: float = 2.0, batch_pad: bool = False, echo=lambda *_: None) -> dict:
    """Throughput at each client count, on one deployment with pipelining and batching on (`inflight`,
    `batch_wait_ms`), and the one-client baseline of the runtime as it was (one request at a time, no
    batching), measured in the same run. -> {"throughput_rps": {K: rps}, "runs": [...], "baseline_one_client": ...}"""
    out = {"settings": {"max_inflight": inflight, "batch_wait_ms": batch_wait_ms, "batch_pad": batch_pad}, "runs": []}
    sequential = ["--max-inflight", "1", "--batch-wait-ms", "0"]
    concurrent = ["--max-inflight", str(inflight), "--batch-wait-ms", f"{batch_wait_ms:g}"] + \
        (["--batch-pad"] if batch_pad else [])
    for name, args in (("sequential", sequential), ("concurrent", concurrent)):
        with LocalCluster(export, prefix=pinned, extra_args=args) as cluster:
            for r in requests[:4]:
                cluster.client.infer(**r)  # warm-up
            for k in ([1] if name == "sequential" else clients):
                echo(f"throughput: {k} client(s), {name} runners")
                run = {**closed_loop(cluster, requests, k, total), "runners": name}
                out["runs"].append(run)
    conc = {r["clients"]: r for r in out["runs"] if r["runners"] == "concurrent"}
    seq = next(r for r in out["runs"] if r["runners"] == "sequential")
    out["throughput_rps"] = {str(k): r["throughput_rps"] for k, r in conc.items()}
    if 1 in conc:
        out["p50_one_client_vs_sequential"] = round(conc[1]["p50_ms"] / seq["p50_ms"], 4)
        out["speedup_vs_one_client"] = {str(k): round(r["throughput_rps"] / conc[1]["throughput_rps"], 3)
                                        for k, r in conc.items()}
    return out


def slow_device(export: Path, inputs: dict, rank: int, fraction: float, repeats: int, settle: int = 8,
                echo=lambda *_: None) -> dict:
    """Latency with device `rank` at `fraction` speed: even split, adaptive split (after `settle` requests),
    and the ideal (static weights proportional to speed: 1 for the others, `fraction` for it)."""
    P = read_manifest(export / MANIFEST).devices
    ideal = ",".join(f"{fraction if q == rank else 1.0:g}" for q in range(P))
    out = {"rank": rank, "fraction": fraction, "latency_ms": {}, "spans": {}}
    for name, split in (("even", "even"), ("adaptive", "auto"), ("ideal", ideal)):
        with slowed(fraction) as (args, wrap, how):
            out["slowed_by"] = how
            prefix = lambda k: pinned(k, wrap if k == rank else [])  # noqa: E731
            rank_args = {rank: args} if args else None
            with LocalCluster(export, prefix=prefix, extra_args=["--split", split], rank_args=rank_args,
                              timeout=60) as cluster:
                cluster.client.timeout = max(cluster.client.timeout, 600)
                echo(f"slow device {rank} at {fraction:g}: {name} split")
                for _ in range(settle if name == "adaptive" else 1):
                    cluster.client.infer(**inputs)  # warm-up (and, adaptive, the speeds it learns)
                times, spans = [], None
                for _ in range(repeats):
                    _, stats = cluster.client.infer(**inputs)
                    times.append(stats["latency_ms"])
                    spans = stats["spans"]
                out["latency_ms"][name] = round(statistics.median(times), 1)
                out["spans"][name] = spans
    lat = out["latency_ms"]
    out["adaptive_vs_ideal"] = round(lat["adaptive"] / lat["ideal"], 4)
    out["even_vs_ideal"] = round(lat["even"] / lat["ideal"], 4)
    return out
