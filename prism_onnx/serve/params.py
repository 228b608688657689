"""The bodies of the HTTP API's requests, checked into typed objects before anything is tokenized.

Every field the API knows is checked for its JSON type and range (a bool is not a number here, as in
JSON); a wrong one is a 400 naming the field (`param`). Fields this server does not implement are refused
when they ask for something (`n` above 1, `logprobs`, `echo`, tools, penalties other than 0) and accepted
at their neutral value; fields it does not know are ignored, as OpenAI-compatible servers do.

Defaults follow the OpenAI API, not prism's GenerationConfig: temperature 1.0 and top_p 1.0 (sampling;
send temperature 0 for greedy decoding), max_tokens 16 for /v1/completions, and for /v1/chat/completions
as many tokens as the model's positions leave after the prompt. Extensions of vLLM's server: top_k,
repetition_penalty, stop_token_ids (default: the model's EOS), return_token_ids (each choice also carries
the generated ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import bad_request

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256
_MISSING = object()


def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _field(body: dict, name: str, want: tuple, default=None, what: str = ""):
    """body[name] when it is one of the JSON types `want` (int excludes bool; float accepts int), else 400."""
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and type(None) not in want):
        return default
    t = type(value)
    if t in want or (t is int and float in want):
        return float(value) if t is int and float in want and int not in want else value
    names = " or ".join(_kind(w()) if w is not type(None) else "null" for w in want)
    raise bad_request(f"'{name}' must be {names}, not {_kind(value)}{what}", param=name)


def _int(body, name, default, lo=None, hi=None):
    v = _field(body, name, (int,), default)
    if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad_request(f"'{name}' must be {bounds}, got {v}", param=name)
    return v


def _float(body, name, default, lo, hi, lo_open=False):
    v = _field(body, name, (float,), default)
    if v is not None and not ((lo < v if lo_open else lo <= v) and v <= hi):
        raise bad_request(f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}", param=name)
    return v


def _neutral(body, name, *allowed):
    """Accept a field this server does not implement only at its neutral values."""
    v = body.get(name)
    if v is not None and v not in allowed:
        raise bad_request(f"'{name}' is not supported by this server (only {', '.join(map(repr, allowed)) or 'null'})",
                          param=name)


def _token_rows(value, name: str) -> list | None:
    """A list of ints (one row) or a list of lists of ints (rows) -> rows; None when it is not token ids."""
    if isinstance(value, list) and value and all(type(t) is int for t in value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(r, list) for r in value):
        if not all(r and all(type(t) is int for t in r) for r in value):
            raise bad_request(f"'{name}' as token ids must be non-empty arrays of integers", param=name)
        return value
    return None


@dataclass(frozen=True)
class Inputs:
    """Texts, or rows of token ids (exactly one of them)."""

    texts: list[str] | None = None
    ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.ids)


def parse_inputs(body: dict, name: str, max_items: int) -> Inputs:
    """A string, an array of strings, an array of token ids or an array of such arrays (OpenAI's input and
    prompt)."""
    if name not in body or body[name] is None:
        raise bad_request(f"'{name}' is required", param=name)
    value = body[name]
    if isinstance(value, str):
        return Inputs(texts=[value])
    rows = _token_rows(value, name)
    if rows is not None:
        out = Inputs(ids=rows)
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        out = Inputs(texts=list(value))
    else:
        raise bad_request(f"'{name}' must be a string, an array of strings, an array of token ids or an array of "
                          "arrays of token ids, not "
                          f"{_kind(value) if not isinstance(value, list) or value else 'an empty array'}",
                          param=name)
    if len(out) > max_items:
        raise bad_request(f"'{name}' holds {len(out)} items; at most {max_items} per request", param=name)
    return out


def parse_model(body: dict) -> str | None:
    return _field(body, "model", (str,), None)


# -------------------------------------------------------------------------------------------- embeddings
@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: Inputs
    model: str | None = None
    base64: bool = False
    dimensions: int | None = None


def embedding_request(body: dict, max_items: int) -> EmbeddingRequest:
    """POST /v1/embeddings."""
    inputs = parse_inputs(body, "input", max_items)
    fmt = _field(body, "encoding_format", (str,), "float")
    if fmt not in ("float", "base64"):
        raise bad_request(f"'encoding_format' must be 'float' or 'base64', got {fmt[:40]!r}", param="encoding_format")
    _field(body, "user", (str,))
    return EmbeddingRequest(inputs, parse_model(body), fmt == "base64", _int(body, "dimensions", None, 1))


@dataclass(frozen=True)
class EmbedRequest:
    """POST /embed (text-embeddings-inference): normalize defaults to true, truncate to false."""

    inputs: Inputs
    normalize: bool = True
    truncate: bool = False
    left: bool = False  # truncation_direction "Left"


def embed_request(body: dict, max_items: int) -> EmbedRequest:
    inputs = parse_inputs(body, "inputs", max_items)
    direction = _field(body, "truncation_direction", (str,), "Right")
    if direction not in ("Right", "Left", "right", "left"):
        raise bad_request("'truncation_direction' must be 'Right' or 'Left'", param="truncation_direction")
    _neutral(body, "prompt_name")
    return EmbedRequest(inputs, _field(body, "normalize", (bool,), True), _field(body, "truncate", (bool,), False),
                        direction.lower() == "left")


# ------------------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class Sampling:
    """What to generate, as the HTTP API says it (OpenAI's defaults); `max_tokens` None: the endpoint's."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False


def _stop(body) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise bad_request("'stop' must be a non-empty string or an array of non-empty strings", param="stop")
    if len(v) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in v):
        raise bad_request(f"'stop' takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters",
                          param="stop")
    return tuple(v)


def sampling(body: dict, *max_token_fields: str) -> Sampling:
    """The generation fields shared by /v1/completions and /v1/chat/completions."""
    max_tokens = None
    for name in max_token_fields:
        max_tokens = _int(body, name, None, 1) if max_tokens is None else max_tokens
    _int(body, "n", 1, 1, 1)
    for name in ("presence_penalty", "frequency_penalty"):
        _neutral(body, name, 0, 0.0)
    _neutral(body, "logit_bias", {})
    stops = _field(body, "stop_token_ids", (list,), None)
    if stops is not None and (len(stops) > 64 or not all(type(t) is int and t >= 0 for t in stops)):
        raise bad_request("'stop_token_ids' must be an array of at most 64 token ids", param="stop_token_ids")
    options = _field(body, "stream_options", (dict,), {})
    include_usage = _field(options, "include_usage", (bool,), False)
    stream = _field(body, "stream", (bool,), False)
    if options and not stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", param="stream_options")
    _field(body, "user", (str,))
    return Sampling(max_tokens=max_tokens, temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=_int(body, "top_k", 0, 0),
                    seed=_int(body, "seed", None, 0, 2**63 - 1),
                    repetition_penalty=_float(body, "repetition_penalty", 1.0, 0.0, 100.0, lo_open=True),
                    stop=_stop(body), stop_token_ids=None if stops is None else tuple(stops), stream=stream,
                    include_usage=include_usage, return_token_ids=_field(body, "return_token_ids", (bool,), False))


@dataclass(frozen=True)
class CompletionRequest:
    prompt: Inputs
    sampling: Sampling
    model: str | None = None


def completion_request(body: dict, max_items: int) -> CompletionRequest:
    """POST /v1/completions."""
    prompt = parse_inputs(body, "prompt", max_items)
    _neutral(body, "logprobs")
    _neutral(body, "echo", False)
    _neutral(body, "suffix", "")
    _neutral(body, "best_of", 1)
    return CompletionRequest(prompt, sampling(body, "max_tokens"), parse_model(body))


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict] = field(default_factory=list)  # {"role", "content": str, ...}
    sampling: Sampling = field(default_factory=Sampling)
    model: str | None = None
    add_generation_prompt: bool = True


ROLES = ("system", "developer", "user", "assistant", "tool")


def _content(m: dict, i: int) -> str:
    """A message's content: a string, or an array of text parts (joined), or null."""
    c = m.get("content")
    if c is None or isinstance(c, str):
        return c or ""
    if isinstance(c, list) and all(isinstance(p, dict) for p in c):
        texts = []
        for p in c:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise bad_request(f"messages[{i}].content: only text parts are supported (type 'text' with a "
                                  f"string 'text')", param=f"messages[{i}].content")
            texts.append(p["text"])
        return "\n".join(texts)
    raise bad_request(f"messages[{i}].content must be a string or an array of text parts, not {_kind(c)}",
                      param=f"messages[{i}].content")


def chat_request(body: dict, max_messages: int = 1024) -> ChatRequest:
    """POST /v1/chat/completions."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of messages", param="messages")
    if len(messages) > max_messages:
        raise bad_request(f"'messages' holds {len(messages)} messages; at most {max_messages}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad_request(f"messages[{i}] must be an object with a 'role' among {', '.join(ROLES)}",
                              param=f"messages[{i}].role")
        msg = {"role": m["role"], "content": _content(m, i)}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    _neutral(body, "logprobs", False)
    _neutral(body, "top_logprobs")
    _neutral(body, "tools", [])
    _neutral(body, "tool_choice", "none")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request("'response_format' is not supported by this server (only {\"type\": \"text\"})",
                          param="response_format")
    return ChatRequest(out, sampling(body, "max_completion_tokens", "max_tokens"), parse_model(body),
                       _field(body, "add_generation_prompt", (bool,), True))
