"""Generation over HTTP: a Session (the cluster call in the gateway's pool, its tokens turned into per-row
text as they come) and the response of /v1/completions and /v1/chat/completions, whole or streamed as
server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from starlette.responses import JSONResponse, StreamingResponse

from ..errors import PrismError
from .errors import ApiError, from_cluster
from .gateway import Gateway
from .limits import BUGS
from .text import TextStream

log = logging.getLogger("prism.http")


async def generation_response(g: Gateway, sampling, rows, config, chat: bool):
    """A completion or chat completion: one JSON response, or (sampling.stream) server-sent events."""
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
    """The events of a streamed generation (OpenAI's format), ending with [DONE]."""
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
            BUGS.error(e, "internal error while generating")
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
