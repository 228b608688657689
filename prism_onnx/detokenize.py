"""Incremental detokenization: a row's generated text as its tokens arrive, for streaming (the coordinator's
TOKENS to `prism infer --stream`, the HTTP API's server-sent events). Numpy-free, torch-free.

A token alone does not decode to its share of the text: WordPiece's "##end" continues the word before it,
byte-level BPE splits a character over several tokens, SentencePiece's "▁" is a space only inside the
text. So the whole row is decoded again at every token and only what it adds is sent, as transformers'
TextStreamer and vLLM do.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """One row's generated text as its tokens arrive.

    The text is decoded from all the row's ids each time (so that characters spread over several tokens
    and merged pieces come out whole); `add` returns only the new text that is safe to send: a trailing
    incomplete character (U+FFFD) and the last `len(longest stop string) - 1` characters are held back
    until the next token shows they do not start a stop string. The row ends at a stop token id (its text
    is not part of the output), or at the first stop string (the text is cut before it); `tokens` counts
    the ids it took, stop token included."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = (), stop_ids=()):
        self.decode, self.stops, self.stop_ids = decode, tuple(stops), set(int(t) for t in stop_ids)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []  # the ids whose text is output
        self.tokens: list[int] = []  # every id the row took (stop token included)
        self.text = ""
        self.sent = ""
        self.finish: str | None = None

    def add(self, token: int) -> str:
        if self.finish:
            return ""
        self.tokens.append(int(token))
        if int(token) in self.stop_ids:
            self.finish = "stop"
            return self._flush()
        self.ids.append(int(token))
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish = text[:cut], "stop"
            return self._flush()
        self.text = text
        safe = min(len(text) - self.hold, len(text.rstrip("\ufffd")))
        if safe > len(self.sent) and text.startswith(self.sent):
            new, self.sent = text[len(self.sent):safe], text[:safe]
            return new
        return ""

    def end(self, reason: str) -> str:
        """The cluster finished the row (`reason`: stop or length) without a stop string: the rest of it."""
        if self.finish:
            return ""
        self.finish = reason
        return self._flush()

    def _flush(self) -> str:
        if not self.text.startswith(self.sent):
            return ""  # the decoder changed text already sent (rare): nothing can be taken back
        new, self.sent = self.text[len(self.sent):], self.text
        return new
