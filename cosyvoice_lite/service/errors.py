"""Why a synthesis was refused or stopped: one exception type, whose subclasses say what happened in words a client
can act on. ``status`` is the HTTP status the front doors answer with (the Wyoming server sends ``code``)."""
from __future__ import annotations

from ..cancel import AUDIO_LIMIT, CLIENT_GONE, TIMEOUT


class ServiceError(Exception):
    status = 500
    code = "internal_error"
    outcome = "error"  # for the request's log line

    def __init__(self, message: str, *, param: str | None = None, retry_after: int | None = None,
                 code: str | None = None, **extra):
        super().__init__(message)
        self.message, self.param, self.retry_after, self.extra = message, param, retry_after, extra
        if code is not None:
            self.code = code


class QueueFull(ServiceError):
    status, code, outcome = 503, "queue_full", "queue_full"


class OverBudget(ServiceError):
    """The text cannot be served within MAX_AUDIO_SECONDS or REQUEST_TIMEOUT (said before any synthesis)."""
    status, code, outcome = 413, "too_much_speech", "over_budget"


class NothingToSpeak(ServiceError):
    status, code, outcome = 400, "nothing_to_speak", "rejected"


class Unsupported(ServiceError):
    """The loaded model cannot do what was asked (the message names the model and what it offers)."""
    status, code, outcome = 400, "unsupported", "rejected"


class InvalidInput(ServiceError):
    """Something the client sent cannot be used (an audio file that does not decode, a transcript too long...)."""
    status, code, outcome = 400, "invalid_input", "rejected"


class NotFound(ServiceError):
    status, code, outcome = 404, "not_found", "rejected"


class Conflict(ServiceError):
    status, code, outcome = 409, "conflict", "rejected"


class StoreFailure(ServiceError):
    """The voice store (disk or Redis) does not answer; details in the server log."""
    status, code, outcome = 503, "store_unavailable", "store_error"


class EngineFailure(ServiceError):
    """The engine raised something unexpected; details are in the server log, not in the answer."""
    status, code, outcome = 500, "synthesis_failed", "engine_error"


class TimedOut(ServiceError):
    status, code, outcome = 504, "timeout", "timeout"


class AudioLimit(ServiceError):
    status, code, outcome = 413, "too_much_speech", "audio_limit"


class ClientGone(ServiceError):
    status, code, outcome = 499, "client_closed", "client_gone"


def cancelled(reason: str | None) -> ServiceError:
    """The error that ends a synthesis cancelled for ``reason`` (a cancel.py constant)."""
    if reason == TIMEOUT:
        return TimedOut("synthesis took longer than REQUEST_TIMEOUT; try a shorter text")
    if reason == AUDIO_LIMIT:
        return AudioLimit("the speech reached MAX_AUDIO_SECONDS before the text's end; split the text", param="text")
    if reason == CLIENT_GONE:
        return ClientGone("client closed the connection")
    return ClientGone("the synthesis was cancelled")
