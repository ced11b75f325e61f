"""The HTTP API through Flask's test client, with real engines (offline Piper voice; CosyVoice with a tiny random
model): every endpoint, every error answer, auth, CORS, the request log and start-up engine selection."""
from __future__ import annotations

import io
import json
import logging
import re
import shutil
import struct
import threading
import time

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import GatedEngine, parse_metrics
from cosyvoice_lite.serve import StartupError, load_engine
from cosyvoice_lite.settings import Settings

RATE = 24000
SENTENCES = "The quick brown fox jumps over the lazy dog. It was a sunny day. Everyone went outside."


def decode(data: bytes, fmt: str):
    """-> (samples float array, rate, channels)."""
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768, RATE, 1
    info = soundfile.info(io.BytesIO(data))
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return samples, rate, info.channels


def error_of(response, status):
    assert response.status_code == status, response.data[:500]
    assert response.is_json
    error = response.json["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], str) and error["type"]
    return error


# ---- endpoints ----------------------------------------------------------------------------------------------

def test_health_answers_ok(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "engine": "piper"}


def test_ready_after_warmup_names_engine_and_queue(client):
    response = client.get("/ready")
    assert response.status_code == 200
    body = response.json
    assert body["status"] == "ready" and body["engine"] == "piper"
    assert body["queue"] == {"waiting": 0, "running": 0, "max_batch": 1, "capacity": 9}


def test_ready_is_503_until_warmup_finished(make_app, piper_engine, gate):
    gate.hold("warmup")
    app = make_app(GatedEngine(piper_engine, gate.path), wait=False)
    client = app.test_client()
    response = client.get("/ready")
    error_of(response, 503)
    assert response.json["error"]["code"] == "warming_up" and response.headers["Retry-After"]
    gate.open()
    assert app.extensions["cosyvoice_lite"].admission.ready.wait(30)
    assert client.get("/ready").status_code == 200


def test_speakers_piper_says_it_is_the_fallback_and_how_to_get_cosyvoice(client):
    body = client.get("/speakers").json
    assert body["engine"] == "piper"
    assert "scripts/download_model.py" in body["hint"]
    assert body["speakers"] == [{"id": "en_US-joe-medium", "alias": "joe", "language": "en", "engine": "piper"}]
    assert body["default"] == "en_US-joe-medium"


def test_speakers_cosyvoice_lists_model_ids_with_aliases(make_app, cosyvoice_engine):
    body = make_app(cosyvoice_engine).test_client().get("/speakers").json
    assert body["engine"] == "cosyvoice" and "hint" not in body
    ids = {s["id"]: s for s in body["speakers"]}
    assert set(ids) == {"中文女", "中文男", "日语男", "粤语女", "英文女", "英文男", "韩语女"}
    assert ids["中文女"] == {"id": "中文女", "alias": "zh-female", "language": "zh", "engine": "cosyvoice"}
    assert ids["粤语女"]["alias"] == "yue-female"


def test_tts_returns_24khz_mono_16bit_wav(client):
    response = client.post("/tts", json={"text": "Hello there. How are you today?"})
    assert response.status_code == 200
    assert response.content_type == "audio/wav"
    info = soundfile.info(io.BytesIO(response.data))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    samples, _, _ = decode(response.data, "wav")
    assert abs(len(samples) / RATE - float(response.headers["X-Audio-Duration"])) < 1e-3
    assert 0.8 < len(samples) / RATE < 6
    assert np.abs(samples).max() > 0.3  # speech, not silence
    assert response.headers["X-Engine"] == "piper"


def test_tts_cosyvoice_speaker_by_id_and_by_alias(make_app, cosyvoice_engine):
    client = make_app(cosyvoice_engine).test_client()
    for speaker in ("中文女", "ZH-Female"):
        response = client.post("/tts", json={"text": "你好。", "speaker": speaker})
        assert response.status_code == 200, response.data[:300]
        samples, rate, channels = decode(response.data, "wav")
        assert (rate, channels) == (24000, 1) and len(samples) > 0
        assert response.headers["X-Speaker"] == "zh-female"


def test_tts_speed_shortens_audio(client):
    durations = {}
    for speed in (1.0, 2.0):
        response = client.post("/tts", json={"text": SENTENCES, "speed": speed})
        durations[speed] = float(response.headers["X-Audio-Duration"])
    assert durations[2.0] < 0.75 * durations[1.0]


@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "opus", "flac"])
def test_tts_every_format_decodes_to_24khz_mono(client, fmt):
    response = client.post("/tts", json={"text": "Testing every format.", "format": fmt})
    assert response.status_code == 200
    duration = float(response.headers["X-Audio-Duration"])
    samples, rate, channels = decode(response.data, fmt)
    assert (rate, channels) == (24000, 1)
    assert abs(len(samples) / rate - duration) < (0.1 if fmt == "mp3" else 0.03)


def test_tts_stream_wav_has_unknown_length_header_then_pcm(client):
    response = client.post("/tts", json={"text": SENTENCES, "stream": True})
    assert response.status_code == 200 and response.content_type == "audio/wav"
    data = response.data
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", data[4:8])[0] == 0xFFFFFFFF and data[36:40] == b"data"
    assert struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    assert (len(data) - 44) % 2 == 0 and len(data) > 44 + RATE  # > 0.5 s of audio
    samples, rate, channels = decode(data, "wav")
    assert (rate, channels) == (24000, 1)


def test_tts_stream_pcm_is_raw_samples(client):
    response = client.post("/tts", json={"text": "Raw samples please.", "format": "pcm", "stream": True})
    assert response.status_code == 200 and response.content_type == "audio/pcm"
    assert len(response.data) % 2 == 0 and not response.data.startswith(b"RIFF")
    assert 0.3 < len(response.data) / 2 / RATE < 5


def test_tts_same_seed_gives_the_same_audio(make_app, cosyvoice_engine):
    client = make_app(cosyvoice_engine).test_client()

    def speak(seed, path="/tts", text_key="text"):
        response = client.post(path, json={text_key: "Hello there.", "seed": seed, "stream": False,
                                           **({"response_format": "wav"} if path != "/tts" else {})})
        assert response.status_code == 200, response.data[:300]
        return response.data

    first = speak(7)
    assert speak(7) == first
    assert speak(8) != first
    assert speak(7, "/v1/audio/speech", "input") == first


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "7", True, [7]])
def test_tts_rejects_bad_seed(client, seed):
    error = error_of(client.post("/tts", json={"text": "Hi.", "seed": seed}), 400)
    assert error["code"] == "invalid_seed" and error["param"] == "seed"


def test_tts_piper_accepts_a_seed(client):
    """The offline voice cannot be seeded (its noise comes from inside the ONNX graph): a seed is no error there."""
    response = client.post("/tts", json={"text": "Hi.", "seed": 3})
    assert response.status_code == 200 and response.data[:4] == b"RIFF"


def test_tts_stream_sends_first_audio_before_the_rest_is_synthesised(make_app, cosyvoice_engine, gate):
    """With the engine held after its first chunk, the first audio bytes are already in the client's hands."""
    gate.hold("after_first")
    client = make_app(GatedEngine(cosyvoice_engine, gate.path)).test_client()
    response = client.post("/tts", json={"text": "你好。今天天气很好。", "stream": True}, buffered=False)
    assert response.status_code == 200
    body = iter(response.response)
    first = next(body)
    assert first[:4] == b"RIFF" and len(first) > 44
    assert not (gate.path / "open").exists()  # the engine is still waiting: the rest is not synthesised
    gate.open()
    rest = b"".join(body)
    response.close()
    samples, rate, _ = decode(first + rest, "wav")
    assert rate == 24000 and len(samples) > (len(first) - 44) // 2


def test_stream_closed_before_reading_cancels_and_logs_once(make_app, piper_engine, gate, caplog):
    gate.hold("after_first")
    app = make_app(GatedEngine(piper_engine, gate.path))
    with caplog.at_level(logging.INFO, logger="cosyvoice_lite.request"):
        response = app.test_client().post("/tts", json={"text": SENTENCES, "stream": True}, buffered=False)
        assert response.status_code == 200
        response.close()  # the client leaves before the first byte is read
    synth = app.extensions["cosyvoice_lite"].admission
    deadline = time.monotonic() + 5
    while synth.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert synth.running == 0  # the held synthesis was cancelled although the gate stayed closed
    lines = [r.getMessage() for r in caplog.records if r.name == "cosyvoice_lite.request"]
    assert len(lines) == 1 and "outcome=client_gone" in lines[0]


@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "opus", "flac"])
def test_openai_speech_every_format(client, fmt):
    response = client.post("/v1/audio/speech", json={"model": "tts-1", "input": "OpenAI compatible speech.",
                                                     "voice": "joe", "response_format": fmt, "stream": False})
    assert response.status_code == 200
    assert response.content_type.split(";")[0] == {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg",
                                                    "opus": "audio/ogg", "flac": "audio/flac"}[fmt]
    samples, rate, channels = decode(response.data, fmt)
    duration = float(response.headers["X-Audio-Duration"])
    assert (rate, channels) == (24000, 1)
    assert abs(len(samples) / rate - duration) < (0.1 if fmt == "mp3" else 0.03)
    assert duration > 0.5


def test_openai_speech_defaults_to_mp3(client):
    response = client.post("/v1/audio/speech", json={"model": "tts-1", "input": "Default format.", "voice": "joe"})
    assert response.status_code == 200 and response.content_type == "audio/mpeg"
    assert soundfile.info(io.BytesIO(response.data)).format == "MP3"


def test_openai_speech_stream_mp3(client):
    response = client.post("/v1/audio/speech", json={"input": SENTENCES, "voice": "joe", "stream": True})
    assert response.status_code == 200 and response.content_type == "audio/mpeg"
    samples, rate, channels = decode(response.data, "mp3")
    assert (rate, channels) == (24000, 1) and len(samples) / rate > 2


def test_openai_speech_cosyvoice_voice_alias(make_app, cosyvoice_engine):
    client = make_app(cosyvoice_engine).test_client()
    response = client.post("/v1/audio/speech", json={"model": "cosyvoice", "input": "Hello.", "voice": "en-female",
                                                     "response_format": "flac"})
    assert response.status_code == 200
    samples, rate, channels = decode(response.data, "flac")
    assert (rate, channels) == (24000, 1) and len(samples) > 0


def test_openai_voices_lists_id_and_name(client):
    assert client.get("/v1/audio/voices").json["voices"][0] == {"id": "joe", "name": "en_US-joe-medium",
                                                                "language": "en", "speaker": "joe"}


def test_openapi_describes_every_endpoint(client):
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == {"/tts", "/v1/audio/speech", "/v1/audio/voices", "/v1/audio/voices/{voice_id}",
                                  "/vc", "/v1/models", "/v1/models/{model}", "/speakers", "/health", "/ready",
                                  "/metrics", "/openapi.json", "/"}
    tts = spec["components"]["schemas"]["TtsRequest"]["properties"]
    assert tts["text"]["maxLength"] == 4096 and tts["speaker"]["anyOf"][0]["enum"] == ["en_US-joe-medium", "joe"]
    assert spec["components"]["schemas"]["SpeechRequest"]["properties"]["response_format"]["default"] == "mp3"
    for status in ("400", "413", "415", "503", "504"):
        assert status in spec["paths"]["/tts"]["post"]["responses"]


def test_metrics_count_requests_audio_and_errors(client):
    client.post("/tts", json={"text": "Count me."})
    client.post("/tts", json={"text": ""})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.content_type.startswith("text/plain")
    values = parse_metrics(response.data.decode())
    assert values['cosyvoice_requests_total{code="200",endpoint="tts"}'] >= 1
    assert values['cosyvoice_errors_total{code="400"}'] >= 1
    assert values["cosyvoice_audio_seconds_total"] > 0 and values["cosyvoice_synthesis_seconds_total"] > 0
    assert values["cosyvoice_queue_depth"] == 0 and values["cosyvoice_in_progress"] == 0
    assert values['cosyvoice_engine_info{engine="piper"}'] == 1
    assert values["cosyvoice_request_duration_seconds_count"] >= 1


def test_web_page_and_its_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.content_type.startswith("text/html")
    html = page.data.decode()
    for element in ('id="text"', 'id="speaker"', 'id="speed"', 'id="normalize"', 'id="speak"', 'id="stop"',
                    'id="download"', 'id="wave"', 'id="history"'):
        assert element in html
    assert "http://" not in html and "https://" not in html  # no CDN
    for asset, ctype in (("/static/app.js", "javascript"), ("/static/style.css", "text/css"),
                         ("/favicon.ico", "image/svg+xml")):
        response = client.get(asset)
        assert response.status_code == 200 and ctype in response.content_type
        response.close()


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,code", [
    ({}, "missing_text"),
    ({"text": ""}, "empty_text"),
    ({"text": "   \n\t "}, "empty_text"),
    ({"text": 42}, "invalid_text"),
    ({"text": ["a"]}, "invalid_text"),
    ({"text": {"a": 1}}, "invalid_text"),
    ({"text": True}, "invalid_text"),
])
def test_tts_rejects_missing_empty_or_non_string_text(client, body, code):
    assert error_of(client.post("/tts", json=body), 400)["code"] == code


def test_tts_unknown_speaker_lists_valid_ones(client):
    error = error_of(client.post("/tts", json={"text": "Hi.", "speaker": "nobody"}), 400)
    assert error["code"] == "unknown_speaker" and error["param"] == "speaker"
    assert "en_US-joe-medium" in error["message"] and "joe" in error["message"]
    assert error["valid_speakers"] == [{"id": "en_US-joe-medium", "alias": "joe"}]


def test_tts_non_string_speaker_is_400(client):
    assert error_of(client.post("/tts", json={"text": "Hi.", "speaker": 3}), 400)["code"] == "unknown_speaker"


@pytest.mark.parametrize("speed", [0, 0.2, 4.5, -1, "fast", True, [1]])
def test_tts_rejects_bad_speed(client, speed):
    assert error_of(client.post("/tts", json={"text": "Hi.", "speed": speed}), 400)["code"] == "invalid_speed"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400])
def test_tts_rejects_non_finite_or_huge_speed(client, literal):
    response = client.post("/tts", data='{"text": "Hi.", "speed": %s}' % literal, content_type="application/json")
    assert error_of(response, 400)["code"] == "invalid_speed"


@pytest.mark.parametrize("fmt", ["ogg", "WAV", 5])
def test_tts_rejects_bad_format(client, fmt):
    assert error_of(client.post("/tts", json={"text": "Hi.", "format": fmt}), 400)["code"] == "invalid_format"


@pytest.mark.parametrize("fmt", ["flac", "opus"])
def test_tts_rejects_streaming_whole_file_formats(client, fmt):
    response = client.post("/tts", json={"text": "Hi.", "format": fmt, "stream": True})
    assert error_of(response, 400)["code"] == "invalid_format"


@pytest.mark.parametrize("key", ["stream", "normalize"])
def test_tts_rejects_non_boolean_flags(client, key):
    assert error_of(client.post("/tts", json={"text": "Hi.", key: "yes"}), 400)["code"] == f"invalid_{key}"


@pytest.mark.parametrize("raw", [b"{bad", b"", b'{"text": "a",}', b"\xff\xfe{}", b"[" * 50000 + b"]" * 50000,
                                 b'["text"]', b'"text"', b"null"])
def test_tts_rejects_malformed_json(client, raw):
    response = client.post("/tts", data=raw, content_type="application/json")
    assert error_of(response, 400)["code"] == "invalid_json"


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_tts_rejects_non_json_body_with_415(client, ctype):
    kwargs = {"content_type": ctype} if ctype else {}
    response = client.post("/tts", data=b'{"text": "hi"}', **kwargs)
    assert error_of(response, 415)["code"] == "unsupported_media_type"


def test_tts_text_over_limit_is_400_like_any_schema_violation(client):
    error = error_of(client.post("/tts", json={"text": "a" * 4097}), 400)  # OpenAI's answer to a too-long input
    assert error["code"] == "text_too_long" and error["max_chars"] == 4096


def test_tts_text_limit_follows_setting(make_app, piper_engine):
    client = make_app(piper_engine, max_text_chars=20).test_client()
    assert error_of(client.post("/tts", json={"text": "x" * 21}), 400)["code"] == "text_too_long"
    assert client.post("/tts", json={"text": "Twenty chars or less"}).status_code == 200


def test_body_over_size_limit_is_413(client):
    body = json.dumps({"text": "hi", "padding": "x" * 300_000})
    response = client.post("/tts", data=body, content_type="application/json")
    assert error_of(response, 413)["code"] == "body_too_large"


def test_nothing_to_speak_is_400(client):
    for text in ("...", "\u200b \u200b", "?! ,"):
        error = error_of(client.post("/tts", json={"text": text}), 400)
        assert error["code"] == "nothing_to_speak", text


@pytest.mark.parametrize("text", [
    "nul\x00byte", "bell\x07 and \x1b[31mescape", "lone surrogate \ud800 here", "emoji 😀🎉 party",
    "שלום עולם مرحبا", "<speak><break time='1s'/>tags</speak>", "a" * 1000, "&amp; &#x27; %s %n {0}",
])
def test_hostile_text_never_500(client, text):
    response = client.post("/tts", data=json.dumps({"text": text}), content_type="application/json")
    assert response.status_code in (200, 400), response.data[:300]
    if response.status_code == 200:
        assert decode(response.data, "wav")[1] == 24000
    else:
        error_of(response, 400)


def test_openai_speech_errors(client):
    cases = [({"voice": "joe"}, 400, "missing_text"),
             ({"input": "a" * 4097, "voice": "joe"}, 400, "text_too_long"),
             ({"input": "Hi.", "voice": "nobody"}, 400, "unknown_speaker"),
             ({"input": "Hi.", "voice": "joe", "response_format": "aac"}, 400, "unsupported_format"),
             ({"input": "Hi.", "voice": "joe", "response_format": "webm"}, 400, "invalid_format"),
             ({"input": "Hi.", "voice": "joe", "speed": 0.2}, 400, "invalid_speed"),
             ({"input": "Hi.", "voice": "joe", "speed": 4.01}, 400, "invalid_speed"),
             ({"input": "Hi.", "voice": "joe", "model": 1}, 400, "invalid_model"),
             ({"input": "Hi.", "voice": "joe", "stream_format": "webm"}, 400, "invalid_stream_format"),
             ({"input": "Hi.", "voice": "joe", "instructions": ["x"]}, 400, "invalid_instructions"),
             ({"input": "Hi.", "voice": "joe", "instructions": "Whisper."}, 400, "unsupported_instructions")]
    for body, status, code in cases:
        error = error_of(client.post("/v1/audio/speech", json=body), status)
        assert error["code"] == code, body


def test_openai_speech_voice_error_lists_voices(client):
    error = error_of(client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "nobody"}), 400)
    assert error["param"] == "voice" and "joe" in error["message"] and "alloy" in error["message"]


def test_openai_speech_speed_range_edges_accepted(client):
    for speed in (0.25, 4.0):
        response = client.post("/v1/audio/speech", json={"input": "Edge.", "voice": "joe", "speed": speed,
                                                         "response_format": "pcm"})
        assert response.status_code == 200


def test_unknown_path_is_json_404(client):
    assert error_of(client.get("/nope"), 404)["code"] == "not_found"


def test_wrong_method_is_json_405_with_allow(client):
    response = client.get("/tts")
    assert error_of(response, 405)["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


# ---- failures inside the service ----------------------------------------------------------------------------

def test_engine_failure_is_json_500_and_service_keeps_serving(make_app, piper_engine, gate, caplog):
    gate.mode("fail")
    client = make_app(GatedEngine(piper_engine, gate.path)).test_client()
    with caplog.at_level(logging.ERROR, logger="cosyvoice_lite"):
        error = error_of(client.post("/tts", json={"text": "Hi."}), 500)
    assert error["code"] == "synthesis_failed" and "injected" not in error["message"]
    assert "injected engine failure" in caplog.text  # the details go to the log
    gate.mode("")
    assert client.post("/tts", json={"text": "Still alive."}).status_code == 200


def test_timeout_is_504_and_frees_the_worker(make_app, piper_engine, gate):
    gate.hold("start")
    # 2 s: long enough for "Fast now." on a busy machine; the held request times out whatever the machine does
    app = make_app(GatedEngine(piper_engine, gate.path), request_timeout=2.0)
    client = app.test_client()
    started = time.monotonic()
    error = error_of(client.post("/tts", json={"text": "Too slow."}), 504)
    assert error["code"] == "timeout" and time.monotonic() - started < 5
    synth = app.extensions["cosyvoice_lite"].admission
    deadline = time.monotonic() + 5
    while synth.running and time.monotonic() < deadline:  # the held synthesis was cancelled
        time.sleep(0.02)
    assert synth.running == 0
    gate.open()
    assert client.post("/tts", json={"text": "Fast now."}).status_code == 200


def test_full_queue_is_immediate_503_with_retry_after(make_app, piper_engine, gate):
    gate.hold("start")
    app = make_app(GatedEngine(piper_engine, gate.path), queue_size=1)
    synth = app.extensions["cosyvoice_lite"].admission
    results = []
    threads = [threading.Thread(target=lambda: results.append(app.test_client().post("/tts", json={"text": "Hi."})))
               for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while (synth.running, synth.waiting) != (1, 1) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (synth.running, synth.waiting) == (1, 1)
    started = time.monotonic()
    response = app.test_client().post("/tts", json={"text": "One too many."})
    assert time.monotonic() - started < 0.5
    error = error_of(response, 503)
    assert error["code"] == "queue_full" and int(response.headers["Retry-After"]) >= 1
    gate.open()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200, 200]


# ---- auth, CORS, request ids, the request log ---------------------------------------------------------------

def test_api_key_required_everywhere_but_health_ready_and_page(make_app, piper_engine, caplog):
    key = "s3cret-key-123"
    client = make_app(piper_engine, api_key=key).test_client()
    with caplog.at_level(logging.DEBUG):
        for method, path in (("POST", "/tts"), ("GET", "/speakers"), ("POST", "/v1/audio/speech"),
                             ("GET", "/v1/audio/voices"), ("GET", "/v1/models"), ("GET", "/v1/models/tts-1"),
                             ("GET", "/metrics"), ("GET", "/openapi.json")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
                response = client.open(path, method=method, json={"text": "Hi."}, headers=headers)
                assert error_of(response, 401)["code"] == "unauthorized", (path, headers)
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        for path in ("/health", "/ready", "/", "/static/app.js", "/favicon.ico"):
            response = client.get(path)
            assert response.status_code == 200, path
            response.close()
        auth = {"Authorization": f"Bearer {key}"}
        assert client.post("/tts", json={"text": "Hi."}, headers=auth).status_code == 200
        assert client.get("/speakers", headers=auth).status_code == 200
    assert key not in caplog.text


def test_cors_allowed_origin_and_preflight(make_app, piper_engine):
    client = make_app(piper_engine, cors_origins="https://app.example", api_key="k").test_client()
    preflight = client.options("/tts", headers={"Origin": "https://app.example",
                                                "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 204  # no API key needed for a preflight
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    response = client.get("/health", headers={"Origin": "https://app.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Origin" in response.headers["Vary"]
    other = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_cors_off_by_default_and_star(make_app, piper_engine):
    assert "Access-Control-Allow-Origin" not in make_app(piper_engine).test_client().get(
        "/health", headers={"Origin": "https://a.example"}).headers
    star = make_app(piper_engine, cors_origins="*").test_client()
    assert star.get("/health", headers={"Origin": "https://a.example"}).headers["Access-Control-Allow-Origin"] == "*"


def test_request_id_echoed_or_generated(client):
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    for bad in ("bad id with spaces", "x" * 65, "<script>"):
        generated = client.get("/health", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert generated != bad and len(generated) == 16


def test_one_log_line_per_request_with_the_numbers(client, caplog):
    with caplog.at_level(logging.INFO, logger="cosyvoice_lite.request"):
        client.post("/tts", json={"text": "Log this request.", "speaker": "joe"}, headers={"X-Request-ID": "req-42"})
    lines = [r.getMessage() for r in caplog.records if r.name == "cosyvoice_lite.request"]
    assert len(lines) == 1
    line = lines[0]
    for field in ("id=req-42", "status=200", "speaker=joe", "chars=17", "audio_s=", "synth_s=", "rtf=0.",
                  "outcome=ok"):
        assert field in line, line
    assert re.search(r" first_audio_s=\d+\.\d{3} ", line), line


# ---- start-up: which engine serves --------------------------------------------------------------------------

def test_load_engine_missing_or_empty_model_dir_gives_piper(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    for model_dir in (tmp_path / "missing", empty):
        with caplog.at_level(logging.WARNING, logger="cosyvoice_lite"):
            engine = load_engine(Settings(model_dir=str(model_dir)))
        assert engine.name == "piper"
    assert "scripts/download_model.py" in caplog.text


def test_load_engine_cosyvoice_dir_gives_cosyvoice(tiny_model_dir):
    assert load_engine(Settings(model_dir=str(tiny_model_dir))).name == "cosyvoice"


def test_load_engine_forced_piper_ignores_model(tiny_model_dir):
    assert load_engine(Settings(model_dir=str(tiny_model_dir), engine="piper")).name == "piper"


@pytest.mark.parametrize("case", ["cosyvoice2", "random_file", "forced_cosyvoice_without_model"])
def test_load_engine_refuses_wrong_model_dir(tmp_path, case):
    if case == "cosyvoice2":
        (tmp_path / "cosyvoice2.yaml").write_text("llm: {}\n")
        settings, expect = Settings(model_dir=str(tmp_path)), "CosyVoice2"
    elif case == "random_file":
        (tmp_path / "blob.bin").write_bytes(b"\0" * 10)
        settings, expect = Settings(model_dir=str(tmp_path / "blob.bin")), "is a file"
    else:
        settings, expect = Settings(model_dir=str(tmp_path), engine="cosyvoice"), "no cosyvoice.yaml"
    with pytest.raises(StartupError, match=expect):
        load_engine(settings)


def test_load_engine_truncated_checkpoint_fails_loudly(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    data = (broken / "flow.pt").read_bytes()
    (broken / "flow.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(StartupError, match="cannot load the CosyVoice model"):
        load_engine(Settings(model_dir=str(broken)))


def test_settings_from_env_defaults_and_overrides():
    s = Settings.from_env(environ={})
    assert (s.model_dir, s.max_text_chars, s.port, s.queue_size, s.api_key) == (
        "models/CosyVoice-300M-SFT", 4096, 8080, 8, "")
    s = Settings.from_env(environ={"QUEUE_SIZE": "3", "REQUEST_TIMEOUT": "2.5", "CORS_ORIGINS": "a, b/"})
    assert (s.queue_size, s.request_timeout, s.cors_origin_list) == (3, 2.5, ["a", "b"])
    with pytest.raises(ValueError, match="QUEUE_SIZE"):
        Settings.from_env(environ={"QUEUE_SIZE": "many"})
    with pytest.raises(ValueError, match="ENGINE"):
        Settings.from_env(environ={"ENGINE": "espeak"})


# ---- property-based: arbitrary bodies never crash the service ------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=3), max_leaves=8)
_fields = {"text": _json | st.text(max_size=120), "input": _json | st.text(max_size=120),
           "speaker": _json | st.sampled_from(["joe", "JOE", "en_US-joe-medium", ""]),
           "voice": _json | st.sampled_from(["joe", "alloy"]),
           "speed": _json | st.floats(0.1, 5), "format": _json | st.sampled_from(["wav", "pcm", "mp3", "x"]),
           "response_format": _json | st.sampled_from(["mp3", "opus", "aac"]), "stream": _json,
           "normalize": _json, "model": _json}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/tts", "/v1/audio/speech"]), body=st.fixed_dictionaries({}, optional=_fields))
def test_fuzz_json_bodies_never_500(client, path, body):
    response = client.post(path, data=json.dumps(body), content_type="application/json")
    assert response.status_code in (200, 400, 413), (body, response.data[:300])
    if response.status_code != 200:
        error_of(response, response.status_code)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300), ctype=st.sampled_from(["application/json", "text/plain", "application/x-json"]))
def test_fuzz_raw_bodies_never_500(client, raw, ctype):
    response = client.post("/tts", data=raw, content_type=ctype)
    assert response.status_code in (200, 400, 413, 415), (raw, response.data[:300])
    if response.status_code != 200:
        error_of(response, response.status_code)
