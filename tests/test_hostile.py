"""Hostile clients against a real gunicorn with the tiny model (issue 17): texts built to be as expensive as the
limits allow, clients that hang up, streams that cannot finish. Each is answered within seconds or refused, and
the worker is free again right after. (The tiny model's networks are small: its times are lower bounds.)"""
from __future__ import annotations

import http.client
import json
import time

import pytest

from conftest import gunicorn

HOSTILE_ROWS = {
    "presentation_form": "\ufdfa" * 4096,                 # 12,289 text tokens in one word
    "hanzi_then_digits": "数" + "1" * 4095,               # 8,192 tokens after Chinese TN, no stop
    "combining_marks": ("a" + "\u0301\u0302\u0303\u0304\u0305\u0306\u0307") * 512,
    "money": ("$1,234,567.89 " * 300)[:4096],
    "digits": "1" * 4096,
}
LONG_TEXT = "a" * 3000  # one word of 751 tokens


def post(port: int, body: dict, timeout: float = 30.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/tts", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def read_stream(response) -> tuple[int, bool]:
    """(bytes received, whether the chunked body ended with its terminating chunk)."""
    received = 0
    try:
        while True:
            data = response.read1(65536)
            if not data:
                return received, True
            received += len(data)
    except http.client.IncompleteRead as e:
        return received + len(e.partial), False


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, tiny_model_dir):
    """One worker, QUEUE_SIZE=2, REQUEST_TIMEOUT=6, as in the issue's runs (with a shorter timeout)."""
    with gunicorn(tmp_path_factory.mktemp("hostile"), {"MODEL_DIR": str(tiny_model_dir), "QUEUE_SIZE": "2",
                                                        "REQUEST_TIMEOUT": "6"}) as server:
        yield server


def idle_and_fast(server) -> float:
    """Wait until /ready counts no work, then -> seconds a short request takes."""
    server.wait_for(lambda: json.loads(server.request("GET", "/ready")[2])["queue"]["running"] == 0, 2,
                    "no work running")
    started = time.monotonic()
    status, _, _ = server.request("POST", "/tts", {"text": "Hi."})
    assert status == 200
    return time.monotonic() - started


@pytest.mark.parametrize("name", HOSTILE_ROWS)
def test_hostile_text_streams_its_first_audio_within_seconds_and_hanging_up_frees_the_worker(tiny_server, name):
    started = time.monotonic()
    conn, response = post(tiny_server.port, {"text": HOSTILE_ROWS[name], "stream": True, "format": "pcm"})
    try:
        assert response.status == 200
        assert response.read1(65536)
        assert time.monotonic() - started < 5
    finally:
        conn.close()
    assert idle_and_fast(tiny_server) < 2


def test_client_hanging_up_before_its_first_audio_frees_the_worker(tiny_server):
    conn, _ = None, None
    conn = http.client.HTTPConnection("127.0.0.1", tiny_server.port, timeout=10)
    conn.request("POST", "/tts", body=json.dumps({"text": HOSTILE_ROWS["presentation_form"], "stream": True}),
                 headers={"Content-Type": "application/json"})
    time.sleep(0.1)
    conn.close()
    assert idle_and_fast(tiny_server) < 2


@pytest.mark.parametrize("text", ["<|endoftext|>" * 315, "<|en|><|zh|>"])
def test_text_of_control_tokens_only_is_400_nothing_to_speak(tiny_server, text):
    status, _, body = tiny_server.request("POST", "/tts", {"text": text})
    assert status == 400 and json.loads(body)["error"]["code"] == "nothing_to_speak"


def test_text_too_long_to_finish_within_the_timeout_is_a_fast_413_suggesting_streaming(tiny_server):
    started = time.monotonic()
    status, _, body = tiny_server.request("POST", "/tts", {"text": LONG_TEXT})
    error = json.loads(body)["error"]
    assert status == 413 and error["code"] == "too_much_speech" and '"stream": true' in error["message"]
    assert error["synthesis_seconds"] > 6 and error["audio_seconds"] > 0
    assert time.monotonic() - started < 2


def test_stream_cut_by_the_timeout_ends_without_its_terminating_chunk(tiny_server):
    before = tiny_server.metric('cosyvoice_requests_total{endpoint="tts",code="504"}')
    started = time.monotonic()
    conn, response = post(tiny_server.port, {"text": LONG_TEXT, "stream": True, "format": "pcm"})
    try:
        assert response.status == 200
        received, complete = read_stream(response)
    finally:
        conn.close()
    assert received > 0 and not complete
    assert 5.5 < time.monotonic() - started < 9
    tiny_server.wait_for(lambda: "outcome=truncated_timeout" in tiny_server.log(), 5, "the log line")
    assert tiny_server.metric('cosyvoice_requests_total{endpoint="tts",code="504"}') == before + 1
    assert "Traceback" not in tiny_server.log()


def test_stream_stops_at_max_audio_seconds_visibly_truncated(tmp_path, tiny_model_dir):
    text = "word " * 60  # at least 2.4 s of speech (EOS is banned before 2 tokens per text token), at most 24 s
    with gunicorn(tmp_path, {"MODEL_DIR": str(tiny_model_dir), "MAX_AUDIO_SECONDS": "3"}) as server:
        conn, response = post(server.port, {"text": text, "stream": True, "format": "pcm"})
        try:
            received, complete = read_stream(response)
        finally:
            conn.close()
        assert response.status == 200 and not complete
        assert received <= 3 * 24000 * 2
        status, _, body = server.request("POST", "/tts", {"text": text})  # not streamed: refused before work
        assert status == 413 and "MAX_AUDIO_SECONDS=3" in json.loads(body)["error"]["message"]
        status, _, body = server.request("POST", "/tts", {"text": "word " * 200, "stream": True})  # >= 8 s
        assert status == 413 and json.loads(body)["error"]["code"] == "too_much_speech"
        assert "outcome=truncated_audio_limit" in server.log()
