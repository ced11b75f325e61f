"""One request's synthesis, from admission to its last chunk.

Iterating a ``Synthesis`` yields float32 mono chunks at OUTPUT_RATE: segments found in the audio cache are read
from it, the others are synthesised by the engine (all of them in one call, so that it batches and streams them)
and stored when complete. Whatever ends it (the last chunk, an error, ``close``) ends it once: its admission place
is freed and its work stops.
"""
from __future__ import annotations

import logging
import time
from typing import Iterator

import numpy as np

from ..audio import SAMPLE_RATE
from ..cache import dequantize, quantize, segment_key
from ..cancel import AUDIO_LIMIT, CANCELLED, Cancelled, CancelToken
from ..engines import SEGMENT_END, Plan, SynthesisError
from .errors import EngineFailure, NothingToSpeak, ServiceError, cancelled
from ..voices import Voice
from .request import SynthesisRequest

log = logging.getLogger("cosyvoice_lite")


class Synthesis:
    def __init__(self, service, request: SynthesisRequest, voice: Voice, cancel: CancelToken,
                 clip: tuple[np.ndarray, int] | None = None):
        self.service = service
        self.request = request
        self.voice = voice                   # what conditions it: the request's voice, with its instructions if any
        self._clip = clip                    # voice conversion: the source clip (samples, rate)
        self.plan: Plan | None = None     # set by the service once admitted
        self.cancel = cancel                 # the one cancellation of this request
        self.cache_status = "off"            # 'hit' (every segment), 'partial', 'miss' or 'off'; known at the first chunk
        self.outcome = "-"                   # how it ended, for the request's log line
        self.samples = 0
        self.first_audio: float | None = None  # seconds from the start of synthesis to the first chunk
        self.started: float | None = None
        self._ended: float | None = None
        self._created = time.monotonic()
        self._max_samples = int(service.settings.max_audio_seconds * SAMPLE_RATE)
        self._chunks = self._generate()
        self._closed = False

    # ---- figures ----------------------------------------------------------------------------------------
    @property
    def audio_seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    def synthesis_seconds(self) -> float | None:
        """Seconds of synthesis: until it ended, or so far while it runs; None if it never started."""
        if self.started is None:
            return None
        return (self._ended or time.perf_counter()) - self.started

    # ---- life -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[np.ndarray]:
        return self._chunks

    def close(self) -> None:
        """Stop the work (if any is left) and free the admission place. Safe at any point, and again."""
        if self._closed:
            return
        self._closed = True
        self.cancel.set(CANCELLED)
        self._chunks.close()  # runs the generator's cleanup if it started
        self._release()
        if self.outcome == "-":
            self.outcome = "client_gone"

    def _release(self) -> None:
        self.service.admission.release(self, time.monotonic() - self._created if self.samples else None)

    def _generate(self) -> Iterator[np.ndarray]:
        service, request = self.service, self.request
        admission = service.admission
        if admission.failure:
            self._release()
            raise EngineFailure(f"synthesis failed: {admission.failure} (request id {request.id})")
        self.started = time.perf_counter()
        if self._clip is not None:
            yield from self._convert()
            return
        segments = self.plan.segments
        # a seeded run draws each segment from one random stream, which the cache cannot reproduce: not cached
        store = service.cache if request.cache and request.seed is None else None
        found = [None] * len(segments)
        if store is not None:
            identity = service.engine.identity()

            def key(i: int, lead: bool) -> str:
                return segment_key(identity, self.voice.fingerprint, request.speed, lead, segments[i].key())

            # The first segment the engine synthesises streams with the first-chunk rules (lead). Segment 0 always
            # is that one; a later one was if the segments before it came from the cache: either serves it.
            found = store.lookup([[key(0, True)]] + [[key(i, False), key(i, True)] for i in range(1, len(segments))])
            hits = sum(pcm is not None for pcm in found)
            self.cache_status = "hit" if hits == len(segments) else "partial" if hits else "miss"
        missing = [i for i, pcm in enumerate(found) if pcm is None]
        audio = None
        try:
            if missing:
                audio = iter(service.engine.synthesize([segments[i] for i in missing], self.voice, request.speed,
                                                       self.cancel, request.seed))
            for i, pcm in enumerate(found):
                if pcm is not None:
                    if pcm.size:
                        yield from self._emit(dequantize(pcm))
                    continue
                parts = []
                for chunk in audio:
                    if chunk is SEGMENT_END:
                        break
                    if store is not None:  # rounded as the cache holds it: a later hit gives the same audio
                        pcm16 = quantize(chunk)
                        parts.append(pcm16)
                        chunk = dequantize(pcm16)
                    yield from self._emit(chunk)
                else:
                    raise RuntimeError("the engine ended a segment without its end mark")
                if store is not None:
                    store.store(key(i, i == missing[0]), np.concatenate(parts) if parts else np.zeros(0, np.int16))
            if self.cache_status in ("miss", "off"):  # cached audio says nothing of speed
                admission.speed.observe(self.plan.units, self.samples * request.speed / SAMPLE_RATE,
                                        time.perf_counter() - self.started)
            self.outcome = "ok"
        except Exception as e:  # GeneratorExit (closed early) is not one: it passes
            failure = self._failed(e)
            if failure is e:
                raise
            raise failure from None
        finally:
            self._ended = time.perf_counter()
            if audio is not None and hasattr(audio, "close"):
                audio.close()
            self._release()

    def _convert(self) -> Iterator[np.ndarray]:
        """Voice conversion: the source clip's speech in this voice, one segment, never cached."""
        audio = None
        try:
            audio = iter(self.service.engine.convert(*self._clip, self.voice, self.cancel, self.request.seed))
            for chunk in audio:
                if chunk is not SEGMENT_END:
                    yield from self._emit(chunk)
            self.outcome = "ok"
        except Exception as e:
            raise self._failed(e) from None
        finally:
            self._ended = time.perf_counter()
            if audio is not None and hasattr(audio, "close"):
                audio.close()
            self._release()

    def _failed(self, e: Exception) -> ServiceError:
        """The ServiceError that ends this synthesis after ``e`` (logged when it is not the client's doing)."""
        if isinstance(e, Cancelled):
            error = cancelled(self.cancel.reason or e.reason)  # the token knows why (deadline, client gone)
        elif isinstance(e, SynthesisError):
            error = NothingToSpeak(str(e), param="text")
        elif isinstance(e, ServiceError):
            error = e
        else:
            log.exception("synthesis failed (request %s)", self.request.id, exc_info=e)
            error = EngineFailure(f"synthesis failed: {type(e).__name__} during synthesis (request id "
                                  f"{self.request.id})")
        self.outcome = error.outcome
        return error

    def _emit(self, chunk: np.ndarray) -> Iterator[np.ndarray]:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if self.first_audio is None:
            self.first_audio = time.perf_counter() - self.started
        if self.samples + chunk.size > self._max_samples:
            chunk = chunk[:self._max_samples - self.samples]
            self.samples += chunk.size
            if chunk.size:
                yield chunk
            self.cancel.set(AUDIO_LIMIT)
            raise Cancelled(AUDIO_LIMIT)
        self.samples += chunk.size
        yield chunk
