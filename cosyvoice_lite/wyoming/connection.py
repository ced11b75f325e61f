"""One Wyoming connection: events in, audio out, over the synthesis service.

The event loop never synthesises: each synthesis (a whole ``synthesize``, or one sentence of a stream) is a Job on
a thread of its own that hands its chunks back to the loop, so a slow synthesis holds up no other connection and
the engine's scheduler batches the syntheses of several connections side by side. Answers leave in the order they
are due (one outbox per connection); a stream's next sentence is synthesised while the current one is being sent.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
import uuid

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import Describe
from wyoming.ping import Ping, Pong
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from .. import audio
from ..cancel import CLIENT_GONE
from ..frontend.rules import is_speakable
from ..service import EngineFailure, ServiceError, SynthesisRequest, clean_text
from .framing import FrameError, read_frame
from .sentences import SentenceCutter

log = logging.getLogger("cosyvoice_lite")
request_log = logging.getLogger("cosyvoice_lite.request")

RATE, WIDTH, CHANNELS = audio.SAMPLE_RATE, 2, 1   # one format for every answer of a connection (HA's WAV header)
SAMPLES_PER_CHUNK = 1024                          # as wyoming-piper sends them
DEPTH = 2            # syntheses one connection runs at once: the sentence being sent and the next one
MAX_OUTBOX = 32      # answers owed before the connection stops reading (a client that sends and never reads)
DONE = object()      # a Job's last item


class Refused(Exception):
    """What the connection answers with an error event before any synthesis (unknown voice, text too long...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Job:
    """One synthesis for the connection, on its own thread: the service blocks while the engine works."""

    def __init__(self, conn: "Connection", text: str, voice, kind: str):
        self.conn, self.text, self.voice, self.kind = conn, text, voice, kind
        self.id = f"{conn.id}-{next(conn.jobs)}"
        self.items: asyncio.Queue = asyncio.Queue()  # chunks, then DONE or a ServiceError
        self.started = False
        self.heard = False           # its first chunk (or its end) has reached the loop
        self.gone = False            # the client left: the service's client_gone probe says so
        self.synthesis = None

    def start(self) -> None:
        self.started = True
        threading.Thread(target=self._run, name=f"wyoming-{self.id}", daemon=True).start()

    def cancel(self) -> None:
        """The client left: stop the engine's work now (the token is thread-safe; the probe would notice too)."""
        self.gone = True
        synthesis = self.synthesis
        if synthesis is not None:
            synthesis.cancel.set(CLIENT_GONE)

    def _put(self, item) -> None:
        try:
            self.conn.loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the loop is closed (the server stopped): nobody is listening
            self.cancel()

    def _deliver(self, item) -> None:  # on the loop
        self.items.put_nowait(item)
        if not self.heard:
            self.heard = True
            self.conn._start_jobs()  # the next sentence may start now

    def _run(self) -> None:
        service, arrived = self.conn.service, time.monotonic()
        request = SynthesisRequest(self.text, self.voice, format="pcm", stream=True, id=self.id)
        status, error, synthesis = 200, "-", None
        try:
            synthesis = self.synthesis = service.start(request, client_gone=lambda: self.gone, arrived=arrived)
            if self.gone:
                synthesis.cancel.set(CLIENT_GONE)
            for chunk in synthesis:
                self._put(chunk)
            self._put(DONE)
        except ServiceError as e:
            status, error = e.status, e.code
            self._put(e)
        except Exception:  # never leave the client waiting without an answer
            log.exception("wyoming synthesis failed (request %s)", self.id)
            status, error = 500, "synthesis_failed"
            self._put(EngineFailure(f"synthesis failed (request id {self.id})"))
        finally:
            if synthesis is not None:
                synthesis.close()
            self._record(synthesis, status, error, time.monotonic() - arrived)

    def _record(self, s, status: int, error: str, seconds: float) -> None:
        """The request's metrics (label "wyoming") and its log line, as HTTP requests have them."""
        audio_s = s.audio_seconds if s else 0.0
        synth_s = s.synthesis_seconds() if s else None
        self.conn.service.metrics.observe_request("wyoming", status, seconds if s else None, chars=len(self.text),
                                                  audio_seconds=audio_s, synth_seconds=synth_s or 0.0)
        first = f"{s.first_audio:.3f}" if s and s.first_audio is not None else "-"
        outcome = s.outcome if s else error
        if status == 499:
            outcome = "client_gone"
        request_log.info("request id=%s WYOMING %s status=%d speaker=%s chars=%d audio_s=%.2f synth_s=%s "
                         "first_audio_s=%s total_s=%.3f cache=%s outcome=%s error=%s", self.id, self.kind, status,
                         self.voice.name, len(self.text), audio_s, "-" if synth_s is None else f"{synth_s:.2f}",
                         first, seconds, s.cache_status if s else "-", outcome, error)


class Stream:
    """An open synthesize-start ... synthesize-stop."""

    def __init__(self, voice):
        self.voice = voice          # None: refused at the start; the text is dropped, the stop still answered
        self.cutter = SentenceCutter()
        self.chars = 0


class Connection:
    def __init__(self, server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server, self.service, self.settings = server, server.service, server.service.settings
        self.reader, self.writer = reader, writer
        self.loop = asyncio.get_running_loop()
        self.id = "wy" + uuid.uuid4().hex[:8]  # unique across gunicorn workers too
        self.jobs = itertools.count(1)
        self.outbox: collections.deque = collections.deque()  # Events and Jobs, in the order they are answered
        self.wake = asyncio.Event()       # something to send
        self.room = asyncio.Event()       # the outbox shrank, or the sender gave up
        self.dropped = False              # the sender gave up on the client
        self.stream: Stream | None = None

    # ---- reading ------------------------------------------------------------------------------------------
    async def serve(self) -> None:
        sender = asyncio.create_task(self._send_all())
        peer = self.writer.get_extra_info("peername")
        try:
            while True:
                while len(self.outbox) >= MAX_OUTBOX and not self.dropped:  # backpressure: read no more
                    self.room.clear()
                    await self.room.wait()
                if self.dropped:
                    break
                # a connection that waits for nothing may stay silent for WYOMING_IDLE_TIMEOUT; one that is owed
                # audio or has a stream open, as long as a request may last
                busy = self.stream is not None or self.outbox
                idle = self.settings.request_timeout if busy else self.settings.wyoming_idle_timeout
                event = await read_frame(self.reader, self.server.limits, idle)
                if event is None:
                    break
                await self._handle(event)
        except FrameError as e:
            log.warning("wyoming connection %s from %s closed: %s", self.id, peer, e)
        except asyncio.TimeoutError:
            log.info("wyoming connection %s from %s closed: silent or slow client", self.id, peer)
        except (ConnectionError, OSError):
            pass
        finally:
            for item in self.outbox:  # whatever is still owed is cancelled: nobody will hear it
                if isinstance(item, Job):
                    item.cancel()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            self.writer.close()

    async def _handle(self, event: Event) -> None:
        kind = event.type
        try:
            if Describe.is_type(kind):  # saved voices are read from their store: off the loop
                self._answer((await asyncio.to_thread(self.server.describe)).event())
            elif Ping.is_type(kind):
                self._answer(Pong(text=Ping.from_event(event).text).event())
            elif SynthesizeStart.is_type(kind):
                await self._stream_start(event.data)
            elif SynthesizeChunk.is_type(kind):
                self._stream_chunk(event.data)
            elif SynthesizeStop.is_type(kind):
                self._stream_stop()
            elif Synthesize.is_type(kind):
                if self.stream is None:  # inside a stream it repeats the whole text for older servers: ignored
                    await self._synthesize(event.data)
            else:  # HA >= 2025.8 expects unknown events to be ignored
                log.debug("wyoming connection %s: ignored event %r", self.id, kind[:64])
        except Refused as e:
            self._answer(Error(text=e.message, code=e.code).event())
        except ServiceError as e:  # e.g. the voice store is unavailable
            self._answer(Error(text=e.message, code=e.code).event())

    async def _synthesize(self, data: dict) -> None:
        text = self._text(data.get("text"))
        self._queue(Job(self, text, await self._voice(data.get("voice")), "synthesize"))

    async def _stream_start(self, data: dict) -> None:
        if self.stream is not None:
            return  # one stream at a time; a repeated start changes nothing
        self.stream = Stream(None)
        self.stream.voice = await self._voice(data.get("voice"))  # no voice (allowed since HA 2025.8): default

    def _stream_chunk(self, data: dict) -> None:
        stream = self.stream
        if stream is None or stream.voice is None:
            return
        delta = data.get("text")
        if not isinstance(delta, str):
            raise Refused("invalid_text", "'text' must be a string")
        stream.chars += len(delta)
        if stream.chars > self.settings.max_text_chars:
            stream.voice = None  # the rest of this stream is dropped; the sentences already queued are spoken
            raise Refused("text_too_long", f"the streamed text passed {self.settings.max_text_chars} characters "
                          "(MAX_TEXT_CHARS); the rest of it is not spoken")
        for sentence in stream.cutter.feed(delta):
            self._sentence(sentence, stream.voice)

    def _stream_stop(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None and stream.voice is not None:
            for sentence in stream.cutter.finish():
                self._sentence(sentence, stream.voice)
        self._answer(SynthesizeStopped().event())  # always, even without a stream (HA waits for it)

    def _sentence(self, sentence: str, voice) -> None:
        sentence = clean_text(sentence)
        if is_speakable(sentence):  # a lone quote or dash between sentences is not an error
            self._queue(Job(self, sentence, voice, "stream"))

    async def _voice(self, wanted):
        """HA sends voice {name, speaker}; other clients may send a language alone. No voice: the default."""
        voices = self.service.voices
        if not isinstance(wanted, dict) or not any(wanted.get(k) for k in ("name", "speaker", "language")):
            return self.service.default_voice("voice")  # none on a base model: an error event
        names = [n for n in (wanted.get("name"), wanted.get("speaker")) if isinstance(n, str) and n]
        for name in names:
            voice = voices.find(name)  # the engine's own, in memory
            if voice is None and name.startswith("voice_"):  # a saved voice: read from its store, off the loop
                voice = await asyncio.to_thread(self.service.find_voice, name)
            if voice is not None:
                return voice
        language = wanted.get("language")
        if not names and isinstance(language, str):
            base = language.replace("_", "-").split("-")[0].lower()
            return next((v for v in voices.voices if v.language == base), None) or self.service.default_voice("voice")
        raise Refused("unknown_voice",
                      f"unknown voice {str(names[0] if names else wanted)[:80]!r}; {self.service.voice_choices()}")

    def _text(self, text) -> str:
        """The checks HTTP makes of a text (serve/schema.py), in Wyoming's words."""
        if not isinstance(text, str):
            raise Refused("invalid_text", "'text' must be a string")
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise Refused("text_too_long", f"the text has {len(text)} characters; the limit is {limit}")
        text = clean_text(text)
        if not text.strip():
            raise Refused("nothing_to_speak", "the text is empty")
        problem = self.service.engine.unreadable(text)
        if problem:
            raise Refused("unreadable_text", problem)
        return text

    # ---- writing ------------------------------------------------------------------------------------------
    def _answer(self, event: Event) -> None:
        self.outbox.append(event)
        self.wake.set()

    def _queue(self, job: Job) -> None:
        self.outbox.append(job)
        self._start_jobs()
        self.wake.set()

    def _start_jobs(self) -> None:
        """Start the next syntheses: at most DEPTH at once, and each only once the one before it has given its first
        audio, so that a sentence synthesised ahead never delays the first audio of the one before it."""
        running, previous_heard = 0, True
        for item in self.outbox:
            if not isinstance(item, Job):
                continue
            if item.started:
                running, previous_heard = running + 1, item.heard
                continue
            if running >= DEPTH or not previous_heard:
                break
            item.start()
            running, previous_heard = running + 1, False

    async def _send_all(self) -> None:
        try:
            while True:
                while not self.outbox:
                    self.wake.clear()
                    await self.wake.wait()
                item = self.outbox[0]
                if isinstance(item, Job):
                    await self._send_job(item)
                else:
                    await self._write(item)
                self.outbox.popleft()
                self._start_jobs()
                self.room.set()
        except (asyncio.TimeoutError, ConnectionError, OSError):
            # a client that stopped reading, or is gone: drop it, which ends the reading side too
            log.info("wyoming connection %s dropped: the client does not read", self.id)
            self._drop()
        except Exception:
            log.exception("wyoming connection %s: sending failed", self.id)
            self._drop()

    def _drop(self) -> None:
        self.dropped = True
        self.room.set()
        self.writer.transport.abort()

    async def _send_job(self, job: Job) -> None:
        started = False
        while True:
            item = await job.items.get()
            if isinstance(item, ServiceError):
                if started:  # audio already out: end it well-formed, then say why it stopped
                    await self._write(AudioStop().event())
                await self._write(Error(text=item.message, code=item.code).event())
                return
            if not started:
                await self._write(AudioStart(RATE, WIDTH, CHANNELS).event())
                started = True
            if item is DONE:
                break
            pcm = audio.to_pcm16(item)
            step = SAMPLES_PER_CHUNK * WIDTH
            for i in range(0, len(pcm), step):
                await self._write(AudioChunk(RATE, WIDTH, CHANNELS, pcm[i:i + step]).event())
        await self._write(AudioStop().event())

    async def _write(self, event: Event) -> None:
        await asyncio.wait_for(async_write_event(event, self.writer), self.settings.write_timeout)

