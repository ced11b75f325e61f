"""The bookkeeping of one HTTP request: its log line and metrics, written once when its last byte is out."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..service import Synthesis, SynthesisService

request_log = logging.getLogger("cosyvoice_lite.request")
PROBES = ("health", "ready")  # endpoint labels of liveness and readiness probes


@dataclass
class RequestRecord:
    id: str
    method: str
    path: str
    endpoint: str
    started: float
    error: str = "-"  # the error answer's code
    synthesis: Synthesis | None = None
    outcome: str = "-"  # set when no synthesis tells it (refused before one existed)


def finish_request(service: SynthesisService, rec: RequestRecord, status: int) -> None:
    """The one log line and the metrics of a request. Called once: by after_request for a whole answer, by the
    streamed body's close for a stream (serve/hooks.py)."""
    seconds = time.monotonic() - rec.started
    s = rec.synthesis
    audio_s = s.audio_seconds if s else 0.0
    synth_s = s.synthesis_seconds() if s else None
    rtf = f"{synth_s / audio_s:.3f}" if synth_s is not None and audio_s > 0 else "-"
    service.metrics.observe_request(rec.endpoint, status, seconds if s else None,
                                    chars=len(s.request.text) if s else 0, audio_seconds=audio_s,
                                    synth_seconds=synth_s or 0.0)
    first = f"{s.first_audio:.3f}" if s and s.first_audio is not None else "-"
    # Probes come every few seconds from Kubernetes or Docker: their lines only at debug level.
    level = logging.DEBUG if rec.endpoint in PROBES else logging.INFO
    request_log.log(level, "request id=%s %s %s status=%d speaker=%s chars=%d audio_s=%.2f synth_s=%s rtf=%s "
                    "first_audio_s=%s total_s=%.3f format=%s stream=%s cache=%s outcome=%s error=%s", rec.id,
                    rec.method, rec.path, status, s.request.voice.name if s else "-",
                    len(s.request.text) if s else 0, audio_s, "-" if synth_s is None else f"{synth_s:.2f}", rtf,
                    first, seconds, s.request.format if s else "-", str(bool(s and s.request.stream)).lower(),
                    s.cache_status if s else "-", s.outcome if s else rec.outcome, rec.error)
