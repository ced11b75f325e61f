"""The routes, and how a synthesis becomes an HTTP answer (whole or streamed)."""
from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from urllib.parse import quote

from flask import Blueprint, Response, g, jsonify, request, send_from_directory

from .. import audio
from ..cancel import AUDIO_LIMIT, CLIENT_GONE, STOPPING, TIMEOUT, Cancelled
from ..engines import Speaker, SynthesisError
from ..engines.piper import GET_COSYVOICE_HINT
from .admission import EngineFailure, Job, OverBudget, QueueFull
from .body import client_gone_check, read_json_object
from .context import RequestRecord, Service, finish_request
from .errors import ApiError, error_response
from .openai import SseEncoder, VoiceTable, model_ids, model_object, openai_fields
from .schema import SpeechRequest, parse_speech_request

log = logging.getLogger("cosyvoice_lite")
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# What a stream cut short amounted to: (outcome, status counted in the log line and /metrics). The client got a
# 200 status line already, so it learns of the cut by the connection ending without the terminating chunk.
TRUNCATED = {TIMEOUT: ("truncated_timeout", 504), AUDIO_LIMIT: ("truncated_audio_limit", 413),
             STOPPING: ("truncated_stopping", 503)}


class StreamTruncated(BrokenPipeError):
    """Raised out of a streamed body to make gunicorn drop the connection without the terminating chunk (an EPIPE
    is what gunicorn closes quietly, at debug level)."""

    def __init__(self, why: str):
        super().__init__(errno.EPIPE, f"stream truncated: {why}")


def synthesize_response(service: Service, req: SpeechRequest) -> Response:
    rec: RequestRecord = g.rec
    rec.speaker, rec.chars, rec.fmt, rec.stream = req.speaker.alias, len(req.text), req.fmt, req.stream
    settings = service.settings
    job = Job(req.text, req.speaker, req.speed, req.normalize, request_id=rec.id,
              deadline=rec.started + settings.request_timeout, client_gone=client_gone_check(request.environ),
              cache=service.cache if req.cache else None, max_audio_s=settings.max_audio_seconds, seed=req.seed)
    try:
        service.synth.submit(job)
    except QueueFull as e:
        rec.outcome = "queue_full"
        message = (f"the server is busy ({service.synth.capacity} requests in progress or waiting); "
                   f"retry in {e.retry_after} s")
        raise ApiError(503, message, code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
    try:  # what the text costs, before any synthesis: refuse now what cannot be served
        job.plan = service.engine.plan(req.text, req.normalize)
        service.synth.check_budget(job.plan, req.speed, req.stream, job.cancel.deadline - time.monotonic(),
                                   settings.max_audio_seconds)
    except OverBudget as e:
        service.synth.abandon(job)
        rec.outcome = "over_budget"
        raise ApiError(413, e.message, code="too_much_speech", param="text", audio_seconds=round(e.audio_s, 1),
                       synthesis_seconds=round(e.synth_s, 1)) from None
    except BaseException as e:
        service.synth.abandon(job)
        raise _synthesis_error(rec, e) from None
    rec.job = job
    chunks = service.synth.results(job)
    encoder = audio.make_encoder(req.fmt, streaming=req.stream and req.fmt in audio.STREAMABLE_FORMATS)
    headers = {"X-Engine": service.engine.name, "X-Speaker": quote(req.speaker.alias, safe=" -_.()"),
               "Cache-Control": "no-store",
               "X-Sample-Rate": str(audio.SAMPLE_RATE), "X-Channels": "1",
               "Content-Disposition": f'inline; filename="speech.{audio.FORMATS[req.fmt][1]}"'}
    if req.sse:
        encoder = SseEncoder(encoder, len(req.text))
        del headers["Content-Disposition"]
    try:
        first = next(chunks, None)  # errors before the first audio still get a proper status
        headers["X-Cache"] = rec.cache = job.cache.status  # the engine looked every segment up before that
        if not req.stream:
            parts = [encoder.start()]
            for chunk in ([] if first is None else [first]):
                parts.append(encoder.encode(chunk))
            for chunk in chunks:
                parts.append(encoder.encode(chunk))
            parts.append(encoder.finish())
    except BaseException as e:
        service.synth.abandon(job)
        raise _synthesis_error(rec, e) from None
    if not req.stream:
        service.synth.abandon(job)
        rec.outcome = "ok"
        headers["X-Audio-Duration"] = f"{job.samples / audio.SAMPLE_RATE:.3f}"
        return Response(b"".join(parts), headers=headers, content_type=encoder.content_type)

    def generate():
        status = 200
        try:
            rec.outcome = "streaming"
            yield encoder.start() + (encoder.encode(first) if first is not None else b"")
            for chunk in chunks:
                data = encoder.encode(chunk)
                if data:
                    yield data
            tail = encoder.finish()
            if tail:
                yield tail
            rec.outcome = "ok"
        except Cancelled as e:
            if e.reason == CLIENT_GONE or e.reason not in TRUNCATED:
                rec.outcome = "client_gone"
                return
            rec.outcome, status = TRUNCATED[e.reason]
            log.warning("stream %s truncated after %.1f s of audio: %s", rec.id, job.samples / audio.SAMPLE_RATE,
                        e.reason)
            raise StreamTruncated(e.reason) from None
        except GeneratorExit:
            rec.outcome = "client_gone"
            raise
        except Exception as e:  # the status line is gone already: cut the stream so the client sees an error
            rec.outcome, status = "truncated_error", 500
            log.warning("stream %s truncated by an error: %s", rec.id, e)
            raise StreamTruncated("error") from None
        finally:
            chunks.close()  # ends the synthesis generator here, so that its time is known for the log line
            service.synth.abandon(job)
            finish_request(service, rec, status)

    def closed():  # also when the server closes the stream before its first byte (the generator never ran)
        chunks.close()
        service.synth.abandon(job)
        if rec.outcome == "-":
            rec.outcome = "client_gone"
        finish_request(service, rec, 200)

    headers["X-Accel-Buffering"] = "no"
    response = Response(generate(), headers=headers, content_type=encoder.content_type)
    response.call_on_close(closed)
    return response


def _synthesis_error(rec: RequestRecord, e: BaseException) -> BaseException:
    if isinstance(e, Cancelled) and e.reason == TIMEOUT:
        rec.outcome = "timeout"
        return ApiError(504, "synthesis took longer than REQUEST_TIMEOUT; try a shorter text", code="timeout")
    if isinstance(e, Cancelled) and e.reason == AUDIO_LIMIT:
        rec.outcome = "audio_limit"
        return ApiError(413, "the speech reached MAX_AUDIO_SECONDS before the text's end; split the text",
                        code="too_much_speech", param="text")
    if isinstance(e, Cancelled) and e.reason == STOPPING:
        rec.outcome = "stopping"
        return ApiError(503, "the service is stopping; retry on another instance", code="stopping",
                        headers={"Retry-After": "1"})
    if isinstance(e, Cancelled):
        rec.outcome = "client_gone"
        return ApiError(499, "client closed the connection", code="client_closed")
    if isinstance(e, SynthesisError):
        rec.outcome = "rejected"
        return ApiError(400, str(e), code="nothing_to_speak", param="text")
    if isinstance(e, EngineFailure):
        rec.outcome = "engine_error"
        return ApiError(500, f"synthesis failed: {e} (request id {rec.id})", code="synthesis_failed")
    return e


def routes(service: Service) -> Blueprint:
    """The service's routes, as a blueprint bound to ``service``."""
    api = Blueprint("api", __name__)
    engine = service.engine

    def speaker_json(s: Speaker) -> dict:
        return {"id": s.id, "alias": s.alias, "language": s.language, "engine": s.engine}

    def engine_json() -> dict:
        info = {"engine": engine.name, "description": engine.description}
        if engine.name == "piper":
            info["hint"] = f"Offline fallback voice. For CosyVoice, {GET_COSYVOICE_HINT} and restart."
        return info

    @api.post("/tts")
    def tts():
        body = read_json_object(service.settings.body_timeout)
        req = parse_speech_request(body, service, text_key="text", speaker_key="speaker", format_key="format",
                                   default_format="wav")
        return synthesize_response(service, req)

    voices = VoiceTable(engine, service.settings.voice_map)
    loaded = int(time.time())

    @api.post("/v1/audio/speech")
    def openai_speech():
        body = read_json_object(service.settings.body_timeout)
        body, sse = openai_fields(body, engine)
        req = parse_speech_request(body, service, text_key="input",
                                   speaker_key="voice", format_key="response_format", default_format="mp3",
                                   default_stream=True, resolve=voices.resolve, more_names=voices.names())
        if sse:
            req.stream = req.sse = True
        return synthesize_response(service, req)

    @api.get("/v1/audio/voices")
    def openai_voices():
        return jsonify({"voices": voices.listing()})

    @api.get("/v1/models")
    def openai_models():
        return jsonify({"object": "list", "data": [model_object(m, loaded) for m in model_ids(engine)]})

    @api.get("/v1/models/<path:model>")
    def openai_model(model: str):
        if model not in model_ids(engine):
            raise ApiError(404, f"no model {model[:80]!r}; this service serves {', '.join(model_ids(engine))}",
                           code="model_not_found", param="model")
        return jsonify(model_object(model, loaded))

    @api.get("/speakers")
    def speakers():
        return jsonify({**engine_json(), "default": service.default_speaker().id,
                        "speakers": [speaker_json(s) for s in engine.speakers()]})

    @api.get("/health")
    def health():
        return jsonify({"status": "ok", "engine": engine.name})

    @api.get("/ready")
    def ready():
        synth = service.synth
        if synth.failure:
            return error_response(503, synth.failure, "engine_failed")
        if not synth.ready.is_set():
            return error_response(503, "the model is loading and warming up", "warming_up",
                                  headers={"Retry-After": "2"})
        if synth.running + synth.waiting >= synth.capacity:  # a load balancer should send new requests elsewhere
            return error_response(503, f"the queue is full ({synth.capacity} requests in progress or waiting)",
                                  "queue_full", headers={"Retry-After": str(synth.retry_after())})
        info = engine_json()
        cache = service.cache.describe() if service.cache else {"backend": "off"}
        if service.settings.api_key:  # /ready is public: no model or cache paths, no hosts, for anonymous callers
            info.pop("description", None)
            cache = {k: v for k, v in cache.items() if k not in ("dir", "url", "problem")}
        runtime = getattr(engine, "runtime", None)  # CosyVoice: runtime and precision per stage, CPU features
        return jsonify({"status": "ready", **info, **({"runtime": runtime} if runtime else {}),
                        "speakers": len(engine.speakers()),
                        "queue": {"waiting": synth.waiting, "running": synth.running, "max_batch": synth.max_batch,
                                  "capacity": synth.capacity},
                        "cache": cache})

    @api.get("/metrics")
    def metrics():
        text = service.metrics.render(engine.name, service.synth.ready.is_set() and not service.synth.failure,
                                      service.synth.capacity, service.cache.stats() if service.cache else None)
        return Response(text, content_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/openapi.json")
    def openapi():
        return jsonify(service.spec)

    @api.get("/")
    def page():
        return send_from_directory(STATIC_DIR, "index.html", max_age=0)

    @api.get("/favicon.ico")
    def favicon():
        return send_from_directory(STATIC_DIR, "favicon.svg", mimetype="image/svg+xml", max_age=86400)

    return api
