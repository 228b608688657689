"""The HTTP server thread of `prism run --http PORT`: uvicorn serving serve/app.py beside the runner.

The runner's I/O loop keeps the main thread (and its signal handlers); uvicorn runs its event loop in a
daemon thread on a socket this module binds first, so a port in use is one clear error at start.
"""

from __future__ import annotations

import logging
import socket
import threading

from ..errors import PeerError
from .app import create_app
from .gateway import Gateway
from .limits import HttpLimits, Refusals, limited_protocol

log = logging.getLogger("prism.http")


class HttpServer:
    def __init__(self, gateway: Gateway, host: str, port: int, api_keys: list[str] | None = None,
                 limits: HttpLimits | None = None):
        import uvicorn

        self.gateway, self.host, self.port, self.keyed = gateway, host, int(port), bool(api_keys)
        self.limits = limits = limits or HttpLimits()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, self.port))
        except OSError as e:
            self.sock.close()
            raise PeerError(f"--http: cannot listen on {host}:{port} ({e.strerror or e}): "
                            "is the port in use?") from None
        self.sock.listen(128)
        self.sock.setblocking(False)
        refused = Refusals(gateway.metrics)
        config = uvicorn.Config(create_app(gateway, api_keys, limits, refused), log_config=None, access_log=False,
                                timeout_graceful_shutdown=2, lifespan="off", http=limited_protocol(limits, refused),
                                limit_concurrency=limits.max_connections + 1, timeout_keep_alive=limits.keep_alive)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="prism-http", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException:  # uvicorn ends with SystemExit on a fatal start-up error
            log.exception("the HTTP server stopped; the runner keeps serving its client port")

    def start(self) -> "HttpServer":
        self.thread.start()
        L = self.limits
        log.info("HTTP API of '%s' on http://%s:%d (%s; serves %s; at most %d connections, headers within %g s, "
                 "%d bodies of up to %.0f MiB at once, each within %g s)", self.gateway.name, self.host, self.port,
                 "API key required" if self.keyed else "no API key",
                 ", ".join(self.gateway.capabilities()) or "nothing", L.max_connections, L.header_timeout,
                 L.max_bodies, L.max_body_bytes / 2**20, L.body_timeout)
        if not self.keyed:
            log.warning("the HTTP API has no API key (--api-key / --api-key-file): anyone who can reach port %d "
                        "can use this deployment", self.port)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.gateway.close()
        self.sock.close()
