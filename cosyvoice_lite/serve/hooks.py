"""What every request goes through: its id, the API key, CORS headers, and its log line when it ends."""
from __future__ import annotations

import hmac
import re
import time
import uuid

from flask import Flask, Response, g, request

from ..service import SynthesisService
from ..service.metrics import OTHER
from .context import RequestRecord, finish_request
from .errors import ApiError
from ..settings import Settings

PUBLIC_ENDPOINTS = {"api.health", "api.ready", "api.page", "api.favicon", "static"}  # reachable without API_KEY
# HTTP routes (view names) -> what /metrics counts them as (service.metrics.Metrics.ENDPOINTS)
ENDPOINT_LABELS = {
    "tts": "tts", "openai_speech": "speech", "convert": "vc", "openai_voices": "voices", "create_voice": "voices",
    "get_voice": "voices", "delete_voice": "voices", "openai_models": "models", "openai_model": "models",
    "speakers": "speakers", "health": "health", "ready": "ready", "metrics": "metrics", "openapi": "openapi",
    "page": "page", "static": "page", "favicon": "page",
}


def endpoint_label(endpoint: str | None) -> str:
    """The label of a route, by its name with or without the blueprint ('api.tts' and 'tts' -> 'tts');
    an unknown or missing route (404) -> 'other'."""
    return ENDPOINT_LABELS.get((endpoint or "").rsplit(".", 1)[-1], OTHER)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def register_hooks(app: Flask, service: SynthesisService) -> None:
    settings = service.settings

    @app.before_request
    def begin():
        service.admission.ensure_started()
        rid = request.headers.get("X-Request-ID", "")
        g.rec = RequestRecord(id=rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex[:16], method=request.method,
                              path=_printable(request.path), endpoint=endpoint_label(request.endpoint),
                              started=time.monotonic())
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
            if not response.is_streamed:  # a stream's own close writes its line (serve/routes.py)
                finish_request(service, rec, response.status_code)
        return response



def _printable(text: str, limit: int = 200) -> str:
    """User-controlled text for a log line: no control characters (no forged log lines), bounded length."""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])


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
                                                        "X-Speaker, X-Cache, Content-Disposition")
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, X-Request-ID"
        response.headers["Access-Control-Max-Age"] = "600"
