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
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import PrismError
from .errors import ApiError, bad_request, from_cluster, too_long, unauthorized, unavailable
from .gateway import Gateway
from .params import chat_request, completion_request, embed_request, embedding_request
from .text import TextStream

log = logging.getLogger("prism.http")
MAX_BODY = 16 << 20  # bytes of one request's JSON
MAX_EMBED_INPUTS = 2048  # OpenAI's limit per embeddings request
OPEN_PATHS = ("/health", "/metrics")  # no API key needed
ENDPOINTS = ("/v1/embeddings", "/embed", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
             "/metrics")


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def endpoint(fn):
    """An endpoint: ApiError -> its response; any other exception is a bug: logged with its traceback, 500."""

    @functools.wraps(fn)
    async def wrapper(request: Request):
        try:
            return await fn(request)
        except ApiError as e:
            return error_response(e)
        except Exception as e:
            log.exception("internal error in %s %s (the server keeps serving)", request.method, request.url.path)
            return error_response(ApiError(500, f"internal error: {type(e).__name__}", code="internal_error"))

    return wrapper


async def read_json(request: Request) -> dict:
    """The request's JSON object, read up to MAX_BODY bytes (413 beyond), 400 when it is not a JSON object."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise too_long(f"the request body of {int(length):,} bytes exceeds {MAX_BODY:,} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY:
            raise too_long(f"the request body exceeds {MAX_BODY:,} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise bad_request(f"the request body is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


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


def create_app(gateway: Gateway, api_keys: list[str] | None = None) -> Starlette:
    """The Starlette application of `gateway`; `api_keys`: the accepted keys (None or empty: open)."""
    g = gateway

    async def run(fn, *args, **kw):
        return await asyncio.get_running_loop().run_in_executor(g.pool, functools.partial(fn, *args, **kw))

    async def probe():
        return await asyncio.get_running_loop().run_in_executor(g.probes, g.status)

    def check_model(model: str | None) -> None:
        if model is not None and model != g.name:
            raise ApiError(404, f"the model '{model[:100]}' does not exist: this deployment serves '{g.name}'",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------------------------------------- info
    @endpoint
    async def health(request):
        status = await probe()
        g.metrics.status(status)
        if status is None:
            raise unavailable(f"the coordinator at {g.address} does not answer")
        if not status.get("ready"):
            down = "; ".join(str(v) for v in status.get("peers", {}).values())
            raise unavailable(f"not every device is up: {down or 'waiting for peers'}")
        return JSONResponse({"status": "ok", "devices": status.get("devices"), "connected": status.get("connected")})

    @endpoint
    async def metrics(request):
        g.metrics.status(await probe())
        return Response(g.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card() -> dict:
        m = g.manifest
        s = m.settings
        return {"id": g.name, "object": "model", "created": _timestamp(m.created), "owned_by": "prism-onnx",
                "max_model_len": g.limits.max_seq_len,
                "prism": {"export_id": m.export_id, "architecture": m.model.architecture, "devices": s.devices,
                          "compression_ratio": s.compression_ratio, "capabilities": g.capabilities(),
                          "embedding_dimensions": g.dimensions if g.embeds else None}}

    @endpoint
    async def models(request):
        model = request.path_params.get("model")
        if model is not None:
            check_model(model)
            return JSONResponse(card())
        return JSONResponse({"object": "list", "data": [card()]})

    # ------------------------------------------------------------------------------------- embeddings
    @endpoint
    async def embeddings(request):
        req = embedding_request(await read_json(request), MAX_EMBED_INPUTS)
        check_model(req.model)
        if req.dimensions is not None and req.dimensions != g.dimensions:
            raise bad_request(f"'dimensions' {req.dimensions}: this model's embeddings have {g.dimensions}",
                              param="dimensions")
        rows = await run(g.token_rows, req.inputs, "input")
        vectors = await run(g.embed, rows)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.base64 else v.tolist()}
                for i, v in enumerate(vectors)]
        tokens = sum(map(len, rows))
        return JSONResponse({"object": "list", "data": data, "model": g.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @endpoint
    async def embed(request):
        req = embed_request(await read_json(request), MAX_EMBED_INPUTS)
        rows = await run(g.token_rows, req.inputs, "inputs", truncate=req.truncate, left=req.left)
        vectors = await run(g.embed, rows, normalize=req.normalize)
        return JSONResponse(vectors.tolist())

    # ------------------------------------------------------------------------------------- generation
    @endpoint
    async def completions(request):
        req = completion_request(await read_json(request), g.limits.max_batch)
        check_model(req.model)
        rows = await run(g.token_rows, req.prompt, "prompt")
        return await generation(req.sampling, rows, g.config(req.sampling, rows, 16), chat=False)

    @endpoint
    async def chat_completions(request):
        req = chat_request(await read_json(request))
        check_model(req.model)
        rows = await run(g.chat_rows, req.messages, req.add_generation_prompt)
        return await generation(req.sampling, rows, g.config(req.sampling, rows, None), chat=True)

    async def generation(sampling, rows, config, chat: bool):
        session = Session(g, rows, config, sampling.stop, asyncio.get_running_loop())
        await session.start()  # the first tokens, or the cluster's error as this request's status
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": g.name}
        if sampling.stream:
            return StreamingResponse(sse(session, base, chat, sampling), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async for _ in session.updates():
            pass
        choices = []
        for b, st in enumerate(session.streams):
            c = {"index": b, "finish_reason": st.finish}
            if chat:
                c["message"] = {"role": "assistant", "content": st.sent}
            else:
                c.update(text=st.sent, logprobs=None)
            if sampling.return_token_ids:
                c["token_ids"] = st.tokens
            choices.append(c)
        return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion",
                             "choices": choices, "usage": session.usage()})

    async def sse(session: "Session", base: dict, chat: bool, sampling):
        def event(obj) -> bytes:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

        if chat:
            yield event({**base, "choices": [{"index": b, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None} for b in range(len(session.streams))]})
        try:
            async for updates in session.updates():
                choices = []
                for b, text, ids, finish in updates:
                    if not (text or finish or (ids and sampling.return_token_ids)):
                        continue
                    c = {"index": b, "finish_reason": finish}
                    if chat:
                        c["delta"] = {"content": text} if text else {}
                    else:
                        c.update(text=text, logprobs=None)
                    if sampling.return_token_ids:
                        c["token_ids"] = ids
                    choices.append(c)
                if choices:
                    yield event({**base, "choices": choices})
            if sampling.include_usage:
                yield event({**base, "choices": [], "usage": session.usage()})
        except ApiError as e:  # after the first token the status is sent: the error is the last event
            log.warning("a streamed request failed after it started: %s", e.message)
            yield event(e.body())
        yield b"data: [DONE]\n\n"

    async def not_found(request, exc: HTTPException):
        if exc.status_code == 404:
            e = ApiError(404, f"no such endpoint: {request.method} {request.url.path}", code="unknown_url")
        else:
            e = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return error_response(e)

    routes = [Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
              Route("/v1/models", models, methods=["GET"]), Route("/v1/models/{model:path}", models, methods=["GET"]),
              Route("/v1/embeddings", embeddings, methods=["POST"]), Route("/embed", embed, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    return Observe(app, g, list(api_keys or []))


def _timestamp(iso: str) -> int:
    import datetime as _dt

    try:
        return int(_dt.datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


class Session:
    """One generation request on its way: the cluster call runs in the gateway's pool and hands its tokens to
    the event loop; `updates()` turns them into per-row text (TextStream: stop strings, stop tokens) and
    ends when every row has (the cluster may still be generating tokens nobody reads: it cannot be told
    to stop early)."""

    def __init__(self, g: Gateway, rows: list[list[int]], config, stops: tuple[str, ...], loop):
        self.g, self.rows, self.config, self.loop = g, rows, config, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.streams = [TextStream(g.decode, stops, config.stop_token_ids) for _ in rows]
        self.reply: dict | None = None
        self._first = None
        self._recorded = False

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _work(self) -> None:
        try:
            reply = self.g.generate(self.rows, self.config,
                                    lambda step, ids, texts: self._put(("tokens", ids.tolist())))
            self._put(("done", reply))
        except ApiError as e:
            self._put(("error", e))
        except PrismError as e:
            self._put(("error", from_cluster(e)))
        except Exception as e:  # a bug: the request fails, the server keeps serving
            log.exception("internal error while generating")
            self._put(("error", ApiError(500, f"internal error: {type(e).__name__}", code="internal_error")))

    async def start(self) -> None:
        self.loop.run_in_executor(self.g.pool, self._work)
        self._first = await self.queue.get()
        if self._first[0] == "error":
            raise self._first[1]

    async def updates(self):
        """Yields lists of (row, new text, new token ids, finish reason or None) until every row ended."""
        item, self._first = self._first, None
        while True:
            if item is None:
                item = await self.queue.get()
            kind, value = item
            item = None
            if kind == "error":
                raise value
            out = []
            if kind == "tokens":
                for b, t in enumerate(value):
                    st = self.streams[b]
                    if t < 0 or st.finish:
                        continue
                    text = st.add(t)
                    out.append((b, text, [t], st.finish))
            else:  # done: rows the cluster ended (EOS or length) without a stop string
                self.reply = value
                reasons = value.get("generation", {}).get("finish_reasons") or []
                for b, st in enumerate(self.streams):
                    if not st.finish:
                        text = st.end(reasons[b] if b < len(reasons) else "length")
                        out.append((b, text, [], st.finish))
            if out:
                yield out
            if all(st.finish for st in self.streams):
                self._record()
                return

    def usage(self) -> dict:
        prompt = sum(map(len, self.rows))
        completion = sum(len(st.tokens) for st in self.streams)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _record(self) -> None:
        if not self._recorded:
            self._recorded = True
            u = self.usage()
            self.g.metrics.generation((self.reply or {}).get("generation", {}), u["prompt_tokens"],
                                      u["completion_tokens"])
