"""The OpenAPI 3.0 description served at /openapi.json (limits and speakers filled in from the running service)."""
from __future__ import annotations

from .. import audio
from .openai import model_ids
from .schema import SEED_MAX, SPEED_RANGE

# Every optional field may be null, meaning its default.
SPEED = {"type": "number", "minimum": SPEED_RANGE[0], "maximum": SPEED_RANGE[1], "default": 1.0, "nullable": True}
CACHE = {"type": "boolean", "default": True, "nullable": True,
         "description": "false: neither read nor write the sentence-level audio cache for this request"}
SEED = {"type": "integer", "minimum": 0, "maximum": SEED_MAX, "nullable": True,
        "description": "CosyVoice: the same text, speaker and seed give the same audio (its speech tokens are "
                       "sampled); a seeded request bypasses the audio cache. The offline voice ignores it"}


def _error(description: str) -> dict:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _audio_responses(sse: bool = False) -> dict:
    content = {ctype.split(";")[0]: {"schema": {"type": "string", "format": "binary"}}
               for ctype, _ in audio.FORMATS.values()}
    if sse:  # OpenAPI 3.0: the schema of one event; its data is the JSON of SpeechAudioDeltaEvent or ...DoneEvent
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
        "400": _error("Invalid request: bad JSON, missing/empty/non-string text, unknown speaker (the error lists "
                      "the valid ones), bad speed or format, nothing to speak, text the engine cannot read (the "
                      "offline English voice and text without Latin letters or digits)"),
        "401": _error("API_KEY is set and the bearer token is missing or wrong"),
        "408": _error("The request body stopped arriving for BODY_TIMEOUT seconds"),
        "413": _error("Text longer than MAX_TEXT_CHARS, body larger than MAX_BODY_BYTES, or more speech than "
                      "REQUEST_TIMEOUT (not streamed) or MAX_AUDIO_SECONDS allow"),
        "415": _error("The body is not JSON"),
        "500": _error("Synthesis failed inside the engine (a bug; see the server log)"),
        "503": _error("The queue is full; retry after the Retry-After header's seconds"),
        "504": _error("Synthesis did not finish within REQUEST_TIMEOUT"),
    }


def openapi_spec(service) -> dict:
    settings, engine = service.settings, service.engine
    names = []
    for v in service.voices.voices:
        names += [v.id] if v.name == v.id else [v.id, v.name]
    voices = names + list(service.voices.mapped)
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
                    "speaker": {"type": "string", "enum": names, "nullable": True,
                                "description": "speaker id or alias (GET /speakers); default: the first speaker"},
                    "speed": SPEED,
                    "format": {"type": "string", "enum": formats, "default": "wav", "nullable": True},
                    "stream": {"type": "boolean", "default": False, "nullable": True,
                               "description": f"chunked streaming; formats {', '.join(audio.STREAMABLE_FORMATS)}"},
                    "normalize": {"type": "boolean", "default": True, "nullable": True,
                                  "description": "text normalisation (numbers, dates, ...)"},
                    "cache": CACHE, "seed": SEED}},
                "SpeechRequest": {"type": "object", "required": ["input"], "properties": {
                    "model": {"type": "string", "nullable": True,
                              "description": f"accepted and ignored: one engine serves every model name "
                                             f"(GET /v1/models lists {', '.join(model_ids(engine))})"},
                    "input": text,
                    "voice": {"type": "string", "enum": voices, "nullable": True,
                              "description": "a speaker id or alias, or an OpenAI voice name mapped by VOICE_MAP "
                                             "(GET /v1/audio/voices)"},
                    "response_format": {"type": "string", "enum": formats, "default": "mp3", "nullable": True,
                                        "description": "aac is not available (400)"},
                    "speed": SPEED,
                    "instructions": {"type": "string", "nullable": True,
                                     "description": "not supported by this model: a non-empty value is a 400"},
                    "stream_format": {"type": "string", "enum": ["audio", "sse"], "default": "audio",
                                      "nullable": True,
                                      "description": "sse: speech.audio.delta / speech.audio.done events"},
                    "stream": {"type": "boolean", "default": True, "nullable": True,
                               "description": "extension: false sends the whole file at the end; wav, pcm and mp3 "
                                              "stream by default, opus and flac come whole"},
                    "normalize": {"type": "boolean", "default": True, "nullable": True,
                                  "description": "extension: text normalisation"},
                    "cache": CACHE, "seed": SEED}},
                "Speaker": {"type": "object", "properties": {
                    "id": {"type": "string"}, "alias": {"type": "string"}, "language": {"type": "string"},
                    "engine": {"type": "string"}}},
                "Speakers": {"type": "object", "properties": {
                    "engine": {"type": "string"}, "description": {"type": "string"}, "default": {"type": "string"},
                    "speakers": {"type": "array", "items": {"$ref": "#/components/schemas/Speaker"}}}},
                "Voices": {"type": "object", "properties": {"voices": {"type": "array", "items": {
                    "type": "object", "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                                     "language": {"type": "string"},
                                                     "speaker": {"type": "string"}}}}}},
                "SpeechAudioDeltaEvent": {"type": "object", "required": ["type", "audio"], "properties": {
                    "type": {"type": "string", "enum": ["speech.audio.delta"]},
                    "audio": {"type": "string", "format": "byte", "description": "the next bytes of the file"}}},
                "SpeechAudioDoneEvent": {"type": "object", "required": ["type", "usage"], "properties": {
                    "type": {"type": "string", "enum": ["speech.audio.done"]},
                    "usage": {"type": "object", "required": ["input_tokens", "output_tokens", "total_tokens"],
                              "description": "no tokens are billed: input_tokens counts the input's characters",
                              "properties": {"input_tokens": {"type": "integer"},
                                             "output_tokens": {"type": "integer"},
                                             "total_tokens": {"type": "integer"}}}}},
                "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
                    "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
                    "created": {"type": "integer"}, "owned_by": {"type": "string"}}},
                "Models": {"type": "object", "required": ["object", "data"], "properties": {
                    "object": {"type": "string", "enum": ["list"]},
                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}},
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
                                          "responses": _audio_responses(sse=True)}},
            "/v1/audio/voices": {"get": {"summary": "Voices for the OpenAI endpoint", "operationId": "voices",
                                         "security": secured,
                                         "responses": simple("#/components/schemas/Voices", "voices")}},
            "/v1/models": {"get": {"summary": "Models (OpenAI shape): one engine serves them all",
                                   "operationId": "models", "security": secured,
                                   "responses": simple("#/components/schemas/Models", "models")}},
            "/v1/models/{model}": {"get": {"summary": "One model", "operationId": "model", "security": secured,
                                           "parameters": [{"name": "model", "in": "path", "required": True,
                                                           "schema": {"type": "string"}}],
                                           "responses": {**simple("#/components/schemas/Model", "model"),
                                                         "404": _error("no such model")}}},
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
