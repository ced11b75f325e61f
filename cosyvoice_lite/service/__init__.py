"""The synthesis service, the same behind every front door (HTTP, the CLI, Wyoming): admission and queue, budgets
and limits, the audio cache, cancellation, metrics. It knows no transport: a front door makes a SynthesisRequest,
calls ``start`` and reads the Synthesis it gets; every refusal is a ServiceError."""
from __future__ import annotations

import logging
import time
import unicodedata

from ..cache import open_cache
from ..cancel import CancelToken
from ..engines import Engine, Plan, SynthesisError
from ..settings import Settings
from ..voices import Voice, VoiceBook
from ..voices.clip import MAX_SECONDS, BadClip, read_clip
from ..voices.store import CorruptVoice, StoreError, VoiceStore, new_id
from .admission import Admission
from .errors import (AudioLimit, ClientGone, Conflict, EngineFailure, InvalidInput, NotFound, NothingToSpeak,
                     OverBudget, QueueFull, ServiceError, StoreFailure, TimedOut, Unsupported)
from .metrics import Metrics
from .request import SynthesisRequest
from .synthesis import Synthesis

log = logging.getLogger("cosyvoice_lite")

__all__ = ["AudioLimit", "ClientGone", "Conflict", "EngineFailure", "InvalidInput", "NotFound", "NothingToSpeak",
           "OverBudget", "QueueFull", "ServiceError", "StoreFailure", "SynthesisRequest", "Synthesis",
           "SynthesisService", "TimedOut", "Unsupported", "clean_text"]

MAX_TRANSCRIPT_CHARS = 1000  # a 30 s clip says a few hundred characters at most
MAX_NAME_CHARS = 100


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
        # saved voices, where the model can make them: beside the audio cache (disk, or Redis for every pod)
        self.store = VoiceStore.open(settings.cache, settings.cache_root, settings.max_voices) \
            if engine.offers.cloning else None

    # ---- voices -----------------------------------------------------------------------------------------
    def default_voice(self, param: str = "speaker") -> Voice:
        """The voice of a request that names none: the engine's first. A model without speakers of its own (the
        base model) has none: Unsupported, saying how to make a voice (``param``: the field the front door reads
        a voice from)."""
        if self.voices.default is None:
            raise Unsupported(f"no {param} given; {self.without_speakers()}", code="speaker_required", param=param)
        return self.voices.default

    def without_speakers(self) -> str:
        """What a request must name on a model without built-in speakers (the base model), for refusals."""
        return (f"this model ({self.engine.model_id}) has no built-in speakers: make a voice from a reference clip "
                "with POST /v1/audio/voices and name its id")

    def voice_choices(self, mapped: bool = False, saved: bool = False) -> str:
        """The end of a refusal of an unknown voice: the names a request may use (with the OpenAI names when
        ``mapped``, and a saved voice's id when ``saved``), or how to make a voice on a model without speakers."""
        if not self.voices.voices:
            return self.without_speakers()
        listing = ", ".join([self.voices.names_listing()] + (list(self.voices.mapped) if mapped else []))
        return f"choose one of: {listing}" + (" or a saved voice's id" if saved else "")

    def find_voice(self, name: str, mapped: bool = True) -> Voice | None:
        """A voice by id or name: the engine's own, an OpenAI name (``mapped``), or a saved voice."""
        voice = self.voices.find(name, mapped=mapped)
        if voice is None and self.store is not None and name.startswith("voice_"):
            found = self._read_saved(name)
            voice = found[0] if found else None
        return voice

    def _read_saved(self, voice_id: str) -> tuple[Voice, dict] | None:
        try:
            return self.store.get(voice_id)
        except StoreError as e:
            log.warning("voice store failed: %s", e)
            raise StoreFailure("the voice store is not available right now; retry later", retry_after=5) from None
        except CorruptVoice as e:
            log.warning("saved voice %s is damaged (%s); it is ignored", voice_id, e)
            return None

    def _cloning(self) -> None:
        if self.store is None:
            raise Unsupported(f"this model ({self.engine.model_id}) cannot make voices; it offers: "
                              f"{', '.join(self.engine.offers.listing()) or 'its own voices'}", code="unsupported_mode")

    def saved_voices(self) -> list[dict]:
        """Every saved voice's description, oldest first."""
        if self.store is None:
            return []
        try:
            ids = self.store.ids()
        except StoreError as e:
            log.warning("voice store failed: %s", e)
            return []
        return [meta for meta in (self._describe(i) for i in ids) if meta is not None]

    def _describe(self, voice_id: str) -> dict | None:
        found = self._read_saved(voice_id)
        return None if found is None else public_meta(found[1])

    def saved_voice(self, voice_id: str) -> dict:
        self._cloning()
        meta = self._describe(voice_id)
        if meta is None:
            raise NotFound(f"no saved voice {voice_id[:80]!r}", code="voice_not_found", param="id")
        return meta

    def delete_voice(self, voice_id: str) -> None:
        self._cloning()
        try:
            deleted = self.store.delete(voice_id)
        except StoreError as e:
            log.warning("voice store failed: %s", e)
            raise StoreFailure("the voice store is not available right now; retry later", retry_after=5) from None
        if not deleted:
            raise NotFound(f"no saved voice {voice_id[:80]!r}", code="voice_not_found", param="id")
        self.metrics.count_voice("deleted", 0.0)
        log.info("voice %s deleted", voice_id)

    def create_voice(self, clip: bytes, transcript: str | None = None, name: str | None = None,
                     request_id: str = "") -> dict:
        """Make a voice from a reference clip (and its transcript: zero-shot; without one: cross-lingual) and save
        it. Admitted like a synthesis (it uses the same cores); every refusal is a ServiceError."""
        self._cloning()
        if transcript is not None:
            transcript = clean_text(transcript).strip()
            if len(transcript) > MAX_TRANSCRIPT_CHARS:
                raise InvalidInput(f"'text' (the clip's transcript) has {len(transcript)} characters; the limit is "
                                   f"{MAX_TRANSCRIPT_CHARS}", code="transcript_too_long", param="text")
        name = clean_text(name or "").strip()[:MAX_NAME_CHARS]
        try:
            samples, rate = read_clip(clip, "reference audio")
        except BadClip as e:
            raise InvalidInput(str(e), code="invalid_audio", param="file") from None
        if self.store.full():
            raise Conflict(f"this server keeps at most {self.settings.max_voices} saved voices (MAX_VOICES); "
                           "delete one first", code="too_many_voices")
        holder = object()
        self.admission.admit(holder)
        started = time.perf_counter()
        try:
            voice = self.engine.make_voice(samples, rate, transcript or None, name, new_id())
        except ServiceError:
            raise
        except ValueError as e:  # what the engine finds wrong with the clip (no speech tokens, ...)
            raise InvalidInput(str(e), code="invalid_audio", param="file") from None
        except Exception as e:
            log.exception("making a voice failed (request %s)", request_id)
            raise EngineFailure(f"making the voice failed: {type(e).__name__} (request id {request_id})") from None
        finally:
            self.admission.release(holder)
        seconds = time.perf_counter() - started
        meta = {"name": voice.name, "transcript": transcript or "", "mode": "zero_shot" if transcript
                else "cross_lingual", "created_at": int(time.time()), "prompt_seconds": round(len(samples) / rate, 3)}
        try:
            self.store.put(voice, meta)
        except StoreError as e:
            log.warning("voice store failed: %s", e)
            raise StoreFailure("the voice store is not available right now; retry later", retry_after=5) from None
        self.metrics.count_voice("made", seconds)
        log.info("voice %s made in %.2f s from %.1f s of audio (%s)", voice.id, seconds, meta["prompt_seconds"],
                 meta["mode"])
        return public_meta({**meta, "id": voice.id, "language": voice.language})

    def start(self, request: SynthesisRequest, client_gone=None, arrived: float | None = None) -> Synthesis:
        """Admit ``request`` and plan it: refuse now (ServiceError) what cannot be served — a full queue, text with
        nothing to speak, more audio or time than the limits allow. ``client_gone``: a probe of the front door,
        polled while the audio is awaited; ``arrived``: time.monotonic() of the request's arrival (the deadline
        counts from it). The caller iterates the Synthesis for audio and closes it when done, whatever happens."""
        arrived = time.monotonic() if arrived is None else arrived
        offers = self.engine.offers
        if request.instructions.strip():
            if not offers.instructions:
                raise Unsupported(f"'instructions' is not supported by this model ({self.engine.model_id}): its "
                                  "voices are fixed; leave it out and choose a voice instead (instructions need "
                                  "CosyVoice-300M-Instruct)", code="unsupported_instructions", param="instructions")
            voice = self.engine.instructed(request.voice, clean_text(request.instructions).strip())
        else:
            voice = request.voice
        clip = None
        if request.source is not None:
            if not offers.conversion:
                raise Unsupported(f"this model ({self.engine.model_id}) cannot convert voices; it offers: "
                                  f"{', '.join(offers.listing()) or 'its own voices'}", code="unsupported_mode")
            if voice.prompt_mel is None:
                raise InvalidInput(f"voice conversion speaks in a voice made from a reference clip; {voice.name!r} is "
                                   "not one (make one with POST /v1/audio/voices)", code="unsupported_voice",
                                   param="voice")
            try:
                clip = read_clip(request.source, "source audio")
            except BadClip as e:
                raise InvalidInput(str(e), code="invalid_audio", param="file") from None
        cancel = CancelToken(arrived + self.settings.request_timeout, client_gone)
        synthesis = Synthesis(self, request, voice, cancel, clip)
        self.admission.admit(synthesis)
        try:
            try:
                synthesis.plan = self.engine.plan(request.text, request.normalize) if clip is None \
                    else Plan(units=0, min_audio_s=len(clip[0]) / clip[1], max_audio_s=MAX_SECONDS)
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


def public_meta(meta: dict) -> dict:
    """A saved voice as the API shows it."""
    keys = ("id", "name", "language", "mode", "transcript", "prompt_seconds", "created_at")
    return {"object": "voice", **{k: meta.get(k) for k in keys}}
