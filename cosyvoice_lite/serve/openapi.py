"""/openapi.json: the bodies' JSON schemas are generated from schema.py's models (the ones that validate), with this
service's limits and names; the paths and statuses are assembled here."""
from __future__ import annotations

from pydantic.json_schema import models_json_schema

from .. import audio
from . import schema

REF = "#/components/schemas/{model}"
ERROR = {"$ref": REF.format(model="Error")}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


def _json(model: str, description: str) -> dict:
    return {"200": {"description": description, "content": {"application/json": {"schema": {
        "$ref": REF.format(model=model)}}}}}


def _audio_responses(sse: bool = False) -> dict:
    content = {ctype.split(";")[0]: {"schema": {"type": "string", "format": "binary"}}
               for ctype, _ in audio.FORMATS.values()}
    if sse:  # the schema of one event (as schemathesis reads it); its data is the JSON of a schema.SpeechAudio*Event
        content["text/event-stream"] = {"schema": {"type": "object", "required": ["data"], "properties": {
            "data": {"type": "string", "description": "JSON: a SpeechAudioDeltaEvent or a SpeechAudioDoneEvent"},
            "event": {"type": "string"}}}}
    return {
        "200": {"description": "24 kHz mono audio. wav/pcm/flac are 16-bit; pcm is raw little-endian samples. "
                               "Streamed (stream=true; the default of /v1/audio/speech for wav, pcm and mp3), the "
                               "body is chunked and starts before synthesis ends (a WAV header with unknown "
                               "length, raw PCM, or MP3 frames). With stream_format=sse (/v1/audio/speech) it is "
                               "text/event-stream: speech.audio.delta events (base64 audio), then one "
                               "speech.audio.done event.",
                "headers": {"X-Request-ID": {"schema": {"type": "string"}},
                            "X-Audio-Duration": {"schema": {"type": "string"},
                                                 "description": "seconds (absent when streaming)"},
                            "X-Cache": {"schema": {"type": "string", "enum": ["hit", "partial", "miss", "off"]},
                                        "description": "sentences found in the audio cache before the first "
                                                       "byte: all, some, none; off = not looked up"}},
                "content": content},
        "400": _error("Invalid request: bad JSON, a field that breaks the request schema (the error's code and "
                      "param name it: missing_text, text_too_long, unknown_speaker with the valid ones, "
                      "invalid_speed, ...), or text the engine cannot speak (unreadable_text: the offline English "
                      "voice and text without Latin letters or digits; nothing_to_speak)"),
        "401": _error("API_KEY is set and the bearer token is missing or wrong"),
        "408": _error("The request body stopped arriving for BODY_TIMEOUT seconds"),
        "413": _error("Body larger than MAX_BODY_BYTES, or more speech than REQUEST_TIMEOUT (not streamed) or "
                      "MAX_AUDIO_SECONDS allow"),
        "415": _error("The body is not JSON"),
        "500": _error("Synthesis failed inside the engine (a bug; see the server log)"),
        "503": _error("The queue is full; retry after the Retry-After header's seconds"),
        "504": _error("Synthesis did not finish within REQUEST_TIMEOUT"),
    }


def openapi_spec(service) -> dict:
    settings, engine = service.settings, service.engine
    tts, speech = schema.models(service)
    models = [(tts, "validation"), (speech, "validation"),
              *((m, "serialization") for m in (schema.Error, schema.Speakers, schema.Voices, schema.Model,
                                               schema.Models, schema.Status, schema.SpeechAudioDeltaEvent,
                                               schema.SpeechAudioDoneEvent))]
    _, defs = models_json_schema(models, ref_template=REF)
    secured = [{"bearer": []}] if settings.api_key else []

    def body(model: str) -> dict:
        return {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "cosyvoice-lite", "version": "1.0.0",
                 "description": "CPU text-to-speech with CosyVoice-300M-SFT (or the offline Piper voice when no "
                                f"model is present). Serving engine: {engine.name}."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                       "schemas": defs["$defs"]},
        "paths": {
            "/tts": {"post": {"summary": "Text to speech", "operationId": "tts", "security": secured,
                              "requestBody": body("TtsRequest"), "responses": _audio_responses()}},
            "/v1/audio/speech": {"post": {"summary": "OpenAI-compatible text to speech", "operationId": "speech",
                                          "security": secured, "requestBody": body("SpeechRequest"),
                                          "responses": _audio_responses(sse=True)}},
            "/v1/audio/voices": {"get": {"summary": "Voices for the OpenAI endpoint", "operationId": "voices",
                                         "security": secured, "responses": _json("Voices", "voices")}},
            "/v1/models": {"get": {"summary": "Models (OpenAI shape): one engine serves them all",
                                   "operationId": "models", "security": secured,
                                   "responses": _json("Models", "models")}},
            "/v1/models/{model}": {"get": {"summary": "One model", "operationId": "model", "security": secured,
                                           "parameters": [{"name": "model", "in": "path", "required": True,
                                                           "schema": {"type": "string"}}],
                                           "responses": {**_json("Model", "model"),
                                                         "404": _error("no such model")}}},
            "/speakers": {"get": {"summary": "Speakers of the loaded model", "operationId": "speakers",
                                  "security": secured, "responses": _json("Speakers", "speakers")}},
            "/health": {"get": {"summary": "Liveness", "operationId": "health", "security": [],
                                "responses": _json("Status", "alive")}},
            "/ready": {"get": {"summary": "Readiness (503 until the model is loaded and warmed up)",
                               "operationId": "ready", "security": [],
                               "responses": {**_json("Status", "ready"), "503": _error("loading or warming up")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics", "security": secured,
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi", "security": secured,
                                      "responses": {"200": {"description": "OpenAPI 3.1",
                                                            "content": {"application/json": {"schema": {
                                                                "type": "object"}}}}}}},
            "/": {"get": {"summary": "Web page", "operationId": "page", "security": [],
                          "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {
                              "type": "string"}}}}}}},
        },
    }
