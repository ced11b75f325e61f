"""The synthesis service, the same behind every front door (HTTP, the CLI, Wyoming): admission and queue, budgets
and limits, the audio cache, cancellation, metrics. It knows no transport: a front door makes a SynthesisRequest,
calls ``start`` and reads the Synthesis it gets; every refusal is a ServiceError."""
from __future__ import annotations

import logging
import time
import unicodedata

from ..cache import open_cache
from ..cancel import CancelToken
from ..engines import Engine, SynthesisError
from ..settings import Settings
from ..voices import VoiceBook
from .admission import Admission
from .errors import (
    AudioLimit,
    ClientGone,
    EngineFailure,
    NothingToSpeak,
    OverBudget,
    QueueFull,
    ServiceError,
    TimedOut,
    Unsupported,
)
from .metrics import Metrics
from .request import SynthesisRequest
from .synthesis import Synthesis

log = logging.getLogger("cosyvoice_lite")

__all__ = ["AudioLimit", "ClientGone", "EngineFailure", "NothingToSpeak", "OverBudget", "QueueFull", "ServiceError",
           "SynthesisRequest", "Synthesis", "SynthesisService", "TimedOut", "Unsupported", "clean_text"]


def clean_text(text: str) -> str:
    """Control characters and lone surrogates become spaces: they cannot be spoken and break codecs."""
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in text)


class SynthesisService:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.metrics = Metrics()
        self.cache = open_cache(settings.cache, settings.cache_root, settings.cache_max_mb, settings.cache_ttl,
                                count=self.metrics.count_cache)
        if self.cache is not None:
            engine.identity()  # hashes the checkpoint once, before gunicorn forks the workers
        self.voices = VoiceBook(engine.voices(), settings.voice_map, engine.name)
        self.admission = Admission(engine, settings.queue_size, settings.max_batch, on_change=self.metrics.set_queue)

    def start(self, request: SynthesisRequest, client_gone=None, arrived: float | None = None) -> Synthesis:
        """Admit ``request`` and plan it: refuse now (ServiceError) what cannot be served — a full queue, text with
        nothing to speak, more audio or time than the limits allow. ``client_gone``: a probe of the front door,
        polled while the audio is awaited; ``arrived``: time.monotonic() of the request's arrival (the deadline
        counts from it). The caller iterates the Synthesis for audio and closes it when done, whatever happens."""
        arrived = time.monotonic() if arrived is None else arrived
        cancel = CancelToken(arrived + self.settings.request_timeout, client_gone)
        synthesis = Synthesis(self, request, cancel)
        self.admission.admit(synthesis)
        try:
            try:
                synthesis.plan = self.engine.plan(request.text, request.normalize)
            except SynthesisError as e:
                raise NothingToSpeak(str(e), param="text") from None
            except Exception as e:
                log.exception("planning failed (request %s)", request.id)
                raise EngineFailure(f"synthesis failed: {type(e).__name__} while reading the text (request id "
                                    f"{request.id})") from None
            self.admission.check_budget(synthesis.plan, request.speed, request.stream,
                                        cancel.deadline - time.monotonic(), self.settings.max_audio_seconds)
        except ServiceError as e:
            synthesis.outcome = e.outcome
            synthesis.close()
            raise
        return synthesis

    def close(self) -> None:
        """Cancel every synthesis of this process (a test's or a worker's end)."""
        for holder in self.admission.holders():
            if isinstance(holder, Synthesis):
                holder.close()
