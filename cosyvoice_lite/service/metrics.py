"""Counters and gauges for /metrics, kept by prometheus_client.

Under gunicorn (several worker processes) prometheus_client runs in its multiprocess mode: every process writes its
figures to files of its own in PROMETHEUS_MULTIPROC_DIR, and a scrape adds up the files of all of them, whichever
worker answers. prometheus_client reads that variable once, when it is first imported, so it is imported here only
when the first Metrics is made: serve/gunicorn_conf.py sets the variable in the master (a fresh directory per
server start) after the serve package, and so this module, is imported, but before the app is loaded. It also
removes an exited worker's live gauges (child_exit). Without the variable (Flask test client, CLI) the figures are
this process's own.
"""
from __future__ import annotations

import logging
import math
import os
from types import SimpleNamespace

log = logging.getLogger(__name__)

OTHER = "other"

# The one table of endpoint labels: route (view function) name -> the label its requests are counted under.
class Metrics:
    """The figures of /metrics. Counters (requests, audio, cache) include those of workers that have exited;
    queue depth, in progress and workers are summed over the live workers only."""

    # what a request is counted as: the front doors' endpoints (serve/hooks.py maps HTTP routes onto these)
    ENDPOINTS = ("tts", "speech", "vc", "voices", "models", "speakers", "health", "ready", "metrics", "openapi",
                 "page", "wyoming", OTHER)
    # Status codes outside this list are counted as code="other" (a bounded set of series).
    CODES = (200, 204, 304, 400, 401, 404, 405, 408, 413, 415, 499, 500, 503, 504)
    BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, math.inf)

    # audio cache counters (cache.AudioCache's names) -> (metric, help)
    CACHE_COUNTERS = {
        "hits": ("cosyvoice_cache_hits_total", "Text segments served from the audio cache."),
        "misses": ("cosyvoice_cache_misses_total", "Text segments looked up and not found (synthesised)."),
        "bytes": ("cosyvoice_cache_stored_bytes_total", "Bytes of audio written to the cache."),
        "evictions": ("cosyvoice_cache_evictions_total",
                      "Entries the disk cache evicted to stay under CACHE_MAX_MB (Redis: its evicted_keys)."),
        "corrupt": ("cosyvoice_cache_corrupt_total", "Corrupt cache entries detected and dropped."),
        "errors": ("cosyvoice_cache_errors_total", "Cache operations that failed (request synthesised instead)."),
    }

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
        from prometheus_client.multiprocess import MultiProcessCollector

        # A registry of its own: each app (tests make many in one process) starts from zero.
        registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter("cosyvoice_requests_total", "HTTP requests by endpoint and status code.",
                                 ("endpoint", "code"), registry=registry)
        self._errors = Counter("cosyvoice_errors_total", "HTTP responses with a 4xx/5xx status, by status code.",
                               ("code",), registry=registry)
        self._audio = Counter("cosyvoice_audio_seconds_total", "Seconds of audio synthesised.", registry=registry)
        self._synth = Counter("cosyvoice_synthesis_seconds_total", "Seconds spent synthesising.", registry=registry)
        self._chars = Counter("cosyvoice_characters_total", "Characters of text synthesised.", registry=registry)
        self._duration = Histogram("cosyvoice_request_duration_seconds",
                                   "Wall time of synthesis requests (to the last byte).", buckets=self.BUCKETS,
                                   registry=registry)
        # livesum: the sum over the processes alive now (a dead worker's files are removed by child_exit)
        self._waiting = Gauge("cosyvoice_queue_depth", "Requests waiting for synthesis (all workers).",
                              multiprocess_mode="livesum", registry=registry)
        self._running = Gauge("cosyvoice_in_progress", "Requests being synthesised (all workers).",
                              multiprocess_mode="livesum", registry=registry)
        self._workers = Gauge("cosyvoice_workers", "Worker processes that have served a request.",
                              multiprocess_mode="livesum", registry=registry)
        self._voices_made = Counter("cosyvoice_voices_made_total", "Voices made from reference audio.",
                                    registry=registry)
        self._voice_seconds = Counter("cosyvoice_voice_making_seconds_total",
                                      "Seconds spent making voices (features, tokenizer, speaker encoder).",
                                      registry=registry)
        self._voices_deleted = Counter("cosyvoice_voices_deleted_total", "Saved voices deleted.", registry=registry)
        self._cache = {name: Counter(metric, help_text, registry=registry)
                       for name, (metric, help_text) in self.CACHE_COUNTERS.items()}
        # prometheus_client chose its store at import: files shared by the processes, or this process's memory
        if getattr(values.ValueClass, "_multiprocess", False):
            self._collector = MultiProcessCollector(None)
        else:
            self._collector = registry
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                log.error("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set: /metrics shows "
                          "only the figures of the worker that answers")
        # the files hold no order: families are shown in the order they are defined here
        self._order = {family.name: i for i, family in enumerate(registry.collect())}
        self._cache_metrics = {metric.removesuffix("_total") for metric, _ in self.CACHE_COUNTERS.values()}

    def observe_request(self, endpoint: str, status: int, seconds: float | None = None, chars: int = 0,
                        audio_seconds: float = 0.0, synth_seconds: float = 0.0) -> None:
        """One finished request; ``seconds`` (its wall time) only for synthesis requests."""
        code = str(status) if status in self.CODES else OTHER
        self._requests.labels(endpoint if endpoint in self.ENDPOINTS else OTHER, code).inc()
        if status >= 400 or code == OTHER:
            self._errors.labels(code).inc()
        if audio_seconds:
            self._audio.inc(audio_seconds)
        if synth_seconds:
            self._synth.inc(synth_seconds)
        if chars:
            self._chars.inc(chars)
        if seconds is not None:
            self._duration.observe(seconds)
        self._workers.set(1)

    def count_voice(self, event: str, seconds: float) -> None:
        """'made' (with the seconds it took) or 'deleted'."""
        if event == "made":
            self._voices_made.inc()
            self._voice_seconds.inc(seconds)
        else:
            self._voices_deleted.inc()

    def count_cache(self, name: str, amount: float) -> None:
        self._cache[name].inc(amount)

    def set_queue(self, waiting: int, running: int) -> None:
        self._waiting.set(waiting)
        self._running.set(running)
        self._workers.set(1)  # this process counts among the workers from its first queue change (its start)

    def render(self, engine: str, ready: bool, capacity: int, cache: dict | None = None,
               realtime_factor: float | None = None) -> str:
        """The text of /metrics. ``cache``: None when the audio cache is off, else the backend's figures
        (AudioCache.stats()); the other arguments are this worker's own (``realtime_factor``: None when its engine
        does not measure it, or has not yet)."""
        from prometheus_client import generate_latest
        from prometheus_client.core import GaugeMetricFamily

        families = []
        for family in sorted(self._collector.collect(), key=lambda f: self._order.get(f.name, len(self._order))):
            if family.name in self._cache_metrics and cache is None:
                continue
            if family.name == "cosyvoice_cache_evictions" and cache.get("evictions"):  # Redis counts its own
                family.samples = [s._replace(value=s.value + cache["evictions"]) for s in family.samples]
            # no *_created series: the in-process store adds them, the multiprocess one cannot; keep both alike
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            families.append(family)
        families.append(GaugeMetricFamily("cosyvoice_queue_capacity",
                                          "Requests one worker holds (waiting + synthesising).", value=capacity))
        families.append(GaugeMetricFamily("cosyvoice_ready", "1 when this worker's engine is loaded and warmed up.",
                                          value=1 if ready else 0))
        if cache is not None and "bytes" in cache:
            families.append(GaugeMetricFamily("cosyvoice_cache_bytes", "Bytes the disk cache holds now.",
                                              value=cache["bytes"]))
        if realtime_factor is not None:
            families.append(GaugeMetricFamily(
                "cosyvoice_realtime_factor", "Seconds of synthesis work per second of audio over this worker's last "
                "chunks (below 1: faster than real time, and unseeded streams get chunk sizes from this speed).",
                value=realtime_factor))
        info = GaugeMetricFamily("cosyvoice_engine_info", "The engine serving requests.", labels=("engine",))
        info.add_metric((engine,), 1)
        families.append(info)
        # generate_latest takes anything with collect()
        return generate_latest(SimpleNamespace(collect=lambda: families)).decode()

