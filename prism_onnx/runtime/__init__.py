"""The on-board runtime: onnxruntime, numpy, pyzmq, click (and tokenizers/Pillow for inputs). No torch here.

How the runtime works (a five-minute read)
==========================================

A runner (`prism run`, host.py) is one process per board: one I/O thread (every socket, the membership,
the coordinator) and the worker's lane threads (the onnxruntime work). Any runner started with --serve
also coordinates the client requests it receives.

The messages (every control message is a typed record of schema.py; frames are wire.py's)

    HELLO    runner -> every peer, 5 times a second      Hello: rank, export, clocks, who it sees, health
    REFUSE   runner -> a peer whose HELLO it refuses     Refuse: why (another export, rank taken, --peers)
    REQUEST  client -> its coordinator                   Request: texts or arrays, outputs, generation
    START    coordinator -> each device of the plan      Attempt + arrays: the device's own token inputs
    means    device -> its receivers, per layer          wire.MeansFrame: segment means / window rows
    RESULT   device -> coordinator                       Result: outputs as arrays, or an ErrorInfo
    TOKENS   tail device -> coordinator -> client        Tokens: one decoding step's ids (streaming)
    ABORT    coordinator -> devices of an attempt        Abort: drop this attempt (a rerun, a failure)
    REPLY    coordinator -> client                       Reply: outputs, stats, or an ErrorInfo
    STATUS   client -> coordinator                       Status; answered by a Reply holding the state

Who checks what, where (nothing acts on a message before all of its checks pass)

    keys.py        at start: each keypair's halves, and the key set (keyset.json: this export, these public keys)
    transport.py   CurveZMQ: a connection whose key is not the export's is refused before any byte arrives;
                   the key's name ("device-K", "client-NAME") comes with every message; size limits per port;
                   refused connections said once per host and summed up (counters.FailureSummary)
    clients.py     a client message's connection: ZeroMQ's own routing ids only; its replies go back on that
                   connection while it is open, or nowhere
    protocol.py    framing: header, JSON size and depth before parsing, array shapes and sizes before any
                   array exists (ArrayRules from the manifest's Limits)
    schema.py      every field of the kind's record: type and bounds; cross-field rules (`check`)
    admission.py   a REQUEST's values: texts, ids in the vocabulary, the export's limits (InputError; code too_long)
    dispatch.py    a peer message against its sender: the key names the device it claims to be, and it
                   arrives on that device's live session (membership.py); means frames: wire.check_means
    exchange.py    a means frame against the endpoint (addressed here, this export), then its counts
                   against the request's plan when its exchange point gathers it
    worker.py      a START's inputs against the plan: the device's own span, before onnxruntime

Where each one waits

    membership.py  peers' liveness and readiness, from HELLOs (sans-IO: explicit times); each peer's timeout
                   learned from its heartbeats' gaps (detector.py)
    tenants.py     client requests beyond their client's share of the coordinator (--max-client-inflight),
                   admitted one client after another (round robin)
    coordinator.py client requests not yet answered (`pending`, by attempt), their deadlines, reruns held
                   for a lost device (sans-IO)
    lanes.py       a device's jobs: one lane per coordinator, up to --max-inflight running, started in order
    exchange.py    received means frames: one Inbox per lane, by (request, exchange point), bounded per source
    transport.py   the worker's outbox (inproc): messages to peers, and typed records for its own
                   coordinator (a wake-up on the outbox; the records themselves wait in a queue)

A request, end to end: the client sends a REQUEST to a serving runner (clientport.py: bound to its
connection, through its client's share); its coordinator plans it over the
live devices (an Attempt with a new request id) and queues a Job in its own worker; that lane tokenizes the
texts, batches equal requests (batching.py), STARTs every other device of the plan and runs its own part.
Every device runs the same device program (program.py) with the onnxruntime backend; at each exchange point
it sends its rows to its receivers and gathers its sources' rows. Each device's RESULT goes to the
coordinator (in process for its own), which assembles the REPLY (replies.py). A device that is lost (no
HELLO) or fails the attempt for another's sake gets the attempt ABORTed and rerun over the live devices; any
other error reaches the client as its own class (errors.ErrorInfo: InputError, Busy,
DevicesUnavailable, Timeout, ...), from which the CLI's JSON error type and the HTTP status are made.
"""
