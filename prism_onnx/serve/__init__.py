"""`prism run ... --serve PORT --http HTTP_PORT`: a deployment served over HTTP, to the programs people
already use (the `openai` package, LangChain, LlamaIndex, text-embeddings-inference clients, curl).

    gateway.py  what each endpoint asks of the cluster, through runtime.client.Client on the runner's own
                client port (tokenizing, length checks, pooling, stop strings); no starlette here
    app.py      the Starlette application: endpoints, API keys, OpenAI-shaped errors, server-sent events
    server.py   uvicorn in a thread of the runner's process;  limits.py  connections, timeouts, bodies
    params.py   request bodies -> typed, checked requests;  text.py  tokenizer, chat template, TextStream
    metrics.py  Prometheus metrics;  errors.py  ApiError (status + OpenAI error fields)

The libraries (starlette, uvicorn, prometheus_client, jinja2) are the optional extra `serve`: a board's
core install does not have them, and `prism run` imports none of them unless --http is given.

Credentials: the HTTP server is a client of the runner like any other, over CurveZMQ. It needs no
client folder on the board: the runner makes a keypair in memory at start and accepts its public key
(runtime/keys.py with_local_client), so the secret exists only inside this process. With --insecure the
server talks plain text, like every other client then.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import PrismError

SERVE_MODULES = ("starlette", "uvicorn", "prometheus_client", "jinja2")
INSTALL = 'pip install "prism-onnx[serve]"'


class MissingExtra(PrismError):
    """--http without the `serve` extra installed."""


def require_serve() -> None:
    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"--http needs {', '.join(missing)}, which the core install leaves out: {INSTALL}")


def read_api_keys(key: str | None, key_file: str | Path | None) -> list[str]:
    """--api-key KEY and/or --api-key-file F (one key per line; empty lines and # comments skipped)."""
    keys = [key.strip()] if key and key.strip() else []
    if key is not None and not keys:
        raise PrismError("--api-key is empty")
    if key_file is not None:
        try:
            lines = Path(key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PrismError(f"--api-key-file {key_file}: unreadable ({e})") from None
        found = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise PrismError(f"--api-key-file {key_file}: holds no key")
        keys += found
    if any(any(c.isspace() for c in k) or not k.isprintable() for k in keys):
        raise PrismError("an API key must be printable and hold no spaces")
    return keys


def start_http(host, port: int, api_keys: list[str] | None = None, name: str | None = None):
    """Start the HTTP server of runner `host` (runtime.host.DeviceHost, made with local_client=True) on
    `port`, at the runner's own bind address ('*': every interface). Returns the running HttpServer."""
    require_serve()
    from .gateway import Gateway
    from .server import HttpServer

    from .limits import HttpLimits

    gateway = Gateway(host.bundle, host.local_client_address, host.local_client_keys,
                      host.rank if host.local_client_keys is not None else None, name=name)
    bind = "0.0.0.0" if host.bind_host in ("*", "") else host.bind_host
    try:
        return HttpServer(gateway, bind, port, api_keys, HttpLimits.of(host.settings)).start()
    except BaseException:
        gateway.close()
        raise
