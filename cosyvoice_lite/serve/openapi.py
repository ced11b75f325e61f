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


# The upload routes (a voice from a clip, voice conversion) read their form in serve/body.py's read_upload, not
# through a model: a multipart form, or JSON with the file base64-encoded; every other field is a string.
BASE64 = r"^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def _upload(fields: dict, file_description: str, multipart_extra: dict | None = None, **json_extra) -> dict:
    strings = {"type": ["string", "null"]}  # JSON: a null field is an absent one
    multipart = {"type": "object", "required": ["file"], **(multipart_extra or {}), "properties": {
        "file": {"type": "string", "format": "binary", "description": file_description},
        **{k: {"type": "string", **v} for k, v in fields.items()}}}
    json_form = {"type": "object", "required": ["file"], "additionalProperties": strings, **json_extra, "properties": {
        "file": {"type": "string", "pattern": BASE64, "contentEncoding": "base64", "description": file_description},
        **{k: {"anyOf": [{"type": "string", **v}, {"type": "null"}]} for k, v in fields.items()}}}
    return {"required": True, "content": {"multipart/form-data": {"schema": multipart},
                                          "application/json": {"schema": json_form}}}


def _voice_routes(service, secured: list) -> dict:
    """POST /v1/audio/voices, GET and DELETE /v1/audio/voices/{voice_id}, POST /vc: what the model offers decides
    whether they answer (400 unsupported_mode where it cannot clone or convert)."""
    voice_id = [{"name": "voice_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    saved = {"$ref": REF.format(model="SavedVoice")}
    refused = _error("The model cannot make voices (unsupported_mode), or the clip cannot be used")
    return {
        "/v1/audio/voices/{voice_id}": {
            "get": {"summary": "A saved voice", "operationId": "get_voice", "security": secured,
                    "parameters": voice_id,
                    "responses": {"200": {"description": "the voice", "content": {"application/json": {
                        "schema": saved}}}, "400": refused, "404": _error("no such saved voice")}},
            "delete": {"summary": "Delete a saved voice", "operationId": "delete_voice", "security": secured,
                       "parameters": voice_id,
                       "responses": {"200": {"description": "deleted", "content": {"application/json": {"schema": {
                           "type": "object", "required": ["id", "object", "deleted"], "properties": {
                               "id": {"type": "string"}, "object": {"const": "voice"},
                               "deleted": {"const": True}}}}}},
                           "400": refused, "404": _error("no such saved voice")}}},
        "/vc": {"post": {"summary": "Voice conversion: a source clip spoken again with a voice",
                         "operationId": "convert", "security": secured,
                         "requestBody": _upload({"voice": {**schema.voice_names(service), "description": (
                                                     "a voice name or a saved voice's id; default: the first")},
                                                 "format": {"enum": list(audio.FORMATS)},
                                                 "response_format": {"enum": list(audio.FORMATS),
                                                                     "description": "when format is absent"},
                                                 "stream": {"enum": ["true", "false"]}}, "the source clip",
                                                # opus and flac cannot be streamed; in the multipart form as
                                                # anyOf (schemathesis 4.32.5's coverage phase fails on if/then or
                                                # not beside a binary field: "Unsupported type: 'Binary'")
                                                multipart_extra={"anyOf": [
                                                    {"properties": {"stream": {"const": "false"}}},
                                                    {"properties": {k: {"enum": list(audio.STREAMABLE_FORMATS)}
                                                                    for k in ("format", "response_format")}}]},
                                                **{"if": {"required": ["stream"], "properties": {
                                                    "stream": {"const": "true"}}},
                                                   "then": {"properties": {k: {"enum": list(audio.STREAMABLE_FORMATS)}
                                                                           for k in ("format", "response_format")}}}),
                         "responses": {**_audio_responses(), "400": refused}}},
    }


def openapi_spec(service) -> dict:
    settings, engine = service.settings, service.engine
    tts, speech = schema.models(service)
    models = [(tts, "validation"), (speech, "validation"),
              *((m, "serialization") for m in (schema.Error, schema.Speakers, schema.Voices, schema.Model,
                                               schema.Models, schema.Status, schema.SpeechAudioDeltaEvent,
                                               schema.SpeechAudioDoneEvent, schema.SavedVoice))]
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
            "/v1/audio/voices": {
                "get": {"summary": "Voices for the OpenAI endpoint", "operationId": "voices", "security": secured,
                        "responses": _json("Voices", "voices")},
                "post": {"summary": "A voice of your own from a reference clip", "operationId": "create_voice",
                         "security": secured,
                         "requestBody": _upload({"text": {"description": "the clip's transcript (zero-shot); "
                                                                         "without it, cross-lingual"},
                                                 "name": {"description": "a readable name"}},
                                                "the reference clip (3-30 s of speech)"),
                         "responses": {"201": {"description": "the saved voice", "content": {"application/json": {
                             "schema": {"$ref": REF.format(model="SavedVoice")}}}},
                             "400": _error("The model cannot make voices (unsupported_mode), no clip "
                                           "(missing_audio), or the clip cannot be used"),
                             "413": _error("Upload larger than MAX_UPLOAD_BYTES"),
                             "415": _error("Neither multipart/form-data nor JSON"),
                             "503": _error("The voice store is not available")}}},
            **_voice_routes(service, secured),
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
