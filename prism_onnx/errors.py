"""Errors a user can cause (bad model id, bad input, tampered bundle, bad frame). The CLI prints their
message and exits 1; anything else is a bug and keeps its traceback."""


class PrismError(ValueError):
    """Base class: a problem with what the user gave us, explained in the message."""


class ModelLoadError(PrismError):
    """The model cannot be found, read, or is not supported."""


class InputError(PrismError):
    """The request's inputs do not fit the model (shape, length, image size)."""


class PlanError(PrismError):
    """Impossible partitioning: devices, split weights, compression ratio."""


class BundleError(PrismError):
    """A bundle is missing, incomplete, tampered with, or from another export."""


class FrameError(PrismError):
    """A network frame that is malformed or does not fit what the receiver expects."""


class PeerError(PrismError):
    """A peer device is missing, died, or refused the handshake."""
