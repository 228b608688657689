"""The HTTP API of a deployment (Starlette): OpenAI-compatible endpoints, text-embeddings-inference's
/embed, health and Prometheus metrics.

    POST /v1/embeddings        OpenAI embeddings: input a string, strings, token ids; encoding_format
                               float or base64; pooled as the bundle says (prism_onnx/pooling.py)
    POST /embed                text-embeddings-inference: {"inputs", "normalize", "truncate"} -> [[...]]
    POST /v1/completions       OpenAI completions (prompt: strings or token ids), stream: true as
                               server-sent events ending with `data: [DONE]`
    POST /v1/chat/completions  the same for messages, rendered with the bundle's chat template
    GET  /v1/models            the one model this deployment serves
    GET  /health               200 when every device is up and sees every other, else 503
    GET  /metrics              Prometheus text format (serve/metrics.py)

With API keys, every path but /health and /metrics (probes and scrapers, as vLLM does it) needs
`Authorization: Bearer <key>`; a request without it, or with another key, gets 401. Every error has the
OpenAI shape (serve/errors.py). A request's JSON is read with a size limit and checked (serve/params.py)
before it is tokenized; the work runs in the gateway's thread pool, never on the event loop. A streamed
completion starts only when its first token (or its error) is there, so a request the cluster refuses
gets its status code, not a broken stream.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import ApiError, bad_request, too_long, unauthorized, unavailable
from .gateway import Gateway
from .generation import generation_response
from .limits import BUGS, HttpLimits, Refusals
from .params import chat_request, completion_request, embed_request, embedding_request

log = logging.getLogger("prism.http")
MAX_EMBED_INPUTS = 2048  # OpenAI's limit per embeddings request
OPEN_PATHS = ("/health", "/metrics")  # no API key needed
ENDPOINTS = ("/v1/embeddings", "/embed", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
             "/metrics")


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if e.status in (408, 413) or getattr(e, "unread_body", False):  # the body was not read (whole): this
        headers["Connection"] = "close"                                     # connection cannot carry another
    return JSONResponse(e.body(), status_code=e.status, headers=headers or None)


def endpoint(fn):
    """An endpoint: ApiError -> its response; any other exception is a bug: logged with its traceback, 500."""

    @functools.wraps(fn)
    async def wrapper(*args):  # (request) or, for a method, (self, request)
        request = args[-1]
        try:
            return await fn(*args)
        except ApiError as e:
            return error_response(e)
        except Exception as e:
            BUGS.error(e, f"internal error in {request.method} {request.url.path} (the server keeps serving)")
            return error_response(ApiError(500, f"internal error: {type(e).__name__}", code="internal_error"))

    return wrapper


class Bodies:
    """Request bodies read at once, at most `limits.max_bodies`, each within `limits.body_timeout` seconds and
    `limits.max_body_bytes` bytes (serve/limits.py). `refused(reason, host, why)` counts each refusal."""

    def __init__(self, limits: HttpLimits, refused):
        self.limits, self.refused = limits, refused
        self.slots = asyncio.Semaphore(limits.max_bodies)

    async def read_json(self, request: Request) -> dict:
        """The request's JSON object: 413 when its declared length is over the limit (nothing read) or it
        grows past it, 408 when it does not arrive in time, 503 when no slot frees in time, 400 when it is
        not a JSON object."""
        L, host = self.limits, request.client.host if request.client else None
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > L.max_body_bytes:
            self.refused("body_too_large", host, f"a declared body of {int(length):,} bytes")
            raise too_long(f"the request body of {int(length):,} bytes exceeds {L.max_body_bytes:,} bytes")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + L.body_timeout
        try:
            await asyncio.wait_for(self.slots.acquire(), L.body_timeout)
        except asyncio.TimeoutError:
            self.refused("too_many_bodies", host, f"{L.max_bodies} bodies were being read for {L.body_timeout:g} s")
            e = unavailable(f"the server is reading {L.max_bodies} other request bodies: retry later", code="busy")
            e.unread_body = True
            raise e from None
        try:
            body = await self._read(request, deadline, host)
        finally:
            self.slots.release()
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise bad_request(f"the request body is not valid JSON ({str(e)[:120]})") from None
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object")
        return data

    async def _read(self, request: Request, deadline: float, host: str | None) -> bytes:
        L, chunks, total = self.limits, [], 0
        stream = request.stream().__aiter__()
        while True:
            try:
                left = max(0.0, deadline - asyncio.get_running_loop().time())
                chunk = await asyncio.wait_for(stream.__anext__(), left)
            except StopAsyncIteration:
                return b"".join(chunks)
            except asyncio.TimeoutError:
                self.refused("body_timeout", host, f"a body not whole within {L.body_timeout:g} s")
                raise ApiError(408, f"the request body did not arrive within {L.body_timeout:g} s",
                               code="timeout") from None
            total += len(chunk)
            if total > L.max_body_bytes:
                self.refused("body_too_large", host, f"a body growing past {L.max_body_bytes:,} bytes")
                raise too_long(f"the request body exceeds {L.max_body_bytes:,} bytes")
            chunks.append(chunk)


class Observe:
    """Outermost ASGI middleware: counts every HTTP answer by endpoint and status and times it to its last
    byte (a stream's too); refuses requests without a valid API key (401) where keys are set."""

    def __init__(self, app, gateway: Gateway, api_keys: list[str]):
        self.app, self.metrics = app, gateway.metrics
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = path if path in ENDPOINTS or path.startswith("/v1/models/") else "other"
        label = "/v1/models" if label.startswith("/v1/models/") else label
        t0, status, counted = time.perf_counter(), [500], [False]

        def count():
            if not counted[0]:
                counted[0] = True
                self.metrics.request(label, status[0], time.perf_counter() - t0)

        async def observed(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                count()

        try:
            if self.keys and path not in OPEN_PATHS and not self._authorized(scope):
                return await self._deny(scope, receive, observed)
            return await self.app(scope, receive, observed)
        finally:
            count()  # also a stream whose client went away before its end

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        return scheme.lower() == b"bearer" and any(hmac.compare_digest(token, k) for k in self.keys)

    async def _deny(self, scope, receive, send):
        header = dict(scope.get("headers") or []).get(b"authorization")
        e = unauthorized("missing API key: send the header 'Authorization: Bearer <key>'" if header is None else
                         "incorrect API key")
        await error_response(e)(scope, receive, send)


class Api:
    """The endpoints of one gateway (each an `endpoint`: errors become their OpenAI-shaped responses). The
    cluster calls run in the gateway's pool, STATUS probes in its own single thread (a health check never
    waits behind requests)."""

    def __init__(self, gateway: Gateway, bodies: Bodies):
        self.g, self.bodies = gateway, bodies

    async def read_json(self, request: Request) -> dict:
        return await self.bodies.read_json(request)

    async def run(self, fn, *args, **kw):
        return await asyncio.get_running_loop().run_in_executor(self.g.pool, functools.partial(fn, *args, **kw))

    async def probe(self):
        return await asyncio.get_running_loop().run_in_executor(self.g.probes, self.g.status)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.g.name:
            raise ApiError(404, f"the model '{model[:100]}' does not exist: this deployment serves '{self.g.name}'",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------------------------------- info
    @endpoint
    async def health(self, request):
        status = await self.probe()
        self.g.metrics.status(status)
        if status is None:
            raise unavailable(f"the coordinator at {self.g.address} does not answer")
        if not status.get("ready"):
            down = "; ".join(str(v) for v in status.get("peers", {}).values())
            raise unavailable(f"not every device is up: {down or 'waiting for peers'}")
        return JSONResponse({"status": "ok", "devices": status.get("devices"), "connected": status.get("connected")})

    @endpoint
    async def metrics(self, request):
        self.g.metrics.status(await self.probe())
        return Response(self.g.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(self) -> dict:
        g, m = self.g, self.g.manifest
        s = m.settings
        return {"id": g.name, "object": "model", "created": _timestamp(m.created), "owned_by": "prism-onnx",
                "max_model_len": g.limits.max_seq_len,
                "prism": {"export_id": m.export_id, "architecture": m.model.architecture, "devices": s.devices,
                          "compression_ratio": s.compression_ratio, "capabilities": g.capabilities(),
                          "embedding_dimensions": g.dimensions if g.embeds else None}}

    @endpoint
    async def models(self, request):
        model = request.path_params.get("model")
        if model is not None:
            self.check_model(model)
            return JSONResponse(self.card())
        return JSONResponse({"object": "list", "data": [self.card()]})

    # ------------------------------------------------------------------------------------- embeddings
    @endpoint
    async def embeddings(self, request):
        g = self.g
        req = embedding_request(await self.read_json(request), MAX_EMBED_INPUTS)
        self.check_model(req.model)
        if req.dimensions is not None and req.dimensions != g.dimensions:
            raise bad_request(f"'dimensions' {req.dimensions}: this model's embeddings have {g.dimensions}",
                              param="dimensions")
        rows = await self.run(g.token_rows, req.inputs, "input")
        vectors = await self.run(g.embed, rows)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.base64 else v.tolist()}
                for i, v in enumerate(vectors)]
        tokens = sum(map(len, rows))
        return JSONResponse({"object": "list", "data": data, "model": g.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @endpoint
    async def embed(self, request):
        req = embed_request(await self.read_json(request), MAX_EMBED_INPUTS)
        rows = await self.run(self.g.token_rows, req.inputs, "inputs", truncate=req.truncate, left=req.left)
        vectors = await self.run(self.g.embed, rows, normalize=req.normalize)
        return JSONResponse(vectors.tolist())

    # ------------------------------------------------------------------------------------- generation
    @endpoint
    async def completions(self, request):
        req = completion_request(await self.read_json(request), self.g.limits.max_batch)
        self.check_model(req.model)
        rows = await self.run(self.g.token_rows, req.prompt, "prompt")
        return await generation_response(self.g, req.sampling, rows, self.g.config(req.sampling, rows, 16), chat=False)

    @endpoint
    async def chat_completions(self, request):
        req = chat_request(await self.read_json(request))
        self.check_model(req.model)
        rows = await self.run(self.g.chat_rows, req.messages, req.add_generation_prompt)
        return await generation_response(self.g, req.sampling, rows, self.g.config(req.sampling, rows, None),
                                         chat=True)


async def not_found(request, exc: HTTPException):
    if exc.status_code == 404:
        e = ApiError(404, f"no such endpoint: {request.method} {request.url.path}", code="unknown_url")
    else:
        e = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    return error_response(e)


def create_app(gateway: Gateway, api_keys: list[str] | None = None, limits: HttpLimits | None = None,
               refused: Refusals | None = None) -> Starlette:
    """The Starlette application of `gateway`; `api_keys`: the accepted keys (None or empty: open); `limits`
    of request bodies (serve/limits.py; default HttpLimits())."""
    api = Api(gateway, Bodies(limits or HttpLimits(), refused or Refusals(gateway.metrics)))
    routes = [Route("/health", api.health, methods=["GET"]), Route("/metrics", api.metrics, methods=["GET"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{model:path}", api.models, methods=["GET"]),
              Route("/v1/embeddings", api.embeddings, methods=["POST"]), Route("/embed", api.embed, methods=["POST"]),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    return Observe(app, gateway, list(api_keys or []))


def _timestamp(iso: str) -> int:
    import datetime as _dt

    try:
        return int(_dt.datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


