"""Dynamic batching on the coordinator's device: concurrent client requests that would each get the same
plan are run as one distributed request, and each client gets exactly its own rows back.

When a thread of the coordinator's own lane takes a client request (a Job), it tokenizes it, then takes the
requests already queued behind it (and, while other requests of the lane are running, waits up to
`batch_wait` seconds for more), up to the export's `max_batch` rows. Requests join the first one's batch
only if their `Prepared.key` is equal: the same token count N, plan devices, split weights, requested outputs
and input arrays. The plan's spans depend only on N, the devices and the weights, and every other part of it
(segments, counts, sinks, biases) is computed row by row, so each row gets the plan it would get alone, at
any CR: batching changes no result. A request that does not fit goes back to the lane (`Lane.ready`) and
runs on its own or in a later batch; a generation request is never batched.

`--batch-pad` (off by default) also batches text requests of different lengths, padded on the right to the
longest. At CR=1 that changes nothing (every token is exchanged; padding is masked: equal to the model within
float rounding). At CR > 1 it does: the spans are cut over the padded length, so a short request's tokens
sit on fewer devices and are averaged in other segments than alone. Use it where throughput matters more
than bit-for-bit reproducibility of a request alone.

The batch runs under the first request's id; its other requests ride along: the worker tells the
coordinator (a worker.Batched record, in process, before any START leaves) which rows are whose, and the
coordinator answers each of them with its rows (coordinator.py).

Vocabulary:
    prepared    a request tokenized and planned, its STARTs not sent yet
    members     (request id, first row, end row, its own token count) of each request in a batch, in row
                order (padded requests get their outputs cut back to their own tokens)
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import numpy as np

from ..plan import Plan
from .jobs import Job


@dataclass
class Prepared(Job):
    """A client request's Job (jobs.py) tokenized and planned; `members` when it is a batch of several."""

    inputs: dict = field(default_factory=dict)  # token-level arrays [B, N, ...] (pixel_values [B, C, H, W])
    plan: Plan | None = None
    members: list[tuple[int, int, int, int]] = field(default_factory=list)

    @classmethod
    def of(cls, job: Job, inputs: dict, plan: Plan, members=None) -> "Prepared":
        return cls(job.attempt, job.deadline, job.client, inputs, plan, list(members or []))

    def key(self, pad: bool = False) -> tuple:
        """Requests with equal keys get, row by row, the same plan in one batch as alone; with `pad`, token
        inputs of any length N share a key (they are padded to the longest: see `merge`)."""
        a = self.attempt
        padded = pad and "input_ids" in self.inputs
        arrays = tuple(sorted((k, v.shape[2:] if padded else v.shape[1:], str(v.dtype))
                              for k, v in self.inputs.items()))
        return (None if padded else self.plan.n_tokens, tuple(self.plan.ranks), self.plan.weights,
                tuple(sorted(a.outputs)) if a.outputs else None, arrays)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    """Token inputs [B, N, ...] padded on the right to n tokens with zeros (attention_mask 0: padding)."""
    return a if a.shape[1] == n else np.pad(a, [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2))


def merge(group: list[Prepared], plan_of) -> Prepared:
    """One Prepared of the requests in `group` (equal keys), rows in group order; plan_of(mask) -> Plan.
    Token inputs of different lengths (`--batch-pad`) are padded on the right to the longest."""
    first = group[0]
    n = max(p.plan.n_tokens for p in group) if "input_ids" in first.inputs else None
    pad = (lambda a: _pad(a, n)) if n is not None else (lambda a: a)
    inputs = {k: np.concatenate([pad(p.inputs[k]) for p in group]) for k in first.inputs}
    members, row = [], 0
    for p in group:
        members.append((p.request, row, row + p.plan.batch, p.plan.n_tokens))
        row += p.plan.batch
    return Prepared.of(first, inputs, plan_of(np.concatenate([pad(p.plan.attention_mask) for p in group])), members)


def batchable(job) -> bool:
    """A request the coordinator's lane may batch: a client request (tokenized or not, not a batch already)
    that does not generate."""
    if isinstance(job, Prepared):
        return not job.members and job.attempt.generate is None
    return getattr(job, "client", None) is not None and job.attempt.generate is None


def gather(first, lane, tokenize, plan_of, max_rows: int, wait_s: float, pad: bool = False):
    """`first` (a client request's Job, or a Prepared put back earlier) and what can join it -> a Prepared (maybe a
    batch), or `first` itself when it cannot be tokenized (its own run reports the error). Candidates are
    the requests put back in `lane.ready` (in order), then the lane's queue; those that do not fit stay
    in, or go to, `lane.ready`, in order. tokenize(job) -> Prepared (raises on a bad request);
    plan_of(mask) -> Plan."""
    prepare = lambda j: j if isinstance(j, Prepared) else tokenize(j)  # noqa: E731
    try:
        head = prepare(first)
    except Exception:  # noqa: BLE001 - its own run reports the error (a bad input, or a bug: counted there)
        return first
    earlier = []  # what was put back before: considered first, kept in order
    while True:
        try:
            earlier.append(lane.ready.popleft())
        except IndexError:
            break
    group, rows, left = [head], head.plan.batch, []
    until = time.monotonic() + wait_s
    while rows < max_rows:
        if earlier:
            job = earlier.pop(0)
        else:
            busy = len(lane.running) > 0  # other requests of this lane are running: more are likely coming
            remaining = until - time.monotonic() if busy else 0.0
            try:
                job = lane.jobs.get(timeout=remaining) if remaining > 0 else lane.jobs.get_nowait()
            except queue.Empty:
                break
        if not batchable(job):  # e.g. a generation: it runs alone
            left.append(job)
            continue
        try:
            p = prepare(job)
        except Exception:  # noqa: BLE001 - as above: it runs alone and reports its error
            left.append(job)
            continue
        if p.key(pad) == head.key(pad) and rows + p.plan.batch <= max_rows:
            group.append(p)
            rows += p.plan.batch
        else:
            left.append(p)
    lane.ready.extendleft(reversed(left + earlier))  # ahead of anything put back meanwhile, in order
    return head if len(group) == 1 else merge(group, plan_of)
