"""Who is in the cluster, and whether each peer is reachable in both directions right now. Pure logic:
no sockets, every method takes the time (`now`, monotonic seconds) so tests drive it with numbers.

Every runner sends HELLO to every peer every HEARTBEAT_S seconds. A HELLO carries the sender's clock `t`
and, per peer, the `t` of the last HELLO it received from that peer (`echo`). Peer q is *alive* for us
when its last HELLO is younger than its heartbeat timeout AND that HELLO echoes one of our own HELLOs
sent less than its echo timeout ago: q hears us now, and we hear q now. Each side only compares times of
its own clock. Both timeouts are learned from q's own heartbeats (detector.py): `dead_after`
(--heartbeat-timeout) at least, more for a peer whose heartbeats come irregularly (a board starved by a
busy neighbour), at most ten times it. A peer that stops (killed, SIGSTOP, a cable pulled) is lost that
long later; one that resumes is alive again after one round of HELLOs, whatever state it held before.

The cluster is *ready* when every peer is alive and each reports that it sees every other device alive
(so every ordered pair of devices has a working path). Requests do not wait for readiness: they are
planned over the *members* (elastic partitions): this device and the live peers that see each other,
which after a device is lost is fewer than all. A runner has *formed* (`ever_ready`) once the whole
cluster was ready, or once it joined members of a cluster that had formed (a runner restarted while
another device is still down). Every HELLO also carries the sender's `--peers` list (HOST:PORT by rank):
lists that name another port (or another number of devices) can never form a cluster, so such a HELLO is
refused naming the entries that differ (fatal during start-up, as another export is); lists that differ
only in host names may be right (one machine's name for a board is another's IP address) and are noted
once. A runner instance is identified by its `nonce`
(new at every start): a second runner claiming a live runner's rank is refused, a restarted one
replaces a lost one. A peer's messages other than HELLO are accepted only on the connection (`session`,
the ZeroMQ routing id) that carried its last accepted HELLO.

A peer whose CurveZMQ handshake fails on our own connection to it (transport.MonitorEvent "peer_keys")
holds other keys than this device's keys/ say it should: a device folder or keys/ of another export or of
another `prism keys` run. That is said at the first failure, naming the cause, and is fatal during start-up
(as another export is) once it is certain: at once when the peer refuses our key, after KEY_FAILURES
failures in a row otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .detector import Gaps

HEARTBEAT_S = 0.2
DEAD_AFTER_S = 1.0
NEVER = -float("inf")
KEY_FAILURES = 3  # failed handshakes in a row on our connection to a peer that make "other keys" certain


@dataclass
class PeerState:
    rank: int
    address: str
    nonce: str | None = None
    session: bytes | None = None  # routing id of the connection of its last accepted HELLO
    last_hello: float = NEVER  # our clock, when its last HELLO arrived
    their_t: float | None = None  # its clock, in its last HELLO (we echo it back)
    echo: float = NEVER  # our clock: the newest HELLO of ours that it says it heard
    sees: frozenset = frozenset()  # ranks it reports alive
    serving: bool = False
    formed: bool = False  # it reports that its cluster has formed (was ready once)
    up_since: float = NEVER  # our clock: when it last became alive (the newest member yields first)
    gone_session: bytes | None = None  # the session that was live when our connection to it closed
    gone_at: float = NEVER  # our clock: when that happened
    health: dict = field(default_factory=dict)  # its own counters: rejected, denied, internal errors
    up: bool = False  # the verdict of the last tick, for edge detection
    ever_up: bool = False
    gone: str | None = None  # why our connection to it closed, until its next HELLO
    key_failures: int = 0  # failed handshakes in a row on our connection to it
    hello_gaps: Gaps = field(default_factory=Gaps)  # between its HELLOs
    echo_gaps: Gaps = field(default_factory=Gaps)  # how stale its echo of ours was when the next one came

    def alive(self, now: float, dead_after: float) -> bool:
        return now - self.last_hello < self.hello_gaps.timeout(dead_after) and \
            now - self.echo < self.echo_gaps.timeout(dead_after)


@dataclass
class Verdict:
    accept: bool
    refuse: str | None = None  # the reason sent back in a REFUSE
    fatal: str | None = None  # no cluster can form: this runner stops
    note: str | None = None  # worth one log line (a peer connected or restarted)


@dataclass
class Membership:
    rank: int
    addresses: dict[int, str]  # every peer's address, by rank (this device excluded)
    export_id: str
    settings: dict  # the settings that must agree (DeviceBundle.handshake_settings)
    nonce: str
    serving: bool = False
    dead_after: float = DEAD_AFTER_S
    peers: dict[int, PeerState] = field(default_factory=dict)
    ever_ready: bool = False
    peer_list: tuple[str, ...] = ()  # this runner's --peers, HOST:PORT by rank (this device included)

    def __post_init__(self):
        self.devices = len(self.addresses) + 1
        self.peers = {q: PeerState(q, a) for q, a in self.addresses.items()}
        self.peer_list = tuple(self.peer_list)
        self._noted_lists: set[tuple[int, tuple]] = set()  # (rank, its list) already noted as host-only differences

    # ---------------------------------------------------------------------------------------- queries
    def alive(self, q: int, now: float) -> bool:
        return self.peers[q].alive(now, self.dead_after)

    def ready(self, now: float) -> bool:
        return not self.missing(now)

    def missing(self, now: float) -> list[int]:
        """Peers that are not alive, or that do not see every other device."""
        return [q for q, p in self.peers.items()
                if not p.alive(now, self.dead_after) or not set(range(self.devices)) - {q} <= p.sees]

    def members(self, now: float) -> list[int]:
        """The devices a request can be planned over now: this one and the live peers, each of which sees
        every other member (so every ordered pair of members has a working path). While two members do not
        see each other, one of the peers involved is left out: the one that became alive last (a device
        rejoining yields to those that stayed), then the one that misses the most, then the highest rank."""
        group = {self.rank} | {q for q in self.peers if self.alive(q, now)}
        while True:
            unseen = {q: group - {q} - self.peers[q].sees for q in group if q != self.rank}
            involved = {q for q, u in unseen.items() if u} | {r for u in unseen.values() for r in u}
            involved.discard(self.rank)
            if not involved:
                return sorted(group)
            group.discard(max(involved, key=lambda q: (self.peers[q].up_since, len(unseen[q]), q)))

    def connected(self, now: float) -> list[int]:
        return sorted([self.rank] + [q for q in self.peers if self.alive(q, now)])

    def is_session(self, q: int, session: bytes) -> bool:
        return q in self.peers and self.peers[q].session == session

    # ------------------------------------------------------------------------------------------ HELLO
    def hello(self, now: float, health: dict | None = None):
        """Our heartbeat (schema.Hello); `health` ({name: count}) is reported to the coordinator's STATUS."""
        from .schema import Hello

        return Hello(self.rank, self.nonce, self.export_id, now, settings=dict(self.settings), serving=self.serving,
                     ready=self.ready(now), formed=self.ever_ready, health=dict(health or {}),
                     peers=tuple(self.peer_list),
                     echo={str(q): p.their_t for q, p in self.peers.items() if p.their_t is not None},
                     sees=tuple(q for q in self.peers if self.alive(q, now)))

    def on_hello(self, hello, now: float, session: bytes, key_rank: int | None = None) -> Verdict:
        """A HELLO (schema.Hello, its fields checked) from the connection `session`; `key_rank` is the rank of
        the CurveZMQ key it came with (None without authentication)."""
        rank, nonce, export_id, t = hello.rank, hello.nonce, hello.export_id, hello.t
        settings, health = hello.settings or {}, hello.health or {}
        serving, formed, sees = hello.serving, hello.formed, frozenset(hello.sees)
        echo = (hello.echo or {}).get(str(self.rank))
        their_list = tuple(hello.peers)
        if key_rank is not None and rank != key_rank:
            return Verdict(False, refuse=f"a HELLO claiming rank {rank} came with the key of device {key_rank}")
        if export_id != self.export_id:
            differ = {k: (settings.get(k), v) for k, v in self.settings.items() if settings.get(k) != v}
            what = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items()) or "same settings, other files"
            reason = (f"bundle from another export: device {rank} runs export {export_id[:12]}, device {self.rank} "
                      f"runs {self.export_id[:12]} ({what})")
            return Verdict(False, refuse=reason, fatal=None if self.ever_ready else
                           f"device {self.rank} refused device {rank} at the handshake: {reason}")
        if rank == self.rank:
            return Verdict(False, refuse=f"two runners claim rank {rank}")
        if rank not in self.peers:
            return Verdict(False, refuse=f"rank {rank} is not in 0..{self.devices - 1}")
        p, note = self.peers[rank], None
        if session == p.gone_session and p.session is None and (echo is None or echo <= p.gone_at):
            return Verdict(False)  # queued before its connection closed: no proof it is alive (ignored)
        if p.nonce not in (None, nonce) and (p.alive(now, self.dead_after) or now - p.last_hello < self.dead_after):
            return Verdict(False, refuse=f"two runners claim rank {rank} (a live one is already connected)")
        lists = self.compare_peers(rank, their_list)
        if lists and lists[0]:
            return Verdict(False, refuse=lists[1], fatal=None if self.ever_ready else
                           f"device {self.rank} refused device {rank} at the handshake: {lists[1]}")
        if p.nonce is None:
            note = f"device {rank} connected"
        elif p.nonce != nonce:
            note = f"device {rank} restarted"
            self.peers[rank] = p = PeerState(rank, p.address, up=p.up, ever_up=p.ever_up, hello_gaps=p.hello_gaps,
                                             echo_gaps=p.echo_gaps)
        elif p.session != session:
            note = f"device {rank} reconnected"
        was_alive = p.alive(now, self.dead_after)
        if p.last_hello != NEVER:  # learn how regular its heartbeats are (detector.py)
            p.hello_gaps.observe(now - p.last_hello, self.dead_after)
        if p.echo != NEVER and echo is not None and p.echo < echo <= now:
            p.echo_gaps.observe(now - p.echo, self.dead_after)
        p.nonce, p.session, p.last_hello, p.their_t, p.gone, p.gone_session = nonce, session, now, t, None, None
        if echo is not None:
            p.echo = max(p.echo, float(echo)) if echo <= now else p.echo  # never trust a time from our future
        if not was_alive and p.alive(now, self.dead_after):
            p.up_since = now
        p.sees, p.serving, p.health, p.formed = sees, serving, health, formed
        if lists and (rank, their_list) not in self._noted_lists:  # host names only: said once per list
            self._noted_lists.add((rank, their_list))
            note = f"{note}; {lists[1]}" if note else lists[1]
        return Verdict(True, note=note)

    def compare_peers(self, rank: int, their_list: tuple[str, ...]) -> tuple[bool, str] | None:
        """None when device `rank`'s --peers list (from its HELLO; empty: not sent) is ours, else (fatal,
        line): fatal when the lists differ in length or in a port (no cluster can form), not when they
        differ in host names only (may name the same machines). The line names the entries that differ."""
        if not their_list or not self.peer_list or their_list == self.peer_list:
            return None
        if len(their_list) != len(self.peer_list):
            return True, (f"device {rank} was started with --peers {','.join(their_list)} ({len(their_list)} devices), "
                          f"device {self.rank} with {','.join(self.peer_list)}: give every runner the same list")
        differ = [k for k, (a, b) in enumerate(zip(their_list, self.peer_list)) if a != b]
        entries = "; ".join(f"rank {k} is {their_list[k]} for device {rank}, {self.peer_list[k]} for device "
                            f"{self.rank}" for k in differ)
        port = any(a.rpartition(":")[2] != b.rpartition(":")[2] for a, b in zip(their_list, self.peer_list))
        if port:
            return True, f"--peers lists differ: {entries}; give every runner the same --peers"
        return False, (f"device {rank}'s --peers names hosts differently ({entries}); fine if they are the same "
                       f"machines, else give every runner the same --peers")

    def on_disconnect(self, q: int, why: str = "closed the connection", now: float = NEVER) -> None:
        """Our connection to q closed (its process died, or ZeroMQ's own heartbeat gave up): q is not alive
        until a new HELLO echoes a new one of ours; a restarted runner may take its rank at once. Messages
        still queued from q's old connection (a dead process's last HELLOs, STARTs, frames) no longer count:
        its session is closed, and a HELLO on it is ignored unless it echoes a HELLO of ours sent after
        `now` (then q's process is alive, its connection survived, and the session is bound again)."""
        p = self.peers[q]
        if p.nonce is not None and p.gone is None:
            p.last_hello, p.echo, p.gone = NEVER, NEVER, why
            p.gone_session, p.session, p.gone_at = p.session, None, now

    def on_refuse(self, reason: str) -> str | None:
        """A peer refused our HELLO: fatal during start-up, ignored (logged) once the cluster has run."""
        return None if self.ever_ready else reason

    def on_key_failure(self, q: int, detail: str, certain: bool = False) -> Verdict:
        """Our CurveZMQ handshake with peer q failed (`detail`: how, transport.OUTGOING): it holds other keys.
        The first failure of a streak is a note naming the cause; fatal during start-up once certain (at once
        when q refused our key, after KEY_FAILURES in a row otherwise)."""
        p = self.peers[q]
        p.key_failures += 1
        reason = (f"the runner at {p.address.removeprefix('tcp://')} (device {q} in --peers) {detail}: "
                  "its device folder or keys/ come "
                  f"from another export or another `prism keys` run (copy this export's device-{q} folder to it, "
                  f"or run `prism keys` once and copy every device-K/keys)")
        note = reason if p.key_failures == 1 else None
        if not self.ever_ready and p.key_failures >= (1 if certain else KEY_FAILURES):
            return Verdict(False, fatal=f"device {self.rank} refused device {q} at the handshake: {reason}", note=note)
        return Verdict(False, note=note)

    def on_handshake(self, q: int) -> None:
        """Our CurveZMQ handshake with peer q succeeded: whatever failed before, it holds the right keys now."""
        self.peers[q].key_failures = 0

    # ------------------------------------------------------------------------------------------- tick
    def tick(self, now: float) -> tuple[list[int], list[int]]:
        """(peers lost since the last tick, peers back). Call it once per I/O loop iteration."""
        lost, back = [], []
        for q, p in self.peers.items():
            up = p.alive(now, self.dead_after)
            if up != p.up:
                if not up:
                    lost.append(q)
                elif p.ever_up:
                    back.append(q)
                p.up, p.ever_up = up, p.ever_up or up
        if not self.ever_ready and (self.ready(now) or any(self.peers[q].formed for q in self.members(now)
                                                           if q != self.rank)):
            self.ever_ready = True
        return lost, back

    def describe(self, q: int, now: float) -> str:
        p = self.peers[q]
        if p.nonce is None:
            return f"device {q} ({p.address}) never connected"
        if p.gone:
            return f"device {q} {p.gone}"
        silent, deaf = now - p.last_hello, now - p.echo
        if silent >= p.hello_gaps.timeout(self.dead_after):
            return f"device {q} sent no heartbeat for {silent:.2f} s ({p.hello_gaps.describe(self.dead_after)})"
        if deaf >= p.echo_gaps.timeout(self.dead_after):
            return (f"device {q} has not echoed this device's heartbeats for {deaf:.2f} s: it does not hear them, "
                    f"or its last heartbeat ({silent:.2f} s ago) was late ({p.echo_gaps.describe(self.dead_after)})")
        unseen = sorted(set(range(self.devices)) - {q} - p.sees)
        return f"device {q} does not see devices {unseen}" if unseen else f"device {q} is connected"
