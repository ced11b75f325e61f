"""The routes, and how a synthesis becomes an HTTP answer (whole or streamed)."""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Blueprint, Response, g, jsonify, request, send_from_directory

from .. import audio
from ..cancel import STOPPING, TIMEOUT, Cancelled
from ..engines import Speaker, SynthesisError
from ..engines.piper import GET_COSYVOICE_HINT
from .admission import EngineFailure, Job, QueueFull
from .body import client_gone_check, read_json_object
from .context import RequestRecord, Service, finish_request
from .errors import ApiError, error_response
from .schema import SpeechRequest, parse_speech_request

log = logging.getLogger("cosyvoice_lite")
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


def synthesize_response(service: Service, req: SpeechRequest) -> Response:
    rec: RequestRecord = g.rec
    rec.speaker, rec.chars, rec.fmt, rec.stream = req.speaker.alias, len(req.text), req.fmt, req.stream
    job = Job(req.text, req.speaker, req.speed, req.normalize, request_id=rec.id,
              deadline=rec.started + service.settings.request_timeout,
              client_gone=client_gone_check(request.environ))
    try:
        service.synth.submit(job)
    except QueueFull as e:
        rec.outcome = "queue_full"
        message = (f"the server is busy ({service.synth.capacity} requests in progress or waiting); "
                   f"retry in {e.retry_after} s")
        raise ApiError(503, message, code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
    rec.job = job
    chunks = service.synth.results(job)
    encoder = audio.make_encoder(req.fmt, streaming=req.stream)
    headers = {"X-Engine": service.engine.name, "X-Speaker": req.speaker.alias, "Cache-Control": "no-store",
               "X-Sample-Rate": str(audio.SAMPLE_RATE), "X-Channels": "1",
               "Content-Disposition": f'inline; filename="speech.{audio.FORMATS[req.fmt][1]}"'}
    try:
        first = next(chunks, None)  # errors before the first audio still get a proper status
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
            rec.outcome = "timeout_mid_stream" if e.reason == TIMEOUT else "client_gone"
        except GeneratorExit:
            rec.outcome = "client_gone"
            raise
        except Exception as e:  # the status line is gone already: end the stream early and log
            rec.outcome = "error_mid_stream"
            log.warning("stream %s ended early: %s", rec.id, e)
        finally:
            service.synth.abandon(job)
            finish_request(service, rec, 200)

    def closed():  # also when the server closes the stream before its first byte (the generator never ran)
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

    @api.post("/v1/audio/speech")
    def openai_speech():
        body = read_json_object(service.settings.body_timeout)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", code="invalid_model", param="model")
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise ApiError(400, "'instructions' must be a string", code="invalid_instructions", param="instructions")
        stream_format = body.get("stream_format", "audio")
        if stream_format != "audio":
            raise ApiError(400, "only stream_format 'audio' is supported", code="invalid_stream_format",
                           param="stream_format")
        req = parse_speech_request(body, service, text_key="input", speaker_key="voice", format_key="response_format",
                                   default_format="mp3")
        return synthesize_response(service, req)

    @api.get("/v1/audio/voices")
    def openai_voices():
        return jsonify({"voices": [{"id": s.alias, "name": s.id, "language": s.language} for s in engine.speakers()]})

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
        runtime = getattr(engine, "runtime", None)  # CosyVoice: runtime and precision per stage, CPU features
        return jsonify({"status": "ready", **engine_json(), **({"runtime": runtime} if runtime else {}),
                        "speakers": len(engine.speakers()),
                        "queue": {"waiting": synth.waiting, "running": synth.running, "max_batch": synth.max_batch,
                                  "capacity": synth.capacity}})

    @api.get("/metrics")
    def metrics():
        text = service.metrics.render(engine.name, service.synth.ready.is_set() and not service.synth.failure,
                                      service.synth.capacity)
        return Response(text, content_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/openapi.json")
    def openapi():
        return jsonify(service.spec)

    @api.get("/")
    def page():
        return send_from_directory(STATIC_DIR, "index.html", max_age=0)

    return api
