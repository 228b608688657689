"""Who asked: each client request bound to the connection it came on, so that its reply (and its streamed
tokens) go back on that connection only, or nowhere. Sans-IO: the transport reports connections opened and
closed (the client port's socket monitor: ACCEPTED and DISCONNECTED, with the connection's file
descriptor) and each message's routing id, key name and descriptor (ZeroMQ's SRCFD); tests drive it with
numbers.

ZeroMQ routes a ROUTER's replies by the routing id of the connection a message came on. A peer may choose
its own routing id (ZMQ_ROUTING_ID), so an id is no proof of who receives a reply: with ROUTER_HANDOVER a
second connection using the same id took over the first one's replies. The client port runs with
handover off (a second connection with an id in use is ignored by ZeroMQ), refuses ids that are not
ZeroMQ's own (five bytes, the first zero: `auto_id`), and binds every request to its connection
(`ClientRef`: routing id, key name, descriptor and the descriptor's epoch, which changes whenever a
connection on that descriptor opens or closes). A reply is delivered only while that connection is open
(`deliverable`): when the client's connection closed, its replies are dropped, even if another connection
took its routing id or its descriptor since (ids of ZeroMQ's form can be chosen too).

Vocabulary: a *client* is a key name ("client", "client-NAME", "local-http", "device-K" for operators),
or without CurveZMQ the peer's address; a *connection* is one TCP connection of a client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPERATOR_PREFIX = "device-"  # a device's own key on the client port: the operator's view of STATUS


def auto_id(routing_id: bytes) -> bool:
    """A routing id of ZeroMQ's own making (a ROUTER numbers the connections whose peer set none: a zero
    byte and four random-started counter bytes)."""
    return len(routing_id) == 5 and routing_id[0] == 0


def is_operator(client: str) -> bool:
    return client.startswith(OPERATOR_PREFIX)


@dataclass(frozen=True)
class ClientRef:
    """The connection a request came on: ZeroMQ's routing id, the client's name, and the connection
    (descriptor, epoch). What the coordinator keeps with each request and hands back with its replies."""

    routing_id: bytes
    client: str
    conn: tuple[int, int] = (-1, 0)


@dataclass
class ClientSessions:
    """The client port's open connections, by file descriptor: the epoch of the connection open on each,
    and the routing id each one uses."""

    epochs: dict[int, int] = field(default_factory=dict)  # fd -> epoch of the connection open on it
    ids: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # routing id -> (fd, epoch) using it
    counter: int = 0

    def opened(self, fd: int) -> None:
        self.counter += 1
        self.epochs[fd] = self.counter

    def closed(self, fd: int) -> None:
        epoch = self.epochs.pop(fd, None)
        self.ids = {r: c for r, c in self.ids.items() if c != (fd, epoch)}

    def identify(self, routing_id: bytes, client: str, fd: int | None) -> ClientRef | str:
        """A message's ClientRef, or why it is refused: a routing id the client chose, or one bound to another
        open connection."""
        if not auto_id(routing_id):
            return ("the client set its own ZeroMQ routing id (ZMQ_ROUTING_ID): this port refuses chosen ids, "
                    "leave it unset")
        fd = -1 if fd is None else int(fd)
        if fd not in self.epochs:  # its ACCEPTED event was lost (monitor queue full): a connection from now on
            self.opened(fd)
        conn = (fd, self.epochs[fd])
        bound = self.ids.setdefault(routing_id, conn)
        if bound != conn and bound[1] == self.epochs.get(bound[0]):
            return "a routing id in use by another open connection"
        self.ids[routing_id] = conn
        return ClientRef(routing_id, client, conn)

    def deliverable(self, ref: ClientRef) -> bool:
        """Is the connection `ref` came on still open (and so still the one its routing id reaches)?"""
        fd, epoch = ref.conn
        return self.epochs.get(fd) == epoch and self.ids.get(ref.routing_id) == ref.conn
