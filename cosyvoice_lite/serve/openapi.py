"""The OpenAPI 3.0 description served at /openapi.json (limits and speakers filled in from the running service)."""
from __future__ import annotations

from .. import audio
from .schema import SPEED_RANGE

SPEED = {"type": "number", "minimum": SPEED_RANGE[0], "maximum": SPEED_RANGE[1], "default": 1.0}


def _error(description: str) -> dict:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _audio_responses() -> dict:
    content = {ctype.split(";")[0]: {"schema": {"type": "string", "format": "binary"}}
               for ctype, _ in audio.FORMATS.values()}
    return {
        "200": {"description": "24 kHz mono audio. wav/pcm/flac are 16-bit; pcm is raw little-endian samples. "
                               "With stream=true the body is chunked and starts before synthesis ends (a WAV "
                               "header with unknown length, raw PCM, or MP3 frames).",
                "headers": {"X-Request-ID": {"schema": {"type": "string"}},
                            "X-Audio-Duration": {"schema": {"type": "string"},
                                                 "description": "seconds (absent when streaming)"}},
                "content": content},
        "400": _error("Invalid request: bad JSON, missing/empty/non-string text, unknown speaker (the error lists "
                      "the valid ones), bad speed or format, nothing to speak"),
        "401": _error("API_KEY is set and the bearer token is missing or wrong"),
        "408": _error("The request body stopped arriving for BODY_TIMEOUT seconds"),
        "413": _error("Text longer than MAX_TEXT_CHARS, body larger than MAX_BODY_BYTES, or more speech than "
                      "REQUEST_TIMEOUT (not streamed) or MAX_AUDIO_SECONDS allow"),
        "415": _error("The body is not JSON"),
        "500": _error("Synthesis failed inside the engine (a bug; see the server log)"),
        "503": _error("The queue is full; retry after the Retry-After header's seconds"),
        "504": _error("Synthesis did not finish within REQUEST_TIMEOUT"),
    }


def openapi_spec(settings, engine) -> dict:
    names = []
    for s in engine.speakers():
        names += [s.id] if s.alias == s.id else [s.id, s.alias]
    text = {"type": "string", "minLength": 1, "maxLength": settings.max_text_chars}
    formats = list(audio.FORMATS)
    secured = [{"bearer": []}] if settings.api_key else []
    json_body = lambda ref: {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}  # noqa: E731
    simple = lambda ref, description: {"200": {"description": description, "content": {  # noqa: E731
        "application/json": {"schema": {"$ref": ref}}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "cosyvoice-lite", "version": "1.0.0",
                 "description": "CPU text-to-speech with CosyVoice-300M-SFT (or the offline Piper voice when no "
                                f"model is present). Serving engine: {engine.name}."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type", "code"],
                    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                   "param": {"type": "string", "nullable": True}, "code": {"type": "string"}}}}},
                "TtsRequest": {"type": "object", "required": ["text"], "properties": {
                    "text": text,
                    "speaker": {"type": "string", "enum": names, "description": "speaker id or alias (GET /speakers); "
                                                                               "default: the first speaker"},
                    "speed": SPEED,
                    "format": {"type": "string", "enum": formats, "default": "wav"},
                    "stream": {"type": "boolean", "default": False,
                               "description": f"chunked streaming; formats {', '.join(audio.STREAMABLE_FORMATS)}"},
                    "normalize": {"type": "boolean", "default": True,
                                  "description": "text normalisation (numbers, dates, ...)"}}},
                "SpeechRequest": {"type": "object", "required": ["input"], "properties": {
                    "model": {"type": "string", "description": "accepted and ignored (one model is served)"},
                    "input": text,
                    "voice": {"type": "string", "enum": names, "description": "see GET /v1/audio/voices"},
                    "response_format": {"type": "string", "enum": formats, "default": "mp3"},
                    "speed": SPEED,
                    "instructions": {"type": "string", "description": "accepted and ignored"},
                    "stream_format": {"type": "string", "enum": ["audio"], "default": "audio"},
                    "stream": {"type": "boolean", "default": False, "description": "extension: chunked streaming"},
                    "normalize": {"type": "boolean", "default": True, "description": "extension: text normalisation"}}},
                "Speaker": {"type": "object", "properties": {
                    "id": {"type": "string"}, "alias": {"type": "string"}, "language": {"type": "string"},
                    "engine": {"type": "string"}}},
                "Speakers": {"type": "object", "properties": {
                    "engine": {"type": "string"}, "description": {"type": "string"}, "default": {"type": "string"},
                    "speakers": {"type": "array", "items": {"$ref": "#/components/schemas/Speaker"}}}},
                "Voices": {"type": "object", "properties": {"voices": {"type": "array", "items": {
                    "type": "object", "properties": {"id": {"type": "string"}, "name": {"type": "string"}}}}}},
                "Status": {"type": "object", "properties": {"status": {"type": "string"},
                                                            "engine": {"type": "string"}}},
            },
        },
        "paths": {
            "/tts": {"post": {"summary": "Text to speech", "operationId": "tts", "security": secured,
                              "requestBody": json_body("#/components/schemas/TtsRequest"),
                              "responses": _audio_responses()}},
            "/v1/audio/speech": {"post": {"summary": "OpenAI-compatible text to speech", "operationId": "speech",
                                          "security": secured,
                                          "requestBody": json_body("#/components/schemas/SpeechRequest"),
                                          "responses": _audio_responses()}},
            "/v1/audio/voices": {"get": {"summary": "Voices for the OpenAI endpoint", "operationId": "voices",
                                         "security": secured,
                                         "responses": simple("#/components/schemas/Voices", "voices")}},
            "/speakers": {"get": {"summary": "Speakers of the loaded model", "operationId": "speakers",
                                  "security": secured,
                                  "responses": simple("#/components/schemas/Speakers", "speakers")}},
            "/health": {"get": {"summary": "Liveness", "operationId": "health", "security": [],
                                "responses": simple("#/components/schemas/Status", "alive")}},
            "/ready": {"get": {"summary": "Readiness (503 until the model is loaded and warmed up)",
                               "operationId": "ready", "security": [],
                               "responses": {**simple("#/components/schemas/Status", "ready"),
                                             "503": _error("loading or warming up")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics", "security": secured,
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi", "security": secured,
                                      "responses": {"200": {"description": "OpenAPI 3.0",
                                                            "content": {"application/json": {"schema": {
                                                                "type": "object"}}}}}}},
            "/": {"get": {"summary": "Web page", "operationId": "page", "security": [],
                          "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {
                              "type": "string"}}}}}}},
        },
    }
