"""Hostile clients against a real gunicorn with the tiny model (issue 17): texts built to be as expensive as the
limits allow, clients that hang up, streams that cannot finish. Each is answered within seconds or refused, and
the worker is free again right after. (The tiny model's networks are small: its times are lower bounds.)"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, edit_checkpoint, free_port, gunicorn, start_gunicorn, stop_gunicorn

HOSTILE_ROWS = {
    "presentation_form": "\ufdfa" * 4096,                 # 12,289 text tokens in one word
    "hanzi_then_digits": "数" + "1" * 4095,               # 8,192 tokens after Chinese TN, no stop
    "combining_marks": ("a" + "\u0301\u0302\u0303\u0304\u0305\u0306\u0307") * 512,
    "money": ("$1,234,567.89 " * 300)[:4096],
    "digits": "1" * 4096,
}
LONG_TEXT = "a" * 3000  # one word of 751 tokens


def ready_running(server):
    """Work /ready counts (None while it answers 503, e.g. with the queue full)."""
    return json.loads(server.request("GET", "/ready")[2]).get("queue", {}).get("running")


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
    server.wait_for(lambda: ready_running(server) == 0, 2,
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
    before = tiny_server.metric('cosyvoice_requests_total{code="504",endpoint="tts"}')
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
    assert tiny_server.metric('cosyvoice_requests_total{code="504",endpoint="tts"}') == before + 1
    assert "Traceback" not in tiny_server.log()


def test_stream_stops_at_max_audio_seconds_visibly_truncated(tmp_path, tiny_model_dir):
    # at least 2.44 s of speech (EOS is banned before 2 tokens per text token), at most 24.4 s: the limit leaves EOS
    # three sampled tokens in which to end the stream before it, and a seed makes the draw the same every run
    text = "word " * 60
    with gunicorn(tmp_path, {"MODEL_DIR": str(tiny_model_dir), "MAX_AUDIO_SECONDS": "2.5"}) as server:
        conn, response = post(server.port, {"text": text, "stream": True, "format": "pcm", "seed": 1})
        try:
            received, complete = read_stream(response)
        finally:
            conn.close()
        assert response.status == 200 and not complete
        assert received <= 2.5 * 24000 * 2
        status, _, body = server.request("POST", "/tts", {"text": text})  # not streamed: refused before work
        assert status == 413 and "MAX_AUDIO_SECONDS=2.5" in json.loads(body)["error"]["message"]
        status, _, body = server.request("POST", "/tts", {"text": "word " * 200, "stream": True})  # >= 8 s
        assert status == 413 and json.loads(body)["error"]["code"] == "too_much_speech"
        assert "outcome=truncated_audio_limit" in server.log()


# ---- every refusal is JSON ------------------------------------------------------------------------------------

def raw(port: int, data: bytes) -> tuple[int, dict, bytes]:
    """Send bytes as they are, read until the server closes -> (status, headers, body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    finally:
        sock.close()
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body[:int(headers["content-length"])]


CHUNKED = b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
MALFORMED = {
    "size_not_hex": CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n",
    "negative_size": CHUNKED + b"-5\r\n{}\r\n0\r\n\r\n",
    "size_differs_from_body": CHUNKED + b'5\r\n{"text": "hi"}\r\n0\r\n\r\n',
    "trailer_with_content_length": CHUNKED + b'10\r\n{"text": "hi."}\r\n0\r\nContent-Length: 5\r\n\r\n',
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_chunked_body_is_400_json_without_a_traceback(tiny_server, name):
    status, headers, body = raw(tiny_server.port, MALFORMED[name])
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "malformed_body"
    assert "Traceback" not in tiny_server.log() and " ERROR " not in tiny_server.log()


GUNICORN_REFUSALS = {
    "bad_request_line": (b"GARBAGE\r\n\r\n", 400),
    "uri_too_long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "too_many_headers": (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200))
                         + b"\r\n", 431),
    "unknown_expectation": (b"POST /tts HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n{}", 417),
    "unknown_transfer_coding": (b"POST /tts HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n\r\n", 501),
}


@pytest.mark.parametrize("name", GUNICORN_REFUSALS)
def test_gunicorns_own_refusals_are_json(tiny_server, name):
    data, expected = GUNICORN_REFUSALS[name]
    status, headers, body = raw(tiny_server.port, data)
    assert status == expected and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["message"] and error["code"]



@pytest.mark.parametrize("path", ["//health", "//tts", "/health/", "//v1/audio/voices"])
def test_odd_paths_are_never_a_redirect_built_from_the_host_header(tiny_server, path):
    """Werkzeug answers a doubled or trailing slash with a 308 to an absolute URL made from the Host header
    (an open redirect); here such a path is served, or refused in JSON."""
    status, headers, body = raw(tiny_server.port, f"GET {path} HTTP/1.1\r\nHost: evil.example\r\n"
                                                  f"Connection: close\r\n\r\n".encode())
    assert (status == 200 or 400 <= status < 500) and "location" not in headers and b"evil.example" not in body
    assert headers["content-type"] == "application/json"

# ---- start-up refuses model files it cannot trust -------------------------------------------------------------

def _yaml_with(model_dir, top: str = "", in_llm: str = "") -> None:
    path = model_dir / "cosyvoice.yaml"
    text = path.read_text()
    text = text.replace("llm: !new:cosyvoice.llm.llm.TransformerLM\n",
                        f"{top}\nllm: !new:cosyvoice.llm.llm.TransformerLM\n{in_llm}")
    path.write_text(text)


def _laughs(levels: int, width: int) -> str:
    lines = [f"lol0: &lol0 [{', '.join(['lol'] * width)}]"]
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines)


def _bad_model_dir(tmp_path, tiny_model_dir, case: str):
    """-> (MODEL_DIR, text the start-up error must contain)."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    if case == "billion_laughs":
        _yaml_with(model_dir, top=_laughs(9, 9), in_llm="    lol: *lol8\n")
        return model_dir, "expands to more than"
    if case == "many_aliases":
        _yaml_with(model_dir, top="x: &x 1\nmany: [" + ", ".join(["*x"] * 150) + "]")
        return model_dir, "YAML aliases"
    if case == "huge_power":
        _yaml_with(model_dir, in_llm="    lol: !ref <llm_input_size> ** 100000000\n")
        return model_dir, "out of range"
    if case == "deep_ref_chain":
        chain = "\n".join(f"r{i}: !ref <r{i + 1}>" for i in range(3000)) + "\nr3000: 1"
        _yaml_with(model_dir, top=chain, in_llm="    lol: !ref <r0>\n")
        return model_dir, "!ref chain deeper than"
    if case in ("llm_fifo", "llm_dev_zero", "llm_directory"):
        (model_dir / "llm.pt").unlink()
        if case == "llm_fifo":
            os.mkfifo(model_dir / "llm.pt")
            return model_dir, "llm.pt is a FIFO"
        if case == "llm_dev_zero":
            os.symlink("/dev/zero", model_dir / "llm.pt")
            return model_dir, "llm.pt is a device"
        (model_dir / "llm.pt").mkdir()
        return model_dir, "llm.pt is a directory"
    if case == "nan_in_hift":
        def poison(state):
            name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
            state[name] = state[name].clone()
            state[name].view(-1)[0] = float("nan")

        edit_checkpoint(model_dir / "hift.pt", poison)
        return model_dir, "hift.pt"
    if case == "speaker_id_with_newline":
        edit_checkpoint(model_dir / "spk2info.pt",
                        lambda info: info.update({"evil\nX-Injected: 1": next(iter(info.values()))}))
        return model_dir, "control character"
    if case == "model_dir_symlink_loop":
        loop = tmp_path / "loop"
        os.symlink(loop, loop)
        return loop, "cannot be used"
    if case == "model_dir_dangling_symlink":
        link = tmp_path / "dangling"
        os.symlink(tmp_path / "nowhere", link)
        return link, "does not exist"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["billion_laughs", "many_aliases", "huge_power", "deep_ref_chain", "llm_fifo",
                                  "llm_dev_zero", "llm_directory", "nan_in_hift", "speaker_id_with_newline",
                                  "model_dir_symlink_loop", "model_dir_dangling_symlink"])
def test_startup_refuses_untrusted_model_files_quickly_and_clearly(tmp_path, tiny_model_dir, case):
    model_dir, expect = _bad_model_dir(tmp_path, tiny_model_dir, case)
    env = {**os.environ, "PORT": str(free_port()), "HOST": "127.0.0.1", "MODEL_DIR": str(model_dir),
           "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and time.monotonic() - started < 30
    assert "cannot start" in proc.stderr and expect in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "engine: piper" not in proc.stderr


def test_ready_shows_no_paths_to_anonymous_callers_when_api_key_is_set(tmp_path, tiny_model_dir):
    cache_dir = tmp_path / "cache"
    with gunicorn(tmp_path, {"MODEL_DIR": str(tiny_model_dir), "API_KEY": "sekret", "CACHE": "disk",
                             "CACHE_DIR": str(cache_dir)}) as server:
        status, _, body = server.request("GET", "/ready")
        assert status == 200 and str(tiny_model_dir) not in body.decode() and str(cache_dir) not in body.decode()
        assert json.loads(body)["cache"]["backend"] == "disk"
        status, headers, body = server.request("GET", "//speakers", headers={"Host": "evil.example"})
        assert status in (401, 404) and "evil.example" not in headers.get("location", "") + body.decode()


def test_draining_server_refuses_new_connections(tmp_path, gate):
    gate.hold("after_first")
    server = start_gunicorn(tmp_path, {"GRACEFUL_TIMEOUT": "20"}, gate=gate)
    try:
        conn, response = post(server.port, {"text": "One. Two. Three.", "stream": True})
        assert response.read1(65536)[:4] == b"RIFF"
        server.proc.send_signal(signal.SIGTERM)  # the stream holds the drain open
        time.sleep(1.5)
        assert server.proc.poll() is None
        try:  # refused or reset at once; a timeout (a connection left hanging in the backlog) fails the test
            refused = socket.create_connection(("127.0.0.1", server.port), timeout=2)
            refused.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = refused.recv(100)
        except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
            answer = b""
        assert answer == b""
        gate.open()
        response.read()
        conn.close()
    finally:
        stop_gunicorn(server)


# ---- connections cannot starve a worker -----------------------------------------------------------------------

def _slow_client(port: int, kind: str, stop: threading.Event, results: list) -> None:
    """One hostile connection: 'headers' trickles its headers, 'body' its body, 'silent' sends nothing,
    'no_read' asks for a stream and never reads it (small receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    try:
        sock.connect(("127.0.0.1", port))
        if kind == "no_read":
            body = json.dumps({"text": "word " * 150, "stream": True, "format": "pcm"}).encode()
            sock.sendall(b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d"
                         b"\r\n\r\n%s" % (len(body), body))
            stop.wait()
            return
        if kind == "headers":
            data = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
        elif kind == "body":
            sock.sendall(b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 300"
                         b"\r\n\r\n")
            data = b'{"text": "' + b"a" * 280
        else:
            data = b""
        for byte in data:
            if stop.is_set():
                return
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
        answer = sock.recv(4096)
        results.append((kind, answer.split(b"\r\n", 1)[0]))
    except OSError as e:
        results.append((kind, type(e).__name__))
    finally:
        sock.close()


def test_clients_that_never_close_do_not_stall_the_worker(tmp_path, tiny_model_dir):
    """A finished 'Connection: close' answer waits a moment for the client's own close; six clients that never
    close must not hold up the seventh."""
    with gunicorn(tmp_path, {"MODEL_DIR": str(tiny_model_dir)}) as server:
        holders = []
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            holders.append(sock)
        try:
            time.sleep(0.3)
            started = time.monotonic()
            assert server.request("GET", "/health", timeout=10)[0] == 200
            assert time.monotonic() - started < 1.0
            for sock in holders:  # each got its answer, then the server's close
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200")
        finally:
            for sock in holders:
                sock.close()


def test_fifty_slow_clients_do_not_starve_the_worker(tmp_path, tiny_model_dir):
    env = {"MODEL_DIR": str(tiny_model_dir), "QUEUE_SIZE": "2", "HEADER_TIMEOUT": "2", "BODY_TIMEOUT": "2",
           "WRITE_TIMEOUT": "2", "REQUEST_TIMEOUT": "15"}
    with gunicorn(tmp_path, env) as server:
        stop, results = threading.Event(), []
        kinds = ["headers"] * 15 + ["body"] * 15 + ["silent"] * 10 + ["no_read"] * 10
        clients = [threading.Thread(target=_slow_client, args=(server.port, kind, stop, results), daemon=True)
                   for kind in kinds]
        for client in clients:
            client.start()
        try:
            worst = 0.0
            for _ in range(16):  # 8 s of probes while the slow clients hold their connections
                started = time.monotonic()
                assert server.request("GET", "/health", timeout=5)[0] == 200
                worst = max(worst, time.monotonic() - started)
                time.sleep(0.5)
            status, _, _ = server.request("POST", "/tts", {"text": "Still served."}, timeout=10)
            assert status in (200, 503)
            assert worst < 1.0
            # once HEADER_TIMEOUT + BODY_TIMEOUT had passed the tricklers got a 408 (or, still sending, a reset)
            trickled = [answer for kind, answer in results if kind in ("headers", "body")]
            refused = ("BrokenPipeError", "ConnectionResetError")
            assert len(trickled) == 30 and all(a in refused or b"408" in a for a in trickled), results
            server.wait_for(lambda: ready_running(server) == 0, 25,
                            "the streams nobody reads to be dropped")
        finally:
            stop.set()
        assert "Traceback" not in server.log()
