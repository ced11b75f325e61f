"""A real gunicorn on 127.0.0.1 (gunicorn.conf.py, random free port, started and killed by the tests): streaming,
the bounded queue, timeouts, /health during synthesis, clients that hang up, SIGTERM, start-up failures and
metrics shared by several workers. Synthesis is real (offline Piper voice; CosyVoice with a tiny model); the gated
server holds it at chosen points so that each test is deterministic."""
from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile

from conftest import ROOT, free_port, gunicorn, parse_metrics, start_gunicorn, stop_gunicorn

SENTENCES = "The quick brown fox jumps over the lazy dog. It was a sunny day. Everyone went outside to play."


def post_json(port: int, path: str, body: dict, timeout: float = 30.0, headers: dict | None = None):
    """Send a JSON POST; -> (connection, response) with the body unread."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def in_background(fn, *args):
    """Run fn(*args) in a thread; -> (thread, result list)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    thread.start()
    return thread, result


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    """app:app exactly as deployed, with no model directory: the offline Piper voice."""
    with gunicorn(tmp_path_factory.mktemp("plain")) as server:
        yield server


# ---- the deployed app -----------------------------------------------------------------------------------------

def test_startup_log_says_which_engine_serves_and_how_to_get_cosyvoice(plain_server):
    log = plain_server.log()
    assert "engine: piper" in log and "scripts/download_model.py" in log
    assert "warmed up" in log


def test_tts_wav_over_http(plain_server):
    status, headers, body = plain_server.request("POST", "/tts", {"text": "Hello from gunicorn."})
    assert status == 200 and headers["content-type"] == "audio/wav"
    samples, rate = soundfile.read(io.BytesIO(body))
    assert rate == 24000 and samples.ndim == 1 and len(samples) / rate > 0.5
    assert f"id={headers['x-request-id']} POST /tts status=200" in plain_server.log()


@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "opus", "flac"])
def test_openai_speech_over_http(plain_server, fmt):
    status, headers, body = plain_server.request("POST", "/v1/audio/speech", {
        "model": "tts-1", "input": "Speech through the OpenAI endpoint.", "voice": "joe", "response_format": fmt,
        "stream": False})
    assert status == 200
    duration = float(headers["x-audio-duration"])
    if fmt == "pcm":
        samples, rate, channels = np.frombuffer(body, "<i2"), 24000, 1
    else:
        info = soundfile.info(io.BytesIO(body))
        samples, rate = soundfile.read(io.BytesIO(body))
        channels = info.channels
    assert (rate, channels) == (24000, 1)
    assert abs(len(samples) / rate - duration) < (0.1 if fmt == "mp3" else 0.03)


def test_stream_is_chunked_and_starts_long_before_synthesis_ends(plain_server):
    """Real timing, no gate: the first bytes of a long multi-sentence text arrive well before the last ones."""
    text = " ".join([SENTENCES] * 4)
    started = time.monotonic()
    conn, response = post_json(plain_server.port, "/tts", {"text": text, "stream": True})
    try:
        assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
        assert response.getheader("Content-Length") is None
        first = response.read1(1 << 16)
        first_at = time.monotonic() - started
        rest = response.read()
        total = time.monotonic() - started
    finally:
        conn.close()
    assert first[:4] == b"RIFF"
    assert first_at < 0.5 * total, (first_at, total)
    samples, rate = soundfile.read(io.BytesIO(first + rest))
    assert rate == 24000 and len(samples) / rate > 10


def test_cosyvoice_tiny_model_over_http(tmp_path, tiny_model_dir):
    with gunicorn(tmp_path, {"MODEL_DIR": str(tiny_model_dir)}) as server:
        status, _, body = server.request("GET", "/speakers")
        speakers = json.loads(body)
        assert status == 200 and speakers["engine"] == "cosyvoice" and len(speakers["speakers"]) == 7
        status, _, body = server.request("POST", "/tts", {"text": "你好。", "speaker": "zh-female"})
        assert status == 200
        samples, rate = soundfile.read(io.BytesIO(body))
        assert rate == 24000 and len(samples) > 0
        assert "engine: cosyvoice" in server.log()


# ---- gated server: streaming, queue, timeouts, disconnects ---------------------------------------------------

def test_stream_first_bytes_arrive_before_the_last_segment_is_synthesised(gserver):
    gserver.gate.hold("after_first")
    conn, response = post_json(gserver.port, "/tts", {"text": SENTENCES, "stream": True})
    try:
        assert response.status == 200
        first = response.read1(1 << 16)
        assert first[:4] == b"RIFF" and len(first) > 44
        assert gserver.metric("cosyvoice_in_progress") == 1  # the engine is held after its first chunk
        gserver.gate.open()
        rest = response.read()
    finally:
        conn.close()
    samples, rate = soundfile.read(io.BytesIO(first + rest))
    assert rate == 24000 and len(samples) > (len(first) - 44) // 2


def test_health_answers_within_a_second_during_synthesis(gserver):
    gserver.gate.hold("start")
    thread, result = in_background(gserver.request, "POST", "/tts", {"text": "A long request."})
    gserver.wait_for(lambda: gserver.metric("cosyvoice_in_progress") == 1, what="synthesis to start")
    for path in ("/health", "/ready", "/metrics"):
        started = time.monotonic()
        status, _, _ = gserver.request("GET", path, timeout=5)
        assert status == 200 and time.monotonic() - started < 1.0, path
    gserver.gate.open()
    thread.join(30)
    assert result[0][0] == 200


def fill_the_queue(gserver) -> list:
    """Hold one request in the engine and one waiting (the gserver fixture's capacity): -> their threads."""
    gserver.gate.hold("start")
    held = [in_background(gserver.request, "POST", "/tts", {"text": f"Request {i}."}) for i in range(2)]
    gserver.wait_for(lambda: gserver.metric("cosyvoice_in_progress") == 1
                     and gserver.metric("cosyvoice_queue_depth") == 1, what="one running and one waiting")
    return held


def test_full_queue_gets_immediate_503_with_retry_after(gserver):
    held = fill_the_queue(gserver)
    for _ in range(3):
        started = time.monotonic()
        status, headers, body = gserver.request("POST", "/tts", {"text": "No room."})
        assert status == 503 and time.monotonic() - started < 0.5
        assert int(headers["retry-after"]) >= 1
        assert json.loads(body)["error"]["code"] == "queue_full"
    gserver.gate.open()
    for thread, result in held:
        thread.join(30)
        assert result[0][0] == 200


def test_ready_is_503_while_the_queue_is_full_and_200_again_after(gserver):
    """Kubernetes takes a full pod out of the Service's endpoints instead of sending it requests to refuse."""
    held = fill_the_queue(gserver)
    status, headers, body = gserver.request("GET", "/ready")
    assert status == 503 and json.loads(body)["error"]["code"] == "queue_full"
    assert int(headers["retry-after"]) >= 1
    assert gserver.request("GET", "/health")[0] == 200  # alive all the same: no restart
    gserver.gate.open()
    for thread, result in held:
        thread.join(30)
        assert result[0][0] == 200
    assert gserver.request("GET", "/ready")[0] == 200


def test_timeout_gives_504_and_the_worker_recovers(gserver):
    gserver.gate.hold("start")
    started = time.monotonic()
    status, _, body = gserver.request("POST", "/tts", {"text": "This will time out."})
    elapsed = time.monotonic() - started
    assert status == 504 and json.loads(body)["error"]["code"] == "timeout"
    assert 2.5 < elapsed < 6  # REQUEST_TIMEOUT=3
    gserver.wait_for(lambda: gserver.metric("cosyvoice_in_progress") == 0, 5, "the timed-out synthesis to stop")
    gserver.gate.open()
    gserver.gate.mode("")
    assert gserver.request("POST", "/tts", {"text": "Back to normal."})[0] == 200


def test_client_hanging_up_mid_stream_stops_its_synthesis(gserver):
    gserver.gate.hold("after_first")
    conn, response = post_json(gserver.port, "/tts", {"text": SENTENCES, "stream": True})
    assert response.status == 200 and response.read1(1 << 16)[:4] == b"RIFF"
    rid = response.getheader("X-Request-ID")
    conn.sock.shutdown(socket.SHUT_RDWR)
    response.close()
    conn.close()
    # The gate stays closed: synthesis can only end because the server noticed and cancelled it.
    gserver.wait_for(lambda: gserver.metric("cosyvoice_in_progress") == 0, 5, "the abandoned synthesis to stop")
    gserver.wait_for(lambda: f"id={rid} POST /tts status=200" in gserver.log(), 5, "the request log line")
    line = next(line for line in gserver.log().splitlines() if f"id={rid} " in line)
    assert "outcome=client_gone" in line


def test_client_hanging_up_while_waiting_cancels_the_request(gserver):
    gserver.gate.hold("start")
    sock = socket.create_connection(("127.0.0.1", gserver.port), timeout=5)
    body = json.dumps({"text": "Nobody will listen."}).encode()
    sock.sendall(b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    gserver.wait_for(lambda: gserver.metric("cosyvoice_in_progress") == 1, what="synthesis to start")
    sock.close()
    gserver.wait_for(lambda: gserver.metric("cosyvoice_in_progress") == 0, 5, "the abandoned synthesis to stop")
    gserver.gate.open()
    assert gserver.request("POST", "/tts", {"text": "Next one."})[0] == 200


# ---- process life cycle ---------------------------------------------------------------------------------------

def test_sigterm_lets_the_in_flight_request_finish(tmp_path, gate):
    gate.mode("start")
    server = start_gunicorn(tmp_path, {"GRACEFUL_TIMEOUT": "20"}, gate=gate)
    try:
        gate.close()
        thread, result = in_background(server.request, "POST", "/tts", {"text": "Finish me, please."})
        server.wait_for(lambda: server.metric("cosyvoice_in_progress") == 1, what="synthesis to start")
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None  # still draining
        gate.open()
        thread.join(30)
        status, _, body = result[0]
        assert status == 200 and soundfile.read(io.BytesIO(body))[1] == 24000
        assert server.proc.wait(20) == 0
    finally:
        stop_gunicorn(server)


@pytest.mark.parametrize("case", ["cosyvoice2_dir", "random_file", "truncated_checkpoint"])
def test_bad_model_dir_fails_startup_loudly(tmp_path, tiny_model_dir, case):
    if case == "cosyvoice2_dir":
        model_dir = tmp_path / "cv2"
        model_dir.mkdir()
        (model_dir / "cosyvoice2.yaml").write_text("llm: {}\n")
        expect = "CosyVoice2"
    elif case == "random_file":
        model_dir = tmp_path / "random.bin"
        model_dir.write_bytes(b"\x00junk" * 100)
        expect = "is a file"
    else:
        model_dir = tmp_path / "truncated"
        shutil.copytree(tiny_model_dir, model_dir)
        data = (model_dir / "llm.pt").read_bytes()
        (model_dir / "llm.pt").write_bytes(data[: len(data) // 3])
        expect = "cannot load the CosyVoice model"
    port = free_port()
    env = {"PORT": str(port), "HOST": "127.0.0.1", "MODEL_DIR": str(model_dir), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "cannot start" in proc.stderr and expect in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_two_workers_share_metrics_and_api_key_is_never_logged(tmp_path):
    key = "top-secret-token-987"
    with gunicorn(tmp_path, {"WORKERS": "2", "API_KEY": key}) as server:
        auth = {"Authorization": f"Bearer {key}"}
        assert server.request("POST", "/tts", {"text": "Hi."})[0] == 401
        assert server.request("GET", "/health")[0] == 200
        for i in range(6):
            assert server.request("POST", "/tts", {"text": f"Number {i}."}, headers=auth)[0] == 200

        def total() -> dict:
            status, _, body = server.request("GET", "/metrics", headers=auth)
            assert status == 200
            return parse_metrics(body.decode())

        server.wait_for(lambda: total()["cosyvoice_workers"] == 2, 20, "both workers to report")
        for _ in range(4):  # whichever worker answers, the totals are the same
            values = total()
            assert values['cosyvoice_requests_total{code="200",endpoint="tts"}'] == 6
            assert values['cosyvoice_requests_total{code="401",endpoint="tts"}'] == 1
        assert key not in server.log()


ZH_SIX = "今天天气很好。我们去公园散步吧。那里有很多花。孩子们在草地上玩。老人们在下棋。傍晚我们一起回家。"


def _stream_times(port: int, text: str, started: float) -> tuple[float, float, int]:
    """(first audio byte, end of stream) in seconds after `started`, and the bytes received."""
    conn, response = post_json(port, "/tts", {"text": text, "speaker": "zh-female", "stream": True,
                                              "format": "pcm"}, timeout=120)
    try:
        assert response.status == 200
        first = response.read1(1 << 16)
        first_at = time.monotonic() - started
        rest = response.read()
        return first_at, time.monotonic() - started, len(first) + len(rest)
    finally:
        conn.close()


def test_concurrent_streams_on_one_worker_are_served_side_by_side(tmp_path, tiny_model_dir):
    """Three listeners of one worker: each hears its first audio before the first listener's stream has ended
    (they are decoded side by side by the scheduler, not one after another)."""
    env = {"MODEL_DIR": str(tiny_model_dir), "WORKERS": "1", "QUEUE_SIZE": "4"}
    with gunicorn(tmp_path, env) as server:
        started = time.monotonic()
        clients = []
        for _ in range(3):
            clients.append(in_background(_stream_times, server.port, ZH_SIX, started))
            time.sleep(0.05)
        for thread, _ in clients:
            thread.join(180)
        times = [result[0] for _, result in clients]
        assert len(times) == 3, "a client did not finish"
        first_client_end = times[0][1]
        assert all(size > 0 for _, _, size in times)
        assert all(first_at < first_client_end for first_at, _, _ in times), times
