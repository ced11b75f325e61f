"""Voices of one's own over HTTP: made from a reference clip (zero-shot with its transcript, cross-lingual without),
listed, used on both speech routes, kept across a restart, deleted; instructions on an Instruct model; voice
conversion; and every kind of bad clip refused with a clear 4xx before any model runs.

The model is the tiny golden one with the two ONNX stand-ins of tests/golden-modes (the real files' signatures)."""
from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile

from conftest import gunicorn, linked_model

HERE = Path(__file__).resolve().parent
MODES = HERE / "golden-modes"
PROMPTS = MODES / "prompts"
EN_CLIP = (PROMPTS / "en_22050_mono.wav").read_bytes()
EN_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."
SOURCE_CLIP = (PROMPTS / "en_24000_mono.wav").read_bytes()


def model_copy(root: Path, name: str) -> Path:
    """The golden model with both ONNX networks, in a directory called ``name`` (its kind shows in the name)."""
    return linked_model(root, name, MODES / "model")


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    return model_copy(tmp_path_factory.mktemp("models"), "tiny-sft")


@pytest.fixture(scope="module")
def app(sft_dir, tmp_path_factory):
    """One warmed-up app for the module (a warm-up is most of a test's time on this model)."""
    from cosyvoice_lite.engines.cosyvoice import CosyVoiceEngine
    from cosyvoice_lite.serve import create_app

    engine = CosyVoiceEngine(sft_dir, mode="fast", backend="torch")
    app = create_app({"engine": engine, "cache_dir": str(tmp_path_factory.mktemp("cache")), "max_voices": 3,
                      "max_upload_bytes": 2_000_000})
    assert app.extensions["cosyvoice_lite"].admission.wait_ready(300)
    yield app
    app.extensions["cosyvoice_lite"].close()


@pytest.fixture
def client(app):
    """The module's app with no saved voice (each test starts from none)."""
    client = app.test_client()
    for voice in client.get("/v1/audio/voices").json["voices"]:
        if voice.get("object") == "voice":
            client.delete(f"/v1/audio/voices/{voice['id']}")
    return client


def wav(samples, rate: int, subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.asarray(samples, dtype=np.float32), rate, subtype=subtype, format="WAV")
    return out.getvalue()


def make(client, clip: bytes = EN_CLIP, **fields):
    return client.post("/v1/audio/voices", data={"file": (io.BytesIO(clip), "clip.wav"), **fields},
                       content_type="multipart/form-data")


def error(response, status: int) -> dict:
    assert response.status_code == status, response.data[:300]
    return response.json["error"]


def test_the_model_says_it_clones_and_converts_but_takes_no_instructions(client):
    offers = client.get("/speakers").json["offers"]
    assert offers == {"kind": "sft", "speakers": True, "cloning": True, "instructions": False, "conversion": True}


def test_a_voice_made_from_a_clip_and_its_transcript_speaks_on_both_routes_until_deleted(client):
    made = make(client, text=EN_TEXT, name="fox reader")
    assert made.status_code == 201, made.data
    voice = made.json
    assert voice["id"].startswith("voice_") and voice["mode"] == "zero_shot" and voice["name"] == "fox reader"
    assert voice["transcript"] == EN_TEXT and voice["prompt_seconds"] == pytest.approx(4.46, abs=0.01)
    listed = client.get("/v1/audio/voices").json["voices"]
    assert [v for v in listed if v["id"] == voice["id"]] == [voice]
    assert client.get(f"/v1/audio/voices/{voice['id']}").json == voice

    whole = client.post("/tts", json={"text": "Hello there.", "speaker": voice["id"], "seed": 1})
    assert whole.status_code == 200 and whole.headers["X-Speaker"] == "fox reader"
    streamed = client.post("/v1/audio/speech", json={"input": "Hello there.", "voice": {"id": voice["id"]},
                                                     "response_format": "pcm", "seed": 1})
    assert streamed.status_code == 200 and len(streamed.data) > 0

    assert client.delete(f"/v1/audio/voices/{voice['id']}").json == {"id": voice["id"], "object": "voice",
                                                                     "deleted": True}
    assert error(client.post("/tts", json={"text": "Hi.", "speaker": voice["id"]}), 400)["code"] == "unknown_speaker"
    assert error(client.get(f"/v1/audio/voices/{voice['id']}"), 404)["code"] == "voice_not_found"
    assert error(client.delete(f"/v1/audio/voices/{voice['id']}"), 404)["code"] == "voice_not_found"


def test_a_clip_without_transcript_makes_a_cross_lingual_voice_from_json_with_base64(client):
    made = client.post("/v1/audio/voices", json={"file": base64.b64encode(EN_CLIP).decode(), "name": "any tongue"})
    assert made.status_code == 201 and made.json["mode"] == "cross_lingual" and made.json["transcript"] == ""


def test_the_same_voice_and_seed_give_the_same_audio_again(client):
    voice = make(client, text=EN_TEXT).json["id"]
    body = {"text": "Hello there.", "speaker": voice, "seed": 3, "format": "pcm"}
    assert client.post("/tts", json=body).data == client.post("/tts", json=body).data


@pytest.mark.parametrize("clip, code, words", [
    (b"this is not audio at all", "invalid_audio", "could not be decoded"),
    (b"", "invalid_audio", "empty"),
    (wav(np.sin(np.arange(8000 * 2) / 5) * 0.3, 8000), "invalid_audio", "8000 Hz"),
    (wav(np.sin(np.arange(16000 * 31) / 5) * 0.3, 16000), "invalid_audio", "limit is 30 s"),
    (wav(np.full(16000, np.nan), 16000, "FLOAT"), "invalid_audio", "not numbers"),
    (wav(np.zeros(16000 * 2), 16000), "invalid_audio", "silent"),
    (wav([0.5], 16000), "invalid_audio", "at least"),
    (wav(np.sin(np.arange(1000) / 5) * 0.3, 384000), "invalid_audio", "384000 Hz"),
], ids=["not_audio", "empty", "8khz", "31s", "nan", "silence", "one_sample", "huge_rate"])
def test_a_bad_clip_is_refused_with_what_is_wrong(client, clip, code, words):
    refused = error(make(client, clip), 400)
    assert refused["code"] == code and words in refused["message"] and refused["param"] == "file"
    assert not [v for v in client.get("/v1/audio/voices").json["voices"] if v.get("object") == "voice"]


def test_a_header_that_claims_hours_is_refused_before_reading(client):
    clip = bytearray(wav(np.sin(np.arange(16000) / 5) * 0.3, 16000))
    clip[40:44] = (16000 * 2 * 3600 * 5).to_bytes(4, "little")  # data chunk size: five hours
    refused = error(make(client, bytes(clip)), 400)
    assert refused["code"] == "invalid_audio"


def test_a_transcript_of_ten_thousand_characters_is_refused(client):
    assert error(make(client, text="a" * 10_000), 400)["code"] == "transcript_too_long"


def test_an_upload_over_the_limit_is_413(client):
    assert error(make(client, b"\0" * 2_100_000), 413)["code"] == "body_too_large"


def test_the_number_of_saved_voices_is_capped(client):
    for _ in range(3):
        assert make(client).status_code == 201
    assert error(make(client), 409)["code"] == "too_many_voices"


def test_no_file_is_a_400_naming_the_field(client):
    response = client.post("/v1/audio/voices", data={"text": "x"}, content_type="multipart/form-data")
    assert error(response, 400)["code"] == "missing_audio"


def test_instructions_to_a_model_without_them_name_the_model(client):
    refused = error(client.post("/tts", json={"text": "Hi.", "instructions": "Speak softly."}), 400)
    assert refused["code"] == "unsupported_instructions" and "cosyvoice-300m-sft" in refused["message"]


def test_voice_conversion_says_the_source_again_in_a_saved_voice(client):
    voice = make(client, text=EN_TEXT).json["id"]
    converted = client.post("/vc", data={"file": (io.BytesIO(SOURCE_CLIP), "source.wav"), "voice": voice},
                            content_type="multipart/form-data")
    assert converted.status_code == 200 and converted.content_type == "audio/wav"
    samples, rate = soundfile.read(io.BytesIO(converted.data))
    assert rate == 24000 and samples.size > 0


def test_voice_conversion_needs_a_voice_made_from_a_clip(client):
    refused = error(client.post("/vc", data={"file": (io.BytesIO(SOURCE_CLIP), "s.wav"), "voice": "en-female"},
                                content_type="multipart/form-data"), 400)
    assert refused["code"] == "unsupported_voice"


def test_an_instruct_model_takes_instructions_and_makes_no_voices(make_app, tmp_path):
    from cosyvoice_lite.engines.cosyvoice import CosyVoiceEngine

    engine = CosyVoiceEngine(model_copy(tmp_path, "tiny-instruct"), mode="fast", backend="torch")
    client = make_app(engine).test_client()
    assert client.get("/speakers").json["offers"]["instructions"] is True
    spoken = client.post("/tts", json={"text": "Hello there.", "instructions": "Speak softly and slowly."})
    assert spoken.status_code == 200 and len(spoken.data) > 44
    assert error(make(client, text=EN_TEXT), 400)["code"] == "unsupported_mode"


# ---- the base model (CosyVoice-300M): no spk2info.pt, so no speaker of its own; voices are made from clips ------

@pytest.fixture(scope="module")
def base_client(base_engine, tmp_path_factory):
    from cosyvoice_lite.serve import create_app

    app = create_app({"engine": base_engine, "cache_dir": str(tmp_path_factory.mktemp("base-cache"))})
    assert app.extensions["cosyvoice_lite"].admission.wait_ready(300)
    yield app.test_client()
    app.extensions["cosyvoice_lite"].close()


def test_a_base_model_warms_up_with_no_speaker_of_its_own_and_offers_voices_from_clips(base_client):
    assert base_client.get("/ready").status_code == 200  # the warm-up needed no built-in speaker
    speakers = base_client.get("/speakers").json
    assert speakers["model"] == "cosyvoice-300m" and speakers["speakers"] == [] and speakers["default"] is None
    assert speakers["offers"] == {"kind": "base", "speakers": False, "cloning": True, "instructions": False,
                                  "conversion": True}
    assert "POST /v1/audio/voices" in speakers["hint"]
    assert base_client.get("/v1/audio/voices").json == {"voices": []}  # no built-ins, no OpenAI names mapped


@pytest.mark.parametrize("route, body, code", [
    ("/tts", {"text": "Hello."}, "speaker_required"),
    ("/tts", {"text": "Hello.", "speaker": "zh-female"}, "unknown_speaker"),
    ("/v1/audio/speech", {"input": "Hello."}, "speaker_required"),
    ("/v1/audio/speech", {"input": "Hello.", "voice": "alloy"}, "unknown_speaker"),
], ids=["tts_no_speaker", "tts_builtin_name", "speech_no_voice", "speech_openai_name"])
def test_on_a_base_model_a_request_without_a_saved_voice_is_a_400_saying_how_to_make_one(base_client, route, body,
                                                                                         code):
    refused = error(base_client.post(route, json=body), 400)
    assert refused["code"] == code
    assert "cosyvoice-300m" in refused["message"] and "POST /v1/audio/voices" in refused["message"]


def test_voices_made_on_a_base_model_speak_and_are_all_it_lists(base_client):
    zero_shot = make(base_client, text=EN_TEXT, name="fox reader")
    cross_lingual = make(base_client, name="any tongue")
    assert (zero_shot.status_code, cross_lingual.status_code) == (201, 201), (zero_shot.data, cross_lingual.data)
    assert (zero_shot.json["mode"], cross_lingual.json["mode"]) == ("zero_shot", "cross_lingual")
    listed = base_client.get("/v1/audio/voices").json["voices"]
    assert sorted(v["id"] for v in listed) == sorted([zero_shot.json["id"], cross_lingual.json["id"]])
    for voice in (zero_shot.json, cross_lingual.json):
        spoken = base_client.post("/tts", json={"text": "Hello there.", "speaker": voice["id"], "format": "pcm"})
        assert spoken.status_code == 200 and spoken.headers["X-Speaker"] == voice["name"] and len(spoken.data) > 0
        assert base_client.delete(f"/v1/audio/voices/{voice['id']}").status_code == 200


def test_a_voice_book_without_voices_has_no_default_and_maps_no_openai_name():
    from cosyvoice_lite.voices import VoiceBook, VoiceMapError

    book = VoiceBook([], engine="cosyvoice")
    assert book.default is None and book.mapped == {} and book.listing() == [] and book.find("alloy") is None
    with pytest.raises(VoiceMapError, match="no built-in speakers"):
        VoiceBook([], "alloy=zh-female", engine="cosyvoice")


def test_a_base_model_without_the_networks_that_make_voices_is_refused_at_start(tmp_path):
    from cosyvoice_lite.engines import StartupError, load_engine
    from cosyvoice_lite.settings import Settings

    mute = linked_model(tmp_path, "tiny-base", MODES / "model",
                        leave_out=("spk2info.pt", "campplus.onnx", "speech_tokenizer_v1.onnx"))
    with pytest.raises(StartupError, match="no spk2info.pt .* no campplus.onnx and speech_tokenizer_v1.onnx"):
        load_engine(Settings.from_env({"model_dir": str(mute), "backend": "torch"}))


def multipart(fields: dict, clip: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
                 f"Content-Type: audio/wav\r\n\r\n".encode() + clip + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


def create(server, **fields) -> str:
    body, headers = multipart(fields, EN_CLIP)
    status, _, answer = server.request("POST", "/v1/audio/voices", body, headers, timeout=120)
    assert status == 201, answer[:300]
    return json.loads(answer)["id"]


def speak(server, voice: str, stream: bool) -> bytes:
    status, _, body = server.request("POST", "/v1/audio/speech", {
        "input": "Hello there.", "voice": voice, "response_format": "pcm", "stream": stream, "seed": 5}, timeout=120)
    assert status == 200, body[:300]
    return body


def test_a_saved_voice_outlives_a_restart_of_gunicorn(sft_dir, tmp_path):
    env = {"MODEL_DIR": str(sft_dir), "COSYVOICE_MODE": "fast", "BACKEND": "torch", "CACHE": "off",
           "CACHE_DIR": str(tmp_path)}
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    with gunicorn(tmp_path / "first", env, ready_timeout=180) as server:
        voice = create(server, text=EN_TEXT)
        whole, streamed = speak(server, voice, False), speak(server, voice, True)
        assert whole == streamed
    with gunicorn(tmp_path / "second", env, ready_timeout=180) as server:
        assert speak(server, voice, True) == whole
        assert server.request("DELETE", f"/v1/audio/voices/{voice}")[0] == 200
        assert server.request("POST", "/tts", {"text": "Hi.", "speaker": voice})[0] == 400


def test_two_servers_share_saved_voices_through_redis(sft_dir, tmp_path):
    from conftest import require_program
    from test_cache import RedisServer

    redis = RedisServer(require_program("redis-server", "apt-get install redis-server"), tmp_path)
    redis.start()
    try:
        env = {"MODEL_DIR": str(sft_dir), "COSYVOICE_MODE": "fast", "BACKEND": "torch", "CACHE": redis.url}
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
        with gunicorn(tmp_path / "one", {**env, "CACHE_DIR": str(tmp_path / "c1")}, ready_timeout=180) as one, \
                gunicorn(tmp_path / "two", {**env, "CACHE_DIR": str(tmp_path / "c2")}, ready_timeout=180) as two:
            voice = create(one, name="shared")
            assert speak(two, voice, False) == speak(one, voice, False)
            assert two.request("DELETE", f"/v1/audio/voices/{voice}")[0] == 200
            assert one.request("GET", f"/v1/audio/voices/{voice}")[0] == 404
    finally:
        redis.kill()
