"""The client's sockets are released: a process that connects and disconnects often (a gateway, a batch
client failing over) must not run out of libzmq sockets (1,023 per context by default)."""

import zmq

from prism_onnx.runtime.client import Client


def test_a_client_that_reconnects_often_leaks_no_sockets():
    """1,100 connect/close cycles of one Client (a DEALER and its monitor each, i.e. three libzmq sockets
    with the monitor's inner one) in the process-wide context: more than 1,023 sockets if any leaked."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = Client(f"127.0.0.1:{port}", dead_after=10.0)
    try:
        for _ in range(1100):
            client.connection.connect()
            client.connection.reset()
    finally:
        client.close()
        router.close(linger=0)


def test_a_monitor_event_taken_since_the_poll_does_not_block_the_io_loop():
    """The I/O loop polls, then handles each ready socket; the client port drains its monitor's events
    before a message (Transport.pending_events), so by the time the loop reaches the monitor its event may
    be gone. Reading then must return nothing at once, not wait for the next connection event (a runner
    stopped answering that way under the fuzz test)."""
    from types import SimpleNamespace

    from zmq.utils.monitor import recv_monitor_message

    from prism_onnx.runtime.transport import Transport

    ctx = zmq.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        router.bind("tcp://127.0.0.1:*")
        monitor = router.get_monitor_socket()
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(router.last_endpoint.decode())
        # the connection's events (accepted, then the ZMTP handshake) come and something else takes them all
        # before the loop gets to the monitor; after the handshake none comes until a disconnection
        while monitor.poll(10_000) and recv_monitor_message(monitor)["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            pass
        monitor.setsockopt(zmq.RCVTIMEO, 10_000)  # a hang guard: a blocking read fails (zmq.Again), not hangs
        assert Transport.on_monitor(SimpleNamespace(), monitor) is None  # at once: nothing to read
    finally:
        ctx.destroy(linger=0)  # closes the sockets too, also after a failure
