"""The HTTP API's bodies as pydantic models: the same classes validate the requests of /tts and /v1/audio/speech and
generate /openapi.json (openapi.py), so that the document and the behaviour cannot disagree.

Limits that come from the running service (MAX_TEXT_CHARS, the speaker and voice names) are filled in by
``tts_model`` / ``speech_model``, which make (once per value, cached) the class that validates and is documented.
pydantic's errors become the API's error codes in ``_api_error``; what no JSON schema can say (the speaker lookup,
text the engine cannot read) is checked after the model, in ``parse_tts`` / ``parse_openai_speech``."""
from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, create_model,
                      model_validator)
from pydantic_core import PydanticCustomError

from .. import audio
from ..service import ServiceError, SynthesisRequest, SynthesisService, clean_text
from ..voices.store import ID_PATTERN
from .errors import ApiError

SPEED_RANGE = (0.25, 4.0)
SEED_MAX = 2**63 - 1
MAX_INSTRUCTIONS_CHARS = 1000
WHOLE_FORMATS = [f for f in audio.FORMATS if f not in audio.STREAMABLE_FORMATS]  # opus, flac: sent whole only

# Text must have something besides whitespace and control characters (Cc, which become spaces; so do lone
# surrogates, which no JSON schema regex can name). The same pattern validates (Python's re) and is published.
SPEAKABLE = r"[^\s\x00-\x1f\x7f-\x9f]"
BLANK = r"^\s*$"

Format = Literal[tuple(audio.FORMATS)]
Speed = Annotated[float, Field(ge=SPEED_RANGE[0], le=SPEED_RANGE[1], allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description=(
    "CosyVoice: the same text, speaker and seed give the same audio (its speech tokens are sampled); a seeded "
    "request streams in the official chunk sizes, whatever the server's speed, and bypasses the audio cache. The "
    "offline voice ignores it")),
    # JSON Schema's integer is any number without a fraction (7.0 too): read such a number as that integer
    BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]
CACHE = "false: neither read nor write the sentence-level audio cache for this request"
INSTRUCTIONS = ("how to speak, in words (CosyVoice-300M-Instruct); a model without instructions accepts only "
                "blank, as its pattern says")


def _streamed_whole_format(stream_key: str, format_key: str, **unless) -> dict:
    """JSON schema: stream true with a format that cannot be streamed (opus, flac) is refused."""
    properties = {stream_key: {"const": True}, format_key: {"enum": WHOLE_FORMATS}, **unless}
    return {"not": {"required": [stream_key, format_key], "properties": properties}}


class Body(BaseModel):
    """Strict JSON types (no "1" for 1, no true for 1); unknown fields are ignored, as OpenAI clients send more."""
    model_config = ConfigDict(strict=True, extra="ignore", regex_engine="python-re")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, body: Any) -> Any:
        """Every optional field may be null, meaning its default (documented: each is ``X | None``). Text is
        cleaned here (control characters and lone surrogates become spaces); lone surrogates elsewhere become
        U+FFFD, since pydantic refuses them in any string."""
        if not isinstance(body, dict):
            return body
        return {k: _scrub(body[k], k in cls.TEXT_FIELDS) for k in cls.model_fields if body.get(k) is not None}

    TEXT_FIELDS: ClassVar[tuple[str, ...]] = ()


def _scrub(value, text: bool = False):
    if isinstance(value, str):
        return clean_text(value) if text else value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    return value


class TtsRequest(Body):
    """POST /tts."""
    model_config = ConfigDict(json_schema_extra=_streamed_whole_format("stream", "format"))
    TEXT_FIELDS: ClassVar[tuple[str, ...]] = ("text",)

    text: Annotated[str, Field(min_length=1, pattern=SPEAKABLE)]  # maxLength: MAX_TEXT_CHARS (tts_model)
    speaker: str | None = Field(None, description="speaker id or alias (GET /speakers; aliases in any case), or a "
                                                  "saved voice's id; default: the first speaker (a model without "
                                                  "built-in speakers has none: 400 speaker_required)")
    speed: Speed | None = 1.0
    format: Format | None = "wav"
    stream: bool | None = Field(False, description="chunked streaming; formats "
                                                   + ", ".join(audio.STREAMABLE_FORMATS))
    normalize: bool | None = Field(True, description="text normalisation (numbers, dates, ...)")
    cache: bool | None = Field(True, description=CACHE)
    seed: Seed | None = None
    instructions: Annotated[str, Field(max_length=MAX_INSTRUCTIONS_CHARS)] | None = Field("", description=INSTRUCTIONS)

    @model_validator(mode="after")
    def _streamable(self):
        if self.stream and self.format in WHOLE_FORMATS:
            raise PydanticCustomError("whole_format", "{fmt} cannot be streamed", {"fmt": self.format})
        return self


class VoiceRef(BaseModel):
    """OpenAI's custom voice reference: {"id": name}."""
    model_config = ConfigDict(strict=True, extra="forbid")
    id: str


class SpeechRequest(Body):
    """POST /v1/audio/speech (OpenAI's request; stream, normalize, cache and seed are extensions)."""
    model_config = ConfigDict(json_schema_extra={"allOf": [
        # sse streams events whatever the format; stream false contradicts it
        {"not": {"required": ["stream_format", "stream"],
                 "properties": {"stream_format": {"const": "sse"}, "stream": {"const": False}}}},
        _streamed_whole_format("stream", "response_format", stream_format={"not": {"const": "sse"}})]})
    TEXT_FIELDS: ClassVar[tuple[str, ...]] = ("input",)

    model: str | None = Field(None, description="accepted and ignored: one engine serves every model name "
                                                "(GET /v1/models)")
    input: Annotated[str, Field(min_length=1, pattern=SPEAKABLE)]  # maxLength: MAX_TEXT_CHARS (speech_model)
    voice: str | VoiceRef | None = Field(None, description="a speaker id or alias, or an OpenAI voice name mapped "
                                                           "by VOICE_MAP (GET /v1/audio/voices)")
    response_format: Format | None = Field("mp3", description="aac is not available (400)")
    speed: Speed | None = 1.0
    instructions: Annotated[str, Field(max_length=MAX_INSTRUCTIONS_CHARS)] | None = Field("", description=INSTRUCTIONS)
    stream_format: Literal["audio", "sse"] | None = Field(
        "audio", description="sse: speech.audio.delta / speech.audio.done events")
    stream: bool | None = Field(True, description="extension: false sends the whole file at the end; wav, pcm and "
                                                  "mp3 stream by default, opus and flac come whole")
    normalize: bool | None = Field(True, description="extension: text normalisation")
    cache: bool | None = Field(True, description=CACHE)
    seed: Seed | None = None

    @model_validator(mode="after")
    def _streamable(self):
        if self.stream_format == "sse" and "stream" in self.model_fields_set and not self.stream:
            raise PydanticCustomError("sse_not_streamed", "stream_format 'sse' streams events")
        if self.stream_format != "sse" and self.stream and "stream" in self.model_fields_set \
                and self.response_format in WHOLE_FORMATS:
            raise PydanticCustomError("whole_format", "{fmt} cannot be streamed", {"fmt": self.response_format})
        return self


def _named(names: tuple[str, ...], saved: bool) -> Any:
    """A voice field's schema: the names the service knows, and (where the model makes voices) the form of a saved
    voice's id. The lookup itself is the service's (``_voice``), in which names match case-insensitively."""
    saved_id = {"type": "string", "pattern": ID_PATTERN.pattern}
    if not names:  # a model without built-in speakers (the base model): saved voices only
        return WithJsonSchema(saved_id if saved else {"type": "string"})
    listed = {"type": "string", "enum": list(names)}
    return WithJsonSchema({"anyOf": [listed, saved_id]} if saved else listed)


def _instructions(offered: bool) -> Any:
    """Instructions of at most MAX_INSTRUCTIONS_CHARS; on a model without them, blank only."""
    return Annotated[str, Field(max_length=MAX_INSTRUCTIONS_CHARS, **({} if offered else {"pattern": BLANK}))] | None


@lru_cache(maxsize=8)
def tts_model(max_chars: int, speakers: tuple[str, ...], saved: bool, instructions: bool) -> type[TtsRequest]:
    """TtsRequest with this service's MAX_TEXT_CHARS, voice names and offers."""
    return create_model(
        "TtsRequest", __base__=TtsRequest,
        text=(Annotated[str, Field(min_length=1, max_length=max_chars, pattern=SPEAKABLE)], ...),
        speaker=(Annotated[str, _named(speakers, saved)] | None, TtsRequest.model_fields["speaker"]),
        instructions=(_instructions(instructions), TtsRequest.model_fields["instructions"]))


@lru_cache(maxsize=8)
def speech_model(max_chars: int, voices: tuple[str, ...], saved: bool, instructions: bool) -> type[SpeechRequest]:
    """SpeechRequest with this service's MAX_TEXT_CHARS, voice names (speakers, then VOICE_MAP names) and offers."""
    ref = create_model("VoiceRef", __base__=VoiceRef, id=(Annotated[str, _named(voices, saved)], ...))
    return create_model(
        "SpeechRequest", __base__=SpeechRequest,
        input=(Annotated[str, Field(min_length=1, max_length=max_chars, pattern=SPEAKABLE)], ...),
        voice=(Annotated[str, _named(voices, saved)] | ref | None, SpeechRequest.model_fields["voice"]),
        instructions=(_instructions(instructions), SpeechRequest.model_fields["instructions"]))


def voice_names(service: SynthesisService) -> dict:
    """The JSON schema of a voice name on the upload routes (POST /vc), as on /v1/audio/speech."""
    return _named(_names(service.voices, mapped=True), service.store is not None).json_schema


def _names(voices, mapped: bool) -> tuple[str, ...]:
    """The names a voice field accepts: each voice's id and readable name, then (``mapped``) the VOICE_MAP names."""
    names = []
    for v in voices.voices:
        names += [v.id] if v.name == v.id else [v.id, v.name]
    return tuple(names + (list(voices.mapped) if mapped else []))


def models(service: SynthesisService) -> tuple[type[TtsRequest], type[SpeechRequest]]:
    """The two request models of this service: they validate its requests and are its /openapi.json."""
    max_chars, offers = service.settings.max_text_chars, service.engine.offers
    saved = service.store is not None  # saved voices are looked up by id
    return (tts_model(max_chars, _names(service.voices, mapped=False), saved, offers.instructions),
            speech_model(max_chars, _names(service.voices, mapped=True), saved, offers.instructions))


# ---- parsing: the model, then what no schema says ------------------------------------------------------------

def parse_tts(body: dict, service: SynthesisService) -> SynthesisRequest:
    """POST /tts's body -> the request, or ApiError (400) with the field's code."""
    req = _validate(models(service)[0], body, service, ROLES_TTS)
    voice = _voice(req.speaker, "speaker", service, mapped=False)
    _readable(req.text, "text", service)
    return SynthesisRequest(req.text, voice, req.speed, req.format, req.stream, seed=req.seed, cache=req.cache,
                            normalize=req.normalize, instructions=req.instructions)


def parse_openai_speech(body: dict, service: SynthesisService) -> SynthesisRequest:
    """POST /v1/audio/speech's body -> the request, or ApiError (400) with the field's code."""
    req = _validate(models(service)[1], body, service, ROLES_SPEECH)
    voice = _voice(req.voice.id if isinstance(req.voice, VoiceRef) else req.voice, "voice", service, mapped=True)
    _readable(req.input, "input", service)
    sse = req.stream_format == "sse"
    # streamed by default only in the formats that stream; events stream whatever the format
    stream = sse or (req.stream if "stream" in req.model_fields_set else req.response_format in
                     audio.STREAMABLE_FORMATS)
    return SynthesisRequest(req.input, voice, req.speed, req.response_format, stream, sse=sse, seed=req.seed,
                            cache=req.cache, normalize=req.normalize, instructions=req.instructions)


def _validate(model: type[Body], body: dict, service, roles: dict) -> Body:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _api_error(e.errors(include_url=False)[0], body, service, roles) from None


def _voice(name: str | None, key: str, service, mapped: bool):
    """The voice by name: the speaker lookup is the service's (names match case-insensitively), not the schema's."""
    if name is None:
        try:
            return service.default_voice(key)
        except ServiceError as e:  # a model without built-in speakers: a voice must be named
            raise ApiError(e.status, e.message, code=e.code, param=e.param) from None
    voice = service.find_voice(name, mapped=mapped)
    if voice is None:
        raise _unknown_speaker(key, f"unknown {key} {repr(name)[:80]}", service, mapped)
    return voice


def _unknown_speaker(key: str, problem: str, service, mapped: bool) -> ApiError:
    return ApiError(400, f"{problem}; {service.voice_choices(mapped=mapped)}", code="unknown_speaker", param=key,
                    valid_speakers=[{"id": v.id, "alias": v.name} for v in service.voices.voices])


def _readable(text: str, key: str, service) -> None:
    problem = service.engine.unreadable(text)
    if problem:
        raise ApiError(400, problem, code="unreadable_text", param=key, engine=service.engine.name)


# ---- pydantic's errors as the API's codes ----------------------------------------------------------------------

# the role of each wire name: the codes are named after the role (missing_text for 'text' and for 'input')
ROLES_TTS = {"text": "text", "speaker": "speaker", "format": "format"}
ROLES_SPEECH = {"input": "text", "voice": "speaker", "response_format": "format"}


def _api_error(error: dict, body: dict, service, roles: dict) -> ApiError:
    kind = error["type"]
    if not error["loc"]:  # a model validator: the two fields that contradict each other
        if kind == "sse_not_streamed":
            return ApiError(400, "stream_format 'sse' streams events; leave out 'stream': false, or use "
                            "stream_format 'audio'", code="invalid_stream", param="stream")
        key = next(k for k, role in roles.items() if role == "format")
        fmt = error["ctx"]["fmt"]
        return ApiError(400, f"{fmt} cannot be streamed; stream one of {', '.join(audio.STREAMABLE_FORMATS)}",
                        code="invalid_format", param=key)
    key = str(error["loc"][0])
    role = roles.get(key, key)
    value = body.get(key)
    max_chars = service.settings.max_text_chars
    if role == "text":
        if kind == "missing":
            return ApiError(400, f"'{key}' is required", code="missing_text", param=key)
        if kind == "string_too_long":  # 400 like any schema violation (OpenAI's answer for a too-long input)
            return ApiError(400, f"'{key}' has {len(value)} characters; the limit is {max_chars}",
                            code="text_too_long", param=key, max_chars=max_chars)
        if kind in ("string_too_short", "string_pattern_mismatch"):
            return ApiError(400, f"'{key}' is empty", code="empty_text", param=key)
        return ApiError(400, f"'{key}' must be a string", code="invalid_text", param=key)
    if role == "speaker":
        return _unknown_speaker(key, f"'{key}' must be a string", service, mapped=key == "voice")
    if role == "format":
        if value == "aac":
            return ApiError(400, f"'{key}' aac is not available here (no AAC encoder is installed); use one of "
                            f"{', '.join(audio.FORMATS)}", code="unsupported_format", param=key)
        return ApiError(400, f"'{key}' must be one of {', '.join(audio.FORMATS)}", code="invalid_format", param=key)
    if key == "speed":
        return ApiError(400, f"'speed' must be a number from {SPEED_RANGE[0]} to {SPEED_RANGE[1]}",
                        code="invalid_speed", param="speed")
    if key == "seed":
        return ApiError(400, f"'seed' must be an integer from 0 to {SEED_MAX}", code="invalid_seed", param="seed")
    if key in ("stream", "normalize", "cache"):
        return ApiError(400, f"'{key}' must be true or false", code=f"invalid_{key}", param=key)
    if key == "instructions" and kind == "string_too_long":
        return ApiError(400, f"'instructions' has {len(value)} characters; the limit is {MAX_INSTRUCTIONS_CHARS}",
                        code="instructions_too_long", param="instructions")
    if key == "instructions" and kind == "string_pattern_mismatch":  # the service's refusal, said by the schema
        return ApiError(400, f"'instructions' is not supported by this model ({service.engine.model_id}): "
                        "its voices are fixed; leave it out and choose a voice instead (instructions need "
                        "CosyVoice-300M-Instruct)", code="unsupported_instructions", param="instructions")
    if key == "stream_format":
        return ApiError(400, "'stream_format' must be 'audio' or 'sse'", code="invalid_stream_format", param=key)
    return ApiError(400, f"'{key}' must be a string", code=f"invalid_{key}", param=key)  # model, instructions


# ---- the JSON answers (documented in /openapi.json; checked against the real answers by the schemathesis test) --

class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. max_chars, valid_speakers, engine
    message: str
    type: str
    param: str | None
    code: str


class Error(BaseModel):
    """Every error answer (the OpenAI shape)."""
    error: ErrorDetail


class SpeakerInfo(BaseModel):
    id: str
    alias: str
    language: str
    engine: str


class Offers(BaseModel):
    """What the loaded model can do besides speaking with its own voices."""
    kind: str
    speakers: bool
    cloning: bool
    instructions: bool
    conversion: bool


class Speakers(BaseModel):
    engine: str
    description: str
    model: str
    offers: Offers
    hint: str | None = Field(None, description="what to do first: the offline voice: how to get CosyVoice; a "
                                               "model without built-in speakers: how to make a voice")
    default: str | None = Field(description="the speaker of a request that names none; null on a model without "
                                            "built-in speakers (the base model)")
    speakers: list[SpeakerInfo]


class VoiceInfo(BaseModel):
    id: str
    name: str
    language: str
    speaker: str = Field(description="the speaker's alias")


class SavedVoice(BaseModel):
    """A voice made from a reference clip (POST /v1/audio/voices)."""
    object: Literal["voice"]
    id: str
    name: str | None
    language: str | None
    mode: str | None
    transcript: str | None
    prompt_seconds: float | None
    created_at: int | float | None


class Voices(BaseModel):
    voices: list[VoiceInfo | SavedVoice] = Field(description="the model's voices, the OpenAI names, then saved voices")


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int = Field(description="when this service loaded its engine (Unix seconds)")
    owned_by: str


class Models(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Status(BaseModel):
    model_config = ConfigDict(extra="allow")  # /ready adds the runtime, queue and cache
    status: str
    engine: str


class SpeechAudioDeltaEvent(BaseModel):
    type: Literal["speech.audio.delta"]
    audio: str = Field(description="base64: the next bytes of the file", json_schema_extra={"format": "byte"})


class Usage(BaseModel):
    """No tokens are billed: input_tokens counts the input's characters."""
    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechAudioDoneEvent(BaseModel):
    type: Literal["speech.audio.done"]
    usage: Usage
