"""Per-app state shared by the routes, and the bookkeeping of one request (its log line and metrics)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .. import audio
from ..cache import open_cache
from ..engines import Engine, Speaker
from .admission import Admission, Job
from .metrics import Metrics
from ..settings import Settings

request_log = logging.getLogger("cosyvoice_lite.request")
PROBES = ("health", "ready")  # endpoint labels of liveness and readiness probes


class Service:
    """Per-app state shared by the routes."""

    def __init__(self, settings: Settings, engine: Engine, spec: dict):
        self.settings = settings
        self.engine = engine
        self.metrics = Metrics()
        # the sentence-level audio cache, for engines that can use one
        self.cache = open_cache(settings.cache, settings.cache_root, settings.cache_max_mb, settings.cache_ttl,
                                count=self.metrics.count_cache) if engine.caches_segments else None
        if self.cache is not None:
            engine.cache_identity()  # hashes the checkpoint once, before gunicorn forks the workers
        self.synth = Admission(engine, settings.queue_size, settings.max_batch, on_change=self.metrics.set_queue)
        self.spec = spec  # openapi.json

    def default_speaker(self) -> Speaker:
        return self.engine.speakers()[0]




@dataclass
class RequestRecord:
    id: str
    method: str
    path: str
    endpoint: str
    started: float
    speaker: str = "-"
    chars: int = 0
    fmt: str = "-"
    stream: bool = False
    job: Job | None = None
    cache: str = "-"
    outcome: str = "-"
    error: str = "-"  # the error answer's code
    logged: bool = False



def finish_request(service: Service, rec: RequestRecord, status: int) -> None:
    """The one log line and the metrics of a request, when its last byte is out (later calls do nothing)."""
    if rec.logged:
        return
    rec.logged = True
    seconds = time.monotonic() - rec.started
    job = rec.job
    audio_s = job.samples / audio.SAMPLE_RATE if job else 0.0
    synth_s = job.synthesis_seconds() if job else None
    rtf = f"{synth_s / audio_s:.3f}" if synth_s is not None and audio_s > 0 else "-"
    service.metrics.observe_request(rec.endpoint, status, seconds if job else None, chars=rec.chars if job else 0,
                                    audio_seconds=audio_s, synth_seconds=synth_s or 0.0)
    first = f"{job.first_audio:.3f}" if job and job.first_audio is not None else "-"
    # Probes come every few seconds from Kubernetes or Docker: their lines only at debug level.
    level = logging.DEBUG if rec.endpoint in PROBES else logging.INFO
    request_log.log(level, "request id=%s %s %s status=%d speaker=%s chars=%d audio_s=%.2f synth_s=%s rtf=%s "
                    "first_audio_s=%s total_s=%.3f format=%s stream=%s cache=%s outcome=%s error=%s", rec.id,
                    rec.method, rec.path, status, rec.speaker, rec.chars, audio_s,
                    "-" if synth_s is None else f"{synth_s:.2f}", rtf, first, seconds, rec.fmt,
                    str(rec.stream).lower(), rec.cache, rec.outcome, rec.error)
