"""A device runner's STATUS report, built from its host's state (host.DeviceHost.status)."""

from __future__ import annotations


def runner_status(host, now: float) -> dict:
    """What a device runner reports in STATUS (the operator's view; clients get their own requests only):
    readiness, members, the peers' health and learned heartbeat timeouts, the split, the counters."""
    m, coordinator = host.membership, host.coordinator
    return {
        "ready": m.ready(now), "export_id": host.bundle.export_id, "devices": host.bundle.devices,
        "coordinator": host.rank, "connected": m.connected(now), "members": m.members(now),
        "min_devices": coordinator.min_devices if coordinator else None,
        "secure": host.transport.keys is not None,
        "rejected_frames": {str(host.rank): host.rejected_total,
                            **{str(q): p.health.get("rejected", 0) for q, p in m.peers.items()}},
        "health": {str(host.rank): host.health, **{str(q): p.health for q, p in m.peers.items()}},
        "pending": len(coordinator.pending) if coordinator else 0,
        "requests": coordinator.describe_pending(now) if coordinator else [],
        "heartbeat_timeouts": {str(q): round(max(p.hello_gaps.timeout(m.dead_after),
                                                 p.echo_gaps.timeout(m.dead_after)), 3)
                               for q, p in m.peers.items()},
        "split": coordinator.split.describe() if coordinator else None,
        "counters": {**host.counters.to_dict(), "exchange_rejected": host.worker.lanes.rejected_frames,
                     "inbox_bytes": host.worker.lanes.inbox_bytes},
        "peers": {str(q): m.describe(q, now) for q in m.peers},
    }
