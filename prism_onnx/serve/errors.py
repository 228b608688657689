"""The HTTP API's errors: one typed exception, answered in the OpenAI error shape

    {"error": {"message": "...", "type": "invalid_request_error", "param": "input", "code": null}}

with the status that says whose fault it is: 400 a malformed or ill-typed request, 401 a missing or wrong
API key, 404 an unknown model or path, 413 an input too long for the deployment (or a body too large),
503 the cluster cannot serve now (too few devices up, busy), 504 no answer in time, 500 a bug (logged with
its traceback; every other error is one log line at most).

An error from the cluster arrives as the class the cluster raised (errors.ErrorInfo.exception); its status
comes from its `code`, in STATUS_OF_CODE: the one table, never from its text.
"""

from __future__ import annotations

from ..errors import PrismError

STATUS_OF_CODE = {  # errors.py codes -> HTTP status
    "invalid_input": 400, "bad_message": 400, "invalid_plan": 400, "too_long": 413,
    "busy": 503, "devices_unavailable": 503, "peer_failed": 503, "server_lost": 503, "timeout": 504,
    "bad_bundle": 500, "model_load": 500, "internal": 500, "error": 500,
}


class ApiError(PrismError):
    """An HTTP request that cannot be served, with its status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = int(status), message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def too_long(message: str, param: str | None = None) -> ApiError:
    return ApiError(413, message, param=param, code="context_length_exceeded")


def unavailable(message: str, code: str = "devices_unavailable") -> ApiError:
    return ApiError(503, message, code=code)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type="invalid_request_error", code="invalid_api_key")


def from_cluster(e: PrismError, param: str | None = None) -> ApiError:
    """An error the cluster raised -> its ApiError: the status of its code (STATUS_OF_CODE), the code kept."""
    status = STATUS_OF_CODE.get(e.code, 500)
    code = "context_length_exceeded" if e.code == "too_long" else e.code
    return ApiError(status, str(e), param=param if status == 413 else None, code=code)
