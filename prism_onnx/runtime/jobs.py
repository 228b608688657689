"""What a device's worker runs: a Job (one attempt of a request, as this device runs it) and, on the
coordinator, what its lane tells its own coordinator about batches (Batched). batching.Prepared is a Job
tokenized and planned."""

from __future__ import annotations

from dataclasses import dataclass

from .schema import Attempt, Request


@dataclass
class Job:
    """One attempt as this device's worker runs it: the Attempt (on a device, with START's arrays: the
    request's attention mask, this device's own token inputs, for the tail of a generation the whole
    prompt), the time it must be done by, and on the coordinator the client's Request, prepared first
    (tokenized, planned, STARTs sent: worker._start)."""

    attempt: Attempt
    deadline: float
    client: Request | None = None

    @property
    def request(self) -> int:
        return self.attempt.request

    @property
    def coordinator(self) -> int:
        return self.attempt.coordinator

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.attempt.ranks


@dataclass(frozen=True)
class Batched:
    """The worker ran several requests as one attempt (batching.py): to its own coordinator, in process,
    before any START of that attempt leaves: each member's (request id, first row, end row, tokens)."""

    request: int
    members: tuple[tuple[int, int, int, int], ...]
