"""The HTTP service (Flask app factory). gunicorn runs ``app:app``; see gunicorn.conf.py for the process model.

Routes: POST /tts, GET /speakers, POST /v1/audio/speech, GET /v1/audio/voices, GET /health, GET /ready,
GET /metrics, GET /openapi.json, GET / (web page). Every error is JSON {"error": {"message", "type", "param",
"code"}} (the OpenAI shape), produced in one place: ``_register_error_handlers``.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import re
import socket
import time
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, current_app, g, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import audio
from .engines import Engine, Speaker, StartupError, SynthesisError, load_engine
from .engines.piper import GET_COSYVOICE_HINT
from .openapi import openapi_spec
from .cancel import CLIENT_GONE, TIMEOUT, Cancelled
from .service import Admission, EngineFailure, Job, Metrics, QueueFull
from .settings import Settings

log = logging.getLogger("cosyvoice_lite")
request_log = logging.getLogger("cosyvoice_lite.request")

STATIC_DIR = Path(__file__).parent / "static"
SPEED_RANGE = (0.25, 4.0)
PUBLIC_ENDPOINTS = {"health", "ready", "page", "static"}  # reachable without API_KEY
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ApiError(Exception):
    """An error answer. ``message`` is shown to the client; ``extra`` keys are added to the error object."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}
        self.extra = extra


# ---------------------------------------------------------------------------------------------------------------
# App factory
# ---------------------------------------------------------------------------------------------------------------

class Service:
    """Per-app state shared by the routes."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.metrics = Metrics()
        self.synth = Admission(engine, settings.queue_size, settings.max_batch, on_change=self.metrics.set_queue)
        self.spec = openapi_spec(settings, engine)

    def default_speaker(self) -> Speaker:
        return self.engine.speakers()[0]


def create_app(config: dict | None = None) -> Flask:
    """Build the app. ``config`` overrides settings by field name (e.g. {'queue_size': 2}); 'engine' may be an
    Engine instance to serve instead of the one ``load_engine`` would pick. The engine warms up on the first
    request or on ``app.extensions['cosyvoice_lite'].synth.ensure_started()`` (gunicorn does it after fork)."""
    config = dict(config or {})
    engine = config.pop("engine") if isinstance(config.get("engine"), Engine) else None
    settings = Settings.from_env(config)
    if engine is None:
        engine = load_engine(settings)
    service = Service(settings, engine)

    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.ensure_ascii = False
    app.json.sort_keys = False
    app.extensions["cosyvoice_lite"] = service
    _register_hooks(app, service)
    _register_error_handlers(app)
    _register_routes(app, service)
    log.info("cosyvoice-lite app created: engine=%s speakers=%s in_progress=%d queue=%d timeout=%ss max_chars=%d "
             "auth=%s", engine.name, ",".join(s.alias for s in engine.speakers()), service.synth.max_batch,
             settings.queue_size,
             settings.request_timeout, settings.max_text_chars, "on" if settings.api_key else "off")
    return app


# ---------------------------------------------------------------------------------------------------------------
# Per-request bookkeeping: id, auth, CORS, one log line, metrics
# ---------------------------------------------------------------------------------------------------------------

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
    outcome: str = "-"
    logged: bool = False


def _register_hooks(app: Flask, service: Service) -> None:
    settings = service.settings

    @app.before_request
    def begin():
        service.synth.ensure_started()
        rid = request.headers.get("X-Request-ID", "")
        g.rec = RequestRecord(id=rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex[:16], method=request.method,
                              path=_printable(request.path), endpoint=_endpoint_label(), started=time.monotonic())
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            return Response(status=204)  # CORS preflight; headers added in finish()
        if settings.api_key and (request.endpoint or "") not in PUBLIC_ENDPOINTS:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            # WSGI hands headers over as latin-1 text: back to the raw bytes the client sent.
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1", "replace"),
                                                                     settings.api_key.encode("utf-8")):
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <API_KEY>'",
                               code="unauthorized", headers={"WWW-Authenticate": 'Bearer realm="cosyvoice-lite"'})

    @app.after_request
    def finish(response: Response):
        rec: RequestRecord | None = g.get("rec")
        _add_cors(response, settings)
        if rec is not None:
            response.headers["X-Request-ID"] = rec.id
            if not response.is_streamed:
                finish_request(service, rec, response.status_code)
        return response


def _printable(text: str, limit: int = 200) -> str:
    """User-controlled text for a log line: no control characters (no forged log lines), bounded length."""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])


def _endpoint_label() -> str:
    endpoint = request.endpoint or ""
    return {"tts": "tts", "openai_speech": "speech", "openai_voices": "voices", "speakers": "speakers",
            "health": "health", "ready": "ready", "metrics": "metrics", "openapi": "openapi", "page": "page",
            "static": "page"}.get(endpoint, "other")


def finish_request(service: Service, rec: RequestRecord, status: int) -> None:
    """The one log line and the metrics of a request, when its last byte is out (later calls do nothing)."""
    if rec.logged:
        return
    rec.logged = True
    seconds = time.monotonic() - rec.started
    job = rec.job
    audio_s = job.samples / audio.SAMPLE_RATE if job else 0.0
    synth_s = job.synth_seconds if job else 0.0
    rtf = f"{synth_s / audio_s:.3f}" if audio_s > 0 else "-"
    service.metrics.observe_request(rec.endpoint, status, seconds if job else None, chars=rec.chars if job else 0,
                                    audio_seconds=audio_s, synth_seconds=synth_s)
    request_log.info("request id=%s %s %s status=%d speaker=%s chars=%d audio_s=%.2f synth_s=%.2f rtf=%s "
                    "total_s=%.3f format=%s stream=%s outcome=%s", rec.id, rec.method, rec.path, status, rec.speaker,
                    rec.chars, audio_s, synth_s, rtf, seconds, rec.fmt, str(rec.stream).lower(), rec.outcome)


def _add_cors(response: Response, settings: Settings) -> None:
    origins = settings.cors_origin_list
    origin = request.headers.get("Origin", "")
    if not origins or not origin:
        return
    if "*" in origins:
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin.rstrip("/") in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.vary.add("Origin")
    else:
        return
    response.headers["Access-Control-Expose-Headers"] = ("X-Request-ID, Retry-After, X-Audio-Duration, X-Engine, "
                                                        "X-Speaker, Content-Disposition")
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, X-Request-ID"
        response.headers["Access-Control-Max-Age"] = "600"


# ---------------------------------------------------------------------------------------------------------------
# Errors: the one place where exceptions become responses
# ---------------------------------------------------------------------------------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
                415: "invalid_request_error", 500: "server_error", 503: "overloaded_error", 504: "timeout_error"}


def error_response(status: int, message: str, code: str, param: str | None = None, headers: dict | None = None,
                   **extra) -> Response:
    body = {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
            "code": code, **extra}
    response = jsonify({"error": body})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        return error_response(e.status, e.message, e.code, e.param, e.headers, **e.extra)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}
        messages = {404: f"no such endpoint: {request.path} (see /openapi.json)",
                    405: f"{request.method} is not allowed on {request.path}",
                    413: f"request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes"}
        headers = {"Allow": ", ".join(e.valid_methods)} if getattr(e, "valid_methods", None) else None
        return error_response(e.code or 500, messages.get(e.code, e.description or e.name),
                              code.get(e.code, re.sub(r"\W+", "_", e.name.lower())), headers=headers)

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        rec = g.get("rec")
        log.exception("unhandled error (request %s)", rec.id if rec else "-")
        return error_response(500, f"internal error (request id {rec.id if rec else '-'}); see the server log",
                              "internal_error")


# ---------------------------------------------------------------------------------------------------------------
# Request parsing and validation
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SpeechRequest:
    text: str
    speaker: Speaker
    speed: float
    fmt: str
    stream: bool
    normalize: bool


def _read_body(limit: int, timeout: float) -> bytes:
    """The request body, read with two guards that Werkzeug does not give under gunicorn:

    - size: past ``limit`` bytes -> 413. With a Content-Length Werkzeug refuses before reading, but a chunked body
      has none, and there Werkzeug silently stopped at the limit: a valid JSON body just over it was cut and
      answered '400 malformed JSON'. We read one byte past the limit to tell the two apart.
    - time: gunicorn's socket has no timeout, so a client that stopped sending its body (a wrong Content-Length,
      a dead peer, a slowloris) held a request thread for ever; QUEUE_SIZE + 9 of them froze the worker, /health
      included. Now a body that stalls for ``timeout`` seconds is answered 408 and the thread is free again.
    """
    environ = request.environ
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge()
    if not environ.get("wsgi.input_terminated"):  # not gunicorn (e.g. the test client): Werkzeug bounds the stream
        return request.get_data(cache=False)
    sock = environ.get("gunicorn.socket")
    previous = sock.gettimeout() if sock is not None else None
    try:
        if sock is not None:
            sock.settimeout(timeout)  # per read; restored before the response goes out
        raw = environ["wsgi.input"].read(limit + 1)  # gunicorn stops at Content-Length or the last chunk
    except TimeoutError:
        if sock is not None:
            try:  # the rest of the body will never be read: no drain after the 408, the connection closes
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        raise ApiError(408, f"the request body stopped arriving (nothing for {timeout:g} s)",
                       code="body_timeout") from None
    finally:
        if sock is not None:
            try:
                sock.settimeout(previous)
            except OSError:
                pass
    if len(raw) > limit:
        raise RequestEntityTooLarge()
    return raw


def read_json_object(body_timeout: float) -> dict:
    if not request.is_json:
        raise ApiError(415, "send a JSON body with 'Content-Type: application/json'", code="unsupported_media_type")
    raw = _read_body(current_app.config["MAX_CONTENT_LENGTH"], body_timeout)
    try:
        body = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply", code="invalid_json") from None
    except ValueError as e:
        raise ApiError(400, f"malformed JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object", code="invalid_json")
    return body


def _number(value) -> float | None:
    """A finite JSON number as float, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def clean_text(text: str) -> str:
    """Control characters and lone surrogates become spaces: they cannot be spoken and break codecs."""
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in text)


def parse_speech_request(body: dict, service: Service, *, text_key: str, speaker_key: str, format_key: str,
                         default_format: str) -> SpeechRequest:
    settings = service.settings
    text = body.get(text_key)
    if text is None:
        raise ApiError(400, f"'{text_key}' is required", code="missing_text", param=text_key)
    if not isinstance(text, str):
        raise ApiError(400, f"'{text_key}' must be a string", code="invalid_text", param=text_key)
    if len(text) > settings.max_text_chars:
        raise ApiError(413, f"'{text_key}' has {len(text)} characters; the limit is {settings.max_text_chars}",
                       code="text_too_long", param=text_key, max_chars=settings.max_text_chars)
    text = clean_text(text)
    if not text.strip():
        raise ApiError(400, f"'{text_key}' is empty", code="empty_text", param=text_key)

    name = body.get(speaker_key)
    if name is None:
        speaker = service.default_speaker()
    else:
        speaker = service.engine.resolve_speaker(name) if isinstance(name, str) else None
        if speaker is None:
            valid = service.engine.speakers()
            listing = ", ".join(f"{s.id} ({s.alias})" if s.alias != s.id else s.id for s in valid)
            problem = f"unknown {speaker_key} {repr(name)[:80]}" if isinstance(name, str) \
                else f"'{speaker_key}' must be a string"
            raise ApiError(400, f"{problem}; choose one of: {listing}", code="unknown_speaker",
                           param=speaker_key, valid_speakers=[{"id": s.id, "alias": s.alias} for s in valid])

    speed = _number(body.get("speed", 1.0))
    if speed is None or not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise ApiError(400, f"'speed' must be a number from {SPEED_RANGE[0]} to {SPEED_RANGE[1]}", code="invalid_speed",
                       param="speed")

    fmt = body.get(format_key, default_format)
    if not isinstance(fmt, str) or fmt not in audio.FORMATS:  # a list or object is not a format (nor hashable)
        raise ApiError(400, f"'{format_key}' must be one of {', '.join(audio.FORMATS)}", code="invalid_format",
                       param=format_key)
    stream = body.get("stream", False)
    normalize = body.get("normalize", True)
    for key, value in (("stream", stream), ("normalize", normalize)):
        if not isinstance(value, bool):
            raise ApiError(400, f"'{key}' must be true or false", code=f"invalid_{key}", param=key)
    if stream and fmt not in audio.STREAMABLE_FORMATS:
        raise ApiError(400, f"{fmt} cannot be streamed; stream one of {', '.join(audio.STREAMABLE_FORMATS)}",
                       code="invalid_format", param=format_key)
    return SpeechRequest(text, speaker, speed, fmt, stream, normalize)


# ---------------------------------------------------------------------------------------------------------------
# Synthesis responses
# ---------------------------------------------------------------------------------------------------------------

def _client_gone_check(environ):
    """A cheap test of whether the client hung up: its socket reads EOF. (gunicorn exposes the socket.)"""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return lambda: False

    def gone() -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except (OSError, ValueError):
            return True
    return gone


def synthesize_response(service: Service, req: SpeechRequest) -> Response:
    rec: RequestRecord = g.rec
    rec.speaker, rec.chars, rec.fmt, rec.stream = req.speaker.alias, len(req.text), req.fmt, req.stream
    job = Job(req.text, req.speaker, req.speed, req.normalize, request_id=rec.id,
              deadline=rec.started + service.settings.request_timeout,
              client_gone=_client_gone_check(request.environ))
    try:
        service.synth.submit(job)
    except QueueFull as e:
        rec.outcome = "queue_full"
        message = f"the server is busy ({service.synth.capacity} requests in progress); retry in {e.retry_after} s"
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
    if isinstance(e, Cancelled):
        rec.outcome = "client_gone" if e.reason == CLIENT_GONE else e.reason
        return ApiError(499, "client closed the connection", code="client_closed")
    if isinstance(e, SynthesisError):
        rec.outcome = "rejected"
        return ApiError(400, str(e), code="nothing_to_speak", param="text")
    if isinstance(e, EngineFailure):
        rec.outcome = "engine_error"
        return ApiError(500, f"synthesis failed: {e} (request id {rec.id})", code="synthesis_failed")
    return e


# ---------------------------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------------------------

def _register_routes(app: Flask, service: Service) -> None:
    engine = service.engine

    def speaker_json(s: Speaker) -> dict:
        return {"id": s.id, "alias": s.alias, "language": s.language, "engine": s.engine}

    def engine_json() -> dict:
        info = {"engine": engine.name, "description": engine.description}
        if engine.name == "piper":
            info["hint"] = f"Offline fallback voice. For CosyVoice, {GET_COSYVOICE_HINT} and restart."
        return info

    @app.post("/tts")
    def tts():
        body = read_json_object(service.settings.body_timeout)
        req = parse_speech_request(body, service, text_key="text", speaker_key="speaker", format_key="format",
                                   default_format="wav")
        return synthesize_response(service, req)

    @app.post("/v1/audio/speech")
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

    @app.get("/v1/audio/voices")
    def openai_voices():
        return jsonify({"voices": [{"id": s.alias, "name": s.id, "language": s.language} for s in engine.speakers()]})

    @app.get("/speakers")
    def speakers():
        return jsonify({**engine_json(), "default": service.default_speaker().id,
                        "speakers": [speaker_json(s) for s in engine.speakers()]})

    @app.get("/health")
    def health():
        return jsonify({"status": "ok", "engine": engine.name})

    @app.get("/ready")
    def ready():
        synth = service.synth
        if synth.failure:
            return error_response(503, synth.failure, "engine_failed")
        if not synth.ready.is_set():
            return error_response(503, "the model is loading and warming up", "warming_up",
                                  headers={"Retry-After": "2"})
        return jsonify({"status": "ready", **engine_json(), "speakers": len(engine.speakers()),
                        "queue": {"waiting": synth.waiting, "running": synth.running, "max_batch": synth.max_batch,
                                  "capacity": synth.capacity}})

    @app.get("/metrics")
    def metrics():
        text = service.metrics.render(engine.name, service.synth.ready.is_set() and not service.synth.failure,
                                      service.synth.capacity)
        return Response(text, content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json")
    def openapi():
        return jsonify(service.spec)

    @app.get("/")
    def page():
        return send_from_directory(STATIC_DIR, "index.html", max_age=0)
