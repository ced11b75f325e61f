"""The OpenAI-compatible routes as OpenAI clients use them: the real ``openai`` SDK against a real gunicorn (the
offline voice behind a gate, so that "the first audio comes before the synthesis ends" is deterministic), plus the
voice table (VOICE_MAP), /v1/models, the SSE events, nulls and the request log through Flask's test client."""
from __future__ import annotations

import base64
import io
import json
import logging
import re
import time

import numpy as np
import openai
import pytest
import soundfile

from conftest import GatedEngine
from cosyvoice_lite.engines import StartupError
from cosyvoice_lite.serve.schema import parse_openai_speech, parse_tts
from cosyvoice_lite.settings import Settings

SENTENCES = "The quick brown fox jumps over the lazy dog. It was a sunny day. Everyone went outside to play."
OPENAI_VOICES = ["alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse"]


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                         timeout=30)


def sse_events(body: bytes) -> list[dict]:
    """The JSON payloads of a text/event-stream body (every event is one 'data:' line and a blank line)."""
    text = body.decode()
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        events.append(json.loads(block[len("data: "):]))
    return events


def log_line(server, rid: str) -> str:
    server.wait_for(lambda: f"id={rid} " in server.log(), 5, f"the log line of {rid}")
    return next(line for line in server.log().splitlines() if f"id={rid} " in line)


# ---- the openai SDK against gunicorn --------------------------------------------------------------------------

def test_sdk_create_gives_the_whole_mp3(gserver):
    response = sdk(gserver).audio.speech.create(model="tts-1", voice="alloy", input="Hello from the SDK.")
    assert response.response.headers["content-type"] == "audio/mpeg"
    samples, rate = soundfile.read(io.BytesIO(response.content), dtype="float32")
    assert rate == 24000 and len(samples) / rate > 0.5


def test_sdk_streaming_response_gets_audio_before_the_synthesis_ends(gserver):
    gserver.gate.hold("after_first")
    with sdk(gserver).audio.speech.with_streaming_response.create(
            model="tts-1", voice="nova", input=SENTENCES, response_format="pcm") as response:
        chunks = response.iter_bytes()
        first = next(chunks)
        # the engine is held after its first chunk, and the client already has audio
        assert len(first) > 0 and gserver.metric("cosyvoice_in_progress") == 1
        gserver.gate.open()
        rest = b"".join(chunks)
        assert "content-length" not in response.headers and "x-audio-duration" not in response.headers
    assert (len(first) + len(rest)) % 2 == 0 and (len(first) + len(rest)) / 2 / 24000 > 3


def test_sdk_stream_false_buffers_the_whole_file(gserver):
    with sdk(gserver).audio.speech.with_streaming_response.create(
            model="tts-1", voice="echo", input="Whole file, please.", response_format="wav",
            extra_body={"stream": False}) as response:
        body = response.read()
        assert int(response.headers["content-length"]) == len(body)
        duration = float(response.headers["x-audio-duration"])
    samples, rate = soundfile.read(io.BytesIO(body), dtype="float32")
    assert rate == 24000 and abs(len(samples) / rate - duration) < 0.002


def test_sdk_sse_events_carry_the_audio_then_done(gserver):
    with sdk(gserver).audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts", voice="shimmer", input="Server-sent events.", response_format="wav",
            stream_format="sse") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read()
    events = sse_events(body)
    assert [e["type"] for e in events] == ["speech.audio.delta"] * (len(events) - 1) + ["speech.audio.done"]
    assert all(set(e) == {"type", "audio"} for e in events[:-1]) and len(events) > 2
    assert events[-1] == {"type": "speech.audio.done",
                          "usage": {"input_tokens": 19, "output_tokens": 0, "total_tokens": 19}}
    wav = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    assert rate == 24000 and len(samples) / rate > 0.5


def test_sdk_sse_sends_a_delta_before_the_synthesis_ends(gserver):
    gserver.gate.hold("after_first")
    with sdk(gserver).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=SENTENCES, response_format="mp3", stream_format="sse") as response:
        lines = response.iter_lines()
        first = json.loads(next(lines).removeprefix("data: "))
        assert first["type"] == "speech.audio.delta" and base64.b64decode(first["audio"])
        assert gserver.metric("cosyvoice_in_progress") == 1
        gserver.gate.open()
        assert [line for line in lines if line][-1].startswith('data: {"type":"speech.audio.done"')


def test_sdk_lists_and_retrieves_models(gserver):
    client = sdk(gserver)
    ids = [m.id for m in client.models.list()]
    assert ids == ["piper-en_US-joe-medium", "tts-1", "tts-1-hd", "gpt-4o-mini-tts"]
    model = client.models.retrieve("tts-1")
    assert (model.id, model.object, model.owned_by) == ("tts-1", "model", "cosyvoice-lite")
    assert abs(model.created - time.time()) < 3600
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("whisper-1")
    assert error.value.code == "model_not_found"


def test_sdk_instructions_are_refused_with_a_reason(gserver):
    with pytest.raises(openai.BadRequestError) as error:
        sdk(gserver).audio.speech.create(model="gpt-4o-mini-tts", voice="coral", input="Hi.",
                                         instructions="Speak in a cheerful tone.")
    assert error.value.code == "unsupported_instructions" and error.value.param == "instructions"
    assert "not supported by this model" in error.value.message


def test_sdk_aac_is_refused_naming_the_formats(gserver):
    with pytest.raises(openai.BadRequestError) as error:
        sdk(gserver).audio.speech.create(model="tts-1", voice="alloy", input="Hi.", response_format="aac")
    assert error.value.code == "unsupported_format"
    assert "mp3" in error.value.message and "opus" in error.value.message and "flac" in error.value.message


def test_sdk_offline_voice_refuses_text_without_latin_letters(gserver):
    with pytest.raises(openai.BadRequestError) as error:
        sdk(gserver).audio.speech.create(model="tts-1", voice="alloy", input="你好，世界。")
    assert error.value.code == "unreadable_text" and error.value.param == "input"
    assert "engine piper" in error.value.message and "scripts/download_model.py" in error.value.message


def test_sdk_unknown_voice_lists_the_voice_names(gserver):
    with pytest.raises(openai.BadRequestError) as error:
        sdk(gserver).audio.speech.create(model="tts-1", voice="nobody", input="Hi.")
    assert error.value.code == "unknown_speaker" and "alloy" in error.value.message


# ---- the request log over gunicorn ----------------------------------------------------------------------------

def test_log_lines_of_errors_streams_and_probes(gserver):
    status, headers, _ = gserver.request("POST", "/v1/audio/speech", {"input": "Hi.", "voice": "nobody"})
    assert status == 400
    assert re.search(r" status=400 .* error=unknown_speaker$", log_line(gserver, headers["x-request-id"]))

    status, headers, _ = gserver.request("POST", "/v1/audio/speech", {"input": SENTENCES, "voice": "alloy"})
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    line = log_line(gserver, headers["x-request-id"])
    assert "stream=true cache=off outcome=ok error=-" in line
    assert re.search(r" audio_s=[1-9]\d*\.\d\d synth_s=\d+\.\d\d rtf=\d+\.\d{3} first_audio_s=\d+\.\d{3} ", line)

    rid = "probe-check"
    assert gserver.request("GET", "/health", headers={"X-Request-ID": rid})[0] == 200
    assert gserver.request("GET", "/ready", headers={"X-Request-ID": rid})[0] == 200
    gserver.request("GET", "/speakers", headers={"X-Request-ID": "after-probes"})
    log_line(gserver, "after-probes")
    assert f"id={rid} " not in gserver.log()  # LOG_LEVEL=info: probe lines are debug


def test_log_line_of_a_stream_the_client_left_has_its_real_synthesis_time(gserver):
    gserver.gate.hold("after_first")
    with sdk(gserver).audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=SENTENCES, response_format="pcm") as response:
        received = response.iter_bytes()  # kept: a dropped iterator closes the response, i.e. hangs up at once
        assert next(received)
        rid = response.headers["x-request-id"]
        time.sleep(0.3)
        response.close()
    gserver.wait_for(lambda: gserver.metric("cosyvoice_in_progress") == 0, 5, "the abandoned synthesis to stop")
    line = log_line(gserver, rid)
    assert "outcome=client_gone" in line
    synth_s = float(re.search(r" synth_s=(\d+\.\d\d) ", line).group(1))
    assert synth_s >= 0.3


# ---- voices, models, stream defaults and nulls through the Flask test client ---------------------------------

@pytest.fixture
def cosy_client(make_app, cosyvoice_engine):
    return make_app(cosyvoice_engine).test_client()


def test_openai_voice_names_speak_with_the_default_table(cosy_client):
    expected = {"alloy": "en-female", "ash": "en-male", "ballad": "en-male", "coral": "en-female",
                "echo": "en-male", "fable": "en-male", "nova": "en-female", "onyx": "en-male", "sage": "en-female",
                "shimmer": "en-female", "verse": "en-male"}
    for voice, speaker in expected.items():
        response = cosy_client.post("/v1/audio/speech", json={"input": "Hi.", "voice": voice,
                                                              "response_format": "pcm"})
        assert response.status_code == 200 and response.headers["X-Speaker"] == speaker, voice


def test_voice_map_setting_overrides_and_adds_names(make_app, cosyvoice_engine):
    client = make_app(cosyvoice_engine, voice_map="alloy=中文女, Narrator=zh-male").test_client()
    for voice, speaker in (("alloy", "zh-female"), ("narrator", "zh-male"), ("echo", "en-male"),
                           ("ko-female", "ko-female")):
        response = client.post("/v1/audio/speech", json={"input": "你好。", "voice": voice, "response_format": "pcm"})
        assert response.headers["X-Speaker"] == speaker, voice
    voices = {v["id"]: v for v in client.get("/v1/audio/voices").json["voices"]}
    assert voices["alloy"] == {"id": "alloy", "name": "alloy (zh-female)", "language": "zh", "speaker": "zh-female"}
    assert voices["narrator"]["speaker"] == "zh-male" and voices["zh-female"]["name"] == "中文女"


def test_voice_map_naming_a_missing_speaker_stops_the_start(make_app, cosyvoice_engine):
    with pytest.raises(StartupError, match="VOICE_MAP maps 'alloy' to 'nobody'.*choose one of: 中文女"):
        make_app(cosyvoice_engine, wait=False, voice_map="alloy=nobody")


def test_voice_map_name_that_is_a_speaker_stops_the_start(make_app, cosyvoice_engine):
    with pytest.raises(StartupError, match="VOICE_MAP name 'zh-female' is already a speaker"):
        make_app(cosyvoice_engine, wait=False, voice_map="zh-female=zh-male")


def test_voice_map_malformed_is_a_settings_error():
    for bad in ("alloy", "alloy=", "=zh-female", "alloy:zh-female"):
        with pytest.raises(ValueError, match="VOICE_MAP entries are name=speaker"):
            Settings.from_env(environ={"VOICE_MAP": bad})


def test_voice_map_for_cosyvoice_still_starts_the_offline_voice(make_app, piper_engine):
    client = make_app(piper_engine, voice_map="alloy=zh-female").test_client()
    response = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "alloy", "response_format": "pcm"})
    assert response.status_code == 200 and response.headers["X-Speaker"] == "joe"


def test_voices_lists_speakers_then_openai_names(client):
    voices = client.get("/v1/audio/voices").json["voices"]
    assert voices[0] == {"id": "joe", "name": "en_US-joe-medium", "language": "en", "speaker": "joe"}
    assert [v["id"] for v in voices[1:12]] == OPENAI_VOICES
    assert voices[1] == {"id": "alloy", "name": "alloy (joe)", "language": "en", "speaker": "joe"}


def test_custom_voice_object_with_an_id_is_a_voice_name(client):
    response = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": {"id": "alloy"},
                                                     "response_format": "pcm"})
    assert response.status_code == 200 and response.headers["X-Speaker"] == "joe"


@pytest.mark.parametrize("fmt", ["mp3", "wav", "pcm"])
def test_openai_speech_streams_by_default(client, fmt):
    response = client.post("/v1/audio/speech", json={"input": "Streamed.", "voice": "alloy", "response_format": fmt})
    assert response.status_code == 200
    assert "X-Audio-Duration" not in response.headers and "Content-Length" not in response.headers
    if fmt == "wav":
        assert response.data[4:8] == b"\xff\xff\xff\xff"  # the unknown-length header of a stream


@pytest.mark.parametrize("fmt", ["opus", "flac"])
def test_openai_speech_whole_file_formats_come_whole_unless_stream_is_asked(client, fmt):
    response = client.post("/v1/audio/speech", json={"input": "Whole.", "voice": "alloy", "response_format": fmt})
    assert response.status_code == 200 and float(response.headers["X-Audio-Duration"]) > 0.2
    response = client.post("/v1/audio/speech", json={"input": "Whole.", "response_format": fmt, "stream": True})
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_format"


def test_sse_of_a_whole_file_format_is_one_delta_then_done(client):
    response = client.post("/v1/audio/speech", json={"input": "Flac events.", "response_format": "flac",
                                                     "stream_format": "sse"})
    assert response.status_code == 200 and response.content_type == "text/event-stream"
    events = sse_events(response.data)
    assert [e["type"] for e in events] == ["speech.audio.delta", "speech.audio.done"]
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(events[0]["audio"])), dtype="float32")
    assert rate == 24000 and len(samples) > 0


def test_sse_with_stream_false_is_a_contradiction(client):
    for stream in (False, "yes"):
        response = client.post("/v1/audio/speech", json={"input": "Hi.", "stream_format": "sse", "stream": stream})
        assert response.status_code == 400 and response.json["error"]["code"] == "invalid_stream", stream


def test_sse_with_stream_true_streams_any_format(client):
    response = client.post("/v1/audio/speech", json={"input": "Hi.", "stream_format": "sse", "stream": True,
                                                     "response_format": "opus"})
    assert response.status_code == 200 and response.content_type == "text/event-stream"
    assert [e["type"] for e in sse_events(response.data)] == ["speech.audio.delta", "speech.audio.done"]


def test_openai_speech_stream_format_must_be_audio_or_sse(client):
    response = client.post("/v1/audio/speech", json={"input": "Hi.", "stream_format": "webm"})
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_stream_format"


def test_empty_instructions_mean_none(client):
    response = client.post("/v1/audio/speech", json={"input": "Hi.", "instructions": "", "response_format": "pcm"})
    assert response.status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/tts", {"text": "Nulls.", "speaker": None, "speed": None, "format": None, "stream": None, "normalize": None}),
    ("/v1/audio/speech", {"input": "Nulls.", "model": None, "voice": None, "speed": None, "response_format": None,
                          "stream": None, "normalize": None, "instructions": None, "stream_format": None}),
])
def test_null_optional_fields_mean_their_defaults(client, path, body):
    with_nulls = client.post(path, json=body)
    required = {k: v for k, v in body.items() if v is not None}
    without = client.post(path, json=required)
    assert with_nulls.status_code == without.status_code == 200
    assert with_nulls.content_type == without.content_type == ("audio/wav" if path == "/tts" else "audio/mpeg")
    whole = [r.headers.get("X-Audio-Duration") is not None for r in (with_nulls, without)]
    assert whole == [path == "/tts"] * 2  # /tts sends whole files by default, the OpenAI route streams
    assert with_nulls.headers["X-Speaker"] == "joe"
    # and the same request (Piper's durations are sampled, so the audio itself is not compared)
    service = client.application.extensions["cosyvoice_lite"]
    parse = parse_tts if path == "/tts" else parse_openai_speech
    assert parse(body, service) == parse(required, service)


def test_tts_offline_voice_refuses_text_without_latin_letters(client):
    for text in ("你好，欢迎使用 CosyVoice。"[:6], "こんにちは", "안녕하세요", "Привет"):
        response = client.post("/tts", json={"text": text})
        assert response.status_code == 400, text
        error = response.json["error"]
        assert error["code"] == "unreadable_text" and error["engine"] == "piper"
        assert "no Latin letters or digits" in error["message"] and "download_model.py" in error["message"]
    for text in ("Café 2024", "42", "你好 hello"):
        assert client.post("/tts", json={"text": text, "format": "pcm"}).status_code == 200, text


def test_cosyvoice_reads_chinese(cosy_client):
    response = cosy_client.post("/tts", json={"text": "你好。", "speaker": "zh-female", "format": "pcm"})
    assert response.status_code == 200 and len(response.data) > 0


def test_log_line_of_a_4xx_names_the_error_code(client, caplog):
    with caplog.at_level(logging.INFO, logger="cosyvoice_lite.request"):
        client.post("/tts", json={"text": "Hi.", "speed": 9}, headers={"X-Request-ID": "bad-speed"})
        client.post("/tts", data="{", content_type="application/json", headers={"X-Request-ID": "bad-json"})
        client.get("/nope", headers={"X-Request-ID": "no-route"})
    lines = {r.getMessage().split()[1]: r.getMessage() for r in caplog.records if r.name == "cosyvoice_lite.request"}
    assert re.search(r" status=400 .* error=invalid_speed$", lines["id=bad-speed"])
    assert re.search(r" status=400 .* error=invalid_json$", lines["id=bad-json"])
    assert re.search(r" status=404 .* error=not_found$", lines["id=no-route"])


def test_probe_log_lines_are_debug(client, caplog):
    with caplog.at_level(logging.DEBUG, logger="cosyvoice_lite.request"):
        client.get("/health")
        client.get("/ready")
        client.get("/speakers")
    levels = {r.getMessage().split()[3]: r.levelno for r in caplog.records if r.name == "cosyvoice_lite.request"}
    assert levels == {"/health": logging.DEBUG, "/ready": logging.DEBUG, "/speakers": logging.INFO}


def test_stream_closed_early_logs_its_synthesis_time(make_app, piper_engine, gate, caplog):
    app = make_app(GatedEngine(piper_engine, gate.path))
    gate.hold("after_first")
    with caplog.at_level(logging.INFO, logger="cosyvoice_lite.request"):
        response = app.test_client().post("/v1/audio/speech", json={"input": SENTENCES, "response_format": "pcm"},
                                          buffered=False)
        first = next(response.response)
        time.sleep(0.2)
        response.close()
    gate.open()
    assert np.frombuffer(first, "<i2").size > 0
    line = next(r.getMessage() for r in caplog.records if r.name == "cosyvoice_lite.request")
    assert "outcome=client_gone" in line
    assert float(re.search(r" synth_s=(\d+\.\d\d) ", line).group(1)) >= 0.2


def test_openapi_describes_the_openai_routes(client):
    spec = client.get("/openapi.json").json
    assert {"/v1/models", "/v1/models/{model}", "/v1/audio/voices", "/v1/audio/speech"} <= set(spec["paths"])
    speech = spec["components"]["schemas"]["SpeechRequest"]["properties"]
    assert speech["stream"]["default"] is True and speech["stream_format"]["anyOf"][0]["enum"] == ["audio", "sse"]
    assert speech["voice"]["anyOf"][0]["enum"][:3] == ["en_US-joe-medium", "joe", "alloy"]
    assert all({"type": "null"} in field["anyOf"] for name, field in speech.items() if name != "input")
    assert "text/event-stream" in spec["paths"]["/v1/audio/speech"]["post"]["responses"]["200"]["content"]

