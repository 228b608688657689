"""Text on the HTTP side: the bundle's tokenizer (prompt and input token counts, the length checks), the
chat template; the streamed detokenization of generated tokens with stop strings is prism_onnx/detokenize.py.

The server tokenizes every text itself and sends the cluster token ids, so the counts in `usage` are the
ones the model saw, and an over-long input is refused (413) before it costs a request.
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from pathlib import Path

from ..detokenize import TextStream  # noqa: F401 (the HTTP side's streams)
from ..errors import BundleError
from .errors import bad_request


class Tokenizer:
    """The bundle's tokenizer.json (the `tokenizers` library, a core dependency): encode without padding or
    truncation, decode without special tokens; `encode_truncated` for text-embeddings-inference's
    truncate=true (special tokens kept, as the tokenizer's own truncation does)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = str(path)
        self._tok = _Tokenizer.from_file(self.path)
        self._tok.no_truncation()
        self._tok.no_padding()
        self._truncating: dict[tuple[int, str], object] = {}
        self._lock = threading.Lock()

    def encode(self, texts: list[str], special: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=special)]

    def encode_truncated(self, texts: list[str], max_length: int, left: bool = False) -> list[list[int]]:
        from tokenizers import Tokenizer as _Tokenizer

        key = (max_length, "left" if left else "right")
        with self._lock:
            tok = self._truncating.get(key)
            if tok is None:
                tok = _Tokenizer.from_file(self.path)
                tok.no_padding()
                tok.enable_truncation(max_length, direction=key[1])
                self._truncating[key] = tok
        return [e.ids for e in tok.encode_batch(list(texts))]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(t) for t in ids], skip_special_tokens=True)


class ChatTemplate:
    """A tokenizer's chat template rendered as transformers renders it (`apply_chat_template`): a sandboxed
    Jinja environment with trim_blocks and lstrip_blocks, the `tojson` filter, `raise_exception` and
    `strftime_now`, and the tokenizer's special tokens (bos_token, eos_token, ...) as variables. The
    rendered prompt is tokenized without adding special tokens: the template writes them itself."""

    def __init__(self, source: str, special_tokens: dict | None = None):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: _dt.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise BundleError(f"the bundle's chat template does not compile: {e}") from None
        self.special = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **self.special)
        except TemplateError as e:  # the template's own raise_exception, e.g. "roles must alternate"
            raise bad_request(f"the model's chat template refused these messages: {e}", param="messages") from None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    from jinja2 import TemplateError

    raise TemplateError(message)
