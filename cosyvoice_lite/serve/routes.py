"""The routes, and how a synthesis becomes an HTTP answer (whole or streamed)."""
from __future__ import annotations

import errno
import logging
import time
from pathlib import Path
from urllib.parse import quote

from flask import Blueprint, Response, g, jsonify, request, send_from_directory

from .. import audio
from ..service import AudioLimit, ServiceError, SynthesisRequest, SynthesisService, TimedOut
from ..voices import Voice
from .body import client_gone_check, read_json_object, read_upload
from .context import RequestRecord, finish_request
from .errors import ApiError, error_response
from .openai import SseEncoder, model_ids, model_object
from .schema import parse_openai_speech, parse_tts

log = logging.getLogger("cosyvoice_lite")
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# What a stream cut short amounted to: (outcome, status counted in the log line and /metrics). The client got a
# 200 status line already, so it learns of the cut by the connection ending without the terminating chunk.
TRUNCATED = {TimedOut: ("truncated_timeout", 504), AudioLimit: ("truncated_audio_limit", 413)}


class StreamTruncated(BrokenPipeError):
    """Raised out of a streamed body to make gunicorn drop the connection without the terminating chunk (an EPIPE
    is what gunicorn closes quietly, at debug level)."""

    def __init__(self, why: str):
        super().__init__(errno.EPIPE, f"stream truncated: {why}")


def api_error(e: ServiceError) -> ApiError:
    """A refusal of the service as the HTTP answer it is."""
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    return ApiError(e.status, e.message, code=e.code, param=e.param, headers=headers, **e.extra)


def speak(service: SynthesisService, req: SynthesisRequest) -> Response:
    """Synthesise ``req`` into the answer: whole, or streamed as it is made. Whatever is refused before the first
    audio is an error answer with its status; a stream cut later ends without its terminating chunk."""
    rec: RequestRecord = g.rec
    req.id = rec.id
    try:
        synthesis = service.start(req, client_gone=client_gone_check(request.environ), arrived=rec.started)
    except ServiceError as e:
        rec.outcome = e.outcome
        raise api_error(e) from None
    rec.synthesis = synthesis
    encoder = audio.make_encoder(req.format, streaming=req.stream and req.format in audio.STREAMABLE_FORMATS)
    headers = {"X-Engine": service.engine.name, "X-Speaker": quote(req.voice.name, safe=" -_.()"),
               "Cache-Control": "no-store", "X-Sample-Rate": str(audio.SAMPLE_RATE), "X-Channels": "1",
               "Content-Disposition": f'inline; filename="speech.{audio.FORMATS[req.format][1]}"'}
    if req.sse:
        encoder = SseEncoder(encoder, len(req.text))
        del headers["Content-Disposition"]
    chunks = iter(synthesis)
    try:
        first = next(chunks, None)  # errors before the first audio still get a proper status
        headers["X-Cache"] = synthesis.cache_status  # every segment was looked up before that
        if not req.stream:
            body = b"".join([encoder.start(), *(encoder.encode(c) for c in ([] if first is None else [first])),
                             *(encoder.encode(c) for c in chunks), encoder.finish()])
    except ServiceError as e:
        synthesis.close()
        raise api_error(e) from None
    except BaseException:
        synthesis.close()
        raise
    if not req.stream:
        synthesis.close()
        headers["X-Audio-Duration"] = f"{synthesis.audio_seconds:.3f}"
        return Response(body, headers=headers, content_type=encoder.content_type)

    def generate():
        try:
            synthesis.outcome = "streaming"
            yield encoder.start() + (encoder.encode(first) if first is not None else b"")
            for chunk in chunks:
                data = encoder.encode(chunk)
                if data:
                    yield data
            tail = encoder.finish()
            if tail:
                yield tail
        except ServiceError as e:
            outcome = TRUNCATED.get(type(e))
            if outcome is None and e.outcome == "client_gone":
                synthesis.outcome = "client_gone"
                return
            synthesis.outcome, g_status[0] = outcome or ("truncated_error", 500)
            log.warning("stream %s truncated after %.1f s of audio: %s", rec.id, synthesis.audio_seconds, e.code)
            raise StreamTruncated(e.code) from None
        except GeneratorExit:
            synthesis.outcome = "client_gone"
            raise
        except Exception as e:  # the status line is gone already: cut the stream so the client sees an error
            synthesis.outcome, g_status[0] = "truncated_error", 500
            log.warning("stream %s truncated by an error: %s", rec.id, e)
            raise StreamTruncated("error") from None

    g_status = [200]  # what the log line and /metrics count for the stream

    def closed():  # werkzeug calls it once, when the stream ends, is cut, or was never started
        synthesis.close()
        finish_request(service, rec, g_status[0])

    headers["X-Accel-Buffering"] = "no"
    response = Response(generate(), headers=headers, content_type=encoder.content_type)
    response.call_on_close(closed)
    return response


def routes(service: SynthesisService, spec: dict) -> Blueprint:
    """The service's routes, as a blueprint bound to ``service``; ``spec``: the OpenAPI document."""
    api = Blueprint("api", __name__)
    engine = service.engine
    voices = service.voices
    admission = service.admission
    loaded = int(time.time())

    def voice_json(v: Voice) -> dict:
        return {"id": v.id, "alias": v.name, "language": v.language, "engine": v.engine}

    def engine_json() -> dict:
        offers = engine.offers
        info = {"engine": engine.name, "description": engine.description, "model": engine.model_id,
                "offers": {"kind": offers.kind, "speakers": offers.speakers, "cloning": offers.cloning,
                           "instructions": offers.instructions, "conversion": offers.conversion}}
        if engine.hint:
            info["hint"] = engine.hint
        return info

    def upload(what: str) -> tuple[dict, bytes]:
        fields, clip = read_upload(service.settings.body_timeout, service.settings.max_upload_bytes)
        if clip is None:
            raise ApiError(400, f"send the {what} audio as 'file' (multipart) or base64 in a JSON body",
                           code="missing_audio", param="file")
        return fields, clip

    @api.post("/tts")
    def tts():
        body = read_json_object(service.settings.body_timeout, service.settings.max_body_bytes)
        req = parse_tts(body, service)
        return speak(service, req)

    @api.post("/v1/audio/speech")
    def openai_speech():
        body = read_json_object(service.settings.body_timeout, service.settings.max_body_bytes)
        req = parse_openai_speech(body, service)
        return speak(service, req)

    @api.get("/v1/audio/voices")
    def openai_voices():
        return jsonify({"voices": voices.listing() + service.saved_voices()})

    @api.post("/v1/audio/voices")
    def create_voice():
        fields, clip = upload("reference")
        try:
            made = service.create_voice(clip, fields.get("text"), fields.get("name"), request_id=g.rec.id)
        except ServiceError as e:
            g.rec.outcome = e.outcome
            raise api_error(e) from None
        return jsonify(made), 201

    @api.get("/v1/audio/voices/<voice_id>")
    def get_voice(voice_id: str):
        try:
            return jsonify(service.saved_voice(voice_id))
        except ServiceError as e:
            raise api_error(e) from None

    @api.delete("/v1/audio/voices/<voice_id>")
    def delete_voice(voice_id: str):
        try:
            service.delete_voice(voice_id)
        except ServiceError as e:
            raise api_error(e) from None
        return jsonify({"id": voice_id, "object": "voice", "deleted": True})

    @api.post("/vc")
    def convert():
        fields, clip = upload("source")
        name = fields.get("voice")
        try:
            voice = service.default_voice("voice") if name is None else service.find_voice(name)
        except ServiceError as e:
            raise api_error(e) from None
        if voice is None:
            raise ApiError(400, f"unknown voice {name[:80]!r}; {service.voice_choices(saved=True)}",
                           code="unknown_speaker", param="voice")
        fmt = fields.get("format") or fields.get("response_format") or "wav"
        if fmt not in audio.FORMATS:
            raise ApiError(400, f"'format' must be one of {', '.join(audio.FORMATS)}", code="invalid_format",
                           param="format")
        stream = (fields.get("stream") or "false").lower() == "true"
        if stream and fmt not in audio.STREAMABLE_FORMATS:
            raise ApiError(400, f"{fmt} cannot be streamed; stream one of {', '.join(audio.STREAMABLE_FORMATS)}",
                           code="invalid_format", param="format")
        return speak(service, SynthesisRequest("", voice, format=fmt, stream=stream, source=clip))

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
        return jsonify({**engine_json(), "default": voices.default.id if voices.default else None,
                        "speakers": [voice_json(v) for v in voices.voices]})

    @api.get("/health")
    def health():
        return jsonify({"status": "ok", "engine": engine.name})

    @api.get("/ready")
    def ready():
        if admission.failure:
            return error_response(503, admission.failure, "engine_failed")
        if not admission.ready.is_set():
            return error_response(503, "the model is loading and warming up", "warming_up",
                                  headers={"Retry-After": "2"})
        if admission.running + admission.waiting >= admission.capacity:  # a balancer should send requests elsewhere
            return error_response(503, f"the queue is full ({admission.capacity} requests in progress or waiting)",
                                  "queue_full", headers={"Retry-After": str(admission.retry_after())})
        info = engine_json()
        cache = service.cache.describe() if service.cache else {"backend": "off"}
        if service.settings.api_key:  # /ready is public: no model or cache paths, no hosts, for anonymous callers
            info.pop("description", None)
            cache = {k: v for k, v in cache.items() if k not in ("dir", "url", "problem")}
        runtime = getattr(engine, "runtime", None)  # CosyVoice: runtime and precision per stage, CPU features
        return jsonify({"status": "ready", **info, **({"runtime": runtime} if runtime else {}),
                        "speakers": len(voices.voices),
                        "queue": {"waiting": admission.waiting, "running": admission.running,
                                  "max_batch": admission.max_batch, "capacity": admission.capacity},
                        "cache": cache})

    @api.get("/metrics")
    def metrics():
        text = service.metrics.render(engine.name, admission.ready.is_set() and not admission.failure,
                                      admission.capacity, service.cache.stats() if service.cache else None,
                                      engine.realtime_factor)
        return Response(text, content_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/openapi.json")
    def openapi():
        return jsonify(spec)

    @api.get("/")
    def page():
        return send_from_directory(STATIC_DIR, "index.html", max_age=0)

    @api.get("/favicon.ico")
    def favicon():
        return send_from_directory(STATIC_DIR, "favicon.svg", mimetype="image/svg+xml", max_age=86400)

    return api
