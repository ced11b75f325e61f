"""The Wyoming front door (Home Assistant), spoken to with the real `wyoming` client library.

A real gunicorn serves HTTP and, with WYOMING_URI set, Wyoming from the same worker and model (tiny random
CosyVoice); one test starts the standalone `python -m cosyvoice_lite wyoming`. The event sequences are the ones
Home Assistant's wyoming integration sends (homeassistant/components/wyoming/tts.py). Every wait is bounded."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from conftest import ROOT, free_port, gunicorn

READ_TIMEOUT = 60.0  # per event: the tiny model is quick, but the 2 cores are shared
LONG_TEXT = ("The first sentence is here. The second one follows it. A third sentence makes it longer. "
             "Then a fourth. And a fifth to finish.")


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def read(client: AsyncTcpClient, timeout: float = READ_TIMEOUT) -> Event:
    event = await asyncio.wait_for(client.read_event(), timeout)
    assert event is not None, "the server closed the connection"
    return event


async def answer(client: AsyncTcpClient, until: str) -> list[Event]:
    """Events up to and including the first of type ``until`` (or an error)."""
    events = []
    while True:
        events.append(await read(client))
        if events[-1].type in (until, "error"):
            return events


def types(events: list[Event]) -> list[str]:
    """The sequence without the audio chunks (counted as one 'audio-chunk*' per run)."""
    out = []
    for e in events:
        if e.type == "audio-chunk":
            if out[-1:] != ["audio-chunk*"]:
                out.append("audio-chunk*")
        else:
            out.append(e.type)
    return out


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """HTTP and Wyoming from one gunicorn worker over one SynthesisService."""
    port = free_port()
    env = {"MODEL_DIR": str(tiny_model_dir), "BACKEND": "torch", "WYOMING_URI": f"tcp://127.0.0.1:{port}",
           "MAX_TEXT_CHARS": "600", "HEADER_TIMEOUT": "1", "BODY_TIMEOUT": "1", "MAX_BATCH": "4",
           "WYOMING_IDLE_TIMEOUT": "2"}
    with gunicorn(tmp_path_factory.mktemp("wyoming"), env) as srv:
        srv.wyoming_port = port
        wait_for_port(port, 30)
        yield srv


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def client(server) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", server.wyoming_port)


# ---- describe -------------------------------------------------------------------------------------------------

def test_describe_lists_every_speaker_as_a_voice_with_its_language_and_offers_streaming(server):
    async def go():
        async with client(server) as c:
            await c.write_event(Describe().event())
            return Info.from_event(await read(c))

    info = run(go())
    (program,) = info.tts
    assert program.name == "cosyvoice-lite" and program.installed and program.supports_synthesize_streaming
    voices = {v.name: v.languages for v in program.voices}
    assert voices == {"zh-female": ["zh"], "zh-male": ["zh"], "ja-male": ["ja"], "yue-female": ["yue"],
                      "en-female": ["en"], "en-male": ["en"], "ko-female": ["ko"]}
    assert {v.description for v in program.voices} >= {"中文女", "英文男"}  # the model's own ids answer too


# ---- Home Assistant's two sequences ---------------------------------------------------------------------------

def test_non_streaming_synthesize_is_answered_with_audio_start_chunks_and_stop_in_16_bit_mono_24khz(server):
    async def go():
        async with client(server) as c:
            await c.write_event(Synthesize(text="你好，世界。", voice=SynthesizeVoice(name="zh-male")).event())
            return await answer(c, "audio-stop")

    events = run(go())
    assert types(events) == ["audio-start", "audio-chunk*", "audio-stop"]
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (24000, 2, 1)
    chunks = [AudioChunk.from_event(e) for e in events if e.type == "audio-chunk"]
    assert all((c.rate, c.width, c.channels) == (24000, 2, 1) for c in chunks)
    assert all(0 < len(c.audio) <= 2048 and len(c.audio) % 2 == 0 for c in chunks)  # <= 1024 samples each
    assert "WYOMING synthesize status=200 speaker=zh-male" in server.log()


@pytest.mark.parametrize("deltas, rest, sentences", [
    # an LLM's deltas: cut inside words and characters, never on sentence ends
    (["你", "好，世", "界。"], ["今天天", "气很", "好！明天", "见"], 3),
    (["Hel", "lo the", "re. "], ["How a", "re you? Fi", "ne, tha", "nks"], 3),
])
def test_streaming_speaks_each_sentence_once_complete_and_ignores_the_compatibility_synthesize(
        server, deltas, rest, sentences):
    async def go():
        async with client(server) as c:
            await c.write_event(SynthesizeStart(voice=SynthesizeVoice(name="en-female")).event())
            for d in deltas:
                await c.write_event(SynthesizeChunk(text=d).event())
            # the first sentence is spoken before the rest of the text exists
            first = await read(c)
            for d in rest:
                await c.write_event(SynthesizeChunk(text=d).event())
            await c.write_event(Synthesize(text="".join(deltas + rest)).event())  # HA's copy for old servers
            await c.write_event(SynthesizeStop().event())
            return [first] + await answer(c, "synthesize-stopped")

    events = run(go())
    assert types(events) == ["audio-start", "audio-chunk*", "audio-stop"] * sentences + ["synthesize-stopped"]
    formats = {(e.data["rate"], e.data["width"], e.data["channels"]) for e in events if e.type == "audio-start"}
    assert formats == {(24000, 2, 1)}  # HA writes its WAV header from the first audio-start


def test_synthesize_stop_is_always_answered_and_a_stream_needs_no_voice(server):
    async def go():
        async with client(server) as c:
            await c.write_event(SynthesizeStop().event())  # no stream open
            alone = await answer(c, "synthesize-stopped")
            await c.write_event(SynthesizeStart().event())  # no voice (HA >= 2025.8)
            await c.write_event(SynthesizeChunk(text="Hi there").event())
            await c.write_event(SynthesizeStop().event())
            return alone, await answer(c, "synthesize-stopped")

    alone, stream = run(go())
    assert types(alone) == ["synthesize-stopped"]
    assert types(stream) == ["audio-start", "audio-chunk*", "audio-stop", "synthesize-stopped"]


def test_no_voice_speaks_with_the_default_speaker_and_a_voice_is_found_by_name_or_speaker(server):
    async def go():
        async with client(server) as c:
            await c.write_event(Synthesize(text="默认的声音。").event())
            await answer(c, "audio-stop")
            await c.write_event(Synthesize(text="Named by its id.", voice=SynthesizeVoice(name="英文男")).event())
            await answer(c, "audio-stop")
            await c.write_event(Event("synthesize", {"text": "By speaker.", "voice": {"speaker": "ja-male"}}))
            await answer(c, "audio-stop")

    run(go())
    log = server.log()
    for speaker, chars in (("zh-female", 6), ("en-male", 16), ("ja-male", 11)):
        assert f"status=200 speaker={speaker} chars={chars} " in log


def test_unknown_events_are_ignored(server):
    async def go():
        async with client(server) as c:
            await c.write_event(Event("some-future-event", {"x": 1}, payload=b"\0" * 10))
            await c.write_event(Describe().event())
            return await read(c)

    assert run(go()).type == "info"


# ---- errors ---------------------------------------------------------------------------------------------------

def test_refusals_are_error_events_and_the_connection_stays_usable(server):
    async def go():
        async with client(server) as c:
            errors = []
            for event in (Synthesize(text="Hello.", voice=SynthesizeVoice(name="nobody")).event(),
                          Synthesize(text="x" * 601).event(),
                          Synthesize(text="。。。！").event(),
                          Event("synthesize", {"text": 42})):
                await c.write_event(event)
                errors.append(Error.from_event(await read(c)))
            await c.write_event(Synthesize(text="Still here.").event())
            return errors, await answer(c, "audio-stop")

    errors, after = run(go())
    assert [e.code for e in errors] == ["unknown_voice", "text_too_long", "nothing_to_speak", "invalid_text"]
    assert "en-female" in errors[0].text and "600" in errors[1].text
    assert types(after) == ["audio-start", "audio-chunk*", "audio-stop"]


def test_a_malformed_frame_closes_that_connection_and_no_other(server):
    async def go():
        async with client(server) as bystander:
            for bad in (b"this is not json\n", b'{"type": "synthesize", "data_length": 5}\n{nope',
                        b'["a list"]\n', b'{"no_type": 1}\n'):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.wyoming_port)
                writer.write(bad)
                assert await asyncio.wait_for(reader.read(), 10) == b"", bad  # closed, nothing answered
                writer.close()
            await bystander.write_event(Describe().event())
            return await read(bystander)

    assert run(go()).type == "info"
    assert "wyoming connection" in server.log() and "is not valid JSON" in server.log()


@pytest.mark.parametrize("length", ["data_length", "payload_length"])
def test_an_oversized_length_is_refused_before_any_of_it_is_read(server, length):
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.wyoming_port)
        writer.write(json.dumps({"type": "synthesize", length: 2**40}).encode() + b"\n")
        started = time.monotonic()
        closed = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return closed, time.monotonic() - started

    closed, seconds = run(go())
    assert closed == b"" and seconds < 5
    assert f"'{length}' 1099511627776 is over the limit" in server.log()


def test_a_client_that_stalls_inside_a_frame_is_closed(server):
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.wyoming_port)
        writer.write(b'{"type": "descr')  # HEADER_TIMEOUT + BODY_TIMEOUT = 2 s for a whole frame
        closed = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return closed

    assert run(go()) == b""


def test_a_silent_client_is_closed_after_the_idle_timeout_but_not_while_its_stream_is_open(server):
    async def go():
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", server.wyoming_port)
        async with client(server) as streaming:
            await streaming.write_event(SynthesizeStart().event())
            started = time.monotonic()
            closed = await asyncio.wait_for(silent_reader.read(), 10)  # WYOMING_IDLE_TIMEOUT = 2 s
            waited = time.monotonic() - started
            await asyncio.sleep(1)  # the stream has been silent longer than the idle timeout by now
            await streaming.write_event(SynthesizeChunk(text="Still listening.").event())
            await streaming.write_event(SynthesizeStop().event())
            events = await answer(streaming, "synthesize-stopped")
        silent_writer.close()
        return closed, waited, events

    closed, waited, events = run(go())
    assert closed == b"" and 1 < waited < 6
    assert types(events) == ["audio-start", "audio-chunk*", "audio-stop", "synthesize-stopped"]


# ---- concurrency and cancellation ------------------------------------------------------------------------------

def test_two_clients_at_once_both_hear_their_first_audio_before_either_finishes(server):
    async def speak(text: str) -> tuple[float, float]:
        async with client(server) as c:
            await c.write_event(Synthesize(text=text).event())
            first = None
            while True:
                event = await read(c)
                if event.type == "audio-chunk" and first is None:
                    first = time.monotonic()
                if event.type in ("audio-stop", "error"):
                    assert event.type == "audio-stop"
                    return first, time.monotonic()

    async def go():
        return await asyncio.gather(speak(LONG_TEXT), speak(LONG_TEXT.replace("first", "opening")))

    (first_a, end_a), (first_b, end_b) = run(go())
    assert max(first_a, first_b) < min(end_a, end_b)


def test_a_client_that_leaves_mid_stream_stops_its_synthesis(server):
    before = server.metric('cosyvoice_requests_total{code="499",endpoint="wyoming"}')
    seen = len(server.log())

    async def go():
        async with client(server) as c:
            await c.write_event(SynthesizeStart().event())
            await c.write_event(SynthesizeChunk(text=LONG_TEXT * 3).event())
            while (await read(c)).type != "audio-chunk":
                pass
        # the connection is closed here, mid-stream, without synthesize-stop

    run(go())
    server.wait_for(lambda: server.metric('cosyvoice_requests_total{code="499",endpoint="wyoming"}') > before,
                    20, "the abandoned synthesis to be counted as client_gone")
    server.wait_for(lambda: server.metric("cosyvoice_in_progress") == 0, 20, "the engine to stop its work")
    # of the stream's 13 sentences, only the one being spoken and the next (synthesised ahead) were started,
    # and both were cut short
    lines = [line for line in server.log()[seen:].splitlines() if "WYOMING stream" in line]
    assert 1 <= len(lines) <= 2 and all("outcome=client_gone" in line for line in lines), lines


# ---- the standalone server and settings -------------------------------------------------------------------------

def test_python_m_cosyvoice_lite_wyoming_serves_alone(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "MODEL_DIR": str(tiny_model_dir), "BACKEND": "torch", "TORCH_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "wyoming.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "cosyvoice_lite", "wyoming", "--uri",
                                 f"tcp://127.0.0.1:{port}"], cwd=ROOT, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 60, proc)

        async def go():
            async with AsyncTcpClient("127.0.0.1", port) as c:
                await c.write_event(Synthesize(text="独自一人。").event())
                return await answer(c, "audio-stop")

        assert types(run(go())) == ["audio-start", "audio-chunk*", "audio-stop"]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, log_path.read_text()


def test_wyoming_binds_to_localhost_when_an_api_key_is_set_unless_told_otherwise():
    from cosyvoice_lite.settings import Settings

    assert Settings.from_env(environ={}).wyoming_address() == ("0.0.0.0", 10200)
    assert Settings.from_env(environ={"API_KEY": "k"}).wyoming_address() == ("127.0.0.1", 10200)
    assert Settings.from_env(environ={"API_KEY": "k", "WYOMING_URI": "on"}).wyoming_address() == ("127.0.0.1", 10200)
    told = Settings.from_env(environ={"API_KEY": "k", "WYOMING_URI": "tcp://0.0.0.0:10300"})
    assert told.wyoming_address() == ("0.0.0.0", 10300)
    with pytest.raises(ValueError, match="WYOMING_URI"):
        Settings.from_env(environ={"WYOMING_URI": "http://x:1"})


def test_zeroconf_without_the_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from cosyvoice_lite.settings import Settings
    from cosyvoice_lite.wyoming.server import WyomingServer, ZeroconfMissing

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "zeroconf" else real(name, *a))

    # only what the constructor reads before the check
    service = SimpleNamespace(settings=Settings.from_env(environ={}), voices=SimpleNamespace(voices=[]),
                              engine=SimpleNamespace(name="piper", description=""))
    with pytest.raises(ZeroconfMissing, match="pip install zeroconf"):
        WyomingServer(service, "127.0.0.1", 0, zeroconf_name="kitchen")


def test_saved_voices_are_described_by_their_id_with_their_language():
    from cosyvoice_lite.voices import Voice
    from cosyvoice_lite.wyoming import describe

    service = SimpleNamespace(
        engine=SimpleNamespace(name="cosyvoice", description="CosyVoice-300M"),
        voices=SimpleNamespace(voices=[Voice("中文女", "zh-female", "zh")]),
        saved_voices=lambda: [{"id": "voice_0123abcd", "name": "Grandma", "language": "yue"}])
    voices = [(v.name, v.description, v.languages) for v in describe(service).tts[0].voices]
    assert voices == [("zh-female", "中文女", ["zh"]), ("voice_0123abcd", "Grandma (saved voice)", ["yue"])]


# ---- the base model: no speaker of its own -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_server(base_engine, tmp_path_factory):
    """Wyoming over a base model (CosyVoice-300M's layout: no spk2info.pt), served in this process over one
    SynthesisService (as `cosyvoice-lite wyoming` does), on a loop the fixture stops."""
    from cosyvoice_lite.service import SynthesisService
    from cosyvoice_lite.settings import Settings
    from cosyvoice_lite.wyoming.server import WyomingServer

    service = SynthesisService(Settings.from_env({"cache_dir": str(tmp_path_factory.mktemp("base"))}), base_engine)
    service.admission.ensure_started()
    assert service.admission.wait_ready(300) and not service.admission.failure
    server = WyomingServer(service, "127.0.0.1", 0)
    server.wyoming_port = server.port
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="wyoming-test", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.serve_forever(), loop)
    yield server

    async def shut_down():  # cancel the server and its connections, and let them finish, before the loop stops
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(shut_down(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    service.close()


@pytest.fixture(scope="module")
def base_voice(base_server) -> str:
    """A voice saved on the base model's server, made from a golden-modes clip and its transcript."""
    from golden_data import GOLDEN_MODES

    prompts = GOLDEN_MODES / "prompts"
    name, info = next(iter(json.loads((prompts / "prompts.json").read_text()).items()))
    return base_server.service.create_voice((prompts / name).read_bytes(), info["text"], "reader")["id"]


def test_on_a_base_model_describe_lists_the_saved_voices_only(base_server, base_voice):
    async def go():
        async with client(base_server) as c:
            await c.write_event(Describe().event())
            return Info.from_event(await read(c))

    (program,) = run(go()).tts
    assert [(v.name, v.description) for v in program.voices] == [(base_voice, "reader (saved voice)")]


def test_on_a_base_model_a_synthesis_without_a_voice_is_an_error_event_and_a_saved_voice_speaks(base_server,
                                                                                                base_voice):
    async def go():
        async with client(base_server) as c:
            await c.write_event(Synthesize(text="Hello.").event())
            refused = Error.from_event(await read(c))
            await c.write_event(SynthesizeStart().event())
            stream_refused = Error.from_event(await read(c))
            await c.write_event(SynthesizeChunk(text="Not spoken. ").event())
            await c.write_event(SynthesizeStop().event())
            stopped = await answer(c, "synthesize-stopped")
            await c.write_event(Synthesize(text="Hello there.", voice=SynthesizeVoice(name=base_voice)).event())
            return refused, stream_refused, stopped, await answer(c, "audio-stop")

    refused, stream_refused, stopped, spoken = run(go())
    assert refused.code == stream_refused.code == "speaker_required"
    assert "cosyvoice-300m" in refused.text and "POST /v1/audio/voices" in refused.text
    assert types(stopped) == ["synthesize-stopped"]  # the stream without a voice spoke nothing
    assert types(spoken) == ["audio-start", "audio-chunk*", "audio-stop"]


# ---- sentences out of deltas -----------------------------------------------------------------------------------

def test_deltas_are_cut_into_sentences_at_their_ends_only():
    from cosyvoice_lite.wyoming.sentences import SentenceCutter

    cutter = SentenceCutter()
    out = []
    for delta in ["Pi is 3.", "14 tod", "ay! She said \"", "go.\" Then", "你好", "世界。今", "天很好！」再", "见"]:
        out += cutter.feed(delta)
    assert out == ["Pi is 3.14 today!", ' She said "go."', " Then你好世界。", "今天很好！」"]
    assert cutter.finish() == ["再见"]
    assert SentenceCutter().feed("x" * 1000) == ["x" * 400, "x" * 400]  # no end in sight: bounded anyway
