"""The sentence-level audio cache: real diskcache directories, a real redis-server, real gunicorn workers."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import diskcache
import numpy as np
import pytest
from conftest import ROOT, free_port, gunicorn, parse_metrics, require_program

from cosyvoice_lite import audio
from cosyvoice_lite.cache import AudioCache, DiskBackend, dequantize, quantize
from cosyvoice_lite.cache.codec import CorruptEntry, pack, unpack


def sentence(topic: str) -> str:
    """A sentence long enough (62 tokens) to be a segment of its own."""
    return (f"This sentence is about {topic}, and it is long enough to stand on its own as one segment of the text, "
            f"since it has many words in it and goes on for quite a while before it finally ends, so that the "
            f"splitter never packs it together with the sentence before it or the one after it.")


A, B, C = sentence("apples"), sentence("rivers"), sentence("mountains")
SHORT = "A short sentence to speak."


def pcm_of_wav(body: bytes) -> bytes:
    assert body[:4] == b"RIFF"
    return body[44:]


def post(client, text, path="/tts", **fields):
    key = "input" if path != "/tts" else "text"
    body = {key: text, **({"response_format": "wav"} if path != "/tts" else {}), **fields}
    r = client.post(path, json=body)
    assert r.status_code == 200, r.data[:300]
    return r.headers.get("X-Cache"), r.data


@pytest.fixture
def disk_app(make_app, cosyvoice_engine, tmp_path):
    return make_app(cosyvoice_engine, cache="disk", cache_dir=str(tmp_path / "cache"))


# ---- entries ------------------------------------------------------------------------------------------------

def test_every_16_bit_sample_survives_the_cache_and_encodes_to_the_same_bytes():
    q = np.arange(-32768, 32768, dtype=np.int16)
    assert np.array_equal(unpack(pack(q)), q)
    assert audio.to_pcm16(dequantize(q)) == np.clip(q, -32767, 32767).astype("<i2").tobytes()
    x = np.linspace(-1.2, 1.2, 100001, dtype=np.float32)
    assert audio.to_pcm16(dequantize(quantize(x))) == audio.to_pcm16(x)


@pytest.mark.parametrize("damage", ["truncated", "extended", "flipped byte", "empty", "foreign"])
def test_a_damaged_entry_is_recognised(damage):
    blob = pack(np.arange(1000, dtype=np.int16))
    bad = {"truncated": blob[:-2], "extended": blob + b"\0\0", "empty": b"", "foreign": b"RIFF" + blob[4:],
           "flipped byte": blob[:30] + bytes([blob[30] ^ 1]) + blob[31:]}[damage]
    with pytest.raises(CorruptEntry):
        unpack(bad)


# ---- one server, disk -----------------------------------------------------------------------------------------

def test_second_request_is_a_hit_with_identical_bytes_and_no_model_work(disk_app, cosyvoice_engine):
    client = disk_app.test_client()
    assert post(client, SHORT)[0] == "miss"
    events = []
    cosyvoice_engine.scheduler.trace = lambda event, seconds, **info: events.append(event)
    try:
        status, wav = post(client, SHORT)
    finally:
        cosyvoice_engine.scheduler.trace = None
    assert status == "hit" and events == []
    assert post(client, SHORT, cache=False)[0] == "off"
    metrics = parse_metrics(client.get("/metrics").data.decode())
    assert metrics["cosyvoice_cache_hits_total"] == 1 and metrics["cosyvoice_cache_misses_total"] == 1
    assert metrics["cosyvoice_cache_stored_bytes_total"] > len(pcm_of_wav(wav))
    assert metrics["cosyvoice_cache_bytes"] > 0


def test_every_format_and_streaming_come_from_the_same_entry(disk_app):
    client = disk_app.test_client()
    status, wav = post(client, SHORT)
    assert status == "miss"
    pcm = pcm_of_wav(wav)
    streamed = client.post("/tts", json={"text": SHORT, "stream": True})
    assert streamed.headers["X-Cache"] == "hit" and pcm_of_wav(streamed.data) == pcm
    assert post(client, SHORT, format="pcm") == ("hit", pcm)
    for fmt in ("mp3", "flac"):  # (opus: libsndfile gives each Ogg stream a random serial number)
        assert post(client, SHORT, format=fmt) == post(client, SHORT, format=fmt)
    assert post(client, SHORT, format="mp3", stream=True)[1] == post(client, SHORT, format="mp3")[1]
    openai = client.post("/v1/audio/speech", json={"input": SHORT, "voice": "zh-female", "response_format": "pcm"})
    assert openai.headers["X-Cache"] == "hit" and openai.data == pcm


def test_only_the_segments_not_cached_are_synthesised_in_order(disk_app):
    # A later segment starts with a space (the frontend keeps it), so its tokens differ from the sentence alone
    client = disk_app.test_client()
    a = pcm_of_wav(post(client, A)[1])
    status, abc = post(client, f"{A} {B} {C}", format="pcm")
    assert status == "partial" and abc.startswith(a)
    status, ab = post(client, f"{A} {B}", format="pcm")  # " B" was stored as it was synthesised, after A's audio
    assert status == "hit" and ab.startswith(a) and abc.startswith(ab) and len(abc) > len(ab)
    assert post(client, f"{A} {B} {C}", format="pcm") == ("hit", abc)
    status, cb = post(client, f"{C} {B}", format="pcm")
    assert status == "partial" and cb.endswith(ab[len(a):])


def wav_bytes(pcm: bytes) -> bytes:
    return audio.wav_header(len(pcm) // 2) + pcm


def test_cache_false_neither_reads_nor_writes(disk_app):
    client = disk_app.test_client()
    assert post(client, SHORT, cache=False)[0] == "off"
    assert post(client, SHORT, path="/v1/audio/speech", cache=False)[0] == "off"
    assert post(client, SHORT)[0] == "miss"
    assert post(client, SHORT, path="/v1/audio/speech")[0] == "hit"
    r = client.post("/tts", json={"text": SHORT, "cache": "no"})
    assert r.status_code == 400 and r.json["error"]["param"] == "cache"
    spec = client.get("/openapi.json").json["components"]["schemas"]
    for request in ("TtsRequest", "SpeechRequest"):
        assert {"type": "boolean"} in spec[request]["properties"]["cache"]["anyOf"]


def test_speaker_speed_mode_and_model_never_share_entries(make_app, cosyvoice_engine, tiny_model_dir, tmp_path):
    from cosyvoice_lite.engines.cosyvoice import CosyVoiceEngine

    other_model = tmp_path / "tiny-seed-1"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(other_model), "--seed", "1"],
                   check=True, capture_output=True, timeout=300)
    settings = {"cache": "disk", "cache_dir": str(tmp_path / "cache")}
    client = make_app(cosyvoice_engine, **settings).test_client()
    assert post(client, SHORT, speaker="zh-female")[0] == "miss"
    assert post(client, SHORT, speaker="zh-female")[0] == "hit"
    assert post(client, SHORT, speaker="zh-male")[0] == "miss"
    assert post(client, SHORT, speaker="zh-female", speed=1.25)[0] == "miss"
    for engine in (CosyVoiceEngine(tiny_model_dir, mode="fast"), CosyVoiceEngine(other_model)):
        other = make_app(engine, **settings).test_client()
        assert post(other, SHORT, speaker="zh-female")[0] == "miss"
        assert post(other, SHORT, speaker="zh-female")[0] == "hit"
    assert post(client, SHORT, speaker="zh-female", speed=1.25)[0] == "hit"


def test_a_corrupt_entry_is_dropped_and_synthesised_again(disk_app, tmp_path, caplog):
    client = disk_app.test_client()
    _, first = post(client, SHORT)
    store = diskcache.Cache(str(tmp_path / "cache" / "audio"))
    (key,) = list(store)
    store.set(key, store.get(key)[:-100])  # a torn write: the header promises more samples
    with caplog.at_level(logging.WARNING, logger="cosyvoice_lite"):
        status, again = post(client, SHORT)
    assert status == "miss" and again[:4] == b"RIFF" and again != first
    (warning,) = [r.message for r in caplog.records if "corrupt" in r.message]
    assert warning.startswith("audio cache (disk) has a corrupt entry")
    assert unpack(store.get(key)).size * 2 == len(pcm_of_wav(again))  # replaced by an intact entry
    assert post(client, SHORT) == ("hit", again)
    assert parse_metrics(client.get("/metrics").data.decode())["cosyvoice_cache_corrupt_total"] == 1


def test_a_cache_database_that_is_not_one_falls_back_to_synthesis(make_app, cosyvoice_engine, tmp_path, caplog):
    audio_dir = tmp_path / "cache" / "audio"
    audio_dir.mkdir(parents=True)
    (audio_dir / "cache.db").write_bytes(b"not a database " * 1000)
    client = make_app(cosyvoice_engine, cache="disk", cache_dir=str(tmp_path / "cache")).test_client()
    with caplog.at_level(logging.WARNING, logger="cosyvoice_lite"):
        assert [post(client, SHORT)[0] for _ in range(2)] == ["miss", "miss"]
    assert len([r for r in caplog.records if r.message.startswith("audio cache (disk) read failed")]) == 1
    assert client.get("/ready").json["cache"]["state"] == "failing"


@pytest.mark.parametrize("env, problem", [({"CACHE": "memcached://x"}, "CACHE must be"),
                                          ({"CACHE_MAX_MB": "0"}, "CACHE_MAX_MB"),
                                          ({"CACHE_TTL": "-1"}, "CACHE_TTL")])
def test_bad_cache_settings_stop_the_start(env, problem):
    from cosyvoice_lite.settings import Settings

    with pytest.raises(ValueError, match=problem):
        Settings.from_env(environ=env)


def test_a_full_size_bound_evicts_the_least_recently_used(tmp_path):
    backend = DiskBackend(str(tmp_path / "audio"), max_bytes=600_000)
    counts = {}
    cache = AudioCache(backend, count=lambda name, n: counts.__setitem__(name, counts.get(name, 0) + n))
    pieces = {name: np.full(100_000, i, dtype=np.int16) for i, name in enumerate("abcdefgh")}  # 200 kB each
    for name, pcm in pieces.items():
        cache.store(name, pcm)
        cache.lookup([["a"]])  # 'a' stays recently used
    assert backend.stats()["bytes"] <= 600_000 + 200_100
    assert cache.lookup([["a"], ["h"], ["b"]])[2] is None
    assert np.array_equal(cache.lookup([["a"]])[0], pieces["a"])
    assert counts["evictions"] == 8 - backend.stats()["entries"]


# ---- faults of the disk under a real gunicorn ---------------------------------------------------------------

def request_log(server) -> list[tuple[int, str, str]]:
    """(pid, request id, cache) of every request line in the server log."""
    return [(int(m[1]), m[2], m[3]) for m in
            re.finditer(r"\[(\d+)\] INFO cosyvoice_lite\.request: request id=(\S+) .*? cache=(\S+)", server.log())]


def tts(server, text, rid="", **fields):
    status, headers, body = server.request("POST", "/tts", {"text": text, "speaker": "zh-female", **fields},
                                           headers={"X-Request-ID": rid} if rid else None, timeout=120)
    assert status == 200, body[:300]
    return headers.get("x-cache"), body


def model_env(tiny_model_dir, **env) -> dict:
    return {"MODEL_DIR": str(tiny_model_dir), "TORCH_THREADS": "1", **env}


def test_two_gunicorn_workers_share_hits_through_the_disk(tiny_model_dir, tmp_path):
    env = model_env(tiny_model_dir, WORKERS="2", CACHE="disk", CACHE_DIR=str(tmp_path / "cache"))
    with gunicorn(tmp_path, env, ready_timeout=180) as server:
        assert tts(server, SHORT, rid="first") == ("miss", tts(server, SHORT)[1])
        (writer,) = [pid for pid, rid, _ in request_log(server) if rid == "first"]
        for round_ in range(20):  # concurrent requests reach both workers
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda rid: tts(server, SHORT, rid=rid),
                                        [f"again-{round_}-{i}" for i in range(4)]))
            assert all(answer == answers[0] for answer in answers) and answers[0][0] == "hit"
            if {pid for pid, rid, cache in request_log(server) if rid.startswith("again")} - {writer}:
                break
        else:
            pytest.fail("no request reached the second worker")
        ready = server.request("GET", "/ready")[2].decode()
        assert '"backend":"disk"' in ready.replace(" ", "") and '"state":"ok"' in ready.replace(" ", "")


def as_root_without_permission_override() -> tuple[str, ...]:
    """root ignores file modes; setpriv drops that power so a read-only directory is read-only to the server."""
    if os.geteuid() != 0:
        return ()
    setpriv = require_program("setpriv", "apt-get install util-linux")
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search", "--")


def test_a_read_only_cache_directory_falls_back_to_synthesis_with_one_warning(tiny_model_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    cache_dir.chmod(0o555)
    env = model_env(tiny_model_dir, CACHE="disk", CACHE_DIR=str(cache_dir))
    try:
        with gunicorn(tmp_path, env, ready_timeout=180, prefix=as_root_without_permission_override()) as server:
            for _ in range(3):
                assert tts(server, SHORT)[0] == "miss"
            assert server.log().count("audio cache (disk) read failed") == 1
            assert b'"state":"failing"' in server.request("GET", "/ready")[2].replace(b" ", b"")
    finally:
        cache_dir.chmod(0o755)


def test_a_full_disk_falls_back_to_synthesis_with_one_warning(tiny_model_dir, tmp_path):
    # RLIMIT_FSIZE: no file of the server may grow past 500 kB (the cache's index fits, a segment's audio does not)
    env = model_env(tiny_model_dir, CACHE="disk", CACHE_DIR=str(tmp_path / "cache"))
    with gunicorn(tmp_path, env, ready_timeout=180, prefix=(require_program("prlimit", "apt-get install util-linux"), "--fsize=500000", "--")) as server:
        answers = [tts(server, f"{A} {B} {C}") for _ in range(3)]  # every answer is a 200 (tts checks it)
        assert answers[0][0] == "miss" and "File too large" in server.log()
        assert server.metric("cosyvoice_cache_errors_total") >= 1
        # one warning per incident: a sampled segment short enough to fit ends one, the next failure starts another
        events = re.findall(r"audio cache \(disk\) (write failed|works again)", server.log())
        assert events[0] == "write failed" and all(a != b for a, b in zip(events, events[1:])), events


# ---- Redis --------------------------------------------------------------------------------------------------

class RedisServer:
    """A real redis-server on a free loopback port, no persistence."""

    def __init__(self, executable: str, tmp_path):
        self.executable = executable
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.tmp_path = tmp_path
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.tmp_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError("redis-server did not start") from None
                time.sleep(0.05)

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(require_program("redis-server", "apt-get install redis-server"), tmp_path)
    server.start()
    yield server
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.kill()


def test_two_servers_share_hits_through_redis(tiny_model_dir, tmp_path, tmp_dirs, redis_server):
    env = model_env(tiny_model_dir, CACHE=redis_server.url, CACHE_TTL="60")
    with gunicorn(tmp_path / "one", env, ready_timeout=180) as one, \
            gunicorn(tmp_path / "two", env, ready_timeout=180) as two:
        status, first = tts(one, SHORT)
        assert status == "miss"
        assert tts(two, SHORT) == ("hit", first)
        assert tts(one, SHORT, speed=1.5)[0] == "miss"
        assert tts(two, SHORT, speed=1.5)[0] == "hit"
        assert two.metric("cosyvoice_cache_hits_total") == 2 and one.metric("cosyvoice_cache_misses_total") == 2
        import redis

        ttl = redis.Redis(port=redis_server.port).ttl(next(iter(redis.Redis(port=redis_server.port).keys())))
        assert 0 < ttl <= 60


@pytest.fixture
def tmp_dirs(tmp_path):  # one directory per gunicorn server
    for name in ("one", "two"):
        (tmp_path / name).mkdir()


def test_redis_killed_or_stalled_mid_test_still_answers(make_app, cosyvoice_engine, redis_server, caplog,
                                                        monkeypatch):
    import cosyvoice_lite.cache as cache_module

    monkeypatch.setattr(cache_module, "RETRY_AFTER", 1.0)
    client = make_app(cosyvoice_engine, cache=redis_server.url).test_client()
    assert post(client, SHORT)[0] == "miss"
    assert post(client, SHORT)[0] == "hit"
    with caplog.at_level(logging.INFO, logger="cosyvoice_lite"):
        redis_server.kill()
        assert [post(client, SHORT)[0] for _ in range(3)] == ["miss"] * 3
        time.sleep(1.1)
        assert post(client, SHORT)[0] == "miss"  # tried again, still down: no second warning
        warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING and "audio cache" in r.message]
        assert len(warnings) == 1 and "redis" in warnings[0]
        redis_server.start()  # empty again
        time.sleep(1.1)
        assert post(client, SHORT)[0] == "miss" and post(client, SHORT)[0] == "hit"
        assert any("works again" in r.message for r in caplog.records)

        os.kill(redis_server.proc.pid, signal.SIGSTOP)  # a Redis that accepts but never answers
        started = time.monotonic()
        assert post(client, SHORT)[0] == "miss"
        looked_up = time.monotonic() - started
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert looked_up < 60  # bounded: the socket timeout, then synthesis
    ready = client.get("/ready").json["cache"]
    assert ready["backend"] == "redis" and ready["url"] == redis_server.url


@pytest.mark.parametrize("url, shown", [("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
                                        ("rediss://app:secret@cache/1", "rediss://app:***@cache/1"),
                                        ("redis://cache:6379/0", "redis://cache:6379/0")])
def test_ready_never_shows_the_redis_password(url, shown):
    from cosyvoice_lite.cache import RedisBackend

    assert RedisBackend(url).describe()["url"] == shown
