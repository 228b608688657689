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
