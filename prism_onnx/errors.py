"""Errors a user can cause (bad model id, bad input, tampered bundle, bad frame) or meet (a busy or
incomplete cluster). The CLI prints their message and exits 1; anything else is a bug and keeps its
traceback.

Every error has a `code` (what the HTTP status, the CLI's JSON `type` and the client's retry decision are
made from: serve/errors.py holds the one table of statuses) and `retryable` (the same request may succeed
later or elsewhere). Between runners and clients an error travels as an ErrorInfo (runtime/schema.py
WireError), and `ErrorInfo.exception()` raises the same class on the other side: a too-long text reaches
the caller as an InputError (code "too_long"), a full coordinator as Busy.
"""

from __future__ import annotations

from dataclasses import dataclass


class PrismError(ValueError):
    """Base class: a problem with what the user gave us, or with the cluster, explained in the message.
    `ranks`: the devices it concerns (set when it comes from a cluster); `code`: the class's, unless a more
    precise one is given (an InputError that is too long for the deployment: "too_long")."""

    code = "error"
    retryable = False

    def __init_subclass__(cls, code: str | None = None, retryable: bool | None = None, **kw):
        """`class Busy(PeerError, code="busy")`: a subclass states its code (and whether it is retryable)."""
        super().__init_subclass__(**kw)
        if code is not None:
            cls.code = code
        if retryable is not None:
            cls.retryable = retryable

    def __init__(self, *args, ranks=(), code: str | None = None):
        super().__init__(*args)
        self.ranks = tuple(ranks)
        if code is not None:
            self.code = code


class ModelLoadError(PrismError, code="model_load"):
    """The model cannot be found, read, or is not supported."""


class InputError(PrismError, code="invalid_input"):
    """The request's inputs do not fit the model (shape, length, image size)."""


TOO_LONG = "too_long"


def too_long(message: str) -> InputError:
    """An InputError of code "too_long": the request is too large for this deployment (more tokens than
    --max-seq-len or the model's positions, more rows than --max-batch, a key/value cache beyond
    --max-cache-mb). HTTP answers it 413."""
    return InputError(message, code=TOO_LONG)


class PlanError(PrismError, code="invalid_plan"):
    """Impossible partitioning: devices, split weights, compression ratio."""


class BundleError(PrismError, code="bad_bundle"):
    """A bundle is missing, incomplete, tampered with, or from another export."""


class FrameError(PrismError, code="bad_message"):
    """A network frame that is malformed or does not fit what the receiver expects."""


class PeerError(PrismError, code="peer_failed", retryable=True):
    """A peer device is missing, died, or refused the handshake; or a device failed a request because of
    another device (a rerun may succeed)."""


class DevicesUnavailable(PeerError, code="devices_unavailable"):
    """Fewer devices are live than the cluster needs (--min-devices), or a request gave up after reruns."""


class Busy(PeerError, code="busy"):
    """The coordinator (or this client's share of it) is full: retry later."""


class Timeout(PeerError, code="timeout"):
    """No answer within the time allowed."""


class InternalError(PrismError, code="internal"):
    """A bug in a runner, reported instead of crashing it."""


ERRORS = {cls.__name__: cls for cls in (PrismError, ModelLoadError, InputError, PlanError, BundleError,
                                        FrameError, PeerError, DevicesUnavailable, Busy, Timeout, InternalError)}


@dataclass(frozen=True)
class ErrorInfo:
    """An error as it travels: its class name, code, message, whether a rerun may succeed, the devices it
    concerns."""

    type: str
    code: str
    message: str
    retryable: bool = False
    ranks: tuple[int, ...] = ()

    @classmethod
    def of(cls, e: BaseException, ranks=()) -> "ErrorInfo":
        """The ErrorInfo of an exception (anything not a PrismError is an InternalError: a bug)."""
        if not isinstance(e, PrismError):
            return cls("InternalError", InternalError.code, f"{type(e).__name__}: {e}", False, tuple(ranks))
        return cls(type(e).__name__, e.code, str(e), e.retryable, tuple(ranks) or e.ranks)

    def exception(self) -> PrismError:
        """The error as the class it was raised as (a class this version does not know: by its code, else
        PrismError)."""
        cls = ERRORS.get(self.type) or next((c for c in ERRORS.values() if c.code == self.code), PrismError)
        e = cls(self.message, ranks=self.ranks, code=self.code)
        if cls is PrismError:
            e.retryable = self.retryable
        return e
